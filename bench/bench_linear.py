"""
Speed of cpu_linear.linear (oneDNN) against F.linear (PyTorch's choice, MKL at precision "highest") on the
matrix shapes of a TerraMind `tiny` training step: 2048 tokens (batch 8 x 256) through the block layers, and
a few hundred target tokens through a 15360-way output head. Forward alone, and forward + backward (input and
weight gradients). For each, it prints ms, GFLOP/s and the relative error of the output against float64.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_linear.py
    flock /tmp/cpu.lock .venv/bin/python bench/bench_linear.py --threads 1
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_linear  # noqa: E402

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


def main():
    p = argparse.ArgumentParser(description="cpu_linear (oneDNN) against F.linear on TerraMind tiny shapes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per case (median reported)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
