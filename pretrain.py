"""
Pretraining: masked cross-modal token prediction (paper §3.2 and §8.2; 4M, Mizrahi et al. 2023, §3), from a CPU
smoke run to DDP on GPU nodes, one file.

Consumes a TerraMesh-layout folder (--data, with splits/{train,val}.txt): pixel tiles for the pixel entries
(S2L1C, S2L2A, S2RGB, S1GRD, S1RTC, DEM) and caption/coords text; token shards (--tokens, written by
`fsq_tokenizer.py tokenize`) for the token entries tok_S2L2A ... tok_NDVI; a WordPiece vocabulary
(--text-tokenizer, text_tokenizer.py) for captions and coords. An entry without data (no folder, no shards)
is left out of the model and of the masking budgets, and the startup log says so. Per sample, in the
DataLoader workers, masking.py draws the input and target budgets and which tokens fill them.
Produces in --out:
  terramind.safetensors            the model: `TerraMind.from_checkpoint(path)` (config in the metadata)
  pretrain_state.safetensors       model + AdamW state + step, data position, RNG and run settings (--resume);
                                   the one before it is kept as pretrain_state.prev.safetensors
  log.jsonl, loss.png, val.png     one JSON line per step and per validation; the loss curves

Exactness: the samples of step s are the stream positions [s * total, (s + 1) * total); position k is sample
perm_e[k mod n] of epoch e = k div n (perm_e from (seed, e)) and its crop and masks come from
rng(seed, e, k mod n). Nothing depends on the number of processes, workers or micro-batches, so 2 ranks give
the losses of 1 rank with 2 accumulation steps, and a resumed run the losses of an uninterrupted one.

    # CPU smoke run (synthetic world, 64 px tiles = 4 x 4 tokens; tokenizers and shards: fsq_tokenizer.py)
    python pretrain.py --size smoke --data data/synth --tokens tokens/ --steps 300 --out ckpt/
    python pretrain.py --size smoke --data data/synth --tokens tokens/ --steps 600 --out ckpt/ --resume
    # one GPU (bf16 autocast, fused AdamW; batch 128 of base needs about 40 GiB): the paper's recipe (§8.2, printed
    # at start: base lr 2e-4 x 4096 / 256, global batch 4096 by gradient accumulation, 500B tokens)
    python pretrain.py --size base --data /data/terramesh --tokens /data/tokens --batch-size 128 \\
        --workers 8 --compile --out ckpt/
    # one node, 8 GPUs (gloo instead of NCCL on CPU), then several nodes: the same global batch and losses
    torchrun --standalone --nproc_per_node=8 pretrain.py --size base --data /data/terramesh --tokens /data/tokens \\
        --batch-size 128 --workers 8 --compile --out ckpt/
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 pretrain.py ...
    # the ablations: TerraMind-B-single (§4.2), other Dirichlet mixtures (§8.2), no cross-scale overlap
    python pretrain.py --size base ... --pixel-inputs S2L2A --alphas 'S2L2A=1000/*=0.5@1;mix@4' --scales disjoint
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from cli import (TrainingDiverged, fraction, multiple_of, nonnegative_float, nonnegative_int, positive_float,
                 positive_int, run_main, torch_device, writable_folder)
from fsq_tokenizer import TokenShards, read_header
from masking import MIXTURES, SCALES, Masking, cross_scale_overlap, parse_mixture
from pictures import plot_curves
from terramesh import (PATCH, TerraMeshDataset, dataset_modalities, expect_kind, is_shard_root, load_safetensors,
                       parse_coords, save_safetensors, token_window)
from terramind import (ENTRIES, ENTRY_INDEX, PRESETS, TerraMind, TerraMindConfig, entry_kind,
                       flops_per_token)
from text_tokenizer import OFFICIAL_VOCAB, WordPieceTokenizer

# The recipe per size. paper §8.2: base learning rate 2e-4, cosine over 500B tokens, global batches of 2K, 4K
# and 8K compared on 32 GPUs; 4M: lr = blr * total_batch_size / 256. Ours: 4096 (4M-21's global batch at
# TerraMind's 256 + 256 token budgets) for every real size; tiny/small take base's recipe; smoke is a CPU
# run (blr 1.6e-2 = lr 2e-3 at batch 32). batch_size: the largest micro-batch per process (memory).
SIZE_DEFAULTS = {
    "smoke": dict(batch_size=32, total_batch_size=32, blr=1.6e-2, tokens=2e6),
    "tiny": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "small": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "base": dict(batch_size=64, total_batch_size=4096, blr=2e-4, tokens=500e9),
    "large": dict(batch_size=32, total_batch_size=4096, blr=2e-4, tokens=500e9)}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16
STATE, MODEL = "pretrain_state.safetensors", "terramind.safetensors"
TRAIN, VAL = 0, 1   # stream tags in the per-sample seeds

# -----------------------------------------------------------------------------------------------------------
# Data


def short(entry: str) -> str:
    return entry.removeprefix("tok_")


class PretrainData(Dataset):
    """Masked samples of one split, indexed by stream position k (see the module docstring): item k is a dict of
    fixed-shape tensors from masking.Masking, deterministic in (seed, epoch, k mod n)."""

    def __init__(self, root, split, tokens, text: WordPieceTokenizer, masking: Masking, tile: int, seed: int,
                 shuffle: bool):
        self.root, self.text, self.masking, self.tile, self.seed, self.shuffle = root, text, masking, tile, seed, shuffle
        want = [short(e) for e in masking.entries if entry_kind(e) != "tokens"]
        present = dataset_modalities(root, split)
        self.ds = TerraMeshDataset(root, [m for m in want if m in present], size=None, split=split)
        self.tokens = tokens   # TokenShards or None
        self.token_entries = [e for e in masking.entries if entry_kind(e) == "tokens"]
        self._perm = (None, None)

    def __len__(self):
        return len(self.ds)

    def order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:   # one permutation per epoch, the same in every worker and rank
            self._perm = (epoch, np.random.default_rng([self.seed, TRAIN, epoch]).permutation(len(self.ds)))
        return self._perm[1]

    def __getitem__(self, k: int) -> dict:
        epoch, j = divmod(k, len(self.ds)) if self.shuffle else (0, k)
        i = int(self.order(epoch)[j]) if self.shuffle else j
        rng = np.random.default_rng([self.seed, TRAIN if self.shuffle else VAL, epoch, j])
        return self.masking(self.sample(i, rng), rng)

    def sample(self, i: int, rng) -> dict:
        """Sample i as masking.py reads it: cropped pixels, cropped token grids, caption and coords ids."""
        raw, sid, t, out = self.ds[i], self.ds.ids[i], self.tile, {}
        pixels = [m for m in raw if not isinstance(raw[m], str)]
        H, W = raw[pixels[0]].shape[-2:] if pixels else (None, None)
        if self.tokens is not None and H is None:   # token entries only: the tile is the token grid
            H, W = next((self.tokens.get(short(e), sid).shape for e in self.token_entries
                         if self.tokens.has(short(e), sid)), (t // PATCH, t // PATCH))
            H, W = H * PATCH, W * PATCH
        top = left = dy = dx = 0
        if H is not None:   # the token grid covers the centred whole-patch window: 264 px tiles -> 256, 4 px in
            (dy, gh), (dx, gw) = token_window(H), token_window(W)
            if gh < t or gw < t:
                raise ValueError(f"{self.root}: sample {sid} is {H}x{W} px, smaller than the tile size {t}")
            top, left = ((int(rng.integers(0, (n - t) // PATCH + 1)) if self.shuffle else (n - t) // PATCH // 2)
                         * PATCH for n in (gh, gw)) if (gh, gw) != (t, t) else (0, 0)
        for m in pixels:   # a patch-aligned crop: the same window for pixels and tokens
            out[m] = raw[m][:, dy + top:dy + top + t, dx + left:dx + left + t]
        for e in self.token_entries:
            if self.tokens is not None and self.tokens.has(short(e), sid):
                g = self.tokens.get(short(e), sid)                                           # (h, w)
                if tuple(g.shape) != (H // PATCH, W // PATCH):
                    raise ValueError(f"{self.tokens.folder / short(e)}: sample {sid} has a {tuple(g.shape)} token "
                                     f"grid, its tiles are {H}x{W} px; tokenize the same tiles")
                out[e] = g[top // PATCH:(top + t) // PATCH, left // PATCH:(left + t) // PATCH]
        if "caption" in raw:
            out["caption"] = self.text.encode(raw["caption"])
        if "coords" in raw:   # official CoordsTokenizer ids, snapped to the 0.25 degree grid
            out["coords"] = self.text.encode_coords(*parse_coords(raw["coords"], self.ds.files["coords"][sid]))
        return out


class StepBatches:
    """Batch sampler: the micro-batches of this rank for steps start..steps-1. Micro-batch a of rank r at step s
    holds positions s * total + (a * world + r) * micro + [0, micro)."""

    def __init__(self, start, steps, rank, world, micro, accum):
        self.start, self.steps, self.rank, self.world, self.micro, self.accum = start, steps, rank, world, micro, accum

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        total = self.world * self.accum * self.micro
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                first = s * total + (a * self.world + self.rank) * self.micro
                yield list(range(first, first + self.micro))


def available_entries(root, tokens_folder, log) -> tuple[list, TokenShards | None]:
    """The entries the data has (in ENTRIES order) and the token shards; says what is missing."""
    root, have = Path(root), []
    shards, present = None, dataset_modalities(root)
    if tokens_folder and Path(tokens_folder).is_dir():
        found = [m for m in (short(e) for e in ENTRIES if entry_kind(e) == "tokens")
                 if any((Path(tokens_folder) / m).glob("shard_*.safetensors"))]
        shards = TokenShards(tokens_folder, found) if found else None
    for e in ENTRIES:
        kind, m = entry_kind(e), short(e)
        ok = (shards is not None and m in shards.modalities) if kind == "tokens" else m in present
        if ok:
            have.append(e)
        elif kind == "tokens":
            log(f"  {e}: no token shards in {tokens_folder}/{m} -> left out (budget 0)")
        elif is_shard_root(root):   # said once at start: TerraMesh as published has no captions
            log(f"  {e}: the published TerraMesh layout has no {m} -> left out (budget 0)")
        else:
            log(f"  {e}: no folder {root / m} -> left out (budget 0)")
    return have, shards


# -----------------------------------------------------------------------------------------------------------
# Optimization


def param_groups(model, weight_decay):
    """4M exemptions from weight decay: norms and biases; embeddings, mask token, modality embeddings decay."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if "norm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """4M (DINO cosine_scheduler): linear warmup from 0, then half-cosine to 0, per step."""
    if step < warmup:
        return lr * step / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


