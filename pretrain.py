"""
Pretraining: masked cross-modal token prediction (paper §3.2 and §8.2; 4M,
Mizrahi et al. 2023, §3), from a CPU smoke run to DDP on GPU nodes.

Consumes a TerraMesh-layout folder (--data, with splits/{train,val}.txt): pixel
tiles for the pixel entries (S2L1C, S2L2A, S2RGB, S1GRD, S1RTC, DEM) and
caption/coords text; token shards (--tokens, written by `fsq_tokenizer.py
tokenize`) for the token entries tok_S2L2A ... tok_NDVI; a WordPiece vocabulary
(--text-tokenizer, text_tokenizer.py) for captions and coords. An entry without
data (no folder, no shards) is left out of the model and of the masking budgets,
and the startup log says so. Per sample, in the DataLoader workers, masking.py
draws the input and target budgets and which tokens fill them.

Produces in --out:
  terramind.safetensors        the model: `TerraMind.from_checkpoint(path)`
                               (config in the metadata)
  pretrain_state.safetensors   model + AdamW state + step, data position, RNG and
                               run settings (--resume); the one before it is kept
                               as pretrain_state.prev.safetensors
  log.jsonl, loss.png, val.png one JSON line per step and per validation; the
                               loss curves

This file holds the method: the loop, the loss step, the schedule and the
optimizer's parameter groups. Around it: pretrain_data.py (the data stream,
exact over processes and resumes), pretrain_recipe.py (run settings, the paper's
recipe per size), pretrain_state.py (the resumable state, safe against a kill),
pretrain_log.py (log.jsonl, the finiteness check, pictures).

    # CPU smoke run (synthetic world, 64 px tiles = 4 x 4 tokens; tokenizers and
    # shards: fsq_tokenizer.py)
    python pretrain.py --size smoke --data data/synth --tokens tokens/ --steps 300 --out ckpt/
    python pretrain.py --size smoke --data data/synth --tokens tokens/ --steps 600 --out ckpt/ \\
        --resume
    # one GPU (bf16 autocast, fused AdamW; batch 128 of base needs about 40 GiB): the
    # paper's recipe (§8.2, printed at start: base lr 2e-4 x 4096 / 256, global batch
    # 4096 by gradient accumulation, 500B tokens)
    python pretrain.py --size base --data /data/terramesh --tokens /data/tokens \\
        --batch-size 128 --workers 8 --compile --out ckpt/
    # one node, 8 GPUs (gloo instead of NCCL on CPU), then several nodes: the same
    # global batch and losses
    torchrun --standalone --nproc_per_node=8 pretrain.py --size base \\
        --data /data/terramesh --tokens /data/tokens --batch-size 128 --workers 8 \\
        --compile --out ckpt/
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=$HEAD:29500 pretrain.py ...
    # the ablations: TerraMind-B-single (§4.2), other Dirichlet mixtures (§8.2), no
    # cross-scale overlap
    python pretrain.py --size base ... --pixel-inputs S2L2A \\
        --alphas 'S2L2A=1000/*=0.5@1;mix@4' --scales disjoint
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset, default_collate
from tqdm import tqdm

from cli import (fraction, multiple_of, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, run_main, torch_device, writable_folder)
from entries import ENTRY_INDEX, entry_kind
from masking import MIXTURES, SCALES, Masking, cross_scale_overlap
from modalities import PATCH
from pretrain_data import PretrainData, StepBatches, available_entries, short
from pretrain_log import (StepLog, append_rows, defer_checks, diverged, plot_log,
                          read_log, step_line, val_table)
from pretrain_recipe import RUN_KEYS, pixel_entries, recipe, resolve
from pretrain_state import MODEL, STATE, load_state, save_state, temp_files
from shard_index import is_shard_root
from terramind import PRESETS, TerraMind, TerraMindConfig, flops_per_token
from text_tokenizer import OFFICIAL_VOCAB, WordPieceTokenizer

# dense bf16 peak FLOP/s per GPU, for the MFU of the log lines
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10": 125e12}


# -----------------------------------------------------------------------------
# Optimization


def param_groups(model, weight_decay):
    """4M exemptions from weight decay: norms and biases; embeddings, mask token,
    modality embeddings decay."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        exempt = "norm" in name or name.endswith(".bias")
        if exempt:
            rest.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """4M (DINO cosine_scheduler): linear warmup from 0, then half-cosine to 0,
    per step."""
    if step < warmup:
        return lr * step / warmup
    angle = math.pi * (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(angle))


