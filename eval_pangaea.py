"""
PANGAEA evaluation (paper Table 6) and few-shot classification (paper Tables 5, 11) of a frozen
TerraMind encoder.

Segmentation, the PANGAEA protocol (PANGAEA, Marsocci et al. 2024, §4): frozen encoder; four
encoder blocks ([3, 5, 7, 11] of 12, [7, 11, 15, 23] of 24) as grids into UPerNet (neck
x4/x2/x1/x0.5, pooling 1/2/3/6, 512 channels, dropout 0.1); AdamW lr 1e-4, wd 0.05, batch 8,
80 epochs, lr x0.1 at 60%/90% of the iterations; random 224 crops; 224 sliding windows,
overlaps averaged; one confusion matrix per split -> IoU and mIoU as PANGAEA computes them.
Bands are matched by name (missing ones zero-filled and reported) and standardized with the
dataset's statistics; multi-temporal data runs the encoder per frame, then L-TAE or
Linear(T, 1) (pangaea_decoders.py). The readers: the benchmark's on-disk formats (READERS,
pangaea_datasets.py) and TerraMesh roots with a label folder, either layout (terramesh_labels.py).

Few-shot: mean-pooled embeddings of image folders (<root>/[train|test/]<class>/*.tif), k-shot
n-way, nearest prototype, 200 runs on the full test set.

Consumes our checkpoint (`--model`), official weights (`--official` + `--size`) or a random
init (neither); writes <out>/results.json, head.safetensors, prediction.png. CPU smoke runs on
the synthetic world with the smoke model of pretrain.py (ckpt/; without --model: a random-init
--size smoke), then one GPU:
    python eval_pangaea.py seg --dataset terramesh --root data/synth --labels label_water \\
        --classes land,water --modalities S2L2A,S1GRD --model ckpt/terramind.safetensors \\
        --crop 64 --channels 64 --epochs 20 --workers 0 --out runs/pangaea/water
    python eval_pangaea.py folders --root data/synth --out data/synth_classes  # dominant LULC
    python eval_pangaea.py fewshot --root data/synth_classes --modality S2L1C --ways 5 \\
        --shots 1 --model ckpt/terramind.safetensors
    python eval_pangaea.py seg --dataset sen1floods11 --root data/sen1floods11_v1.1 \\
        --official TerraMind_v1_base.pt --size base --modalities S2L1C,S1GRD --device cuda \\
        --out runs/pangaea/sen1floods11
    python eval_pangaea.py table runs/pangaea/*/results.json          # paper Table 6 layout
The head trains on frozen features in one process: there is no torchrun variant.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

from checkpoints import save_safetensors
from cli import (TrainingDiverged, fraction, layer_list, multiple_of, nonnegative_int,
                 positive_int, run_main, torch_device, writable_folder)
from fewshot import embed, fewshot_accuracy
from metrics import confusion_matrix, segmentation_scores
from modalities import MODALITIES, PATCH, PIXEL_MODALITIES, modality_names
from pangaea_datasets import READERS, band_codes, source_key
from pangaea_decoders import LTAE2d, TemporalLinear, UPerNet
from pangaea_reports import save_prediction, table6, write_json
from shard_index import is_shard_root
from sliding_windows import sliding_inference
from terramesh_labels import (ImageFolder, LULCClasses, TerraMeshLabels, split_folders,
                              write_class_folders)

# -----------------------------------------------------------------------------------------------
# Input pipeline: bands by name, the dataset's standardization, crops
# (PANGAEA pangaea/engine/data_preprocessor.py)


class BandMatcher:
    """PANGAEA's BandFilter + NormalizeMeanStd + BandPadding. Each encoder input (a TerraMind
    modality) is fed from the dataset modality of its kind (optical: S2L1C/S2L2A/S2RGB, sar:
    S1GRD/S1RTC, or the same name); bands are matched by name in the encoder's order and
    standardized with the dataset's statistics; bands the dataset lacks are 0 (= the mean).
    `lines` reports it. DEVIATION: PANGAEA feeds B10 into S2L2A's B9 slot."""

    def __init__(self, reader, entries):
        self.plan, self.lines = {}, []
        pixels = [m for m in MODALITIES if MODALITIES[m].pixel_key]
        for e in entries:
            if e not in pixels:
                raise ValueError(f"{e!r} is not a TerraMind pixel modality: {pixels}")
            src = source_key(e, reader.bands)
            if src not in reader.bands:
                self.lines.append(f"{e}: not fed ({reader.name} has no {src})")
                continue
            self.plan[e] = self.feed(reader, e, src)
        if not self.plan:
            raise ValueError(f"no encoder input of {list(entries)} can be fed from "
                             f"{reader.name} ({list(reader.bands)})")

    def feed(self, reader, entry: str, src: str) -> tuple:
        """(src, index of each wanted band in src's bands (-1: missing), mean, std (C, 1, 1, 1))."""
        have, want = list(reader.bands[src]), band_codes(entry)
        index = np.array([have.index(c) if c in have else -1 for c in want])
        rows = np.maximum(index, 0)
        mean = np.asarray(reader.mean[src], np.float32)[rows, None, None, None]
        std = np.asarray(reader.std[src], np.float32)[rows, None, None, None]
        missing = [c for c, i in zip(want, index) if i < 0]
        unused = [c for c in have if c not in want]
        line = f"{entry} <- {src}: {int((index >= 0).sum())}/{len(want)} bands"
        if missing:
            line += f", zero-filled {','.join(missing)}"
        if unused:
            line += f", unused {','.join(unused)}"
        self.lines.append(line)
        return src, index, mean, std

    def __call__(self, image: dict) -> dict:
        """{modality: (C, T, H, W)} -> {entry: standardized (C_e, T, H, W)}."""
        out = {}
        for e, (src, index, mean, std) in self.plan.items():
            x = (image[src][np.maximum(index, 0)] - mean) / std
            x = np.where((index >= 0)[:, None, None, None], x, 0)
            out[e] = torch.from_numpy(x.astype(np.float32))
        return out


