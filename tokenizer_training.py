"""
How the image tokenizers are trained: the recipe of paper §8.1 and the plumbing of the loop.

`fsq_tokenizer.py train` runs the loop (its `train()` reads top to bottom); this file holds what
the loop calls, so that each piece fits a screen:

  * `TRAIN_DEFAULTS`, `train_recipe`: steps, learning rate, warmup, EMA and autocast of a run,
    from the flags, else the preset (official: paper §8.1 and the official code);
  * `lr_at`: linear warmup, then cosine to 0;
  * `augment`: random crops (§8.1) and horizontal flips;
  * `backward`, `update_ema`, `diverged`: one optimizer step, the EMA, a step gone non-finite;
  * `save_state`, `load_state`, `resume`: `tokenizer_<MOD>.state.safetensors` for --resume;
  * `setup_distributed`, `make_loader`, `make_optimizer`: DDP under torchrun, batches, AdamW.

It consumes the flags of `fsq_tokenizer.py train` and has no command line of its own:
    python fsq_tokenizer.py train --modality DEM --data data/synth --size smoke --out ckpt/
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from checkpoints import expect_kind, load_safetensors, save_safetensors
from cli import TrainingDiverged
from modalities import MODALITIES
from token_shards import read_header
from tokenizer_data import WithIds, random_crop

# Run settings per preset that flags override. official: paper §8.1 (100 epochs, base lr 1e-4 at
# global batch 256 scaled as 4M does, EMA, fp16 for the diffusion tokenizers, random crops) with
# the official code's EMA decays (tokenizer_register.py docstrings: 0.9999, LULC 0.99) and its
# one-epoch warmup; 32 per GPU x 8 GPUs is the paper's 256. tiny/smoke (ours): steps and an
# absolute lr (higher rates saturate the sigmoid of FSQ on the synthetic world: the codebook
# collapses to ~2^5 codes)
TRAIN_DEFAULTS = {"official": dict(epochs=100, batch_size=32, blr=1e-4, ema=0.9999),
                  "tiny": dict(steps=2000, batch_size=32, lr=5e-4, ema=0.0),
                  "smoke": dict(steps=400, batch_size=32, lr=5e-4, ema=0.0)}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_recipe(args, m: str, world: int, n: int, batch: int,
                 cuda: bool) -> argparse.Namespace:
    """steps, peak lr, warmup steps, EMA decay and autocast dtype of one tokenizer's training,
    from the flags, else the preset: --epochs over the n samples (the official preset) or
    --steps; --lr as given or --blr x global batch / 256 (4M); warmup one epoch when training
    by epochs, else 5% of the steps."""
    preset = TRAIN_DEFAULTS[args.size]
    per_epoch = max(1, n // (batch * world))
    epochs = args.epochs or (None if args.steps else preset.get("epochs"))
    steps = epochs * per_epoch if epochs else args.steps or preset["steps"]
    blr = args.blr or (None if args.lr else preset.get("blr"))
    lr = blr * batch * world / 256 if blr else args.lr or preset["lr"]
    official_ema = 0.99 if m == "LULC" else preset["ema"]     # official: LULC's EMA decay is 0.99
    ema = args.ema if args.ema is not None else official_ema if preset["ema"] else 0.0
    diffusion = MODALITIES[m].decoder == "diffusion"
    gpu_dtype = "fp16" if args.size == "official" and diffusion else "bf16"
    dtype = args.dtype or (gpu_dtype if cuda else "fp32")
    warmup = per_epoch if epochs else max(1, steps // 20)
    length = f"{epochs} epochs x {per_epoch} steps = {steps} steps" if epochs else f"{steps} steps"
    rate = f"base lr {blr:.1e} x {batch * world} / 256 = lr {lr:.2e}" if blr else f"lr {lr:.1e}"
    text = (f"{length} of {batch} x {world}; {rate}, warmup {warmup} steps, "
            f"EMA {ema or 'off'}, {dtype}")
    return argparse.Namespace(steps=steps, lr=lr, ema=ema, dtype=dtype, warmup=warmup, text=text)


def lr_at(step: int, steps: int, lr: float, warmup_lr: float = 1e-6,
          warmup: int | None = None) -> float:
    """Linear warmup from warmup_lr over `warmup` steps (default 5% of the steps; the official
    preset: one epoch, as the official code), then cosine to 0 (official: warmup_lr 1e-6,
    min_lr 0)."""
    warmup = warmup or max(1, steps // 20)
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def train_state_path(folder, modality: str) -> Path:
    return Path(folder) / f"tokenizer_{modality}.state.safetensors"


def setup_distributed(device: str) -> tuple[bool, int, int, str]:
    """(DDP?, rank, world size, device). Under torchrun: one process per GPU with --device cuda,
    CPU processes over gloo with --device cpu (even where a GPU is present)."""
    ddp, rank = int(os.environ.get("WORLD_SIZE", 1)) > 1, int(os.environ.get("RANK", 0))
    if not ddp:
        return False, rank, 1, device
    cuda = str(device).startswith("cuda")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, rank, torch.distributed.get_world_size(), device


def make_loader(ds, batch: int, args, ddp: bool):
    """(sampler, loader) of shuffled training batches with the samples' ids."""
    if ddp:
        sampler = torch.utils.data.DistributedSampler(ds, seed=args.seed)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        sampler = torch.utils.data.RandomSampler(ds, generator=generator)
    loader = torch.utils.data.DataLoader(WithIds(ds), batch, sampler=sampler, drop_last=True,
                                         num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    return sampler, loader


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.99), weight decay 0.05 on matrices, none on biases and norms (official)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]                # biases, norms
    groups = [{"params": matrices, "weight_decay": 0.05},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)  # official recipe


