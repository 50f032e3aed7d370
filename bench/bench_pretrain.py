"""
Pretraining speed on the CPU: FLOPs per token per size, the training step of pretrain.py for `tiny` next to the
official implementation's rate, and the data path's samples/s next to the model's.

  1. FLOPs per token (terramind.flops_per_token: forward + backward, 256 input + 256 target tokens at 224 px;
     smoke at 64 + 64 on 64 px tiles) and parameter counts, per preset.
  2. tiny, one pretrain.train_step (forward, backward, gradient clip, AdamW) on the batch bench_terramind.py
     uses (8 samples x (256 + 256) tokens at 224 px, all2all masking, fp32), alternating with the plain model
     step bench_terramind.py times (forward, backward, AdamW): median ms/step and tokens/s of both. With
     --official PYTHON (the oracle venv's python), bench/bench_terramind.py runs in that interpreter right after
     and its official and ours lines are printed beside ours.
  3. On a TerraMesh-layout world with token shards (64 px synthetic tiles): samples/s of pretrain.py's loader
     alone (PretrainData + StepBatches + DataLoader, 0, 1 and 2 workers) and of the model alone (train_step on
     batches already in memory), for smoke and tiny.

    flock /tmp/cpu.lock python bench/bench_pretrain.py --data data/synth --tokens tokens/ --official ~/oracle/bin/python
"""
import argparse
import itertools
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pretrain  # noqa: E402
from entries import ENTRIES, OFFICIAL_INPUTS, OFFICIAL_TARGETS, entry_kind  # noqa: E402
from masking import Masking  # noqa: E402
from modalities import MODALITIES  # noqa: E402
from pretrain_data import PretrainData, StepBatches, available_entries  # noqa: E402
from terramind import PRESETS, TerraMind, TerraMindConfig, flops_per_token  # noqa: E402
from text_tokenizer import OFFICIAL_VOCAB, WordPieceTokenizer  # noqa: E402


def flops_table():
    print("== FLOPs per token (training: forward + backward), parameters; every entry, as pretrain.py builds it")
    for size in PRESETS:
        config = replace(TerraMindConfig.preset(size), inputs=ENTRIES,
                         targets=tuple(e for e in ENTRIES if entry_kind(e) != "pixels"))
        n = (64, 64) if size == "smoke" else (256, 256)
        with torch.device("meta"):
            params = sum(p.numel() for p in TerraMind(config).parameters())
        print(f"  {size:6s} {params / 1e6:8.1f}M params | {n[0]} + {n[1]} tokens | "
              f"{flops_per_token(config, *n) / 1e6:8.1f} MFLOP/token")


def plain_step(model, opt, batches):
    """What bench_terramind.py times: forward, backward, AdamW (no clip, no accumulation bookkeeping)."""
    loss, _ = model(next(batches))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pretrain_step(model, opt, batches):
    pretrain.train_step(model, model, opt, batches, 1, 1, torch.device("cpu"), None, 1.0)


def timed_steps(model, batches, n, warmup, steps=(pretrain_step,)):
    """Median seconds per step of each step function over n steps after `warmup` untimed ones; the functions
    alternate, so load from other processes hits them alike."""
    opts = [torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95)) for _ in steps]
    times = [[] for _ in steps]
    for k in range(warmup + n):
        for f, opt, ts in zip(steps, opts, times):
            t = time.perf_counter()
            f(model, opt, batches)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts[warmup:]) for ts in times]