class SegmentationData(torch.utils.data.Dataset):
    """A reader through the protocol's transforms: training samples are random `crop` windows
    (focus: around a random labelled pixel; smaller images padded), evaluation samples whole
    images; "resize" datasets are always the whole image resized to `crop` (image only).
    `replicate` repeats the set per epoch (data_replicate)."""

    def __init__(self, reader, matcher, crop, train, seed=0, replicate=1):
        self.reader, self.matcher, self.crop, self.train = reader, matcher, crop, train
        self.seed, self.replicate, self.epoch = seed, replicate, 0

    def __len__(self):
        return len(self.reader) * self.replicate

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        image, y = self.reader[i % len(self.reader)]
        x = self.matcher(image)
        if self.reader.prep == "resize":
            return self.resized(x), y
        if not self.train:
            return x, y
        return self.random_crop(x, y, i)

    def resized(self, x: dict) -> dict:
        """official: bilinear + antialias, image only. (C, T, H, W) -> (C, T, crop, crop)."""
        s, out = self.crop, {}
        for e, v in x.items():
            frames = v.flatten(0, 1)[None]                                  # (1, C*T, H, W)
            small = F.interpolate(frames, (s, s), mode="bilinear", antialias=True)[0]
            out[e] = small.view(*v.shape[:2], s, s)
        return out

    def random_crop(self, x: dict, y: np.ndarray, i: int) -> tuple:
        """A `crop` window at rng(seed, epoch, i); "focus": centred on a random labelled pixel."""
        s, ignore = self.crop, self.reader.ignore_index
        ph, pw = max(s - y.shape[0], 0), max(s - y.shape[1], 0)
        x = {e: F.pad(v, (0, pw, 0, ph)) for e, v in x.items()}             # inputs: the mean
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=ignore)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top = rng.integers(0, y.shape[0] - s + 1)
        left = rng.integers(0, y.shape[1] - s + 1)
        labelled = np.argwhere(y != ignore) if self.reader.prep == "focus" else []
        if len(labelled):
            row, col = labelled[rng.integers(len(labelled))]
            top = np.clip(row - s // 2, 0, y.shape[0] - s)
            left = np.clip(col - s // 2, 0, y.shape[1] - s)
        window = (slice(top, top + s), slice(left, left + s))
        return {e: v[(..., *window)] for e, v in x.items()}, y[window]


# -----------------------------------------------------------------------------------------------
# The model: frozen encoder, temporal mapping, UPerNet (pangaea_decoders.py)

def default_layers(depth: int) -> list:
    """PANGAEA's encoder blocks: [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24; else each
    quarter's last."""
    official = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    if depth in official:
        return official[depth]
    return [max(0, math.ceil(depth * k / 4) - 1) for k in (1, 2, 3, 4)]


class PangaeaModel(nn.Module):
    """Frozen encoder (TerraMind: `config.dim`, `encode(inputs, layers)` -> `.merge("mean",
    layer)`), a temporal mapping for frames > 1 (one module shared by the four levels, official)
    and UPerNet."""

    def __init__(self, encoder, num_logits, layers, frames=1, temporal="ltae", channels=512):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.layers = list(layers)
        dim = encoder.config.dim
        self.temporal = None
        if frames != 1:
            self.temporal = LTAE2d(dim) if temporal == "ltae" else TemporalLinear(frames)
        self.head = UPerNet(dim, num_logits, channels)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()                                            # frozen: always in eval
        return self

    def features(self, inputs: dict) -> list:
        """{entry: (B, C, T, H, W)} -> 4 x (B, D, h, w)."""
        B, _, T = next(iter(inputs.values())).shape[:3]
        frames = {e: rearrange(x, "b c t h w -> (b t) c h w") for e, x in inputs.items()}
        # frames one by one; modalities early-fused, then mean-merged (official)
        with torch.no_grad():
            enc = self.encoder.encode(frames, layers=sorted(set(self.layers)))
            feats = [enc.merge("mean", layer) for layer in self.layers]   # (B*T, D, h, w)
        if self.temporal is None:
            return feats
        return [self.temporal(rearrange(f, "(b t) d h w -> b d t h w", b=B, t=T)) for f in feats]

    def forward(self, inputs: dict, size=None) -> torch.Tensor:          # -> (B, K, H, W)
        size = size or next(iter(inputs.values())).shape[-2:]
        return self.head(self.features(inputs), size)


def load_encoder(model=None, official=None, size="smoke", device="cpu"):
    """Our checkpoint (`model`), official weights (`official` + `size`) or a random init of
    `size`; with a name."""
    from terramind import TerraMind, TerraMindConfig
    if model:
        return TerraMind.from_checkpoint(model, device), f"TerraMind {Path(model).stem}"
    if official:
        encoder = TerraMind.from_official(official, size).to(device)
        label = size if isinstance(size, str) else "custom"
        return encoder, f"TerraMind-{label} ({Path(official).name})"
    return TerraMind(TerraMindConfig.preset(size)).to(device), f"TerraMind-{size} random init"


# -----------------------------------------------------------------------------------------------
# Evaluation: sliding windows, one confusion matrix per split, mIoU as PANGAEA computes it
# (pangaea/engine/evaluator.py; the metric is in metrics.py, the windows in sliding_windows.py)

@torch.no_grad()
def evaluate(model, data: SegmentationData, window: int, device="cpu") -> dict:
    """Whole-split scores, batch 1: sliding windows (or the whole resized image), one confusion
    matrix. Also returns the first sample's prediction and target ("first") for a picture."""
    r, was_training = data.reader, model.training
    model.eval()
    k = len(r.classes)
    cm, first = torch.zeros(k, k, dtype=torch.long), None
    for i in tqdm(range(len(data)), desc=f"eval {r.split}", leave=False):
        x, y = data[i]
        x, y = {e: v[None].to(device) for e, v in x.items()}, torch.as_tensor(y)
        if r.prep == "resize":
            logits = model(x, y.shape)
        else:
            logits = sliding_inference(model, x, window)
        if logits.shape[-2:] != y.shape:
            logits = F.interpolate(logits, y.shape, mode="bilinear")
        if r.binary:
            pred = (logits[0, 0].sigmoid() > 0.5).long().cpu()
        else:
            pred = logits[0].argmax(0).cpu()
        cm += confusion_matrix(pred, y, k, r.ignore_index)
        first = first or (pred, y)
    model.train(was_training)
    return {**segmentation_scores(cm, r.ignore_index), "first": first}


# -----------------------------------------------------------------------------------------------
# Training the head (PANGAEA pangaea/engine/trainer.py)

def dice_loss(logits, target, ignore_index):
    """Soft Dice of a single sigmoid logit, ignored pixels removed: logits (B, 1, H, W),
    target (B, H, W)."""
    keep = target != ignore_index
    p, t = logits[:, 0].sigmoid()[keep], target[keep].float()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def multistep(opt, total: int):
    """PANGAEA's schedule: lr x0.1 at int(0.6 * total) and int(0.9 * total) iterations, stepped
    per iteration."""
    milestones = [int(total * 0.6), int(total * 0.9)]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)


class RecordedBatches(torch.utils.data.BatchSampler):
    """The batches of a shuffled, drop_last DataLoader, each batch's indices kept in `taken` as
    it is drawn (the loader delivers batches in this order, also with workers)."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=True)
        self.taken = []

    def __iter__(self):
        for batch in super().__iter__():
            self.taken.append(batch)
            yield batch


def diverged(epoch: int, step: int, loss: float, data: SegmentationData,
             batch: list) -> TrainingDiverged:
    """The error of a step whose loss is non-finite: the step and the files of the batch's
    samples."""
    r = data.reader
    files = "; ".join(r.sample_files(i % len(r)) for i in batch)
    return TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}: loss {loss}: training stopped, "
                            f"nothing written; the batch's samples of {r.name}: {files}; check "
                            f"them or lower the learning rate")


class HeadTraining:
    """The optimizer side of the protocol: AdamW, `multistep`, cross-entropy with the ignore
    index (Dice for 1-logit tasks), one fixed-format line every `log_every` steps."""

    def __init__(self, model, reader, total: int, lr: float, weight_decay: float):
        self.model, self.reader, self.total = model, reader, total
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr, (0.9, 0.999), weight_decay=weight_decay)
        self.sched = multistep(self.opt, total)
        self.ce = nn.CrossEntropyLoss(ignore_index=reader.ignore_index)
        self.step, self.log_every = 0, max(1, total // 40)

    def loss(self, logits, y):
        if self.reader.binary:
            return dice_loss(logits, y, self.reader.ignore_index)
        return self.ce(logits, y)

    def update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1

    def log(self, loss, images: int, t0: float):
        if self.step % self.log_every and self.step != self.total:
            return
        dt = time.time() - t0
        lr = self.opt.param_groups[0]["lr"]
        print(f"step {self.step}/{self.total} | loss {loss.item():.4f} | lr {lr:.1e} | "
              f"{dt * 1000:.0f} ms | {images / dt:.1f} img/s", flush=True)


def train_segmentation(model, train: SegmentationData, val: SegmentationData, epochs=80,
                       batch_size=8, window=224, device="cpu", workers=4, seed=234, lr=1e-4,
                       weight_decay=0.05, eval_every=5) -> dict:
    """The protocol on the head (`HeadTraining`), validation every `eval_every` epochs and at
    the end; the best-validation head (mIoU; for 1-logit tasks the positive class's IoU) is
    loaded back and its validation scores returned."""
    r = train.reader
    order = torch.Generator().manual_seed(seed)
    batches = RecordedBatches(torch.utils.data.RandomSampler(train, generator=order), batch_size)
    # the batches a shuffled DataLoader draws, kept for the message of a diverged step
    loader = torch.utils.data.DataLoader(train, batch_sampler=batches, num_workers=workers,
                                         generator=order)
    if len(loader) == 0:
        raise ValueError(f"{r.name}: {len(train)} training samples < one batch of {batch_size}; "
                         f"use --replicate")
    run = HeadTraining(model, r, len(loader) * epochs, lr, weight_decay)
    best, best_state = None, None
    for epoch in range(epochs):
        train.set_epoch(epoch)
        batches.taken.clear()
        model.train()
        for x, y in loader:
            t0 = time.time()
            x, y = {e: v.to(device) for e, v in x.items()}, y.to(device)
            loss = run.loss(model(x, y.shape[-2:]), y)
            if not torch.isfinite(loss):
                batch = batches.taken[run.step - epoch * len(loader)]
                raise diverged(epoch, run.step, loss.item(), train, batch)
            run.update(loss)
            run.log(loss, len(y), t0)
        if (epoch + 1) % eval_every and epoch + 1 != epochs:
            continue
        scores = validate(model, val, window, device, epoch, epochs)
        if best is None or _key(scores, r) > _key(best, r):
            best = scores
            best_state = {k: v.clone() for k, v in model.state_dict().items()
                          if not k.startswith("encoder.")}
    model.load_state_dict(best_state, strict=False)
    return best


def _key(scores: dict, reader) -> float:
    """What "best" means: mIoU, or the positive class's IoU for 1-logit tasks."""
    return scores["iou"][1] if reader.binary else scores["miou"]


def validate(model, val: SegmentationData, window, device, epoch: int, epochs: int) -> dict:
    scores = evaluate(model, val, window, device)
    ious = " ".join(f"{v:.1f}" for v in scores["iou"])
    print(f"epoch {epoch + 1}/{epochs} | val mIoU {scores['miou']:.2f} | acc {scores['acc']:.2f} "
          f"| IoU {ious}", flush=True)
    return scores


# -----------------------------------------------------------------------------------------------
# Commands

def seg_readers(args, mods: list) -> dict:
    """{split: reader}: a TerraMesh-layout folder with a label folder (standardized with its
    train split's statistics), or a benchmark dataset in its own format."""
    if args.dataset != "terramesh":
        return {s: READERS[args.dataset](args.root, s) for s in ("train", "val", "test")}
    classes = args.classes and args.classes.split(",")
    folders = split_folders(args.root)
    train = TerraMeshLabels(args.root, "train", args.labels, mods, classes)
    stats = (train.mean, train.std)
    readers = {"train": train}
    for s in ("val", "test"):
        readers[s] = TerraMeshLabels(args.root, folders[s], args.labels, mods, train.classes,
                                     stats)
    if folders["test"] != "test":
        print(f"{args.root}: no test/ split folder; the test scores are on "
              f"{folders['test']}/")
    return readers


def encoder_layers(args, encoder) -> list:
    depth = encoder.config.encoder_depth
    if not args.layers:
        return default_layers(depth)
    layers = [int(v) for v in args.layers.split(",")]
    if max(layers) >= depth:
        raise ValueError(f"--layers {args.layers}: the encoder has {depth} blocks, 0..{depth - 1}")
    return layers


def report_test(test: dict, reader, name: str, n: int, seconds: float):
    print(f"test: {n} samples, best-val head ({seconds:.0f} s): mIoU {test['miou']:.2f} | "
          f"acc {test['acc']:.2f}")
    for k, (c, iou) in enumerate(zip(reader.classes, test["iou"])):
        note = "  (ignore index, not in mIoU)" if k == reader.ignore_index else ""
        print(f"  {str(c):28s} IoU {iou:6.2f}{note}")
    print(table6({name: {reader.name: test["miou"]}}))


def save_seg(out: Path, model, config: dict, name: str, results: dict, readers, test):
    out.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in model.state_dict().items()
            if not k.startswith("encoder.") and v.ndim}      # BN step counters (0-dim) unused
    save_safetensors(out / "head.safetensors", head, {"config": config, "encoder": name})
    write_json(out / "results.json", results)
    save_prediction(out / "prediction.png", readers["test"], *test["first"])
    print(f"wrote {out}/results.json, head.safetensors, prediction.png")


def run_seg(args):
    # before training: a folder it cannot write to would lose every epoch
    writable_folder(args.out)
    torch.manual_seed(args.seed)
    mods = args.modalities.split(",")
    readers = seg_readers(args, mods)
    r = readers["train"]
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(r, mods)
    layers = encoder_layers(args, encoder)
    config = dict(dim=encoder.config.dim, num_logits=1 if r.binary else len(r.classes),
                  layers=layers, frames=r.frames, temporal=args.temporal, channels=args.channels)
    head_config = {k: v for k, v in config.items() if k != "dim"}
    model = PangaeaModel(encoder, **head_config).to(args.device)
    sizes = ", ".join(f"{s} {len(d)}" for s, d in readers.items())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{r.name}: {sizes} samples | encoder {name} | layers {layers} | head "
          f"{params / 1e6:.2f}M params")
    print("bands: " + " | ".join(matcher.lines))
    data = {}
    for s, d in readers.items():
        replicate = args.replicate if s == "train" else 1
        data[s] = SegmentationData(d, matcher, args.crop, s == "train", args.seed, replicate)
    t0 = time.time()
    val = train_segmentation(model, data["train"], data["val"], args.epochs, args.batch_size,
                             args.crop, args.device, args.workers, args.seed)
    test = evaluate(model, data["test"], args.crop, args.device)
    report_test(test, r, name, len(readers["test"]), time.time() - t0)
    results = {"model": name, "dataset": r.name, "classes": [str(c) for c in r.classes],
               "miou": test["miou"], "iou": test["iou"], "acc": test["acc"],
               "val_miou": val["miou"], "bands": matcher.lines, "head": config,
               "args": {k: v for k, v in vars(args).items() if k != "command"}}
    save_seg(Path(args.out), model, config, name, results, readers, test)


