"""
The resumable state of pretraining (pretrain.py): model, AdamW moments, RNG,
step and data position in one self-describing safetensors file, written so that
a kill at any instant leaves a complete state behind.

Produces in the run folder:
  pretrain_state.safetensors        the current state (`--resume` reads it)
  pretrain_state.prev.safetensors   the one before it, on its own inode

    save_state(out / STATE, model, opt, {"step": 100, ...})
    model_sd, opt_sd, rng, meta = load_state(out / STATE)
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from checkpoints import expect_kind, load_safetensors, optimizer_state, save_safetensors

STATE, MODEL = "pretrain_state.safetensors", "terramind.safetensors"
# test hook: "<point>@<step>" SIGKILLs this process at that point of save_state
KILL_AT = "PRETRAIN_KILL_AT"


def kill_point(point: str, step: int):
    """The crash test's hook (tests/test_pretrain.py): with
    PRETRAIN_KILL_AT=<point>@<step> in the environment, the process kills itself
    (SIGKILL, no clean-up) at that named point of the save at that step."""
    if os.environ.get(KILL_AT) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def copy_file(src: Path, dst: Path, step: int, chunk: int = 1 << 20):
    """A byte copy on a new inode (never a hard link: a later save must not touch
    the backup), flushed to disk; the hook point "copying" lies halfway through."""
    half = src.stat().st_size // 2
    with open(src, "rb") as f, open(dst, "wb") as g:
        while block := f.read(chunk):
            g.write(block)
            if g.tell() >= half and g.tell() - len(block) < half:
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
    """The temporary files save_state and the model export leave when killed
    (their names, nothing else)."""
    names = [f"{STATE}.new*", f"{STATE}.tmp*", "pretrain_state.prev.tmp*", f"{MODEL}.tmp*"]
    found = []
    for name in names:
        found += [p for p in out.glob(name) if p.is_file()]
    return sorted(found)


def state_tensors(model, opt_sd: dict) -> dict:
    """The tensors of a state file: model.*, opt.<param id>.<name>, rng.*."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, moments in opt_sd["state"].items():
        for k, v in moments.items():
            # 0-d tensors (AdamW's step) go as (1,): terramesh's checksum cannot view 0-d tensors
            tensors[f"opt.{i}.{k}"] = v.reshape(1) if v.ndim == 0 else v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def save_state(path: Path, model, opt, meta: dict):
    """Model + optimizer + RNG, safe against a kill at any instant: the current
    state is copied (not linked) to *.prev through a temporary file and a rename,
    then the new state is written to a temporary file and renamed over the current
    one. At every instant the folder holds a complete current state (the old or the
    new one) on its own inode; a kill leaves at most temporary files, removed at the
    next start."""
    opt_sd = opt.state_dict()
    tensors = state_tensors(model, opt_sd)
    groups = []
    for g in opt_sd["param_groups"]:
        settings = {k: v for k, v in g.items() if k != "params"}
        groups.append(settings | {"params": g["params"]})
    step, pid = meta["step"], os.getpid()
    kill_point("start", step)
    if path.exists():   # keep the last good state as *.prev
        prev = path.with_suffix(".prev.safetensors")
        tmp = path.with_suffix(f".prev.tmp{pid}")
        copy_file(path, tmp, step)
        kill_point("copied", step)
        os.replace(tmp, prev)
        kill_point("rotated", step)
    new = path.with_name(f"{path.name}.new{pid}")
    described = {**meta, "opt_groups": groups, "opt_ids": list(opt_sd["state"])}
    save_safetensors(new, tensors, described)
    kill_point("written", step)
    os.replace(new, path)
    fsync_folder(path.parent)
    kill_point("replaced", step)


def load_state(path: Path, device="cpu"):
    """-> (model state dict, optimizer state dict, rng tensors, meta); a bad file
    raises ValueError naming it and the previous checkpoint to resume from instead.
    Tensors are cloned off the file's memory map, so training never reads from (or
    writes into) a checkpoint file."""
    try:
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "pretrain state")
    except ValueError as e:
        prev = path.with_suffix(".prev.safetensors")
        hint = ""
        if prev.exists():
            hint = f"; the previous state is {prev}: resume from it with --resume {prev}"
        raise ValueError(f"{e}{hint}") from None
    tensors = {k: v.clone() for k, v in tensors.items()}
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k: v.cpu() for k, v in tensors.items() if k.startswith("rng.")}
    return model, optimizer_state(tensors, meta), rng, meta
