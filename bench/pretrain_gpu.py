"""
One-GPU pretraining throughput: tokens/s, model-FLOPs utilization (MFU) and peak memory of pretrain.train_step
at bf16 autocast with fused AdamW, eager and compiled, for several sizes in one run, then a profile summary
(where the step's time goes) of each size's compiled step. Goal (issue 20): MFU >= 40% for `base` on one H100.

Modes: `eager`; `compile` = torch.compile(model, fullgraph=True), what pretrain.py --compile runs (the whole
training forward in one graph, backward through AOTAutograd); `blocks` = TerraMind.compile_blocks (only the
transformer blocks compiled; the step before issue 20).

Each step: forward + backward + gradient clip + fused AdamW on a micro-batch of B samples with 256 input + 256
target tokens at 224 px (grid 14), masked by masking.py ("mix" alphas) from random pixels and token ids of every
entry (caption: 40 random word ids). --distinct different masked batches are cycled, so the compiled model
meets the varying masks and entry mixes of real training (a recompile would show as a slow step). MFU =
terramind.flops_per_token x tokens/s / the GPU's dense bf16 peak (pretrain.PEAK_FLOPS, or --peak-tflops).

    python bench/pretrain_gpu.py                                  # base at 128, large at 32: eager, compile
    python bench/pretrain_gpu.py --runs base:128 base:192 --modes eager,blocks,compile --steps 30
    python bench/pretrain_gpu.py --device cpu --runs smoke:4 --grid 4 --budget 16 --steps 2 --warmup 1 \\
        --modes eager,compile --profile-steps 1                    # CPU check of the script (minutes: compiling)
Prints one line per size and mode (ms/step median, tokens/s, MFU, peak memory, loss), each mode's rate over
eager, then per size the profile of --profile-steps compiled steps: device busy time per step against the
step's wall time (the rest is the host launching and waiting) and the kernels that take the most time.
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
from entries import ENTRIES, entry_kind  # noqa: E402
from masking import Masking  # noqa: E402
from modalities import MODALITIES, PATCH  # noqa: E402
from terramind import TerraMind, TerraMindConfig, flops_per_token  # noqa: E402


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


def build(config, mode, device):
    """-> (model, net, optimizer) for a mode: eager, blocks or compile."""
    torch.manual_seed(0)
    model = TerraMind(config).to(device)
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    if mode == "compile":
        return model, torch.compile(model, fullgraph=True), opt
    if mode == "blocks":
        return model, model.compile_blocks(), opt
    return model, model, opt


def step(model, net, opt, batches, device, dtype):
    stats, _ = pretrain.train_step(net, model, opt, batches, 1, 1, device, dtype, 1.0)
    return stats


def measure(model, net, opt, batches, args, device, dtype):
    """Median seconds per step over args.steps after args.warmup steps (compilation happens there), last loss."""
    times = []
    for k in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = step(model, net, opt, batches, device, dtype)
        loss = stats[0].item()   # waits for the step: the timer needs it (pretrain.py syncs at log steps only)
        times.append(time.perf_counter() - t)
    return statistics.median(times[args.warmup:]), loss


def profile_summary(model, net, opt, batches, args, device, dtype, rows=12):
    """Profiles args.profile-steps steps: device busy ms per step (sum of kernel self times) against wall ms,
    then the kernels with the most device time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(args.profile_steps):
            step(model, net, opt, batches, device, dtype)[0].item()
        wall = (time.perf_counter() - t) / args.profile_steps
    events = prof.key_averages()
    if cuda:
        busy = sum(getattr(e, key) for e in events if e.device_type.name == "CUDA") / 1e3 / args.profile_steps
        print(f"  device busy {busy:.1f} ms of {wall * 1e3:.1f} ms per step ({busy / (wall * 1e3) * 100:.0f}%), "
              f"the rest is the host launching kernels and waiting", flush=True)
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def run_size(size, batch_size, args, device, dtype, peak):
    """Every mode of one size: one line each; then the profile of the compiled step. -> {mode: tokens/s}."""
    config = replace(TerraMindConfig.preset(size), grid=args.grid, inputs=ENTRIES,
                     targets=tuple(e for e in ENTRIES if entry_kind(e) != "pixels"))
    flops = flops_per_token(config, args.budget, args.budget)
    tokens = batch_size * 2 * args.budget
    print(f"== {size}, batch {batch_size} x ({args.budget} + {args.budget}) tokens, grid {args.grid}, "
          f"{flops / 1e6:.1f} MFLOP/token", flush=True)
    on_device = [{k: v.to(device) for k, v in b.items()} for b in
                 make_batches(config, args.distinct, batch_size, args.budget)]
    rates = {}
    for mode in args.modes.split(","):
        model, net, opt = build(config, mode, device)
        batches = itertools.cycle(on_device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, loss = measure(model, net, opt, batches, args, device, dtype)
        rates[mode] = tokens / sec
        mfu = f"{flops * rates[mode] / peak * 100:5.1f}%" if peak else "  n/a"
        mem = f"{torch.cuda.max_memory_allocated() / 2 ** 30:5.1f} GiB" if device.type == "cuda" else "n/a"
        print(f"  {mode:8s} | {sec * 1e3:8.1f} ms/step (median of {args.steps}) | {rates[mode] / 1e3:8.1f}k tok/s"
              f" | MFU {mfu} | peak memory {mem} | loss {loss:.3f}", flush=True)
        if args.profile_steps and mode == args.modes.split(",")[-1]:
            print(f"  profile of {args.profile_steps} {mode} steps:")
            profile_summary(model, net, opt, batches, args, device, dtype)
        del model, net, opt
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for mode, rate in rates.items():
        if mode != "eager" and "eager" in rates:
            print(f"  {size} {mode} / eager: {rate / rates['eager']:.2f}x tokens/s")
    return rates


def main():
    p = argparse.ArgumentParser(description="one-GPU tokens/s, MFU, peak memory of pretraining, eager vs compiled")
    p.add_argument("--runs", nargs="+", default=["base:128", "large:32"], help="size:micro-batch pairs")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    p.add_argument("--grid", type=int, default=14, help="token grid side (14 = 224 px tiles)")
    p.add_argument("--budget", type=int, default=256, help="input and target tokens per sample")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per mode (compilation happens here)")
    p.add_argument("--distinct", type=int, default=8, help="different masked batches cycled")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, blocks, compile; the profile "
                                                            "is of the last")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per size (0 = no profile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: table)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in pretrain.PEAK_FLOPS.items() if k in name), None)
    print(f"{name} | {'bf16 autocast' if dtype else 'fp32'} | dense bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s | torch {torch.__version__}", flush=True)
    for run in args.runs:
        size, batch_size = run.split(":")
        run_size(size, int(batch_size), args, device, dtype, peak)


if __name__ == "__main__":
    main()
