"""
Speed of cpu_linear.linear (oneDNN) against F.linear (PyTorch's choice, MKL at precision "highest") on the
matrix shapes of a TerraMind `tiny` training step: 2048 tokens (batch 8 x 256) through the block layers, and
a few hundred target tokens through a 15360-way output head. Forward alone, and forward + backward (input and
weight gradients). For each, it prints ms, GFLOP/s and the relative error of the output against float64.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_linear.py
    flock /tmp/cpu.lock .venv/bin/python bench/bench_linear.py --threads 1

With --step it checks the route's verdict against what users run instead: cpu_linear's micro-benchmark
measured now (--verdicts times), next to whole pretrain.train_step calls (forward, backward, clip, AdamW)
with the route forced on and off (TERRAMIND_CPU_LINEAR=onednn / torch), the two taking turns step by step:
`smoke` on run_cpu.sh's batch (32 x (64 + 64) tokens, 64 px, mix masking) and `tiny` on
bench_pretrain.py's (8 x (256 + 256) tokens, 224 px, all2all masking).

    flock /tmp/cpu.lock .venv/bin/python bench/bench_linear.py --step
"""
import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_linear  # noqa: E402
import pretrain  # noqa: E402
from entries import ENTRIES, entry_kind  # noqa: E402
from masking import Masking  # noqa: E402
from modalities import MODALITIES  # noqa: E402
from terramind import TerraMind, TerraMindConfig  # noqa: E402

SHAPES = {  # name: (tokens, in features, out features)
    "qkv 192->576": (2048, 192, 576),
    "fc1 192->768": (2048, 192, 768),
    "fc2 768->192": (2048, 768, 192),
    "proj 192->192": (2048, 192, 192),
    "head 192->15360": (300, 192, 15360),
}