KILL_AT = "PRETRAIN_KILL_AT"   # test hook: "<point>@<step>" SIGKILLs this process at that point of save_state


def kill_point(point: str, step: int):
    """The crash test's hook (tests/test_reliability.py): with PRETRAIN_KILL_AT=<point>@<step> in the
    environment, the process kills itself (SIGKILL, no clean-up) at that named point of the save at that step."""
    if os.environ.get(KILL_AT) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def copy_file(src: Path, dst: Path, step: int, chunk: int = 1 << 20):
    """A byte copy on a new inode (never a hard link: a later save must not touch the backup), flushed to
    disk; the hook point "copying" lies halfway through."""
    size = src.stat().st_size
    with open(src, "rb") as f, open(dst, "wb") as g:
        while block := f.read(chunk):
            g.write(block)
            if g.tell() >= size // 2 and g.tell() - len(block) < size // 2:
                kill_point("copying", step)
        g.flush()
        os.fsync(g.fileno())


def fsync_folder(folder: Path):
    """Makes the renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_files(out: Path) -> list:
    """The temporary files save_state and the model export leave when killed (their names, nothing else)."""
    names = [f"{STATE}.new*", f"{STATE}.tmp*", "pretrain_state.prev.tmp*", f"{MODEL}.tmp*"]
    return sorted(p for name in names for p in out.glob(name) if p.is_file())


def save_state(path: Path, model, opt, meta: dict):
    """Model + optimizer + RNG, safe against a kill at any instant: the current state is copied (not linked)
    to *.prev through a temporary file and a rename, then the new state is written to a temporary file and
    renamed over the current one. At every instant the folder holds a complete current state (the old or the
    new one) on its own inode; a kill leaves at most temporary files, removed at the next start."""
    opt_sd = opt.state_dict()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               # 0-d tensors (AdamW's step) go as (1,): terramesh's checksum cannot view 0-d tensors
               **{f"opt.{i}.{k}": v.reshape(1) if v.ndim == 0 else v for i, s in opt_sd["state"].items()
                  for k, v in s.items()},
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_sd["param_groups"]]
    step, pid = meta["step"], os.getpid()
    kill_point("start", step)
    if path.exists():   # keep the last good state as *.prev
        prev, tmp = path.with_suffix(".prev.safetensors"), path.with_suffix(f".prev.tmp{pid}")
        copy_file(path, tmp, step)
        kill_point("copied", step)
        os.replace(tmp, prev)
        kill_point("rotated", step)
    new = path.with_name(f"{path.name}.new{pid}")
    save_safetensors(new, tensors, {**meta, "opt_groups": groups, "opt_ids": list(opt_sd["state"])})
    kill_point("written", step)
    os.replace(new, path)
    fsync_folder(path.parent)
    kill_point("replaced", step)


def load_state(path: Path, device="cpu"):
    """-> (model state dict, optimizer state dict, rng tensors, meta); a bad file raises ValueError naming it
    and the previous checkpoint to resume from instead. Tensors are cloned off the file's memory map, so
    training never reads from (or writes into) a checkpoint file."""
    try:
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "pretrain state")
    except ValueError as e:
        prev = path.with_suffix(".prev.safetensors")
        hint = f"; the previous state is {prev}: resume from it with --resume {prev}" if prev.exists() else ""
        raise ValueError(f"{e}{hint}") from None
    tensors = {k: v.clone() for k, v in tensors.items()}
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state = {int(i): {k.split(".", 2)[2]: v.reshape(()) if k.endswith(".step") else v
                      for k, v in tensors.items() if k.startswith(f"opt.{i}.")} for i in meta["opt_ids"]}
    rng = {k: v.cpu() for k, v in tensors.items() if k.startswith("rng.")}
    return model, {"state": state, "param_groups": meta["opt_groups"]}, rng, meta


# -----------------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(model, loader, device, dtype, world) -> dict:
    """Token-weighted cross-entropy per target entry over the validation stream (all ranks) -> {entry: loss}."""
    model.eval()
    targets = model.config.targets
    sums = torch.zeros(2, len(targets), dtype=torch.float64, device=device)   # loss sum, token count
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, losses = model(batch)
        for j, e in enumerate(targets):
            if e in losses:
                n = (batch["target_mod"] == ENTRY_INDEX[e]).sum()
                sums[0, j] += losses[e].double() * n
                sums[1, j] += n
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return {e: (sums[0, j] / sums[1, j]).item() for j, e in enumerate(targets) if sums[1, j] > 0}


def val_table(val: dict, config: TerraMindConfig, label: str) -> str:
    """Paper Table 9 layout: one column per modality, the model's validation loss above the random bound log(V)."""
    cols = list(config.targets)
    width = max(len(label), 14)
    head = f"{'':{width}s} " + " ".join(f"{short(e):>8s}" for e in cols)
    row = f"{label:{width}s} " + " ".join(f"{val[e]:8.3f}" if e in val else f"{'-':>8s}" for e in cols)
    bound = f"{'random (log V)':{width}s} " + " ".join(f"{math.log(config.vocab_size(e)):8.3f}" for e in cols)
    return "\n".join([head, row, bound])