def save_state(path: Path, model, opt, ema, step: int, cfg):
    """The training state for --resume: raw weights, EMA weights, AdamW's state."""
    opt_state = opt.state_dict()["state"]
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in (ema or {}).items():
        tensors[f"ema.{k}"] = v
    for i, s in opt_state.items():
        for k, v in s.items():
            # 0-d tensors (AdamW's step) go as (1,): terramesh's checksum cannot view 0-d ones
            tensors[f"opt.{i}.{k}"] = v.reshape(-1) if v.dim() == 0 else v
    meta = {"step": step, "opt": list(opt_state), "config": asdict(cfg)}
    save_safetensors(path, tensors, meta)


def load_state(path: Path, model, opt, ema, device) -> tuple[int, dict | None]:
    """Restores a state written by save_state -> (step, EMA weights)."""
    tensors, meta = load_safetensors(path, device)
    expect_kind(path, meta, "tokenizer state")
    tensors = {k: v.clone() for k, v in tensors.items()}            # off the file's memory map
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or ema
    state = opt.state_dict()
    state["state"] = {}
    for i in meta["opt"]:
        group = {}
        for k, v in tensors.items():
            if k.startswith(f"opt.{i}."):
                group[k.split(".", 2)[2]] = v.reshape(()) if k.endswith(".step") else v
        state["state"][int(i)] = group
    opt.load_state_dict(state)
    return meta["step"], ema


def augment(x: torch.Tensor, sizes: list[int], device) -> torch.Tensor:
    """A random crop (paper §8.1) and a horizontal flip with probability 0.5 (official)."""
    x = random_crop(x, sizes).to(device, non_blocking=True)
    flip = torch.rand(x.shape[0], device=device) < 0.5
    flip = flip.view(-1, *[1] * (x.dim() - 1))
    return torch.where(flip, x.flip(-1), x)


def start_ema(model: nn.Module) -> dict:
    """EMA weights, starting as a copy of the model's."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def wrap_ddp(model: nn.Module, device: str) -> nn.Module:
    device_ids = None if device == "cpu" else [device]
    return nn.parallel.DistributedDataParallel(model, device_ids)


def update_ema(ema: dict, model: nn.Module, decay: float):
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].lerp_(v, 1 - decay)
            else:
                ema[k].copy_(v)


def diverged(m, step, loss, norm, ids, data, state_path: Path) -> TrainingDiverged:
    """The error of a step with a non-finite loss or gradient: nothing of it is applied or
    saved."""
    last = "none yet"
    if state_path.exists():
        last = f"{state_path} (step {read_header(state_path).get('step')})"
    return TrainingDiverged(f"{m} tokenizer, step {step}: loss {loss:.4g}, gradient norm "
                            f"{norm:.4g}: training stopped before this update; the batch's "
                            f"samples in {data}/{m}: {', '.join(ids)}; check them with "
                            f"`python terramesh.py stats`; last good checkpoint: {last}")


def resume(args, state_path: Path, model, opt, ema, device, steps: int, rank: int):
    """(step, EMA weights) to start from: the state's with --resume, else (0, ema)."""
    if not args.resume:
        return 0, ema
    if not state_path.exists():
        if rank == 0:
            print(f"--resume: no {state_path} yet; training {model.modality} from step 0")
        return 0, ema
    step, ema = load_state(state_path, model, opt, ema, device)
    if step >= steps:
        raise ValueError(f"--steps {steps}: {state_path} is already at step {step}; "
                         f"give more steps to continue")
    if rank == 0:
        print(f"resumed {state_path} at step {step}")
    return step, ema


def backward(net, model, opt, scaler, x, dtype, device: str):
    """Loss of the batch, its gradients (unscaled), their norm clipped to 1.0 (official)
    -> (loss, gradient norm)."""
    with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        loss = net(x)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return loss, norm


def log_line(step: int, plan, loss: float, seconds: float, images: int) -> str:
    lr = lr_at(step - 1, plan.steps, plan.lr, warmup=plan.warmup)
    return (f"step {step}/{plan.steps} | loss {loss:.4f} | lr {lr:.1e} | "
            f"{seconds * 1e3:.0f} ms | {images / seconds:.1f} img/s")