def tiny_vs_official(args):
    print(f"== tiny training step, 8 x (256 + 256) tokens at 224 px, fp32, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    masking = Masking(OFFICIAL_INPUTS, OFFICIAL_TARGETS, 256, 256, alphas="all2all", grid=14)
    samples = []
    for b in range(8):   # the sample bench_terramind.py builds: every v1 input, random content
        s = {e: torch.randn(MODALITIES[e].channels, 224, 224, generator=g) if entry_kind(e) == "pixels" else
             torch.randint(0, MODALITIES[e[4:]].vocab_size, (14, 14), generator=g)
             for e in OFFICIAL_INPUTS if entry_kind(e) != "sequence"}
        s["coords"] = torch.randint(4204, 6366, (2,), generator=g)
        samples.append(masking(s, np.random.default_rng([0, b])))
    batch = default_collate(samples)
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("tiny"))
    ours, plain = timed_steps(model, itertools.repeat(batch), args.steps, 2, (pretrain_step, plain_step))
    for name, sec in (("pretrain.train_step", ours), ("model step (as bench_terramind)", plain)):
        print(f"  {name:32s} | {sec * 1e3:7.1f} ms/step (median of {args.steps}) | {8 * 512 / sec / 1e3:5.2f}k tok/s")
    if args.official:
        out = subprocess.run([args.official, str(ROOT / "bench" / "bench_terramind.py"), "--steps", str(args.steps),
                              "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("official", "ours", "ratio"))]
        print("  bench_terramind.py right after (model forward + backward + AdamW):\n    " + "\n    ".join(lines)
              if lines else f"  bench_terramind.py failed:\n{out.stderr[-2000:]}")


def loader_vs_model(args):
    print(f"== data path vs model on {args.data} (tokens {args.tokens}), samples/s")
    text = WordPieceTokenizer.from_file(args.text_tokenizer or OFFICIAL_VOCAB)
    entries, shards = available_entries(args.data, args.tokens, lambda s: print(" ", s.strip()))
    targets = tuple(e for e in entries if entry_kind(e) != "pixels")
    probe = PretrainData(args.data, "train", shards, text, Masking(entries, targets, 64, 64, "mix", 4), 64,
                                  0, True)
    tile = probe.ds[0][next(m for m in probe.ds.modalities if MODALITIES[m].kind == "image")].shape[-1]
    grid = tile // 16
    budget = min(256, 4 * grid * grid)
    masking = Masking(entries, targets, budget, budget, "mix", grid)
    data = PretrainData(args.data, "train", shards, text, masking, tile, 0, True)
    B, n = args.batch_size, args.loader_batches
    for workers in (0, 1, 2):
        loader = DataLoader(data, batch_sampler=StepBatches(0, n + 2, 0, 1, B, 1), num_workers=workers,
                            collate_fn=default_collate)
        it = iter(loader)
        next(it), next(it)                          # worker start-up and first batches excluded
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        print(f"  loader, {workers} workers     | {n * B / (time.perf_counter() - t):7.1f} samples/s")
    batches = [default_collate([data[k] for k in range(i * B, (i + 1) * B)]) for i in range(4)]
    for size in ("smoke", "tiny"):
        torch.manual_seed(0)
        config = replace(TerraMindConfig.preset(size), grid=grid, inputs=tuple(entries), targets=targets)
        sec, = timed_steps(TerraMind(config), itertools.cycle(batches), args.steps, 2)
        print(f"  model {size:5s} train_step  | {B / sec:7.1f} samples/s | {sec * 1e3:6.0f} ms/step | "
              f"{B * 2 * budget / sec / 1e3:5.1f}k tok/s ({B} x ({budget} + {budget}) tokens, {tile} px)")


def main():
    p = argparse.ArgumentParser(description="pretraining speed on the CPU (FLOPs, tokens/s, loader vs model)")
    p.add_argument("--data", default="data/synth", help="TerraMesh-layout world (with splits/)")
    p.add_argument("--tokens", default="tokens", help="its token shards (fsq_tokenizer.py tokenize)")
    p.add_argument("--text-tokenizer", default=None, help="WordPiece JSON (default: the official vocabulary)")
    p.add_argument("--official", default=None, help="python of the oracle venv: also run bench_terramind.py")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step on the world")
    p.add_argument("--loader-batches", type=int, default=20, help="timed loader batches")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flops_table()
    tiny_vs_official(args)
    loader_vs_model(args)


if __name__ == "__main__":
    main()