def read_log(path: Path, upto: int | None = None) -> list:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def plot_log(out: Path, rows: list, config: TerraMindConfig):
    """loss.png: train and validation loss next to the mean log(V); val.png: each modality's validation loss
    divided by its log(V) (1 = a random model)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    logv = {e: math.log(config.vocab_size(e)) for e in config.targets}
    series = {name: tuple(zip(*pts)) for name, pts in (("train", train), ("val", val)) if pts}
    if series:
        plot_curves(out / "loss.png", series, title="pretraining loss (cross-entropy, nats)",
                    hlines={"mean log V": sum(logv.values()) / len(logv)})
    per = {short(e): tuple(zip(*[(r["step"], r["val"][e] / logv[e]) for r in rows if e in r.get("val", {})]))
           for e in config.targets}
    if any(len(xs) > 1 for xs, _ in per.values() if xs):
        plot_curves(out / "val.png", {k: v for k, v in per.items() if v}, title="validation loss / log V",
                    hlines={"random": 1.0})


# -----------------------------------------------------------------------------------------------------------
# Training


def setup_distributed(device: str):
    """torchrun -> (rank, world, device); NCCL on GPU, gloo on CPU. Plain `python` -> (0, 1, device)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def train_step(net, model, opt, batches, accum, world, device, dtype, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches from the iterator `batches` -> (stats, grad norm); stats
    (float64, summed over micro-batches and ranks): [loss, per-target-entry cross-entropy sums, per-entry target
    counts]. `net` is the model, compiled and/or DDP-wrapped. No host sync: the model's static form
    (`sums=True`) gives the per-entry sums as tensors."""
    T = len(model.config.targets)
    stats = torch.zeros(1 + 2 * T, dtype=torch.float64, device=device)
    for a in range(accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        sync = world == 1 or a == accum - 1
        with net.no_sync() if not sync else contextlib.nullcontext():   # DDP: all-reduce once per step
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, sums = net(batch, sums=True)                                   # (), (2, T)
            # every parameter takes part (zero gradient where an entry had no tokens), as in 4M where each
            # modality's embedding runs every step; DDP then needs no unused-parameter search
            loss = loss + 0.0 * sum(p.view(-1)[:1].sum() for p in model.entry_parameters())
            (loss / accum).backward()
        stats[0] += loss.detach().double()
        stats[1:] += sums.detach().double().flatten()                               # T sums, then T counts
    if world > 1:
        dist.all_reduce(stats)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, norm


# the settings that define a run's data stream and schedule: stored in the state, restored by --resume;
# a resumed run may change only FREE ones (a longer run, another micro-batch split)
RUN_KEYS = ("size", "seed", "total_batch_size", "input_budget", "target_budget", "alphas", "tile", "blr", "lr",
            "warmup", "weight_decay", "clip_grad", "steps", "token_budget", "batch_size", "text_tokenizer",
            "pixel_inputs", "scales")
FREE = ("steps", "token_budget", "batch_size", "text_tokenizer")
DEFAULTS = dict(size="smoke", seed=0, alphas="mix", warmup=0.02, weight_decay=0.05, clip_grad=1.0,
                pixel_inputs="all", scales="independent")


def resolve(args, world: int, saved: dict | None) -> argparse.Namespace:
    """Run settings: the checkpoint's when resuming, else the flags, else the defaults (per size, per tile)."""
    run = {}
    for k in RUN_KEYS:
        given = getattr(args, k)
        old = saved.get(k) if saved is not None else None   # None: a checkpoint from before the key
        if old is not None and given is not None and k not in FREE and given != old:
            raise ValueError(f"--{k.replace('_', '-')} {given} differs from the checkpoint's {old}: a resumed "
                             f"run keeps its data stream and schedule (only {', '.join(FREE)} may change)")
        run[k] = given if given is not None or saved is None else old
    if saved is not None and args.token_budget is not None and args.steps is None:
        run["steps"] = None   # a new token budget on resume sets the length
    run = argparse.Namespace(**{**run, **{k: v for k, v in DEFAULTS.items() if run[k] is None}})
    resolve_batch(run, world)
    if args.lr is not None and args.blr is not None:
        raise ValueError("--lr and --blr both given: --blr is scaled by --total-batch-size / 256, --lr is the "
                         "peak rate itself; give one")
    if run.lr is None:   # 4M: the peak rate scales with the global batch
        run.blr = run.blr or SIZE_DEFAULTS[run.size]["blr"]
        run.lr = run.blr * run.total_batch_size / 256
    if run.alphas not in MIXTURES:
        parse_mixture(run.alphas)   # a bad --alphas fails here, with its message
    pixel_entries(run.pixel_inputs)
    if run.text_tokenizer is None:
        if not OFFICIAL_VOCAB.exists():
            raise ValueError(f"no text tokenizer: {OFFICIAL_VOCAB} is absent; pass --text-tokenizer (a WordPiece "
                             f"JSON, e.g. from `python text_tokenizer.py train`)")
        run.text_tokenizer = str(OFFICIAL_VOCAB)
    if run.tile is None:   # the data's tile side, at most 224
        probe = TerraMeshDataset(args.data, split="train", size=None)
        sizes = [x.shape[-1] for x in probe[0].values() if not isinstance(x, str)] if len(probe) else []
        run.tile = min(224, sizes[0] // PATCH * PATCH) if sizes else 224
    if run.tile % PATCH:
        raise ValueError(f"--tile {run.tile} is not a multiple of {PATCH}")
    grid = run.tile // PATCH
    run.input_budget = run.input_budget or min(256, 4 * grid * grid)     # 4M: 256 at 224 px; 64 at 64 px
    run.target_budget = run.target_budget or run.input_budget
    if run.steps is None:
        run.token_budget = run.token_budget or SIZE_DEFAULTS[run.size]["tokens"]
        run.steps = math.ceil(run.token_budget / (run.total_batch_size * (run.input_budget + run.target_budget)))
    return run


def resolve_batch(run, world: int):
    """The global batch (--total-batch-size, else the size's) and the micro-batch per process (--batch-size,
    else the size's largest that divides the global batch over `world` processes); accumulation makes up
    the rest, so every process count runs the same optimisation."""
    run.total_batch_size = run.total_batch_size or SIZE_DEFAULTS[run.size]["total_batch_size"]
    per_process = run.total_batch_size // world
    if per_process == 0:
        raise ValueError(f"--total-batch-size {run.total_batch_size} is smaller than the {world} processes")
    if run.batch_size is None:
        largest = min(SIZE_DEFAULTS[run.size]["batch_size"], per_process)
        run.batch_size = max(b for b in range(1, largest + 1) if per_process % b == 0)
    if run.total_batch_size % (run.batch_size * world):
        raise ValueError(f"--total-batch-size {run.total_batch_size} is not a multiple of --batch-size "
                         f"{run.batch_size} x {world} processes")


def pixel_entries(spec: str) -> list:
    """--pixel-inputs: 'all', 'none' or comma-separated pixel entries -> the pixel entries the model embeds
    (paper §4.2: TerraMind-B-single takes S-2 L2A as its only pixel input, every modality as tokens)."""
    pixels = [e for e in ENTRIES if entry_kind(e) == "pixels"]
    if spec in ("all", "none"):
        return pixels if spec == "all" else []
    chosen = [m for m in spec.split(",") if m]
    if bad := [m for m in chosen if m not in pixels]:
        raise ValueError(f"--pixel-inputs {spec}: {', '.join(bad)} not a pixel entry; choose among all, none, "
                         f"{', '.join(pixels)}")
    return chosen


def token_count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def recipe(run, world: int, warmup: int) -> str:
    """The startup lines that state the optimisation recipe (paper §8.2, 4M), with its source per value."""
    per_step = run.total_batch_size * (run.input_budget + run.target_budget)
    accum = run.total_batch_size // (run.batch_size * world)
    rate = (f"base lr {run.blr:.1e} x {run.total_batch_size} / 256 = peak lr {run.lr:.1e} (4M scaling)"
            if run.blr else f"peak lr {run.lr:.1e} (--lr, not scaled)")
    return (f"recipe: {rate}; AdamW betas (0.9, 0.95), weight decay {run.weight_decay}, clip {run.clip_grad}\n"
            f"  global batch {run.total_batch_size} = {world} process(es) x {accum} accumulation x "
            f"{run.batch_size} micro-batch; tokens per sample {run.input_budget} + {run.target_budget}\n"
            f"  warmup {warmup} steps ({run.warmup:.0%}, {token_count(warmup * per_step)} tokens), cosine to 0 at "
            f"step {run.steps} ({token_count(run.steps * per_step)} tokens)\n"
            f"  masking: alphas {run.alphas}, scales {run.scales}; pixel inputs {run.pixel_inputs}")


def diverged(step: int, loss: float, norm: float, data: PretrainData, total: int, out: Path) -> TrainingDiverged:
    """The error of a step whose loss or gradient norm is non-finite: the step, the samples it read (stream
    positions, module docstring) and the last good checkpoint, which is left as it is."""
    positions = range((step - 1) * total, step * total)
    ids = [data.ds.ids[int(data.order(k // len(data))[k % len(data)])] for k in positions]
    shown = ", ".join(ids[:16]) + (f" (+{len(ids) - 16} more)" if len(ids) > 16 else "")
    last = f"{out / STATE} (step {read_header(out / STATE).get('step')})" if (out / STATE).exists() else "none yet"
    return TrainingDiverged(f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: training stopped before "
                            f"saving; the step's samples in {data.root}: {shown}; check them with `python "
                            f"terramesh.py stats` or lower --lr; last good checkpoint: {last}")


def train(args):
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    args.workers = args.workers if args.workers is not None else 1 if device.type == "cpu" else 6
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave the loader workers their cores: more threads than free cores stall every OpenMP barrier
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - args.workers))
    out = writable_folder(args.out) if rank == 0 else Path(args.out)
    for stale in temp_files(out) if rank == 0 and out.is_dir() else []:
        stale.unlink()
        log(f"removed {stale}: a temporary file of an interrupted save")
    state = None
    if args.resume:
        path = out / STATE if args.resume is True else Path(args.resume)
        state = load_state(path)
        log(f"resuming {path} at step {state[3]['step']}")
    run = resolve(args, world, state[3]["run"] if state else None)
    if state is not None and state[3]["step"] >= run.steps:
        raise ValueError(f"--steps {run.steps}: the checkpoint is already at step {state[3]['step']}; give more "
                         f"steps (or a larger --token-budget) to continue training")
    total, steps, grid = run.total_batch_size, run.steps, run.tile // PATCH
    accum = total // (run.batch_size * world)
    text = WordPieceTokenizer.from_file(run.text_tokenizer)
    log(f"data {args.data}, tokens {args.tokens}, text {run.text_tokenizer} ({text.vocab_size} ids)")
    entries, shards = available_entries(args.data, args.tokens, log)
    pixels = pixel_entries(run.pixel_inputs)
    if left := [e for e in entries if entry_kind(e) == "pixels" and e not in pixels]:
        log(f"  {', '.join(left)}: not a pixel input (--pixel-inputs {run.pixel_inputs}) -> left out")
    inputs = [e for e in entries if entry_kind(e) != "pixels" or e in pixels]
    config = replace(TerraMindConfig.preset(run.size), grid=grid, inputs=tuple(inputs),
                     targets=tuple(e for e in entries if entry_kind(e) != "pixels"))
    if state is not None:
        config = TerraMindConfig(**state[3]["config"])
    masking = Masking(config.inputs, config.targets, run.input_budget, run.target_budget, run.alphas, grid,
                      scales=run.scales)
    tokens_per_step = total * (run.input_budget + run.target_budget)           # 4M counts input + target slots
    warmup = math.ceil(run.warmup * steps)
    args.eval_every = args.eval_every or max(1, min(1000, steps // 8))

    names = ("train/", "val/") if is_shard_root(args.data) else ("splits/train.txt", "splits/val.txt")
    train_set = PretrainData(args.data, "train", shards, text, masking, run.tile, run.seed, shuffle=True)
    val_set = PretrainData(args.data, "val", shards, text, masking, run.tile, run.seed, shuffle=False)
    if len(train_set) < total:
        raise ValueError(f"{args.data}/{names[0]}: {len(train_set)} samples, fewer than one step of {total}")
    n_val = min(len(val_set), args.eval_samples)
    val_positions = list(range(n_val))[rank::world]
    kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=default_collate)
    val_loader = DataLoader(torch.utils.data.Subset(val_set, val_positions), run.batch_size, **kw)

    torch.manual_seed(run.seed)
    model = TerraMind(config).to(device)
    opt = torch.optim.AdamW(param_groups(model, run.weight_decay), lr=run.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type in ("cuda", "cpu"))     # 4M: betas (0.9, 0.95), wd 0.05
    step = 0
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        torch.set_rng_state(state[2]["rng.torch"])
        if device.type == "cuda" and "rng.cuda.0" in state[2]:
            torch.cuda.set_rng_state_all([state[2][f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        step = state[3]["step"]
        if state[3]["position"] != step * total:   # the data stream resumes at sample step x total
            raise ValueError(f"{path}: data position {state[3]['position']} is not step {step} x {total} samples")
        log(f"resumed at step {step}: model, AdamW moments, RNG and data position {step * total} restored")
    net = torch.compile(model, fullgraph=True) if args.compile else model   # the whole step: one graph
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, [device] if device.type == "cuda" else None)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    flops = flops_per_token(config, run.input_budget, run.target_budget)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"  {len(train_set)} train / {len(val_set)} val samples, tiles {run.tile} px = {grid}x{grid} tokens\n"
        f"model {run.size}: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP per token (training)\n"
        f"  inputs  {' '.join(config.inputs)}\n  targets {' '.join(config.targets)}\n"
        f"run: {steps} steps x {total} samples x ({run.input_budget} + {run.target_budget}) tokens = "
        f"{steps * tokens_per_step / 1e6:.1f}M tokens; "
        f"{device} {'bf16' if dtype else 'fp32'}{' compiled' if args.compile else ''}\n"
        + recipe(run, world, warmup))
    if rank == 0:   # paper §3.2 relates the two scales of a modality; how often a target sits under its pixels
        shares = cross_scale_overlap([train_set[k] for k in range(min(64, len(train_set)))])
        log("  token targets under visible pixels of their modality (first 64 samples): "
            + (", ".join(f"{short(e)} {v:.0%}" for e, v in shares.items()) or "none (no pixel twin)"))

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if rank == 0:   # a resumed run rewrites the log up to its checkpoint
        rows = read_log(log_path, step if state is not None else -1)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved_run = {k: getattr(run, k) for k in RUN_KEYS}

    def checkpoint(val=None):
        if rank != 0:
            return
        meta = {"step": step, "position": step * total, "config": asdict(config), "run": saved_run}
        save_state(out / STATE, model, opt, meta)     # the state first: the export never runs ahead of it
        model.save_checkpoint(out / MODEL, step=step, tokens_seen=step * tokens_per_step, run=saved_run,
                              val=val or {})

    def validate():
        val = evaluate(model, val_loader, device, dtype, world)
        if rank == 0 and val:
            row = {"step": step, "val": val, "val_loss": sum(val.values()) / len(val)}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"validation at step {step}, {n_val} samples of {args.data}/{names[1]} "
                       f"(cross-entropy, nats):\n" + val_table(val, config, f"{run.size} step {step}"))
        return val

    loader = DataLoader(train_set, batch_sampler=StepBatches(step, steps, rank, world, run.batch_size, accum), **kw)
    batches = iter(loader)
    targets = config.targets
    bar = tqdm(total=steps, initial=step, disable=True if rank else None, desc="pretrain", unit="step",
               dynamic_ncols=True)   # None: a bar on a terminal, none in a log file
    acc = torch.zeros(1 + 2 * len(targets), dtype=torch.float64, device=device)   # loss, per-entry sums, counts
    val = validate() if step == 0 else {}   # the untrained model: every loss near log(V)
    t0, window = time.time(), 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, run.lr)
        stats, norm = train_step(net, model, opt, batches, accum, world, device, dtype, run.clip_grad)
        if not (torch.isfinite(stats[0]) and torch.isfinite(norm)):   # nothing of this step is saved
            raise diverged(step + 1, stats[0].item() / (accum * world), norm.item(), train_set, total, out)
        step += 1
        bar.update(1)
        acc += stats
        window += 1
        loss_step = stats[0].item() / (accum * world)
        per = {e: stats[1 + j].item() / stats[1 + len(targets) + j].item() for j, e in enumerate(targets)
               if stats[1 + len(targets) + j] > 0}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_step, "losses": per,
                                    "lr": lr_at(step - 1, steps, warmup, run.lr), "grad_norm": norm.item()}) + "\n")
        if step % args.log_every == 0 or step == steps:
            dt = (time.time() - t0) / window
            cnt = acc[1 + len(targets):]
            mods = " ".join(f"{short(e)} {(acc[1 + j] / cnt[j]).item():.2f}" for j, e in enumerate(targets)
                            if cnt[j] > 0)
            mfu = f" | mfu {flops * tokens_per_step / dt / (peak * world) * 100:.1f}%" if peak else ""
            line = (f"step {step}/{steps} | loss {acc[0].item() / (window * accum * world):.3f} | {mods} | "
                    f"lr {lr_at(step - 1, steps, warmup, run.lr):.1e} | {dt * 1e3:.0f} ms | "
                    f"{tokens_per_step / dt / 1e3:.1f}k tok/s{mfu}")
            if rank == 0:
                tqdm.write(line)
            acc.zero_()
            t0, window = time.time(), 0
        pause = time.time()   # validation and checkpoint time is not step time
        if step % args.eval_every == 0 or step == steps:
            val = validate()
        if step % args.save_every == 0 or step == steps:
            checkpoint(val)
        t0 += time.time() - pause
    bar.close()
    if rank == 0:
        plot_log(out, read_log(log_path), config)
        log(f"wrote {out / MODEL}, {out / STATE}, {log_path}, {out / 'loss.png'}, {out / 'val.png'}")
    if world > 1:
        dist.destroy_process_group()
    return val


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(PRESETS), help="model preset (terramind.py; default smoke)")
    p.add_argument("--data", required=True, help="TerraMesh-layout folder with splits/{train,val}.txt, or the "
                   "published layout ({train,val}/<MOD>/*.tar)")
    p.add_argument("--tokens", default="tokens", help="token shards folder (fsq_tokenizer.py tokenize); a modality "
                                                       "without shards is left out")
    p.add_argument("--text-tokenizer", help=f"WordPiece JSON for captions and coords (default: {OFFICIAL_VOCAB})")
    p.add_argument("--out", default="ckpt", help="output folder")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (instead of --token-budget)")
    p.add_argument("--token-budget", type=positive_float, help="input + target tokens to train on, as 4M counts them "
                                                      "(default: smoke 2e6, others the paper's 500e9)")
    p.add_argument("--batch-size", type=positive_int, help="micro-batch per process (default: the largest up to "
                                                           "smoke 32, large 32, else 64 that divides the global batch)")
    p.add_argument("--total-batch-size", type=positive_int, help="samples per optimizer step over all processes; "
                   "gradient accumulation makes up the rest (default: smoke 32, else 4096, whatever the processes)")
    p.add_argument("--blr", type=positive_float, help="base learning rate, peak = blr x total batch / 256 (4M; "
                                                      "default: the paper's 2e-4, smoke 1.6e-2)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate itself, not scaled (instead of --blr)")
    p.add_argument("--warmup", type=fraction, help="warmup fraction of the steps (default 0.02: 4M's 10B of 500B)")
    p.add_argument("--weight-decay", type=nonnegative_float, help="AdamW weight decay (default: 4M's 0.05)")
    p.add_argument("--clip-grad", type=nonnegative_float, help="gradient-norm clip, 0 = off (default 1.0)")
    p.add_argument("--input-budget", type=positive_int,
                   help="input tokens per sample (default: 256 at 224 px, 64 at 64 px)")
    p.add_argument("--target-budget", type=positive_int, help="target tokens per sample (default: the input budget)")
    p.add_argument("--alphas", help=f"Dirichlet mixture of masking.py: a name ({', '.join(MIXTURES)}; default mix) "
                   "or components 'INPUTS/TARGETS@WEIGHT;...' of ENTRY=ALPHA lists, e.g. 'S2L2A=1000/*=0.5@1;mix@4'")
    p.add_argument("--scales", choices=SCALES, help="pixel and token entries of one modality masked independently "
                   "(default, 4M) or disjoint: no token target under a visible pixel patch of its modality")
    p.add_argument("--pixel-inputs", help="pixel entries the model embeds: all (default), none, or a list such as "
                   "S2L2A (TerraMind-B-single, paper §4.2: every other modality enters as tokens)")
    p.add_argument("--tile", type=multiple_of(PATCH),
                   help="tile side in px, a multiple of 16 (default: the data's, at most 224; "
                   "larger tiles are cropped, the same window for pixels and tokens)")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the init, sample order, crops and masks (default 0)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="autocast (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's training step (fullgraph)")
    p.add_argument("--workers", type=nonnegative_int,
                   help="DataLoader worker processes per process (default: 1 on CPU, 6 on GPU)")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--eval-every", type=positive_int,
                   help="steps between validations (default: steps / 8, at most 1000)")
    p.add_argument("--eval-samples", type=positive_int, default=512,
                   help="validation samples (the first of splits/val.txt)")
    p.add_argument("--save-every", type=positive_int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", nargs="?", const=True, help=f"continue from <out>/{STATE}, or from the state given")
    train(p.parse_args())


if __name__ == "__main__":
    run_main(main)