def train_step(net, model, opt, batches, accum, world, device, dtype,
               clip) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches from the iterator `batches`
    -> (stats, grad norm); stats (float64, summed over micro-batches and ranks):
    [loss, per-target-entry cross-entropy sums, per-entry target counts]. `net` is
    the model, compiled and/or DDP-wrapped. No host sync: the model's static form
    (`sums=True`) gives the per-entry sums as tensors."""
    T = len(model.config.targets)
    stats = torch.zeros(1 + 2 * T, dtype=torch.float64, device=device)
    autocast = dict(dtype=dtype or torch.float32, enabled=dtype is not None)
    for a in range(accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        sync = world == 1 or a == accum - 1
        # DDP: all-reduce once per step
        reduce_later = net.no_sync() if not sync else contextlib.nullcontext()
        with reduce_later:
            with torch.autocast(device.type, **autocast):
                loss, sums = net(batch, sums=True)                   # (), (2, T)
            # every parameter takes part (zero gradient where an entry had no
            # tokens), as in 4M where each modality's embedding runs every step;
            # DDP then needs no unused-parameter search
            touch = sum(p.view(-1)[:1].sum() for p in model.entry_parameters())
            loss = loss + 0.0 * touch
            (loss / accum).backward()
        stats[0] += loss.detach().double()
        stats[1:] += sums.detach().double().flatten()                # T sums, T counts
    if world > 1:
        dist.all_reduce(stats)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, norm


# -----------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(model, loader, device, dtype, world) -> dict:
    """Token-weighted cross-entropy per target entry over the validation stream
    (all ranks) -> {entry: loss}."""
    model.eval()
    targets = model.config.targets
    # loss sum, token count
    sums = torch.zeros(2, len(targets), dtype=torch.float64, device=device)
    autocast = dict(dtype=dtype or torch.float32, enabled=dtype is not None)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, **autocast):
            _, losses = model(batch)
        for j, e in enumerate(targets):
            if e in losses:
                n = (batch["target_mod"] == ENTRY_INDEX[e]).sum()
                sums[0, j] += losses[e].double() * n
                sums[1, j] += n
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    val = {}
    for j, e in enumerate(targets):
        if sums[1, j] > 0:
            val[e] = (sums[0, j] / sums[1, j]).item()
    return val


# -----------------------------------------------------------------------------
# Training


def setup_distributed(device: str):
    """torchrun -> (rank, world, device); NCCL on GPU, gloo on CPU. Plain `python`
    -> (0, 1, device)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def quiet(*args, **kwargs):
    """The log of ranks other than 0."""