def fewshot_sets(args) -> tuple:
    """(support, query, split): class folders (<root>/[train|test/]<class>/*.tif; split False:
    one pool), or the dominant-LULC classes of a TerraMesh root's train and test (else val)
    splits, either layout (pangaea_datasets.LULCClasses)."""
    root, bands = Path(args.root), args.bands and args.bands.split(",")
    if is_terramesh_root(root):
        test = split_folders(root)["test"]
        support = LULCClasses(root, "train", args.modality)
        stats = (support.mean, support.std)
        query = LULCClasses(root, test, args.modality, classes=support.classes, stats=stats)
        return support, query, True
    split = (root / "train").is_dir() and (root / "test").is_dir()
    support = ImageFolder(root / "train" if split else root, args.modality, bands)
    query = support
    if split:
        stats = (support.mean, support.std)
        query = ImageFolder(root / "test", args.modality, bands, support.classes, stats)
    return support, query, split


def is_terramesh_root(root: Path) -> bool:
    """A TerraMesh root rather than class folders: published shards, or LULC/ and splits/."""
    return is_shard_root(root) or ((root / "LULC").is_dir() and (root / "splits").is_dir())


def run_fewshot(args):
    if args.out:
        writable_folder(args.out)
    torch.manual_seed(args.seed)
    root = Path(args.root)
    support, query, split = fewshot_sets(args)
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(support, [args.modality])
    print(f"{root.name}: {len(support.classes)} classes, {len(support)} support / "
          f"{len(query)} query images | encoder {name} | bands: {matcher.lines[0]}")
    support_data = SegmentationData(support, matcher, None, False)
    xs, ys = embed(encoder, support_data, args.batch_size, args.device)
    xq, yq = xs, ys
    if split:
        query_data = SegmentationData(query, matcher, None, False)
        xq, yq = embed(encoder, query_data, args.batch_size, args.device)
    mean, std = fewshot_accuracy(xs, ys, xq, yq, args.ways, args.shots, args.runs, args.seed,
                                 same_pool=not split)
    print(f"| Model | {args.shots}-shot {args.ways}-way |\n|---|---|\n| {name} | {mean:.2f} ± "
          f"{std:.2f} |\n({args.runs} runs, accuracy % on the full test set; chance "
          f"{100 / args.ways:.1f})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "results.json", {
            "model": name, "dataset": root.name, "ways": args.ways, "shots": args.shots,
            "runs": args.runs, "accuracy": mean, "std": std, "chance": 100 / args.ways})


