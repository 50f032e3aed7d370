"""
The settings of a pretraining run (pretrain.py): the paper's recipe per model
size, the flags that override it, and what a resumed run keeps from its state.

Consumes pretrain.py's parsed flags and, when resuming, the run settings stored in
the state file; produces one namespace of resolved settings (`resolve`) and the
startup lines that state the recipe with its source per value (`recipe`).

    run = resolve(args, world=1, saved=None)
    print(recipe(run, world=1, warmup=math.ceil(run.warmup * run.steps)))
"""
from __future__ import annotations

import argparse
import math

from entries import ENTRIES, entry_kind
from masking import MIXTURES, parse_mixture
from modalities import PATCH
from terramesh import TerraMeshDataset
from text_tokenizer import OFFICIAL_VOCAB

# The recipe per size. paper §8.2: base learning rate 2e-4, cosine over 500B
# tokens, global batches of 2K, 4K and 8K compared on 32 GPUs; 4M: lr = blr *
# total_batch_size / 256. Ours: 4096 (4M-21's global batch at TerraMind's 256 +
# 256 token budgets) for every real size; tiny/small take base's recipe; smoke is
# a CPU run (blr 1.6e-2 = lr 2e-3 at batch 32). batch_size: the largest
# micro-batch per process (memory).
SIZE_DEFAULTS = {
    "smoke": dict(batch_size=32, total_batch_size=32, blr=1.6e-2, tokens=2e6),
    "tiny": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "small": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "base": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "large": dict(batch_size=32, total_batch_size=4096, blr=2e-4, tokens=500e9)}

# the settings that define a run's data stream and schedule: stored in the state,
# restored by --resume; a resumed run may change only FREE ones (a longer run,
# another micro-batch split)
RUN_KEYS = ("size", "seed", "total_batch_size", "input_budget", "target_budget",
            "alphas", "tile", "blr", "lr", "warmup", "weight_decay", "clip_grad",
            "steps", "token_budget", "batch_size", "text_tokenizer", "pixel_inputs",
            "scales")
FREE = ("steps", "token_budget", "batch_size", "text_tokenizer")
DEFAULTS = dict(size="smoke", seed=0, alphas="mix", warmup=0.02, weight_decay=0.05,
                clip_grad=1.0, pixel_inputs="all", scales="independent")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def merge_settings(args, saved: dict | None) -> dict:
    """Each RUN_KEYS setting from the flags, else the checkpoint's; a flag that
    contradicts the checkpoint on a setting outside FREE is refused."""
    run = {}
    for k in RUN_KEYS:
        given = getattr(args, k)
        old = saved.get(k) if saved is not None else None   # None: a checkpoint from before the key
        if old is not None and given is not None and k not in FREE and given != old:
            raise ValueError(
                f"{flag(k)} {given} differs from the checkpoint's {old}: a resumed "
                f"run keeps its data stream and schedule (only {', '.join(FREE)} "
                f"may change)")
        run[k] = given if given is not None or saved is None else old
    if saved is not None and args.token_budget is not None and args.steps is None:
        run["steps"] = None   # a new token budget on resume sets the length
    return run


def resolve(args, world: int, saved: dict | None) -> argparse.Namespace:
    """Run settings: the checkpoint's when resuming, else the flags, else the
    defaults (per size, per tile)."""
    run = merge_settings(args, saved)
    unset = {k: v for k, v in DEFAULTS.items() if run[k] is None}
    run = argparse.Namespace(**{**run, **unset})
    resolve_batch(run, world)
    if args.lr is not None and args.blr is not None:
        raise ValueError("--lr and --blr both given: --blr is scaled by "
                         "--total-batch-size / 256, --lr is the peak rate itself; give one")
    if run.lr is None:   # 4M: the peak rate scales with the global batch
        run.blr = run.blr or SIZE_DEFAULTS[run.size]["blr"]
        run.lr = run.blr * run.total_batch_size / 256
    if run.alphas not in MIXTURES:
        parse_mixture(run.alphas)   # a bad --alphas fails here, with its message
    pixel_entries(run.pixel_inputs)
    if run.text_tokenizer is None:
        if not OFFICIAL_VOCAB.exists():
            raise ValueError(f"no text tokenizer: {OFFICIAL_VOCAB} is absent; pass "
                             f"--text-tokenizer (a WordPiece JSON, e.g. from "
                             f"`python text_tokenizer.py train`)")
        run.text_tokenizer = str(OFFICIAL_VOCAB)
    if run.tile is None:
        run.tile = data_tile(args.data)
    if run.tile % PATCH:
        raise ValueError(f"--tile {run.tile} is not a multiple of {PATCH}")
    grid = run.tile // PATCH
    # 4M: 256 at 224 px; 64 at 64 px
    run.input_budget = run.input_budget or min(256, 4 * grid * grid)
    run.target_budget = run.target_budget or run.input_budget
    if run.steps is None:
        run.token_budget = run.token_budget or SIZE_DEFAULTS[run.size]["tokens"]
        per_step = run.total_batch_size * (run.input_budget + run.target_budget)
        run.steps = math.ceil(run.token_budget / per_step)
    return run


