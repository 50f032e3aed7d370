"""
Thinking-in-Modalities (TiM) fine-tuning and inference (paper §4.4, eq. 5-6, Tables 8
and 13; official: terratorch .../terramind/model/terramind_tim.py).

Before the downstream model sees an input, a frozen copy of the pretrained TerraMind generates extra
modalities from it (`--tim LULC`; several are generated in a chain, each conditioned on the input and the
ones before it, eq. 5). The generated token ids enter a trainable copy of the encoder as additional token
inputs (eq. 6); the per-patch features of the encoder blocks are merged over modalities (mean or concat)
and go to the UPerNet head of eval_pangaea.py. No gradient reaches the generator: it is frozen, runs under
no_grad, and hands over discrete ids. `--tim none` is plain fine-tuning, the baseline.

Consumes a pretrained TerraMind (pretrain.py) and Sen1Floods11 (`--dataset sen1floods11`, v1.1 layout; S1 ->
S1GRD, S2 L1C -> S2L1C, labels -1 ignored) or a TerraMesh-layout folder with a label folder (the synthetic world's
label_water), standardized with TerraMind's pretraining constants (official configs), NaN -> the mean. Produces
in --out: model.safetensors (best validation mIoU: encoder, head and frozen generator, config in the metadata;
`TiMSegmenter.from_checkpoint`), state.safetensors (--resume), results.json, log.jsonl, curves.png, prediction.png.
`predict` streams inputs of any size window by window (scene.py) into a tiled class mask GeoTIFF with the
inputs' georeferencing, resumable with --resume, and a PNG overlay up to 2048 px. `--cache`
reuses generated TiM tokens per (sample, crop): deterministic sampling only (see README).

    # CPU smoke run: synthetic world, smoke TerraMind from pretrain.py (64 px tiles)
    python tim_finetune.py train --model ckpt/terramind.safetensors --data data/synth --modalities S1GRD \\
        --tim LULC --temperature 0 --cache --lr 1e-3 --channels 64 --epochs 3 --out runs/tim/s1_lulc
    python tim_finetune.py train ... --tim none --out runs/tim/s1          # the plain fine-tuning baseline
    python tim_finetune.py table runs/tim/*/results.json                   # paper Table 8 layout
    python tim_finetune.py predict --ckpt runs/tim/s1_lulc/model.safetensors --input S1GRD=tile.tif --out mask.tif
    # one GPU, official TiM example (terramind_v1_base_tim_lulc_sen1floods11.yaml): bf16 autocast
    python tim_finetune.py train --model ckpt/terramind_base.safetensors --dataset sen1floods11 \\
        --data data/sen1floods11 --modalities S2L1C,S1GRD --tim LULC --epochs 100 --device cuda --out runs/tim/sf11
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

from cli import (TrainingDiverged, fraction, multiple_of, nonnegative_float, nonnegative_int, positive_float,
                 positive_int, run_main, torch_device, writable_folder)
from eval_pangaea import (UPerNet, confusion_matrix, default_layers, save_prediction, segmentation_scores,
                          sliding_inference, window_starts, write_json)
from generate import Sampling, generate_tokens
from pangaea_datasets import OPTICAL, READERS, SAR, TerraMeshLabels, band_codes
from pictures import plot_curves, save_png
from scene import Progress, Raster, TiledWriter, open_scene, summary
from terramesh import (LULC_COLORS, MODALITIES, PATCH, TOKENIZED_IMAGES, expect_kind, load_safetensors, modality_names,
                       render, save_safetensors, standardize)
from terramind import TerraMind, TerraMindConfig

IGNORE = -1   # label value of unlabelled pixels (Sen1Floods11, TerraMesh label folders)
NODATA = 255  # predicted mask value where every input band is NaN
OVERLAY_MAX = 2048   # px: larger scenes get no PNG overlay (it holds the whole image)
PIXELS = [m for m in MODALITIES if MODALITIES[m].pixel_key]

# -----------------------------------------------------------------------------------------------------------
# The model: frozen generator, trainable encoder, UPerNet (official: terramind_tim.py)


@dataclass
class TiMConfig:
    """Defaults are the official TiM settings: LULC, one ROAR step, temperature 1, top-p 0.8, mean."""
    modalities: tuple = ("S2L1C", "S1GRD")   # raw pixel inputs, in encoder order
    tim: tuple = ("LULC",)                    # generated modalities, in chain order; () = plain fine-tuning
    num_classes: int = 2
    merge: str = "mean"                       # official merge_method: "mean" or "concat"
    layers: tuple = ()                        # encoder blocks into UPerNet (default: eval_pangaea.default_layers)
    channels: int = 512                       # UPerNet channels (PANGAEA 512)
    tile: int = 224                           # training crop = inference window, px
    steps: int = 1                            # decoding steps per TiM modality (official 1)
    scheme: str = "roar"                      # official roar; maskgit keeps the most confident tokens per step
    temperature: float = 1.0                  # 0 = argmax
    top_p: float = 0.8
    top_k: float = 0                          # official 0 (off)
    encoder: dict = field(default_factory=dict)     # TerraMindConfig of the trainable copy
    generator: dict = field(default_factory=dict)   # TerraMindConfig of the frozen copy ({} without TiM)

    def __post_init__(self):
        self.modalities, self.tim, self.layers = tuple(self.modalities), tuple(self.tim), tuple(self.layers)
        if bad := [m for m in self.modalities if m not in MODALITIES or not MODALITIES[m].pixel_key]:
            raise ValueError(f"inputs must be pixel modalities ({', '.join(PIXELS)}), got {bad}")
        if bad := [m for m in self.tim if m not in TOKENIZED_IMAGES]:
            raise ValueError(f"TiM modalities must be tokenized images ({', '.join(TOKENIZED_IMAGES)}), got {bad}")
        if self.merge not in ("mean", "concat") or self.tile % PATCH:
            raise ValueError(f"merge must be mean or concat, tile a multiple of {PATCH}: {self.merge!r}, {self.tile}")

    @property
    def deterministic(self) -> bool:
        """Argmax with a fixed order: one ROAR step (all tokens at once) or MaskGIT (confidence order)."""
        return self.temperature == 0 and (self.steps == 1 or self.scheme == "maskgit")

    def sampling(self) -> Sampling:
        return Sampling(self.scheme, self.steps, "linear", self.temperature, top_k=self.top_k, top_p=self.top_p)


def _copy_weights(dst: nn.Module, src: nn.Module, what: str):   # strict: every weight of dst from src
    state, want = src.state_dict(), dst.state_dict()
    if missing := [k for k in want if k not in state or state[k].shape != want[k].shape]:
        raise ValueError(f"the pretrained TerraMind has no weights for the {what}'s {missing[:5]}")
    dst.load_state_dict({k: state[k] for k in want})


class TiMSegmenter(nn.Module):
    """`think` generates the TiM tokens (frozen generator, eq. 5); `forward` encodes inputs + tokens with the
    trainable encoder, merges modalities per patch and segments with UPerNet (eq. 6)."""

    def __init__(self, config: TiMConfig):
        super().__init__()
        self.config = c = config
        self.encoder = TerraMind(TerraMindConfig(**c.encoder))
        self.generator = TerraMind(TerraMindConfig(**c.generator)).eval().requires_grad_(False) if c.tim else None
        self.layers = list(c.layers or default_layers(self.encoder.config.encoder_depth))
        width = self.encoder.config.dim * ((len(c.modalities) + len(c.tim)) if c.merge == "concat" else 1)
        self.head = UPerNet(width, c.num_classes, c.channels)

    @classmethod
    def from_pretrained(cls, pretrained: TerraMind, **settings) -> "TiMSegmenter":
        """Two trimmed copies of one pretrained TerraMind (official checkpoint_filter_fn_tim): the encoder with
        embeddings for the inputs and tok_<TiM>; the generator with those inputs (the chain feeds generated
        tokens back, eq. 5) and tok_<TiM> decoder heads. A fresh UPerNet."""
        c = TiMConfig(**settings)
        pc, tok = pretrained.config, tuple("tok_" + m for m in c.tim)
        if missing := [e for e in c.modalities + tok if e not in pc.inputs] + [e for e in tok if e not in pc.targets]:
            raise ValueError(f"the pretrained TerraMind lacks {missing} (inputs {list(pc.inputs)}, targets "
                             f"{list(pc.targets)}): official TiM refuses new modalities")
        enc = replace(pc, inputs=c.modalities + tok, targets=(), decoder_depth=0)
        gen = replace(pc, inputs=c.modalities + tok, targets=tok)
        model = cls(replace(c, encoder=asdict(enc), generator=asdict(gen) if c.tim else {}))
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
        """{modality: standardized (B, C, H, W)} -> {tok_<TiM>: ids (B, H/16, W/16)}, generated in chain order."""
        if not self.config.tim:
            return {}
        return generate_tokens(self.generator, inputs, ["tok_" + m for m in self.config.tim],
                               self.config.sampling(), generator)

    def forward(self, inputs: dict, tokens: dict | None = None, size=None) -> torch.Tensor:
        """inputs {modality: (B, C, H, W)}, tokens {tok_<TiM>: (B, h, w)} (default: `think`) -> (B, K, H, W)."""
        if tokens is None:
            tokens = self.think(inputs)
        enc = self.encoder.encode({**inputs, **tokens}, layers=sorted(set(self.layers)))
        features = [enc.merge(self.config.merge, i) for i in self.layers]       # 4 x (B, D | D*M, h, w)
        return self.head(features, size or next(iter(inputs.values())).shape[-2:])

    def save_checkpoint(self, path, **meta):   # 0-d tensors (BatchNorm counters) go as (1,): the checksum views
        tensors = {k: v.reshape(1) if v.ndim == 0 else v for k, v in self.state_dict().items()}
        save_safetensors(path, tensors, {"config": asdict(self.config), **meta})

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "TiMSegmenter":
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "TiM model")
        model = cls(TiMConfig(**meta["config"])).to(device)
        want = model.state_dict()
        if set(want) != set(tensors):
            raise ValueError(f"{path}: keys do not match its config (missing {sorted(set(want) - set(tensors))[:5]},"
                             f" unexpected {sorted(set(tensors) - set(want))[:5]})")
        model.load_state_dict({k: v.reshape(want[k].shape) for k, v in tensors.items()})
        return model


def tim_tokens(model: TiMSegmenter, inputs: dict, keys: list, cache: dict | None, generator=None) -> dict:
    """The TiM tokens of a batch: generated, or read from `cache` {key: {entry: ids}} where present (missing
    samples are generated as a sub-batch and stored)."""
    if cache is None or not model.config.tim:
        return model.think(inputs, generator)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        new = model.think({e: v[todo] for e, v in inputs.items()}, generator)
        for j, i in enumerate(todo):
            cache[keys[i]] = {e: t[j].to("cpu", torch.int32) for e, t in new.items()}
    dev = next(iter(inputs.values())).device
    return {e: torch.stack([cache[k][e] for k in keys]).to(dev, torch.long) for e in cache[keys[0]]}


# -----------------------------------------------------------------------------------------------------------
# Data: pangaea_datasets' readers, bands matched by name, TerraMind's pretraining standardization


def band_plan(reader, modalities) -> dict:
    """{modality: (reader key, index of each of its bands in that key's bands, -1 = missing)}: the same name,
    else optical / sar (Sen1Floods11 "optical" = 13 L1C bands, "sar" = VV, VH)."""
    plan = {}
    for m in modalities:
        src = m if m in reader.bands else "optical" if m in OPTICAL else "sar" if m in SAR else m
        if src not in reader.bands:
            raise ValueError(f"{reader.name}: no data for {m} (it has {list(reader.bands)})")
        have = list(reader.bands[src])
        plan[m] = (src, np.array([have.index(b) if b in have else -1 for b in band_codes(m)]))
    return plan


def prepare(name: str, x: np.ndarray, index=None) -> torch.Tensor:
    """Physical (C, H, W) -> standardized float32 with TerraMind's pretraining constants (official configs);
    bands the data lack (index -1) and NaN (no data) become 0 = the mean."""
    if index is not None:
        x = np.where((index >= 0)[:, None, None], x[np.maximum(index, 0)], np.nan)
    return torch.nan_to_num(standardize(name, torch.from_numpy(np.asarray(x, np.float32))), 0.0)


class TiMData(torch.utils.data.Dataset):
    """A reader's samples as ({modality: (C, H, W)}, label (H, W), key). Training: a random `crop` per sample
    and epoch, at whole-patch offsets, rng(seed, epoch, i); small images padded (inputs 0, labels ignored).
    Evaluation: whole images. key = (i, top, left) names the generator input for the TiM cache."""

    def __init__(self, reader, modalities, crop: int, train: bool, seed: int = 0):
        self.reader, self.plan, self.crop, self.train = reader, band_plan(reader, modalities), crop, train
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.reader)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):   # reader.read: file units with NaN kept (PangaeaDataset[i] would make NaN 0)
        image, y = self.reader.read(self.reader.items[i])
        x = {m: prepare(m, image[src], index) for m, (src, index) in self.plan.items()}
        y, top, left = torch.as_tensor(np.asarray(y, np.int64)), 0, 0
        if self.train:
            s = self.crop
            ph, pw = max(s - y.shape[0], 0), max(s - y.shape[1], 0)
            x, y = {m: F.pad(v, (0, pw, 0, ph)) for m, v in x.items()}, F.pad(y, (0, pw, 0, ph), value=IGNORE)
            rng = np.random.default_rng([self.seed, self.epoch, i])
            top, left = (int(rng.integers(0, (n - s) // PATCH + 1)) * PATCH for n in y.shape)
            x, y = {m: v[:, top:top + s, left:left + s] for m, v in x.items()}, y[top:top + s, left:left + s]
        return x, y, torch.tensor([i, top, left])


def readers(args) -> dict:
    if args.dataset == "terramesh":
        classes = args.classes.split(",") if args.classes else None
        train = TerraMeshLabels(args.data, "train", args.labels, args.modalities, classes, stats=({}, {}))
        return {"train": train, **{s: TerraMeshLabels(args.data, s, args.labels, args.modalities, train.classes,
                                                      stats=({}, {})) for s in ("val", "test")}}
    return {s: READERS[args.dataset](args.data, s) for s in ("train", "val", "test")}


# -----------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model, data: TiMData, split: str, cache, autocast, generator=None) -> dict:
    """Whole images, batch 1, sliding windows of config.tile (eval_pangaea) -> PANGAEA scores and the mean
    cross-entropy. Cache keys: (split, sample, window batch, window)."""
    was = model.training
    model.eval()
    k = model.config.num_classes
    cm, loss, pixels, first = torch.zeros(k, k, dtype=torch.long), 0.0, 0, None
    dev = next(model.head.parameters()).device
    for i in tqdm(range(len(data)), desc=f"eval {split}", leave=False):
        x, y, _ = data[i]
        calls = iter(range(1 << 30))

        def predict(w):
            n = len(next(iter(w.values())))
            keys = [(split, i, next(calls), j) for j in range(n)] if cache is not None else []
            with autocast:
                return model(w, tim_tokens(model, w, keys, cache, generator)).float()
        logits = sliding_inference(predict, {m: v[None].to(dev) for m, v in x.items()}, model.config.tile)
        keep = y != IGNORE
        loss += F.cross_entropy(logits.cpu(), y[None], ignore_index=IGNORE, reduction="sum").item()
        pixels += int(keep.sum())
        pred = logits[0].argmax(0).cpu()
        cm += confusion_matrix(pred, y, k, IGNORE)
        first = first or (pred, y)
    model.train(was)
    return {**segmentation_scores(cm, IGNORE), "loss": loss / max(pixels, 1), "first": first}


def save_state(path, model, opt, sched, meta: dict, rngs: dict):
    """Model, AdamW, scheduler, RNGs and the epoch, atomic (terramesh.save_safetensors); 0-d tensors as (1,)."""
    opt_sd, flat = opt.state_dict(), lambda v: v.reshape(1) if v.ndim == 0 else v   # noqa: E731
    tensors = {**{f"model.{k}": flat(v) for k, v in model.state_dict().items()},
               **{f"opt.{i}.{k}": flat(v) for i, s in opt_sd["state"].items() for k, v in s.items()},
               **{f"rng.{k}": v for k, v in rngs.items()}}
    save_safetensors(path, tensors, {**meta, "config": asdict(model.config), "opt_groups": opt_sd["param_groups"],
                                     "opt_ids": list(opt_sd["state"]), "sched": sched.state_dict()})


def load_state(path, model, opt, sched, tim_rng, device) -> dict:
    """Restores what save_state wrote into the live objects -> its metadata; refuses another configuration."""
    tensors, meta = load_safetensors(path, device)
    expect_kind(path, meta, "TiM state")
    tensors = {k: v.clone() for k, v in tensors.items()}   # off the file's memory map
    if meta.get("config") != json.loads(json.dumps(asdict(model.config))):
        raise ValueError(f"{path}: written for another configuration; resume with the same flags")
    want = model.state_dict()
    model.load_state_dict({k[6:]: v.reshape(want[k[6:]].shape) for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict({"param_groups": meta["opt_groups"], "state": {int(i): {
        k.split(".", 2)[2]: v.reshape(()) if k.endswith(".step") else v for k, v in tensors.items()
        if k.startswith(f"opt.{i}.")} for i in meta["opt_ids"]}})
    sched.load_state_dict(meta["sched"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    tim_rng.set_state(tensors["rng.tim"].cpu())
    return meta


def train(args):
    torch.manual_seed(args.seed)
    dev, out = args.device, writable_folder(args.out)
    rs = readers(args)
    r = rs["train"]
    names = [str(k).lower() for k in r.classes]
    water = names.index("water") if "water" in names else min(1, len(names) - 1)
    pretrained = TerraMind.from_checkpoint(args.model, "cpu")
    tile = args.crop or pretrained.config.grid * PATCH
    model = TiMSegmenter.from_pretrained(
        pretrained, modalities=args.modalities, tim=args.tim, num_classes=len(r.classes), merge=args.merge,
        channels=args.channels, tile=tile, steps=args.tim_steps, scheme=args.tim_scheme,
        temperature=args.temperature, top_p=args.top_p).to(dev)
    c = model.config
    if args.cache and c.tim and not c.deterministic:
        raise ValueError("--cache needs deterministic TiM sampling: --temperature 0 with --tim-steps 1 or "
                         "--tim-scheme maskgit (stochastic samples would be frozen to one draw)")
    model.encoder.requires_grad_(not args.freeze_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, args.lr, weight_decay=args.weight_decay)          # official TiM example
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)   # official, on val loss
    data = {s: TiMData(rd, c.modalities, tile, s == "train", args.seed) for s, rd in rs.items()}
    cache = {} if args.cache and c.tim else None
    tim_rng = torch.Generator(dev).manual_seed(args.seed)   # stochastic TiM sampling, reproducible and resumable
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if "cuda" in dev else "fp32")]
    autocast = torch.autocast(torch.device(dev).type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    start, best, log, state = 0, None, out / "log.jsonl", out / "state.safetensors"
    if args.resume:
        meta = load_state(state if args.resume is True else args.resume, model, opt, sched, tim_rng, dev)
        start, best = meta["epoch"], meta["best"]
        rows = [s for s in log.read_text().splitlines() if json.loads(s)["epoch"] <= start] if log.exists() else []
        log.write_text("".join(s + "\n" for s in rows))
        print(f"resumed after epoch {start}")
    elif log.exists():
        log.unlink()
    per_epoch = len(data["train"]) // args.batch_size
    if per_epoch == 0:   # drop_last (as PANGAEA): a batch of one breaks the BatchNorm of UPerNet's 1x1 pooling
        raise ValueError(f"{r.name}: {len(data['train'])} training samples < one batch of {args.batch_size}")
    print(f"{r.name}: {', '.join(f'{s} {len(d)}' for s, d in data.items())} samples | inputs {', '.join(c.modalities)}"
          f" | TiM {' -> '.join(c.tim) or 'none'} ({c.scheme}, {c.steps} step(s), T {c.temperature}, top-p {c.top_p}"
          f"{', cached' if cache is not None else ''}) | merge {c.merge} | {sum(p.numel() for p in params) / 1e6:.2f}M "
          f"trainable ({'frozen encoder' if args.freeze_encoder else 'full fine-tuning'}) | {tile} px | {dev} "
          f"{str(dtype).removeprefix('torch.') if dtype else 'fp32'}")
    loss_fn, total, step = nn.CrossEntropyLoss(ignore_index=IGNORE), args.epochs * per_epoch, start * per_epoch
    workers = (4 if "cuda" in dev else 0) if args.workers is None else args.workers
    for epoch in range(start, args.epochs):
        data["train"].set_epoch(epoch)
        epoch_seed = args.seed * 10007 + epoch   # the order of epoch e depends on (seed, e) only: exact resume
        model.train()
        model.encoder.train(not args.freeze_encoder)
        loader = torch.utils.data.DataLoader(data["train"], args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=workers, generator=torch.Generator().manual_seed(epoch_seed))
        t_epoch, t_tim, losses = time.time(), 0.0, []
        for x, y, key in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            t0 = time.time()
            x, y = {m: v.to(dev) for m, v in x.items()}, y.to(dev)
            with autocast:
                tokens = tim_tokens(model, x, [("train", *k) for k in key.tolist()], cache, tim_rng)
                t_tim += time.time() - t0
                loss = loss_fn(model(x, tokens).float(), y)
            if not torch.isfinite(loss):   # nothing of this epoch is saved; model.safetensors stays the best
                samples = ", ".join(str(r.items[i]) for i in key[:, 0].tolist())
                raise TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}: loss {loss.item()}: training stopped; "
                                       f"the batch's samples of {r.name}: {samples}; last good checkpoint: "
                                       f"{state if start or epoch else 'none yet'}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step, dt = step + 1, time.time() - t0
            losses.append(loss.item())
            if step % args.log_every == 0 or step == total:
                tqdm.write(f"step {step}/{total} | loss {loss.item():.4f} | lr {opt.param_groups[0]['lr']:.1e} | "
                           f"{dt * 1e3:.0f} ms | {len(y) / dt:.1f} img/s")
        val = evaluate(model, data["val"], "val", cache, autocast, tim_rng)
        sched.step(val["loss"])
        if not math.isfinite(val["loss"]):   # never saved as the best model
            raise TrainingDiverged(f"epoch {epoch + 1}: validation loss {val['loss']}: training stopped; last good "
                                   f"checkpoint: {state if start or epoch else 'none yet'}")
        if improved := best is None or val["miou"] > best["miou"]:
            best = {"miou": val["miou"], "iou": val["iou"], "epoch": epoch + 1}
            model.save_checkpoint(out / "model.safetensors", epoch=epoch + 1, val_miou=val["miou"])
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val["loss"],
               "val_miou": val["miou"], "val_iou": val["iou"], "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t_epoch, "tim_seconds": t_tim}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {epoch + 1}/{args.epochs} | train loss {row['train_loss']:.4f} | val loss {val['loss']:.4f} | "
              f"mIoU {val['miou']:.2f} | IoU {r.classes[water]} {val['iou'][water]:.2f} | {row['seconds']:.0f} s "
              f"(TiM tokens {t_tim:.1f} s{f', {len(cache)} cached' if cache is not None else ''})"
              + (" | best, saved" if improved else ""), flush=True)
        save_state(state, model, opt, sched, {"epoch": epoch + 1, "best": best, "args": vars(args)},
                   {"torch": torch.get_rng_state(), "tim": tim_rng.get_state()})
    rows = [json.loads(s) for s in log.read_text().splitlines()]
    plot_curves(out / "curves.png", {k: ([q["epoch"] for q in rows], [q[k] for q in rows])
                                     for k in ("train_loss", "val_loss")},
                title=f"TiM {'+'.join(c.tim) or 'none'} on {r.name}", xlabel="epoch")
    model = TiMSegmenter.from_checkpoint(out / "model.safetensors", dev)
    test = evaluate(model, data["test"], "test", None, autocast, torch.Generator(dev).manual_seed(args.seed))
    save_prediction(out / "prediction.png", rs["test"], *test.pop("first"))
    print(f"test (best-val model, epoch {best['epoch']}): mIoU {test['miou']:.2f} | IoU "
          + " | ".join(f"{k} {v:.2f}" for k, v in zip(r.classes, test["iou"])) + f" | acc {test['acc']:.2f}")
    write_json(out / "results.json", {
        "dataset": r.name, "modalities": list(c.modalities), "tim": list(c.tim), "merge": c.merge,
        "classes": [str(k) for k in r.classes], "water": water, "seed": args.seed, "epochs": args.epochs,
        "test": test, "val": best, "model": str(args.model),
        "args": {k: v for k, v in vars(args).items() if k != "command"}})
    print(f"wrote {out}/model.safetensors, results.json, curves.png, prediction.png")


# -----------------------------------------------------------------------------------------------------------
# Inference and the results table


@torch.no_grad()
def predict(model: TiMSegmenter, images: dict, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """{modality: physical (C, H, W)} of any size -> class map (H, W): sliding windows of config.tile."""
    dev = next(model.head.parameters()).device
    x = {m: prepare(m, v)[None].to(dev) for m, v in images.items()}
    rng = torch.Generator(dev).manual_seed(seed)
    return sliding_inference(lambda w: model(w, model.think(w, rng)), x, model.config.tile, batch)[0].argmax(0).cpu()


def overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes painted over the image at 50 %: water blue for two classes, else the LULC palette; class 0 clear."""
    pal = np.array([[0, 0, 0], [30, 110, 255]], np.uint8) if num_classes <= 2 else \
        LULC_COLORS[1:][np.arange(num_classes) % 9]
    out = rgb.astype(np.float32)
    paint = (mask > 0) & (mask < num_classes)
    out[paint] = 0.5 * out[paint] + 0.5 * pal[mask[paint]]
    return out.astype(np.uint8)


def _windows(rasters: dict, chunk: list, size: int, dev) -> dict:
    """{modality: standardized (n, C, size, size)}: the chunk's windows of each input; past the edge and where NaN
    0 = the mean, as predict pads and fills."""
    out = {}
    for m, x in rasters.items():
        parts = []
        for r, c in chunk:
            h, w = min(size, x.height - r), min(size, x.width - c)
            v = x.read(r, r + h, c, c + w).astype(np.float32)
            parts.append(prepare(m, np.pad(v, ((0, 0), (0, size - h), (0, size - w)), constant_values=np.nan)))
        out[m] = torch.stack(parts).to(dev)
    return out


def nodata_rows(rasters: dict, a: int, b: int) -> np.ndarray:
    """Rows [a, b) -> (b - a, W) True where every band of every input is NaN (no data), read in 1024 px blocks."""
    W = next(iter(rasters.values())).width
    empty = np.ones((b - a, W), bool)
    for x in rasters.values():
        for c in range(0, W, 1024):
            v = x.read(a, b, c, min(W, c + 1024))
            empty[:, c:c + 1024] &= np.isnan(v).all(0) if v.dtype.kind == "f" else False
    return empty


def _open_inputs(model: TiMSegmenter, paths: dict) -> dict:
    if bad := [m for m in paths if m not in model.config.modalities]:
        raise ValueError(f"--input {bad[0]}: the model's inputs are {', '.join(model.config.modalities)}")
    if missing := [m for m in model.config.modalities if m not in paths]:
        raise ValueError(f"missing --input for {missing} (the model's inputs: {', '.join(model.config.modalities)})")
    rasters = open_scene({m: paths[m] for m in model.config.modalities})
    for m, x in rasters.items():
        if x.bands != MODALITIES[m].channels:
            raise ValueError(f"{x.path}: expected {MODALITIES[m].channels} band(s) of {m}, got {x.bands}")
    return rasters


@torch.no_grad()
def predict_scene(model: TiMSegmenter, paths: dict, out, batch: int = 8, seed: int = 0, resume: bool = False) -> str:
    """`predict` over co-registered GeoTIFFs {modality: path} of any size in bounded memory: the same windows,
    batches and sampling, each window read from the files, logits summed over the open rows only, every finished
    band of rows written to the tiled class mask `out` (NODATA where every input band is NaN), with the inputs'
    georeferencing. Equals `predict` bit for bit; resume=True continues a killed run into an identical file."""
    t0, dev, size = time.time(), next(model.head.parameters()).device, model.config.tile
    rasters = _open_inputs(model, paths)
    first = next(iter(rasters.values()))
    H, W = first.height, first.width
    Hp, Wp = max(H, size), max(W, size)   # small images padded to one window (sliding_inference)
    corners = [(r, c) for r in window_starts(Hp, size) for c in window_starts(Wp, size)]
    chunks = [corners[k:k + batch] for k in range(0, len(corners), batch)]
    run = {"ckpt": model.config, "inputs": {m: [str(p), Path(p).stat().st_size] for m, p in paths.items()},
           "batch": batch, "seed": seed}
    progress, rng = Progress(f"{out}.progress.npz", run), torch.Generator(dev).manual_seed(seed)
    state = progress.load() if resume else None
    writer = TiledWriter(out, 1, H, W, np.uint8, {**first.geo, 42113: str(NODATA)}, resume=state is not None)
    k0, base, acc, count = 0, 0, None, None   # acc, count: summed logits (K, n, Wp), windows (n, Wp) of rows base..
    if state is not None:
        arrays, meta = state
        k0, base = meta["chunk"], meta["base"]
        acc, count = torch.from_numpy(arrays["acc"]).to(dev), torch.from_numpy(arrays["count"]).to(dev)
        rng.set_state(torch.from_numpy(arrays["rng"]))
    for k in tqdm(range(k0, len(chunks)), desc="windows", unit="batch", initial=k0, total=len(chunks)):
        x = _windows(rasters, chunks[k], size, dev)
        logits = model(x, model.think(x, rng))                                       # (n, K, size, size)
        if acc is None:
            acc, count = logits.new_zeros(logits.shape[1], 0, Wp), logits.new_zeros(0, Wp)
        for j, (r, c) in enumerate(chunks[k]):
            if (grow := r + size - base - acc.shape[1]) > 0:
                acc = torch.cat([acc, acc.new_zeros(acc.shape[0], grow, Wp)], 1)
                count = torch.cat([count, count.new_zeros(grow, Wp)])
            acc[:, r - base:r - base + size, c:c + size] += logits[j]
            count[r - base:r - base + size, c:c + size] += 1
        done = chunks[k + 1][0][0] if k + 1 < len(chunks) else Hp   # later windows start at or below this row
        if done > base:
            mask = (acc[:, :done - base] / count[:done - base]).argmax(0)[:max(0, H - base), :W]   # (h, W)
            mask = mask.cpu().numpy().astype(np.uint8)
            mask[nodata_rows(rasters, base, base + len(mask))] = NODATA
            writer.write_rows(base, mask[None])
            writer.flush()
            acc, count, base = acc[:, done - base:], count[done - base:], done
            progress.save({"acc": acc.cpu().numpy(), "count": count.cpu().numpy(), "rng": rng.get_state().numpy()},
                          chunk=k + 1, base=base)
    writer.finish()
    progress.done()
    scale = first.geo.get(33550)
    return summary(H, W, len(corners), time.time() - t0, scale[0] if scale else None)


def run_predict(args):
    model = TiMSegmenter.from_checkpoint(args.ckpt, args.device).eval()
    paths = dict(item.partition("=")[::2] for item in args.input)
    out = Path(args.out)
    if any(Path(p).resolve() == out.resolve() for p in paths.values()):
        raise ValueError(f"--out {out} is one of the --input files: the mask would replace it; choose another path")
    line = predict_scene(model, paths, out, args.batch_size, args.seed, args.resume)
    mask = Raster(out)
    share = np.zeros(256, np.int64)
    for r in range(0, mask.height, 1024):
        share += np.bincount(mask.read(r, min(mask.height, r + 1024), 0, mask.width).ravel(), minlength=256)
    n = mask.height * mask.width
    print(" | ".join(f"class {k} {100 * share[k] / n:.1f}%" for k in range(model.config.num_classes))
          + f" | no data {100 * share[NODATA] / n:.1f}% -> {out}\n{line}")
    if max(mask.height, mask.width) > OVERLAY_MAX:
        print(f"no PNG overlay for scenes over {OVERLAY_MAX} px (it would hold the whole image in memory)")
        return
    base = next((m for m in paths if m in OPTICAL), next(iter(paths)))
    image = Raster(paths[base]).read(0, mask.height, 0, mask.width).astype(np.float32)
    classes = mask.read(0, mask.height, 0, mask.width)[0]
    png = out.with_suffix(".png") if out.suffix != ".png" else out.with_name(f"{out.stem}_overlay.png")
    save_png(png, overlay(render(base, image), classes, model.config.num_classes))
    print(f"overlay -> {png}")


def label(modalities, tim) -> str:
    names = {"S1GRD": "S-1", "S1RTC": "S-1 RTC", "S2L1C": "S-2", "S2L2A": "S-2", "S2RGB": "RGB"}
    return " + ".join([names.get(m, m) for m in modalities] + [f"gen. {m}" for m in tim])


def table8(results: list) -> str:
    """results.json dicts -> paper Table 8 layout, mean ± std over seeds (test split, %)."""
    groups = {}
    for r in results:   # runs differing only in the seed form one row
        tim = f"TiM ({r['merge']}, T {r['args']['temperature']}, {r['args']['tim_steps']} step)" if r["tim"] else ""
        groups.setdefault((tim, label(r["modalities"], r["tim"])), []).append(r)
    lines = ["| Model | Input | IoU water | mIoU | seeds |", "|---|---|---|---|---|"]
    for (tim, name), rs in sorted(groups.items()):
        iou = [r["test"]["iou"][r["water"]] for r in rs]
        miou = [r["test"]["miou"] for r in rs]
        f = lambda v: f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}"   # noqa: E731
        lines.append(f"| TerraMind {tim} | {name} | {f(iou)} | {f(miou)} | "
                     f"{','.join(str(r['seed']) for r in rs)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="TiM (or plain) fine-tuning with validation every epoch")
    t.add_argument("--model", required=True, help="pretrained TerraMind checkpoint (pretrain.py) or checkpoint folder "
                   "(release.py convert)")
    t.add_argument("--data", required=True, help="dataset folder")
    t.add_argument("--dataset", default="terramesh", choices=["terramesh", "sen1floods11"], help="on-disk format")
    t.add_argument("--labels", default="label_water", help="terramesh: the label folder")
    t.add_argument("--classes", default=None, help="terramesh: class names, comma-separated (default 0..max)")
    t.add_argument("--modalities", type=modality_names(PIXELS), default="S2L1C,S1GRD",
                   help="raw inputs (official TiM example: S2L1C,S1GRD)")
    t.add_argument("--tim", type=modality_names(TOKENIZED_IMAGES, ("none",)), default="LULC",
                   help="generated modalities in chain order, e.g. LULC or LULC,NDVI; none")
    t.add_argument("--tim-steps", type=positive_int, default=1, help="decoding steps per TiM modality (official 1)")
    t.add_argument("--tim-scheme", default="roar", choices=["roar", "maskgit"], help="decoding scheme (official roar)")
    t.add_argument("--temperature", type=nonnegative_float, default=1.0,
                   help="TiM sampling temperature, 0 = argmax (official 1)")
    t.add_argument("--top-p", type=fraction, default=0.8, help="TiM nucleus filter, 0 = off (official 0.8)")
    t.add_argument("--cache", action="store_true", help="reuse generated TiM tokens per sample and crop (argmax only)")
    t.add_argument("--merge", default="mean", choices=["mean", "concat"], help="merge of modalities per patch")
    t.add_argument("--freeze-encoder", action="store_true", help="train the head only (default: full fine-tuning)")
    t.add_argument("--channels", type=positive_int, default=512, help="UPerNet channels (PANGAEA 512)")
    t.add_argument("--crop", type=multiple_of(PATCH), default=None,
                   help="training crop = inference window (default: model tile)")
    t.add_argument("--epochs", type=positive_int, default=100, help="epochs (official example 100)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="batch size (official example 8)")
    t.add_argument("--lr", type=positive_float, default=2e-5, help="AdamW learning rate (official TiM example 2e-5)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.01, help="AdamW weight decay (torch default)")
    t.add_argument("--workers", type=nonnegative_int, default=None,
                   help="data loader processes (default: 4 on GPU, 0 on CPU)")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="autocast (default: bf16 on GPU)")
    t.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    t.add_argument("--resume", nargs="?", const=True, help="continue from <out>/state.safetensors (or the file given)")
    t.add_argument("--out", required=True, help="output folder")
    q = sub.add_parser("predict", help="class mask (GeoTIFF) and PNG overlay of a tile of any size")
    q.add_argument("--ckpt", required=True, help="model.safetensors written by train")
    q.add_argument("--input", action="append", required=True, help="MODALITY=path.tif, one per model input")
    q.add_argument("--out", required=True, help="output mask .tif (the overlay goes beside it as .png)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    q.add_argument("--resume", action="store_true", help="continue a killed predict into the same --out")
    for s in (t, q):
        s.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seed of the init, data order, crops and TiM sampling")
        s.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
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