def run_folders(args):
    writable_folder(args.out)   # before any tile is read
    counts = write_class_folders(args.root, args.out, args.modality, args.min_share)
    for (split, name), n in sorted(counts.items()):
        print(f"{split:5s} {name:20s} {n}")


def run_table(args):
    results = {}
    for f in args.results:
        r = json.loads(Path(f).read_text())
        results.setdefault(r["model"], {})[r["dataset"]] = r["miou"]
    print(table6(results))


def add_model_flags(q):
    """The encoder and run flags that seg and fewshot share."""
    q.add_argument("--root", required=True, help="dataset folder")
    q.add_argument("--model", default=None,
                   help="our TerraMind checkpoint (.safetensors) or checkpoint folder")
    q.add_argument("--official", default=None,
                   help="official weights, e.g. TerraMind_v1_base.pt (with --size)")
    q.add_argument("--size", default="smoke", help="model size of --official, or of a random init")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    q.add_argument("--device", type=torch_device, default=default_device, help="cpu or cuda")
    q.add_argument("--seed", type=nonnegative_int, default=234, help="seed (PANGAEA: 234)")


def add_seg_parser(sub):
    seg = sub.add_parser("seg", help="PANGAEA segmentation")
    add_model_flags(seg)
    seg.add_argument("--dataset", required=True, choices=[*READERS, "terramesh"],
                     help="on-disk format")
    seg.add_argument("--modalities", type=modality_names(PIXEL_MODALITIES),
                     default="S2L2A,S1GRD",
                     help="encoder inputs (PANGAEA's TerraMind: S2L2A,S1GRD)")
    seg.add_argument("--labels", default="label_water", help="terramesh: the label folder")
    seg.add_argument("--classes", default=None,
                     help="terramesh: class names, comma-separated (default 0..max)")
    seg.add_argument("--layers", type=layer_list, default=None,
                     help="encoder blocks, e.g. 3,5,7,11 (default by depth)")
    seg.add_argument("--temporal", default="ltae", choices=["ltae", "linear"],
                     help="multi-temporal mapping")
    seg.add_argument("--crop", type=multiple_of(PATCH), default=224,
                     help="training crop and sliding window (official 224)")
    seg.add_argument("--channels", type=positive_int, default=512,
                     help="UPerNet channels (official 512)")
    seg.add_argument("--epochs", type=positive_int, default=80, help="epochs (official 80)")
    seg.add_argument("--batch-size", type=positive_int, default=8, help="batch size (official 8)")
    seg.add_argument("--replicate", type=positive_int, default=1,
                     help="repeat the train set N times per epoch")
    seg.add_argument("--workers", type=nonnegative_int, default=4, help="data loader workers")
    seg.add_argument("--out", default="runs/pangaea", help="output folder")


