"""
Thinking-in-Modalities (TiM) fine-tuning and inference (paper §4.4, eq. 5-6, Tables 8 and 13;
official: terratorch .../terramind/model/terramind_tim.py).

Before the downstream model sees an input, a frozen copy of the pretrained TerraMind generates
extra modalities from it (`--tim LULC`; several are generated in a chain, each conditioned on the
input and the ones before it, eq. 5). The generated token ids enter a trainable copy of the
encoder as additional token inputs (eq. 6); the per-patch features of the encoder blocks are
merged over modalities (mean or concat) and go to PANGAEA's UPerNet head (pangaea_decoders.py).
No gradient reaches the generator: it is frozen, runs under no_grad, and hands over discrete
ids. `--tim none` is plain fine-tuning, the baseline.

Consumes a pretrained TerraMind (pretrain.py) and Sen1Floods11 (`--dataset sen1floods11`, v1.1
layout; S1 -> S1GRD, S2 L1C -> S2L1C, labels -1 ignored) or a TerraMesh root with a label folder
(the synthetic world's label_water; GeoTIFF or published shard layout), read by tim_data.py.
Produces in --out: model.safetensors (best validation mIoU: encoder, head and frozen generator,
config in the metadata; `TiMSegmenter.from_checkpoint`), state.safetensors (--resume),
results.json, log.jsonl, curves.png, prediction.png. `predict` streams inputs of any size window
by window (tim_scene.py) into a tiled class mask GeoTIFF with the inputs' georeferencing,
resumable with --resume, and a PNG overlay up to 2048 px. `--cache` reuses generated TiM tokens
per (sample, crop): deterministic sampling only (see README).

    # CPU smoke run: synthetic world, smoke TerraMind from pretrain.py (64 px tiles)
    python tim_finetune.py train --model ckpt/terramind.safetensors --data data/synth \\
        --modalities S1GRD --tim LULC --temperature 0 --cache --lr 1e-3 --channels 64 \\
        --epochs 3 --out runs/tim/s1_lulc
    python tim_finetune.py train ... --tim none --out runs/tim/s1    # plain fine-tuning baseline
    python tim_finetune.py table runs/tim/*/results.json             # paper Table 8 layout
    python tim_finetune.py predict --ckpt runs/tim/s1_lulc/model.safetensors \\
        --input S1GRD=tile.tif --out mask.tif
    # one GPU, official TiM example (terramind_v1_base_tim_lulc_sen1floods11.yaml): bf16 autocast
    python tim_finetune.py train --model ckpt/terramind_base.safetensors \\
        --dataset sen1floods11 --data data/sen1floods11 --modalities S2L1C,S1GRD --tim LULC \\
        --epochs 100 --device cuda --out runs/tim/sf11
Fine-tuning runs in one process: there is no torchrun variant.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoints import expect_kind, load_safetensors, optimizer_state, save_safetensors
from cli import (TrainingDiverged, fraction, multiple_of, nonnegative_float,
                 nonnegative_int, positive_float, positive_int, run_main, torch_device,
                 writable_folder)
from eval_pangaea import default_layers
from generate import Sampling, generate_tokens
from metrics import confusion_matrix, segmentation_scores
from modalities import MODALITIES, PATCH, TOKENIZED_IMAGES, modality_names
from pangaea_datasets import OPTICAL
from pangaea_decoders import UPerNet
from pangaea_reports import save_prediction, table8, write_json
from pictures import plot_curves, save_png
from render import render
from scene import Raster
from sliding_windows import sliding_inference
from terramind import TerraMind, TerraMindConfig
from tim_data import IGNORE, TiMData, readers
from tim_scene import (OVERLAY_MAX, check_inputs, class_shares, overlay, predict_outputs,
                       predict_scene)

PIXELS = [m for m in MODALITIES if MODALITIES[m].pixel_key]

# -----------------------------------------------------------------------------------------------
# The model: frozen generator, trainable encoder, UPerNet (official: terramind_tim.py)


@dataclass
class TiMConfig:
    """Defaults are the official TiM settings: LULC, one ROAR step, temperature 1, top-p 0.8,
    mean merge."""
    modalities: tuple = ("S2L1C", "S1GRD")   # raw pixel inputs, in encoder order
    tim: tuple = ("LULC",)         # generated modalities, in chain order; () = plain fine-tuning
    num_classes: int = 2
    merge: str = "mean"            # official merge_method: "mean" or "concat"
    layers: tuple = ()             # encoder blocks into UPerNet (default: default_layers)
    channels: int = 512            # UPerNet channels (PANGAEA 512)
    tile: int = 224                # training crop = inference window, px
    steps: int = 1                 # decoding steps per TiM modality (official 1)
    scheme: str = "roar"           # official roar; maskgit commits the most confident per step
    temperature: float = 1.0       # 0 = argmax
    top_p: float = 0.8
    top_k: float = 0               # official 0 (off)
    # TerraMindConfig of the trainable copy, and of the frozen copy ({} without TiM)
    encoder: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        self.tim, self.layers = tuple(self.tim), tuple(self.layers)
        bad = [m for m in self.modalities if m not in PIXELS]
        if bad:
            raise ValueError(f"inputs must be pixel modalities ({', '.join(PIXELS)}), got {bad}")
        bad = [m for m in self.tim if m not in TOKENIZED_IMAGES]
        if bad:
            raise ValueError(f"TiM modalities must be tokenized images "
                             f"({', '.join(TOKENIZED_IMAGES)}), got {bad}")
        if self.merge not in ("mean", "concat") or self.tile % PATCH:
            raise ValueError(f"merge must be mean or concat, tile a multiple of {PATCH}: "
                             f"{self.merge!r}, {self.tile}")

    @property
    def deterministic(self) -> bool:
        """Argmax with a fixed order: one ROAR step (all tokens at once) or MaskGIT (confidence
        order)."""
        return self.temperature == 0 and (self.steps == 1 or self.scheme == "maskgit")

    def sampling(self) -> Sampling:
        return Sampling(self.scheme, self.steps, "linear", self.temperature, top_k=self.top_k,
                        top_p=self.top_p)


def _copy_weights(dst: nn.Module, src: nn.Module, what: str):
    """Strict: every weight of dst from src."""
    state, want = src.state_dict(), dst.state_dict()
    missing = [k for k in want if k not in state or state[k].shape != want[k].shape]
    if missing:
        raise ValueError(f"the pretrained TerraMind has no weights for the {what}'s {missing[:5]}")
    dst.load_state_dict({k: state[k] for k in want})


class TiMSegmenter(nn.Module):
    """`think` generates the TiM tokens (frozen generator, eq. 5); `forward` encodes inputs +
    tokens with the trainable encoder, merges modalities per patch and segments with UPerNet
    (eq. 6)."""

    def __init__(self, config: TiMConfig):
        super().__init__()
        self.config = c = config
        self.encoder = TerraMind(TerraMindConfig(**c.encoder))
        self.generator = None
        if c.tim:
            frozen = TerraMind(TerraMindConfig(**c.generator))
            self.generator = frozen.eval().requires_grad_(False)
        depth = self.encoder.config.encoder_depth
        self.layers = list(c.layers or default_layers(depth))
        merged = len(c.modalities) + len(c.tim) if c.merge == "concat" else 1
        self.head = UPerNet(self.encoder.config.dim * merged, c.num_classes, c.channels)

    @classmethod
    def from_pretrained(cls, pretrained: TerraMind, **settings) -> "TiMSegmenter":
        """Two trimmed copies of one pretrained TerraMind (official checkpoint_filter_fn_tim):
        the encoder with embeddings for the inputs and tok_<TiM>; the generator with those
        inputs (the chain feeds generated tokens back, eq. 5) and tok_<TiM> decoder heads.
        A fresh UPerNet."""
        c = TiMConfig(**settings)
        pc, tok = pretrained.config, tuple("tok_" + m for m in c.tim)
        missing = [e for e in c.modalities + tok if e not in pc.inputs]
        missing += [e for e in tok if e not in pc.targets]
        if missing:
            raise ValueError(f"the pretrained TerraMind lacks {missing} (inputs "
                             f"{list(pc.inputs)}, targets {list(pc.targets)}): official TiM "
                             f"refuses new modalities")
        enc = replace(pc, inputs=c.modalities + tok, targets=(), decoder_depth=0)
        gen = replace(pc, inputs=c.modalities + tok, targets=tok)
        config = replace(c, encoder=asdict(enc), generator=asdict(gen) if c.tim else {})
        model = cls(config)
        _copy_weights(model.encoder, pretrained, "encoder")
        if c.tim:
            _copy_weights(model.generator, pretrained, "generator")
        return model

    def train(self, mode=True):
        super().train(mode)
        if self.generator is not None:
            self.generator.eval()                      # frozen: always in eval
        return self

    @torch.no_grad()
    def think(self, inputs: dict, generator: torch.Generator | None = None) -> dict:
        """{modality: standardized (B, C, H, W)} -> {tok_<TiM>: ids (B, H/16, W/16)}, generated
        in chain order."""
        if not self.config.tim:
            return {}
        targets = ["tok_" + m for m in self.config.tim]
        return generate_tokens(self.generator, inputs, targets, self.config.sampling(), generator)

    def forward(self, inputs: dict, tokens: dict | None = None, size=None) -> torch.Tensor:
        """inputs {modality: (B, C, H, W)}, tokens {tok_<TiM>: (B, h, w)} (default: `think`)
        -> (B, K, H, W)."""
        if tokens is None:
            tokens = self.think(inputs)
        enc = self.encoder.encode({**inputs, **tokens}, layers=sorted(set(self.layers)))
        # 4 x (B, D | D*M, h, w)
        features = [enc.merge(self.config.merge, i) for i in self.layers]
        size = size or next(iter(inputs.values())).shape[-2:]
        return self.head(features, size)

    def save_checkpoint(self, path, **meta):
        """0-d tensors (BatchNorm counters) go as (1,): the checksum views them."""
        tensors = {k: v.reshape(1) if v.ndim == 0 else v for k, v in self.state_dict().items()}
        save_safetensors(path, tensors, {"config": asdict(self.config), **meta})

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "TiMSegmenter":
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "TiM model")
        model = cls(TiMConfig(**meta["config"])).to(device)
        want = model.state_dict()
        if set(want) != set(tensors):
            missing = sorted(set(want) - set(tensors))[:5]
            unexpected = sorted(set(tensors) - set(want))[:5]
            raise ValueError(f"{path}: keys do not match its config (missing {missing}, "
                             f"unexpected {unexpected})")
        model.load_state_dict({k: v.reshape(want[k].shape) for k, v in tensors.items()})
        return model


def tim_tokens(model: TiMSegmenter, inputs: dict, keys: list, cache: dict | None,
               generator=None) -> dict:
    """The TiM tokens of a batch: generated, or read from `cache` {key: {entry: ids}} where
    present (missing samples are generated as a sub-batch and stored)."""
    if cache is None or not model.config.tim:
        return model.think(inputs, generator)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        new = model.think({e: v[todo] for e, v in inputs.items()}, generator)
        for j, i in enumerate(todo):
            cache[keys[i]] = {e: t[j].to("cpu", torch.int32) for e, t in new.items()}
    dev = next(iter(inputs.values())).device
    tokens = {}
    for e in cache[keys[0]]:
        tokens[e] = torch.stack([cache[k][e] for k in keys]).to(dev, torch.long)
    return tokens


# -----------------------------------------------------------------------------------------------
# Evaluation and the training state


@torch.no_grad()
def evaluate(model, data: TiMData, split: str, cache, autocast, generator=None) -> dict:
    """Whole images, batch 1, sliding windows of config.tile (eval_pangaea) -> PANGAEA scores and
    the mean cross-entropy. Cache keys: (split, sample, window batch, window)."""
    was = model.training
    model.eval()
    k = model.config.num_classes
    cm, loss, pixels, first = torch.zeros(k, k, dtype=torch.long), 0.0, 0, None
    dev = next(model.head.parameters()).device
    for i in tqdm(range(len(data)), desc=f"eval {split}", leave=False):
        x, y, _ = data[i]
        calls = iter(range(1 << 30))

        def predict_windows(w):
            n = len(next(iter(w.values())))
            keys = []
            if cache is not None:
                keys = [(split, i, next(calls), j) for j in range(n)]
            with autocast:
                return model(w, tim_tokens(model, w, keys, cache, generator)).float()
        x = {m: v[None].to(dev) for m, v in x.items()}
        logits = sliding_inference(predict_windows, x, model.config.tile)
        per_pixel = F.cross_entropy(logits.cpu(), y[None], ignore_index=IGNORE, reduction="sum")
        loss += per_pixel.item()
        pixels += int((y != IGNORE).sum())
        pred = logits[0].argmax(0).cpu()
        cm += confusion_matrix(pred, y, k, IGNORE)
        first = first or (pred, y)
    model.train(was)
    return {**segmentation_scores(cm, IGNORE), "loss": loss / max(pixels, 1), "first": first}


def _flat(v):
    return v.reshape(1) if v.ndim == 0 else v


def save_state(path, model, opt, sched, meta: dict, rngs: dict):
    """Model, AdamW, scheduler, RNGs and the epoch, atomic (checkpoints.save_safetensors); 0-d
    tensors as (1,)."""
    opt_sd = opt.state_dict()
    tensors = {f"model.{k}": _flat(v) for k, v in model.state_dict().items()}
    for i, s in opt_sd["state"].items():
        tensors.update({f"opt.{i}.{k}": _flat(v) for k, v in s.items()})
    tensors.update({f"rng.{k}": v for k, v in rngs.items()})
    save_safetensors(path, tensors, {**meta, "config": asdict(model.config),
                                     "opt_groups": opt_sd["param_groups"],
                                     "opt_ids": list(opt_sd["state"]),
                                     "sched": sched.state_dict()})


def load_state(path, model, opt, sched, tim_rng, device) -> dict:
    """Restores what save_state wrote into the live objects -> its metadata; refuses another
    configuration."""
    tensors, meta = load_safetensors(path, device)
    expect_kind(path, meta, "TiM state")
    tensors = {k: v.clone() for k, v in tensors.items()}   # off the file's memory map
    if meta.get("config") != json.loads(json.dumps(asdict(model.config))):
        raise ValueError(f"{path}: written for another configuration; resume with the same flags")
    want = model.state_dict()
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict({k: v.reshape(want[k].shape) for k, v in weights.items()})
    opt.load_state_dict(optimizer_state(tensors, meta))
    sched.load_state_dict(meta["sched"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    tim_rng.set_state(tensors["rng.tim"].cpu())
    return meta


# -----------------------------------------------------------------------------------------------
# Training: AdamW and ReduceLROnPlateau on the validation loss (official TiM example)


def build_model(args, reader) -> TiMSegmenter:
    """The TiM model of the flags from the pretrained TerraMind, on the device."""
    pretrained = TerraMind.from_checkpoint(args.model, "cpu")
    tile = args.crop or pretrained.config.grid * PATCH
    model = TiMSegmenter.from_pretrained(
        pretrained, modalities=args.modalities, tim=args.tim, num_classes=len(reader.classes),
        merge=args.merge, channels=args.channels, tile=tile, steps=args.tim_steps,
        scheme=args.tim_scheme, temperature=args.temperature, top_p=args.top_p)
    c = model.config
    if args.cache and c.tim and not c.deterministic:
        raise ValueError("--cache needs deterministic TiM sampling: --temperature 0 with "
                         "--tim-steps 1 or --tim-scheme maskgit (stochastic samples would be "
                         "frozen to one draw)")
    return model.to(args.device)


class Fit:
    """What one TiM run trains with: the model, AdamW, the plateau scheduler, autocast and its
    scaler, the TiM token cache and the TiM sampling generator (reproducible and resumable)."""

    def __init__(self, args, model: TiMSegmenter):
        dev = args.device
        self.args, self.model = args, model
        model.encoder.requires_grad_(not args.freeze_encoder)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # official TiM example: AdamW, halved after 5 epochs without a better val loss
        self.opt = torch.optim.AdamW(self.params, args.lr, weight_decay=args.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        self.sched = plateau(self.opt, factor=0.5, patience=5)
        self.cache = {} if args.cache and model.config.tim else None
        self.tim_rng = torch.Generator(dev).manual_seed(args.seed)
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.dtype = dtypes[args.dtype or ("bf16" if "cuda" in dev else "fp32")]
        self.autocast = torch.autocast(torch.device(dev).type, dtype=self.dtype,
                                       enabled=self.dtype is not None)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def step(self, loss):
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def resume(args, fit: Fit, out: Path) -> tuple[int, dict | None]:
    """(epochs done, best validation) of --resume, the log cut to them; a fresh run starts its
    log anew."""
    log, state = out / "log.jsonl", out / "state.safetensors"
    if not args.resume:
        log.unlink(missing_ok=True)
        return 0, None
    path = state if args.resume is True else args.resume
    meta = load_state(path, fit.model, fit.opt, fit.sched, fit.tim_rng, args.device)
    start = meta["epoch"]
    rows = log.read_text().splitlines() if log.exists() else []
    rows = [s for s in rows if json.loads(s)["epoch"] <= start]
    log.write_text("".join(s + "\n" for s in rows))
    print(f"resumed after epoch {start}")
    return start, meta["best"]


def describe(args, fit: Fit, data: dict, name: str) -> str:
    """The one line that opens a run: data, inputs, TiM, merge, parameters, tile, device."""
    c = fit.model.config
    sizes = ", ".join(f"{s} {len(d)}" for s, d in data.items())
    cached = ", cached" if fit.cache is not None else ""
    tim = (f"TiM {' -> '.join(c.tim) or 'none'} ({c.scheme}, {c.steps} step(s), "
           f"T {c.temperature}, top-p {c.top_p}{cached})")
    trainable = sum(p.numel() for p in fit.params) / 1e6
    mode = "frozen encoder" if args.freeze_encoder else "full fine-tuning"
    dtype = str(fit.dtype).removeprefix("torch.") if fit.dtype else "fp32"
    return (f"{name}: {sizes} samples | inputs {', '.join(c.modalities)} | {tim} | merge "
            f"{c.merge} | {trainable:.2f}M trainable ({mode}) | {c.tile} px | {args.device} "
            f"{dtype}")


def train_epoch(fit: Fit, data: TiMData, epoch: int, step: int, total: int,
                last_good: str) -> tuple[list, float, int]:
    """One epoch in the order of (seed, epoch) only (exact resume) -> (losses, seconds spent on
    TiM tokens, step). A non-finite loss stops before the update: nothing of this epoch is
    saved, model.safetensors stays the best."""
    args, model, reader = fit.args, fit.model, data.reader
    data.set_epoch(epoch)
    model.train()
    model.encoder.train(not args.freeze_encoder)
    workers = args.workers
    if workers is None:
        workers = 4 if "cuda" in args.device else 0
    order = torch.Generator().manual_seed(args.seed * 10007 + epoch)
    loader = torch.utils.data.DataLoader(data, args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=order)
    t_tim, losses = 0.0, []
    for x, y, key in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
        t0 = time.time()
        x, y = {m: v.to(args.device) for m, v in x.items()}, y.to(args.device)
        keys = [("train", *k) for k in key.tolist()]
        with fit.autocast:
            tokens = tim_tokens(model, x, keys, fit.cache, fit.tim_rng)
            t_tim += time.time() - t0
            loss = fit.loss_fn(model(x, tokens).float(), y)
        if not torch.isfinite(loss):
            samples = "; ".join(reader.sample_files(i) for i in key[:, 0].tolist())
            raise TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}: loss {loss.item()}: "
                                   f"training stopped; the batch's samples of {reader.name}: "
                                   f"{samples}; last good checkpoint: {last_good}")
        fit.step(loss)
        step, dt = step + 1, time.time() - t0
        losses.append(loss.item())
        if step % args.log_every == 0 or step == total:
            tqdm.write(f"step {step}/{total} | loss {loss.item():.4f} | lr {fit.lr():.1e} | "
                       f"{dt * 1e3:.0f} ms | {len(y) / dt:.1f} img/s")
    return losses, t_tim, step


def epoch_line(args, fit: Fit, row: dict, classes, water: int, improved: bool) -> str:
    cached = f", {len(fit.cache)} cached" if fit.cache is not None else ""
    best = " | best, saved" if improved else ""
    return (f"epoch {row['epoch']}/{args.epochs} | train loss {row['train_loss']:.4f} | "
            f"val loss {row['val_loss']:.4f} | mIoU {row['val_miou']:.2f} | IoU "
            f"{classes[water]} {row['val_iou'][water]:.2f} | {row['seconds']:.0f} s "
            f"(TiM tokens {row['tim_seconds']:.1f} s{cached}){best}")


def water_class(classes) -> int:
    """The class whose IoU the log and Table 8 report: "water" by name, else class 1."""
    names = [str(k).lower() for k in classes]
    return names.index("water") if "water" in names else min(1, len(names) - 1)


def train(args):
    torch.manual_seed(args.seed)
    out = writable_folder(args.out)
    rs = readers(args)
    r = rs["train"]
    water = water_class(r.classes)
    model = build_model(args, r)
    fit = Fit(args, model)
    c = model.config
    data = {}
    for s, reader in rs.items():
        data[s] = TiMData(reader, c.modalities, c.tile, s == "train", args.seed)
    start, best = resume(args, fit, out)
    per_epoch = len(data["train"]) // args.batch_size
    if per_epoch == 0:   # drop_last (as PANGAEA): a batch of one breaks UPerNet's 1x1 pooling BN
        raise ValueError(f"{r.name}: {len(data['train'])} training samples < one batch of "
                         f"{args.batch_size}")
    print(describe(args, fit, data, r.name))
    total, step = args.epochs * per_epoch, start * per_epoch
    state, log = out / "state.safetensors", out / "log.jsonl"
    for epoch in range(start, args.epochs):
        last_good = state if start or epoch else "none yet"
        t_epoch = time.time()
        losses, t_tim, step = train_epoch(fit, data["train"], epoch, step, total, last_good)
        val = evaluate(model, data["val"], "val", fit.cache, fit.autocast, fit.tim_rng)
        fit.sched.step(val["loss"])
        if not math.isfinite(val["loss"]):   # never saved as the best model
            raise TrainingDiverged(f"epoch {epoch + 1}: validation loss {val['loss']}: training "
                                   f"stopped; last good checkpoint: {last_good}")
        improved = best is None or val["miou"] > best["miou"]
        if improved:
            best = {"miou": val["miou"], "iou": val["iou"], "epoch": epoch + 1}
            model.save_checkpoint(out / "model.safetensors", epoch=epoch + 1,
                                  val_miou=val["miou"])
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val["loss"],
               "val_miou": val["miou"], "val_iou": val["iou"], "lr": fit.lr(),
               "seconds": time.time() - t_epoch, "tim_seconds": t_tim}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(epoch_line(args, fit, row, r.classes, water, improved), flush=True)
        rngs = {"torch": torch.get_rng_state(), "tim": fit.tim_rng.get_state()}
        meta = {"epoch": epoch + 1, "best": best, "args": vars(args)}
        save_state(state, model, fit.opt, fit.sched, meta, rngs)
    finish(args, fit, out, rs, data, best, water)


def finish(args, fit: Fit, out: Path, rs: dict, data: dict, best: dict, water: int):
    """The loss curves, the best-validation model on the test split, results.json."""
    r, c = rs["train"], fit.model.config
    rows = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    epochs = [q["epoch"] for q in rows]
    curves = {k: (epochs, [q[k] for q in rows]) for k in ("train_loss", "val_loss")}
    plot_curves(out / "curves.png", curves, title=f"TiM {'+'.join(c.tim) or 'none'} on {r.name}",
                xlabel="epoch")
    model = TiMSegmenter.from_checkpoint(out / "model.safetensors", args.device)
    rng = torch.Generator(args.device).manual_seed(args.seed)
    test = evaluate(model, data["test"], "test", None, fit.autocast, rng)
    save_prediction(out / "prediction.png", rs["test"], *test.pop("first"))
    ious = " | ".join(f"{k} {v:.2f}" for k, v in zip(r.classes, test["iou"]))
    print(f"test (best-val model, epoch {best['epoch']}): mIoU {test['miou']:.2f} | IoU {ious} "
          f"| acc {test['acc']:.2f}")
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    write_json(out / "results.json", {
        "dataset": r.name, "modalities": list(c.modalities), "tim": list(c.tim),
        "merge": c.merge, "classes": [str(k) for k in r.classes], "water": water,
        "seed": args.seed, "epochs": args.epochs, "test": test, "val": best,
        "model": str(args.model), "args": flags})
    print(f"wrote {out}/model.safetensors, results.json, curves.png, prediction.png")


# -----------------------------------------------------------------------------------------------
# Commands: train (above), predict (tim_scene.py), table (pangaea_reports.table8)


def run_predict(args):
    model = TiMSegmenter.from_checkpoint(args.ckpt, args.device).eval()
    paths = dict(item.partition("=")[::2] for item in args.input)
    check_inputs(model, paths)
    out, png = predict_outputs(args, paths)
    line = predict_scene(model, paths, out, args.batch_size, args.seed, args.resume)
    mask = Raster(out)
    print(f"{class_shares(mask, model.config.num_classes)} -> {out}\n{line}")
    if max(mask.height, mask.width) > OVERLAY_MAX:
        print(f"no PNG overlay for scenes over {OVERLAY_MAX} px (it would hold the whole image "
              f"in memory)")
        return
    base = next((m for m in paths if m in OPTICAL), next(iter(paths)))
    image = Raster(paths[base]).read(0, mask.height, 0, mask.width).astype(np.float32)
    classes = mask.read(0, mask.height, 0, mask.width)[0]
    save_png(png, overlay(render(base, image), classes, model.config.num_classes))
    print(f"overlay -> {png}")


def add_train_parser(sub):
    t = sub.add_parser("train", help="TiM (or plain) fine-tuning with validation every epoch")
    t.add_argument("--model", required=True, help="pretrained TerraMind checkpoint "
                   "(pretrain.py) or checkpoint folder (release.py convert)")
    t.add_argument("--data", required=True, help="dataset folder")
    t.add_argument("--dataset", default="terramesh", choices=["terramesh", "sen1floods11"],
                   help="on-disk format")
    t.add_argument("--labels", default="label_water", help="terramesh: the label folder")
    t.add_argument("--classes", default=None,
                   help="terramesh: class names, comma-separated (default 0..max)")
    t.add_argument("--modalities", type=modality_names(PIXELS), default="S2L1C,S1GRD",
                   help="raw inputs (official TiM example: S2L1C,S1GRD)")
    t.add_argument("--tim", type=modality_names(TOKENIZED_IMAGES, ("none",)), default="LULC",
                   help="generated modalities in chain order, e.g. LULC or LULC,NDVI; none")
    t.add_argument("--tim-steps", type=positive_int, default=1,
                   help="decoding steps per TiM modality (official 1)")
    t.add_argument("--tim-scheme", default="roar", choices=["roar", "maskgit"],
                   help="decoding scheme (official roar)")
    t.add_argument("--temperature", type=nonnegative_float, default=1.0,
                   help="TiM sampling temperature, 0 = argmax (official 1)")
    t.add_argument("--top-p", type=fraction, default=0.8,
                   help="TiM nucleus filter, 0 = off (official 0.8)")
    t.add_argument("--cache", action="store_true",
                   help="reuse generated TiM tokens per sample and crop (argmax only)")
    t.add_argument("--merge", default="mean", choices=["mean", "concat"],
                   help="merge of modalities per patch")
    t.add_argument("--freeze-encoder", action="store_true",
                   help="train the head only (default: full fine-tuning)")
    t.add_argument("--channels", type=positive_int, default=512,
                   help="UPerNet channels (PANGAEA 512)")
    t.add_argument("--crop", type=multiple_of(PATCH), default=None,
                   help="training crop = inference window (default: model tile)")
    t.add_argument("--epochs", type=positive_int, default=100,
                   help="epochs (official example 100)")
    t.add_argument("--batch-size", type=positive_int, default=8,
                   help="batch size (official example 8)")
    t.add_argument("--lr", type=positive_float, default=2e-5,
                   help="AdamW learning rate (official TiM example 2e-5)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.01,
                   help="AdamW weight decay (torch default)")
    t.add_argument("--workers", type=nonnegative_int, default=None,
                   help="data loader processes (default: 4 on GPU, 0 on CPU)")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast (default: bf16 on GPU)")
    t.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    t.add_argument("--resume", nargs="?", const=True,
                   help="continue from <out>/state.safetensors (or the file given)")
    t.add_argument("--out", required=True, help="output folder")
    return t


def add_predict_parser(sub):
    q = sub.add_parser("predict",
                       help="class mask (GeoTIFF) and PNG overlay of a tile of any size")
    q.add_argument("--ckpt", required=True, help="model.safetensors written by train")
    q.add_argument("--input", action="append", required=True,
                   help="MODALITY=path.tif, one per model input")
    q.add_argument("--out", required=True,
                   help="output mask .tif (the overlay goes beside it as .png)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    q.add_argument("--resume", action="store_true",
                   help="continue a killed predict into the same --out")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing mask and overlay")
    return q


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    for s in (add_train_parser(sub), add_predict_parser(sub)):
        s.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seed of the init, data order, crops and TiM sampling")
        s.add_argument("--device", type=torch_device, default=default_device,
                       help="torch device")
    q = sub.add_parser("table", help="results.json files -> paper Table 8 layout")
    q.add_argument("results", nargs="+", help="results.json files")
    args = p.parse_args(argv)
    if args.command == "train":
        args.modalities = tuple(args.modalities.split(","))
        args.tim = () if args.tim.lower() == "none" else tuple(args.tim.split(","))
        train(args)
    elif args.command == "predict":
        run_predict(args)
    else:
        print(table8([json.loads(Path(f).read_text()) for f in args.results]))


if __name__ == "__main__":
    run_main(main)