def data_tile(root) -> int:
    """The tile side of the data in whole patches, at most 224 px."""
    probe = TerraMeshDataset(root, split="train", size=None)
    sizes = []
    if len(probe):
        sizes = [x.shape[-1] for x in probe[0].values() if not isinstance(x, str)]
    return min(224, sizes[0] // PATCH * PATCH) if sizes else 224


def resolve_batch(run, world: int):
    """The global batch (--total-batch-size, else the size's) and the micro-batch
    per process (--batch-size, else the size's largest that divides the global
    batch over `world` processes); accumulation makes up the rest, so every process
    count runs the same optimisation."""
    size = SIZE_DEFAULTS[run.size]
    run.total_batch_size = run.total_batch_size or size["total_batch_size"]
    per_process = run.total_batch_size // world
    if per_process == 0:
        raise ValueError(f"--total-batch-size {run.total_batch_size} is smaller "
                         f"than the {world} processes")
    if run.batch_size is None:
        largest = min(size["batch_size"], per_process)
        divisors = [b for b in range(1, largest + 1) if per_process % b == 0]
        run.batch_size = max(divisors)
    if run.total_batch_size % (run.batch_size * world):
        raise ValueError(f"--total-batch-size {run.total_batch_size} is not a "
                         f"multiple of --batch-size {run.batch_size} x {world} processes")


def pixel_entries(spec: str) -> list:
    """--pixel-inputs: 'all', 'none' or comma-separated pixel entries -> the pixel
    entries the model embeds (paper §4.2: TerraMind-B-single takes S-2 L2A as its
    only pixel input, every modality as tokens)."""
    pixels = [e for e in ENTRIES if entry_kind(e) == "pixels"]
    if spec == "all":
        return pixels
    if spec == "none":
        return []
    chosen = [m for m in spec.split(",") if m]
    bad = [m for m in chosen if m not in pixels]
    if bad:
        raise ValueError(f"--pixel-inputs {spec}: {', '.join(bad)} not a pixel "
                         f"entry; choose among all, none, {', '.join(pixels)}")
    return chosen


def token_count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def recipe(run, world: int, warmup: int) -> str:
    """The startup lines that state the optimisation recipe (paper §8.2, 4M), with
    its source per value."""
    per_step = run.total_batch_size * (run.input_budget + run.target_budget)
    accum = run.total_batch_size // (run.batch_size * world)
    if run.blr:
        rate = (f"base lr {run.blr:.1e} x {run.total_batch_size} / 256 = "
                f"peak lr {run.lr:.1e} (4M scaling)")
    else:
        rate = f"peak lr {run.lr:.1e} (--lr, not scaled)"
    lines = [
        f"recipe: {rate}; AdamW betas (0.9, 0.95), weight decay "
        f"{run.weight_decay}, clip {run.clip_grad}",
        f"  global batch {run.total_batch_size} = {world} process(es) x {accum} "
        f"accumulation x {run.batch_size} micro-batch; tokens per sample "
        f"{run.input_budget} + {run.target_budget}",
        f"  warmup {warmup} steps ({run.warmup:.0%}, "
        f"{token_count(warmup * per_step)} tokens), cosine to 0 at step "
        f"{run.steps} ({token_count(run.steps * per_step)} tokens)",
        f"  masking: alphas {run.alphas}, scales {run.scales}; pixel inputs "
        f"{run.pixel_inputs}"]
    return "\n".join(lines)