def add_fewshot_parser(sub):
    few = sub.add_parser("fewshot", help="few-shot k-shot n-way")
    add_model_flags(few)
    few.add_argument("--modality", type=modality_names(PIXEL_MODALITIES), default="S2L1C",
                     help="the TerraMind modality the images are fed as (default: S2L1C, as the "
                     "paper's Table 5)")
    few.add_argument("--bands", default=None,
                     help="band codes of the files, in order (default: the modality's)")
    few.add_argument("--ways", type=positive_int, default=5, help="classes per run")
    few.add_argument("--shots", type=positive_int, default=1, help="support images per class")
    few.add_argument("--runs", type=positive_int, default=200, help="runs averaged (paper: 200)")
    few.add_argument("--batch-size", type=positive_int, default=64,
                     help="images per encoder batch")
    few.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    few.epilog = ("--root: class folders <root>/[train|test/]<class>/*.tif, or a TerraMesh root "
                  "(either layout: its dominant-LULC classes, as `folders` writes them)")


def add_folders_parser(sub):
    q = sub.add_parser("folders", help="dominant-LULC image folders from a TerraMesh root")
    q.add_argument("--root", required=True, help="TerraMesh root: GeoTIFF layout with LULC/ and "
                   "splits/, or the published layout (train/, val/, optional test/)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--modality", type=modality_names(PIXEL_MODALITIES), default="S2L1C",
                   help="the modality whose files are linked (default: S2L1C, the few-shot input "
                   "of the paper's Table 5)")
    q.add_argument("--min-share", type=fraction, default=0.5,
                   help="minimum share of the dominant class")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_seg_parser(sub)
    add_fewshot_parser(sub)
    add_folders_parser(sub)
    q = sub.add_parser("table", help="results.json files -> paper Table 6 layout")
    q.add_argument("results", nargs="+", help="results.json files")
    args = p.parse_args()
    commands = {"seg": run_seg, "fewshot": run_fewshot, "folders": run_folders,
                "table": run_table}
    commands[args.command](args)


if __name__ == "__main__":
    run_main(main)
