"""
One-GPU pretraining throughput: tokens/s and model-FLOPs utilization (MFU) of pretrain.train_step for `base`
at bf16 autocast with fused AdamW: eager, with every transformer block compiled (`blocks`, what pretrain.py
--compile does) and with the whole model under torch.compile (`compile`). Goal: MFU >= 40%.

Each step: forward + backward + gradient clip + fused AdamW on a micro-batch of --batch-size samples with 256
input + 256 target tokens at 224 px (grid 14), masked by masking.py ("mix" alphas) from random pixels and token
ids of every entry (caption: 40 random word ids). --distinct different masked batches are cycled, so the
compiled model meets the varying slot counts of real training. MFU = terramind.flops_per_token x tokens/s /
the GPU's dense bf16 peak (pretrain.PEAK_FLOPS, or --peak-tflops).

    python bench/pretrain_gpu.py                                  # base, batch 64: eager, blocks, compile
    python bench/pretrain_gpu.py --batch-size 128 --steps 30
    python bench/pretrain_gpu.py --device cpu --size smoke --grid 4 --batch-size 4 --steps 2   # CPU check of the script
Prints one line per mode: ms/step (median), tokens/s, MFU, peak memory; then each mode's rate / eager.
"""
import argparse
import itertools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain  # noqa: E402
from masking import Masking  # noqa: E402
from terramesh import MODALITIES, PATCH  # noqa: E402
from terramind import ENTRIES, TerraMind, TerraMindConfig, entry_kind, flops_per_token  # noqa: E402


def make_batches(config, n_batches, batch_size, budget, seed=0):
    """n_batches masked batches of random data for every entry of the config (CPU tensors)."""
    g, grid = torch.Generator().manual_seed(seed), config.grid
    masking = Masking(config.inputs, config.targets, budget, budget, "mix", grid)
    out = []
    for k in range(n_batches):
        samples = []
        for b in range(batch_size):
            s = {}
            for e in dict.fromkeys(config.inputs + config.targets):
                kind = entry_kind(e)
                if kind == "pixels":
                    s[e] = torch.randn(MODALITIES[e].channels, grid * PATCH, grid * PATCH, generator=g)
                elif kind == "tokens":
                    s[e] = torch.randint(0, config.vocab_size(e), (grid, grid), generator=g)
                elif e == "coords":
                    s[e] = torch.randint(4204, 6366, (2,), generator=g)       # lat=/lon= token ids
                else:
                    s[e] = torch.randint(6366, 30000, (40,), generator=g)    # word pieces
            samples.append(masking(s, np.random.default_rng([seed, k, b])))
        out.append(default_collate(samples))
    return out


def measure(model, net, batches, args, device, dtype):
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    it = itertools.cycle([{k: v.to(device) for k, v in b.items()} for b in batches])
    times = []
    for k in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats, _ = pretrain.train_step(net, model, opt, it, 1, 1, device, dtype, 1.0)
        stats[0].item()                                          # wait for the step (pretrain.py logs it too)
        times.append(time.perf_counter() - t)
    return statistics.median(times[args.warmup:]), stats[0].item()


def main():
    p = argparse.ArgumentParser(description="one-GPU tokens/s and MFU of base pretraining, eager vs compiled")
    p.add_argument("--size", default="base", help="model preset")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step")
    p.add_argument("--grid", type=int, default=14, help="token grid side (14 = 224 px tiles)")
    p.add_argument("--budget", type=int, default=256, help="input and target tokens per sample")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per mode (compilation happens here)")
    p.add_argument("--distinct", type=int, default=8, help="different masked batches cycled")
    p.add_argument("--modes", default="eager,blocks,compile",
                   help="comma-separated: eager, blocks (TerraMind.compile_blocks), compile (torch.compile(model))")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: table)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    config = replace(TerraMindConfig.preset(args.size), grid=args.grid, inputs=ENTRIES,
                     targets=tuple(e for e in ENTRIES if entry_kind(e) != "pixels"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in pretrain.PEAK_FLOPS.items() if k in name), None)
    flops = flops_per_token(config, args.budget, args.budget)
    tokens = args.batch_size * 2 * args.budget
    print(f"{args.size} on {name} | batch {args.batch_size} x ({args.budget} + {args.budget}) tokens, grid "
          f"{args.grid} | {'bf16 autocast' if dtype else 'fp32'} | {flops / 1e6:.1f} MFLOP/token | peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s | torch {torch.__version__}")
    batches = make_batches(config, args.distinct, args.batch_size, args.budget)
    rates = {}
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = TerraMind(config).to(device)
        net = torch.compile(model) if mode == "compile" else model.compile_blocks() if mode == "blocks" else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, loss = measure(model, net, batches, args, device, dtype)
        rates[mode] = tokens / sec
        mfu = f"{flops * rates[mode] / peak * 100:5.1f}%" if peak else "  n/a"
        mem = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device.type == "cuda" else "n/a"
        print(f"{mode:8s} | {sec * 1e3:8.1f} ms/step (median of {args.steps}) | {rates[mode] / 1e3:8.1f}k tok/s | "
              f"MFU {mfu} | peak memory {mem} | loss {loss:.3f}", flush=True)
        del model, net
    for mode, rate in rates.items():
        if mode != "eager" and "eager" in rates:
            print(f"{mode} / eager: {rate / rates['eager']:.2f}")


if __name__ == "__main__":
    main()