# Not bench_tokenizer.timed: importing that file imports terratorch where installed, which sets the matmul
# precision to "medium" and would take the oneDNN route away (see bench_terramind.py).
def timed(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


STEP_BATCHES = {  # size: (samples, input budget = target budget, grid, alphas)
    "smoke": (32, 64, 4, "mix"),        # run_cpu.sh's pretraining step
    "tiny": (8, 256, 14, "all2all"),    # bench_pretrain.py's
}


def step_batch(config: TerraMindConfig, samples: int, budget: int, alphas: str) -> dict:
    """A masked pretraining batch of random content for every entry of `config`."""
    g = torch.Generator().manual_seed(0)
    masking = Masking(config.inputs, config.targets, budget, budget, alphas, config.grid)
    side = 16 * config.grid
    masked = []
    for b in range(samples):
        sample = {"caption": torch.randint(6366, 30000, (30,), generator=g),
                  "coords": torch.randint(4204, 6366, (2,), generator=g)}
        for e in config.inputs:
            if entry_kind(e) == "pixels":
                sample[e] = torch.randn(MODALITIES[e].channels, side, side, generator=g)
            elif entry_kind(e) == "tokens":
                vocab = config.vocab_size(e)
                sample[e] = torch.randint(0, vocab, (config.grid, config.grid), generator=g)
        masked.append(masking(sample, np.random.default_rng([0, b])))
    return default_collate(masked)


def step_config(size: str) -> TerraMindConfig:
    """The model pretrain.py builds: every entry as input, every token entry as target."""
    base = TerraMindConfig.preset(size)
    targets = tuple(e for e in ENTRIES if entry_kind(e) != "pixels")
    return TerraMindConfig(**{**vars(base), "inputs": ENTRIES, "targets": targets})


def step_ratio(size: str, steps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median seconds per pretrain.train_step with the route off and on, and the median of the
    step-by-step ratios. The routes alternate, and which goes first alternates too."""
    samples, budget, grid, alphas = STEP_BATCHES[size]
    torch.manual_seed(0)
    config = step_config(size)
    model = TerraMind(config)
    batches = itertools.repeat(step_batch(config, samples, budget, alphas))
    groups = pretrain.param_groups(model, 0.05)
    opts = {route: torch.optim.AdamW(groups, lr=1e-4) for route in ("torch", "onednn")}
    times = {"torch": [], "onednn": []}
    for k in range(warmup + steps):
        order = ["torch", "onednn"] if k % 2 == 0 else ["onednn", "torch"]
        for route in order:
            os.environ[cpu_linear.ROUTE_ENV] = route
            start = time.perf_counter()
            pretrain.train_step(model, model, opts[route], batches, 1, 1,
                                torch.device("cpu"), None, 1.0)
            times[route].append(time.perf_counter() - start)
    off, on = times["torch"][warmup:], times["onednn"][warmup:]
    ratios = [a / b for a, b in zip(off, on)]
    return statistics.median(off), statistics.median(on), statistics.median(ratios)


def verdict_against_steps(args):
    """cpu_linear's micro-benchmark measured now, then whole training steps with the route on / off."""
    verdicts = [cpu_linear._measure() for _ in range(args.verdicts)]
    listed = ", ".join(f"{v:.2f}" for v in verdicts)
    print(f"micro-benchmark verdicts ({cpu_linear.MEASUREMENT}): {listed} "
          f"(route taken above {cpu_linear.MIN_SPEEDUP})")
    for size in STEP_BATCHES:
        off, on, ratio = step_ratio(size, args.steps)
        print(f"{size:5s} pretrain.train_step: torch {1e3 * off:7.1f} ms | oneDNN {1e3 * on:7.1f} ms | "
              f"step ratio {ratio:.2f}x (median of {args.steps})")
    os.environ.pop(cpu_linear.ROUTE_ENV)


def main():
    p = argparse.ArgumentParser(description="cpu_linear (oneDNN) against F.linear on TerraMind tiny shapes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per case (median reported)")
    p.add_argument("--step", action="store_true",
                   help="the route's verdict against whole training steps with the route on and off")
    p.add_argument("--steps", type=int, default=10, help="--step: timed steps per route and size")
    p.add_argument("--verdicts", type=int, default=3, help="--step: micro-benchmark verdicts to measure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.step:
        verdict_against_steps(args)
        return
    print(f"torch {torch.__version__} | {args.threads} threads | CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} | matmul precision {torch.get_float32_matmul_precision()} | "
          f"oneDNN route {'available' if cpu_linear._INNER_PRODUCT is not None else 'NOT available'}")
    verdict = "taken" if cpu_linear.speedup() > cpu_linear.MIN_SPEEDUP else "not taken"
    print(f"cpu_linear's first-use micro-benchmark: oneDNN {cpu_linear.speedup():.2f}x F.linear -> route {verdict}; "
          f"timed below whatever the verdict")
    cpu_linear._SPEEDUP = float("inf")
    print(f"{'shape':16s} {'pass':9s} {'F.linear':>18s} {'cpu_linear':>18s} {'speed-up':>8s} "
          f"{'rel. err F / ours':>20s}")
    g = torch.Generator().manual_seed(0)
    for name, (n, i, o) in SHAPES.items():
        x = torch.randn(n, i, generator=g, requires_grad=True)
        w = (torch.randn(o, i, generator=g) / i ** 0.5).requires_grad_()
        grad = torch.randn(n, o, generator=g)
        ref = F.linear(x.double(), w.double())
        for kind, flops in (("forward", 2 * n * i * o), ("fwd+bwd", 6 * n * i * o)):
            row, errs = [], []
            for fn in (F.linear, cpu_linear.linear):
                if kind == "forward":
                    def run(fn=fn):
                        with torch.no_grad():
                            return fn(x, w)
                else:
                    def run(fn=fn):
                        return torch.autograd.grad(fn(x, w), (x, w), grad)
                s = timed(run, args.reps)
                row.append(s)
                y = run() if kind == "forward" else fn(x, w).detach()
                errs.append(((y.double() - ref).norm() / ref.norm()).item())
            cells = [f"{1e3 * s:7.2f} ms {flops / s / 1e9:4.0f} GF/s" for s in row]
            print(f"{name:16s} {kind:9s} {cells[0]:>18s} {cells[1]:>18s} {row[0] / row[1]:7.2f}x "
                  f"{errs[0]:9.1e} / {errs[1]:7.1e}")


if __name__ == "__main__":
    main()