class Pretraining:
    """One pretraining run, as this process sees it: the settings, the data, the
    model and optimizer, the logs. `fit()` runs the loop to the last step."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.log = print if self.rank == 0 else quiet
        self.set_threads()
        state = self.open_folder()
        saved = state[3]["run"] if state else None
        self.run = run = resolve(args, self.world, saved)
        if state is not None and state[3]["step"] >= run.steps:
            raise ValueError(
                f"--steps {run.steps}: the checkpoint is already at step "
                f"{state[3]['step']}; give more steps (or a larger --token-budget) "
                f"to continue training")
        self.total = run.total_batch_size
        self.accum = self.total // (run.batch_size * self.world)
        self.config, shards, text = self.model_config(state)
        self.make_data(shards, text)
        self.make_model(state)
        self.describe()
        self.prepare_log(state)

    def set_threads(self):
        """Loader workers per process and, on CPU, the compute threads."""
        args = self.args
        if args.workers is None:
            args.workers = 1 if self.device.type == "cpu" else 6
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # leave the loader workers their cores: more threads than free cores
            # stall every OpenMP barrier
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores - args.workers))

    def open_folder(self):
        """The output folder (proved writable, left-overs of a killed save removed)
        and the state to resume from, or None."""
        args = self.args
        if self.rank == 0:
            self.out = writable_folder(args.out)
            for stale in temp_files(self.out):
                stale.unlink()
                self.log(f"removed {stale}: a temporary file of an interrupted save")
        else:
            self.out = Path(args.out)
        if not args.resume:
            return None
        path = self.out / STATE if args.resume is True else Path(args.resume)
        state = load_state(path)
        self.state_path = path
        self.log(f"resuming {path} at step {state[3]['step']}")
        return state

    def model_config(self, state):
        """The model's configuration (the entries the data has, or the
        checkpoint's), the token shards and the text tokenizer."""
        args, run = self.args, self.run
        text = WordPieceTokenizer.from_file(run.text_tokenizer)
        self.log(f"data {args.data}, tokens {args.tokens}, text "
                 f"{run.text_tokenizer} ({text.vocab_size} ids)")
        entries, shards = available_entries(args.data, args.tokens, self.log)
        pixels = pixel_entries(run.pixel_inputs)
        left = [e for e in entries if entry_kind(e) == "pixels" and e not in pixels]
        if left:
            self.log(f"  {', '.join(left)}: not a pixel input "
                     f"(--pixel-inputs {run.pixel_inputs}) -> left out")
        inputs = [e for e in entries if entry_kind(e) != "pixels" or e in pixels]
        targets = [e for e in entries if entry_kind(e) != "pixels"]
        self.grid = run.tile // PATCH
        config = replace(TerraMindConfig.preset(run.size), grid=self.grid,
                         inputs=tuple(inputs), targets=tuple(targets))
        if state is not None:
            config = TerraMindConfig(**state[3]["config"])
        return config, shards, text

    def make_data(self, shards, text):
        """The train and validation streams (pretrain_data.py) and the loader kwargs."""
        args, run, config = self.args, self.run, self.config
        masking = Masking(config.inputs, config.targets, run.input_budget,
                          run.target_budget, run.alphas, self.grid, scales=run.scales)
        self.names = ("splits/train.txt", "splits/val.txt")
        if is_shard_root(args.data):
            self.names = ("train/", "val/")
        common = (shards, text, masking, run.tile, run.seed)
        self.train_set = PretrainData(args.data, "train", *common, shuffle=True)
        self.val_set = PretrainData(args.data, "val", *common, shuffle=False)
        if len(self.train_set) < self.total:
            raise ValueError(f"{args.data}/{self.names[0]}: {len(self.train_set)} "
                             f"samples, fewer than one step of {self.total}")
        self.n_val = min(len(self.val_set), args.eval_samples)
        positions = list(range(self.n_val))[self.rank::self.world]
        self.loader_kw = dict(num_workers=args.workers, collate_fn=default_collate,
                              pin_memory=self.device.type == "cuda")
        self.val_loader = DataLoader(Subset(self.val_set, positions), run.batch_size,
                                     **self.loader_kw)

    def make_model(self, state):
        """The model, AdamW (4M: betas (0.9, 0.95), wd 0.05) and the step to start
        at, restored from `state` when resuming."""
        run, device = self.run, self.device
        torch.manual_seed(run.seed)
        self.model = TerraMind(self.config).to(device)
        groups = param_groups(self.model, run.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, 0.95), eps=1e-8,
                                     fused=device.type in ("cuda", "cpu"))
        self.step = 0
        if state is not None:
            self.restore(state)
        net = self.model
        if self.args.compile:
            net = torch.compile(net, fullgraph=True)   # the whole step: one graph
        if self.world > 1:
            ids = [device] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, ids)
        self.net = net
        default = "bf16" if device.type == "cuda" else "fp32"
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[self.args.dtype or default]

    def restore(self, state):
        """Model, AdamW moments, RNG and step from the state; the data stream
        resumes at sample step x total."""
        model_sd, opt_sd, rng, meta = state
        self.model.load_state_dict(model_sd)
        self.opt.load_state_dict(opt_sd)
        torch.set_rng_state(rng["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda.0" in rng:
            gpus = range(torch.cuda.device_count())
            torch.cuda.set_rng_state_all([rng[f"rng.cuda.{i}"] for i in gpus])
        self.step = step = meta["step"]
        if meta["position"] != step * self.total:
            raise ValueError(f"{self.state_path}: data position {meta['position']} is "
                             f"not step {step} x {self.total} samples")
        self.log(f"resumed at step {step}: model, AdamW moments, RNG and data "
                 f"position {step * self.total} restored")

    def describe(self):
        """The startup lines: data, model, run length, recipe, scale overlap."""
        run, config, dtype = self.run, self.config, self.dtype
        self.tokens_per_step = self.total * (run.input_budget + run.target_budget)
        self.warmup = math.ceil(run.warmup * run.steps)
        self.flops = flops_per_token(config, run.input_budget, run.target_budget)
        n_params = sum(p.numel() for p in self.model.parameters())
        precision = ("bf16" if dtype else "fp32") + (" compiled" if self.args.compile else "")
        self.log(
            f"  {len(self.train_set)} train / {len(self.val_set)} val samples, tiles "
            f"{run.tile} px = {self.grid}x{self.grid} tokens\n"
            f"model {run.size}: {n_params / 1e6:.2f}M parameters, "
            f"{self.flops / 1e6:.1f} MFLOP per token (training)\n"
            f"  inputs  {' '.join(config.inputs)}\n  targets {' '.join(config.targets)}\n"
            f"run: {run.steps} steps x {self.total} samples x ({run.input_budget} + "
            f"{run.target_budget}) tokens = "
            f"{run.steps * self.tokens_per_step / 1e6:.1f}M tokens; "
            f"{self.device} {precision}\n" + recipe(run, self.world, self.warmup))
        if self.rank == 0:
            # paper §3.2 relates the two scales of a modality; how often a target
            # sits under its pixels
            first = [self.train_set[k] for k in range(min(64, len(self.train_set)))]
            shares = cross_scale_overlap(first)
            said = ", ".join(f"{short(e)} {v:.0%}" for e, v in shares.items())
            self.log("  token targets under visible pixels of their modality "
                     "(first 64 samples): " + (said or "none (no pixel twin)"))

    def prepare_log(self, state):
        """log.jsonl up to the checkpoint's step (a resumed run rewrites it), the
        step log and its finiteness check."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        if self.rank == 0:
            rows = read_log(self.log_path, self.step if state is not None else -1)
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

        def named(step, loss, norm):
            return diverged(step, loss, norm, self.train_set, self.total, self.out)

        deferred = defer_checks(self.device)
        self.steps_log = StepLog(self.log_path, self.config.targets, deferred,
                                 self.accum * self.world, named, self.rank == 0)
        self.args.eval_every = self.args.eval_every or max(1, min(1000, self.run.steps // 8))

    def checkpoint(self, val=None):
        """The state first, then the model export: the export never runs ahead."""
        if self.rank != 0:
            return
        step, run = self.step, self.run
        saved_run = {k: getattr(run, k) for k in RUN_KEYS}
        meta = {"step": step, "position": step * self.total,
                "config": asdict(self.config), "run": saved_run}
        save_state(self.out / STATE, self.model, self.opt, meta)
        self.model.save_checkpoint(self.out / MODEL, step=step,
                                   tokens_seen=step * self.tokens_per_step,
                                   run=saved_run, val=val or {})

    def validate(self) -> dict:
        """Validation losses (written to log.jsonl, printed in Table 9 layout)."""
        step = self.step
        val = evaluate(self.model, self.val_loader, self.device, self.dtype, self.world)
        if self.rank == 0 and val:
            row = {"step": step, "val": val, "val_loss": sum(val.values()) / len(val)}
            append_rows(self.log_path, [row])
            label = f"{self.run.size} step {step}"
            tqdm.write(f"validation at step {step}, {self.n_val} samples of "
                       f"{self.args.data}/{self.names[1]} (cross-entropy, nats):\n"
                       + val_table(val, self.config, label))
        return val

    def mfu(self, dt: float) -> str:
        """' | mfu x%' on a GPU whose peak PEAK_FLOPS knows, else ''."""
        if self.device.type != "cuda":
            return ""
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak is None:
            return ""
        used = self.flops * self.tokens_per_step / dt
        return f" | mfu {used / (peak * self.world) * 100:.1f}%"

    def fit(self) -> dict:
        """The loop: one optimizer step per iteration at the 4M schedule's rate; the
        step log, validation and checkpoints at their intervals."""
        args, run, steps = self.args, self.run, self.run.steps
        sampler = StepBatches(self.step, steps, self.rank, self.world, run.batch_size,
                              self.accum)
        batches = iter(DataLoader(self.train_set, batch_sampler=sampler, **self.loader_kw))
        bar = tqdm(total=steps, initial=self.step, disable=True if self.rank else None,
                   desc="pretrain", unit="step",
                   dynamic_ncols=True)   # None: a bar on a terminal, none in a log file
        T = len(self.config.targets)
        # loss, per-entry sums, counts
        acc = torch.zeros(1 + 2 * T, dtype=torch.float64, device=self.device)
        val = self.validate() if self.step == 0 else {}   # untrained: every loss near log(V)
        t0, window = time.time(), 0
        while self.step < steps:
            lr = lr_at(self.step, steps, self.warmup, run.lr)
            for group in self.opt.param_groups:
                group["lr"] = lr
            stats, norm = train_step(self.net, self.model, self.opt, batches, self.accum,
                                     self.world, self.device, self.dtype, run.clip_grad)
            self.step += 1
            self.steps_log.add(self.step, lr, stats, norm)   # eager: raises here
            bar.update(1)
            acc += stats
            window += 1
            logs = self.step % args.log_every == 0 or self.step == steps
            evals = self.step % args.eval_every == 0 or self.step == steps
            saves = self.step % args.save_every == 0 or self.step == steps
            if logs or evals or saves:   # nothing past a non-finite step is shown or kept
                self.steps_log.flush()
            if logs:
                dt = (time.time() - t0) / window
                line = step_line(self.step, steps, acc, self.config.targets, window,
                                 self.accum * self.world, lr, dt, self.tokens_per_step,
                                 self.mfu(dt))
                if self.rank == 0:
                    tqdm.write(line)
                acc.zero_()
                t0, window = time.time(), 0
            pause = time.time()   # validation and checkpoint time is not step time
            if evals:
                val = self.validate()
            if saves:
                self.checkpoint(val)
            t0 += time.time() - pause
        bar.close()
        return val

    def finish(self):
        """The loss curves and the list of what was written."""
        if self.rank == 0:
            plot_log(self.out, read_log(self.log_path), self.config)
            self.log(f"wrote {self.out / MODEL}, {self.out / STATE}, {self.log_path}, "
                     f"{self.out / 'loss.png'}, {self.out / 'val.png'}")
        if self.world > 1:
            # gloo's worker threads drop their last tensors after a collective
            # returns, and that needs the GIL: a rank that ran straight into
            # interpreter exit aborted ("terminate called without an active
            # exception"). The barrier waits, GIL released, for those threads.
            dist.barrier()
            dist.destroy_process_group()


def train(args) -> dict:
    """A whole run from parsed flags -> the last validation losses."""
    run = Pretraining(args)
    val = run.fit()
    run.finish()
    return val


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(PRESETS),
                   help="model preset (terramind.py; default smoke)")
    p.add_argument("--data", required=True,
                   help="TerraMesh-layout folder with splits/{train,val}.txt, or the "
                   "published layout ({train,val}/<MOD>/*.tar)")
    p.add_argument("--tokens", default="tokens",
                   help="token shards folder (fsq_tokenizer.py tokenize); a modality "
                   "without shards is left out")
    p.add_argument("--text-tokenizer",
                   help=f"WordPiece JSON for captions and coords (default: {OFFICIAL_VOCAB})")
    p.add_argument("--out", default="ckpt", help="output folder")
    p.add_argument("--device", type=torch_device,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--steps", type=positive_int,
                   help="optimizer steps (instead of --token-budget)")
    p.add_argument("--token-budget", type=positive_float,
                   help="input + target tokens to train on, as 4M counts them "
                   "(default: smoke 2e6, others the paper's 500e9)")
    p.add_argument("--batch-size", type=positive_int,
                   help="micro-batch per process (default: the largest up to smoke 32, "
                   "large 32, else 64 that divides the global batch)")
    p.add_argument("--total-batch-size", type=positive_int,
                   help="samples per optimizer step over all processes; gradient "
                   "accumulation makes up the rest (default: smoke 32, else 4096, "
                   "whatever the processes)")
    p.add_argument("--blr", type=positive_float,
                   help="base learning rate, peak = blr x total batch / 256 (4M; "
                   "default: the paper's 2e-4, smoke 1.6e-2)")
    p.add_argument("--lr", type=positive_float,
                   help="peak learning rate itself, not scaled (instead of --blr)")
    p.add_argument("--warmup", type=fraction,
                   help="warmup fraction of the steps (default 0.02: 4M's 10B of 500B)")
    p.add_argument("--weight-decay", type=nonnegative_float,
                   help="AdamW weight decay (default: 4M's 0.05)")
    p.add_argument("--clip-grad", type=nonnegative_float,
                   help="gradient-norm clip, 0 = off (default 1.0)")
    p.add_argument("--input-budget", type=positive_int,
                   help="input tokens per sample (default: 256 at 224 px, 64 at 64 px)")
    p.add_argument("--target-budget", type=positive_int,
                   help="target tokens per sample (default: the input budget)")
    p.add_argument("--alphas",
                   help=f"Dirichlet mixture of masking.py: a name ({', '.join(MIXTURES)}; "
                   "default mix) or components 'INPUTS/TARGETS@WEIGHT;...' of "
                   "ENTRY=ALPHA lists, e.g. 'S2L2A=1000/*=0.5@1;mix@4'")
    p.add_argument("--scales", choices=SCALES,
                   help="pixel and token entries of one modality masked independently "
                   "(default, 4M) or disjoint: no token target under a visible pixel "
                   "patch of its modality")
    p.add_argument("--pixel-inputs",
                   help="pixel entries the model embeds: all (default), none, or a list "
                   "such as S2L2A (TerraMind-B-single, paper §4.2: every other "
                   "modality enters as tokens)")
    p.add_argument("--tile", type=multiple_of(PATCH),
                   help="tile side in px, a multiple of 16 (default: the data's, at most "
                   "224; larger tiles are cropped, the same window for pixels and tokens)")
    p.add_argument("--seed", type=nonnegative_int,
                   help="seed of the init, sample order, crops and masks (default 0)")
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="autocast (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's training step (fullgraph)")
    p.add_argument("--workers", type=nonnegative_int,
                   help="DataLoader worker processes per process (default: 1 on CPU, 6 on GPU)")
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="steps between log lines")
    p.add_argument("--eval-every", type=positive_int,
                   help="steps between validations (default: steps / 8, at most 1000)")
    p.add_argument("--eval-samples", type=positive_int, default=512,
                   help="validation samples (the first of splits/val.txt)")
    p.add_argument("--save-every", type=positive_int, default=1000,
                   help="steps between checkpoints")
    p.add_argument("--resume", nargs="?", const=True,
                   help=f"continue from <out>/{STATE}, or from the state given")
    train(p.parse_args())


if __name__ == "__main__":
    run_main(main)
