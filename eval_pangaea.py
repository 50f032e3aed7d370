"""
PANGAEA evaluation (paper Table 6) and few-shot classification (paper Tables 5, 11) of a frozen TerraMind encoder.

Segmentation, the PANGAEA protocol (PANGAEA, Marsocci et al. 2024, §4): frozen encoder; four encoder blocks ([3, 5, 7,
11] of 12, [7, 11, 15, 23] of 24) as grids into UPerNet (neck x4/x2/x1/x0.5, pooling 1/2/3/6, 512 channels,
dropout 0.1); AdamW lr 1e-4, wd 0.05, batch 8, 80 epochs, lr x0.1 at 60%/90% of the iterations; random 224 crops;
224 sliding windows, overlaps averaged; one confusion matrix per split -> IoU and mIoU as PANGAEA computes them.
Bands are matched by name (missing ones zero-filled and reported) and standardized with the dataset's statistics;
multi-temporal data runs the encoder per frame, then L-TAE or Linear(T, 1). The readers live in pangaea_datasets.py:
the benchmark's on-disk formats (READERS) and TerraMesh-layout folders with a label folder. Few-shot: mean-pooled
embeddings of image folders (<root>/[train|test/]<class>/*.tif), k-shot n-way, nearest prototype, 200 runs on the
full test set.

Consumes our checkpoint (`--model`), official weights (`--official` + `--size`) or a random init (neither);
writes <out>/results.json, head.safetensors, prediction.png. CPU smoke runs on the synthetic world with the smoke
model of pretrain.py (ckpt/; without --model: a random-init --size smoke), then one GPU:
    python eval_pangaea.py seg --dataset terramesh --root data/synth --labels label_water --classes land,water \
        --modalities S2L2A,S1GRD --model ckpt/terramind.safetensors --crop 64 --channels 64 --epochs 20 --workers 0 \
        --out runs/pangaea/water
    python eval_pangaea.py folders --root data/synth --out data/synth_classes        # dominant-LULC classes
    python eval_pangaea.py fewshot --root data/synth_classes --modality S2L1C --ways 5 --shots 1 \
        --model ckpt/terramind.safetensors
    python eval_pangaea.py seg --dataset sen1floods11 --root data/sen1floods11_v1.1 --official TerraMind_v1_base.pt \
        --size base --modalities S2L1C,S1GRD --device cuda --out runs/pangaea/sen1floods11
    python eval_pangaea.py table runs/pangaea/*/results.json                        # paper Table 6 layout
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

from cli import (TrainingDiverged, fraction, layer_list, multiple_of, nonnegative_int, positive_int, run_main,
                 torch_device, writable_folder)
from pangaea_datasets import OPTICAL, READERS, SAR, ImageFolder, TerraMeshLabels, band_codes, write_class_folders
from pictures import save_sheet
from terramesh import (LULC_COLORS, MODALITIES, PATCH, PIXEL_MODALITIES, modality_names, render, save_safetensors,
                       write_text)

# -----------------------------------------------------------------------------------------------------------
# Input pipeline: bands by name, the dataset's standardization, crops (PANGAEA pangaea/engine/data_preprocessor.py)

class BandMatcher:
    """PANGAEA's BandFilter + NormalizeMeanStd + BandPadding. Each encoder input (a TerraMind modality) is fed
    from the dataset modality of its kind (optical: S2L1C/S2L2A/S2RGB, sar: S1GRD/S1RTC, or the same name); bands
    are matched by name in the encoder's order, standardized with the dataset's statistics; bands the dataset
    lacks are 0 (= the mean). `lines` reports it. DEVIATION: PANGAEA feeds B10 into S2L2A's B9 slot."""

    def __init__(self, reader, entries):
        self.plan, self.lines = {}, []
        for e in entries:
            if e not in MODALITIES or not MODALITIES[e].pixel_key:
                raise ValueError(f"{e!r} is not a TerraMind pixel modality: {[m for m in MODALITIES if MODALITIES[m].pixel_key]}")
            src = e if e in reader.bands else "optical" if e in OPTICAL else "sar" if e in SAR else e
            if src not in reader.bands:
                self.lines.append(f"{e}: not fed ({reader.name} has no {src})")
                continue
            have, want = list(reader.bands[src]), band_codes(e)
            index = np.array([have.index(c) if c in have else -1 for c in want])
            self.plan[e] = (src, index, *(np.asarray(s[src], np.float32)[np.maximum(index, 0), None, None, None]
                                          for s in (reader.mean, reader.std)))
            missing, unused = [c for c, i in zip(want, index) if i < 0], [c for c in have if c not in want]
            self.lines.append(f"{e} <- {src}: {int((index >= 0).sum())}/{len(want)} bands" +
                              (f", zero-filled {','.join(missing)}" if missing else "") +
                              (f", unused {','.join(unused)}" if unused else ""))
        if not self.plan:
            raise ValueError(f"no encoder input of {list(entries)} can be fed from {reader.name} ({list(reader.bands)})")

    def __call__(self, image: dict) -> dict:           # {modality: (C, T, H, W)} -> {entry: (C_e, T, H, W)}
        return {e: torch.from_numpy(np.where((index >= 0)[:, None, None, None],
                                             (image[src][np.maximum(index, 0)] - mean) / std, 0).astype(np.float32))
                for e, (src, index, mean, std) in self.plan.items()}


class SegmentationData(torch.utils.data.Dataset):
    """A reader through the protocol's transforms: training samples are random `crop` windows (focus: around a
    random labelled pixel; smaller images padded), evaluation samples whole images; "resize" datasets are always
    the whole image resized to `crop` (image only). `replicate` repeats the set per epoch (data_replicate)."""

    def __init__(self, reader, matcher, crop, train, seed=0, replicate=1):
        self.reader, self.matcher, self.crop, self.train = reader, matcher, crop, train
        self.seed, self.replicate, self.epoch = seed, replicate, 0

    def __len__(self):
        return len(self.reader) * self.replicate

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        (image, y), r, s = self.reader[i % len(self.reader)], self.reader, self.crop
        x = self.matcher(image)
        if r.prep == "resize":    # official: bilinear + antialias, image only
            return {e: F.interpolate(v.flatten(0, 1)[None], (s, s), mode="bilinear", antialias=True)[0]
                    .view(*v.shape[:2], s, s) for e, v in x.items()}, y
        if not self.train:
            return x, y
        ph, pw = max(s - y.shape[0], 0), max(s - y.shape[1], 0)
        x = {e: F.pad(v, (0, pw, 0, ph)) for e, v in x.items()}                   # inputs: the mean
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=r.ignore_index)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top, left = rng.integers(0, y.shape[0] - s + 1), rng.integers(0, y.shape[1] - s + 1)
        labelled = np.argwhere(y != r.ignore_index) if r.prep == "focus" else []
        if len(labelled):
            row, col = labelled[rng.integers(len(labelled))]
            top, left = np.clip(row - s // 2, 0, y.shape[0] - s), np.clip(col - s // 2, 0, y.shape[1] - s)
        return {e: v[..., top:top + s, left:left + s] for e, v in x.items()}, y[top:top + s, left:left + s]


# -----------------------------------------------------------------------------------------------------------
# The model: frozen encoder, temporal mapping, UPerNet (PANGAEA pangaea/decoders/upernet.py, ltae.py)

def default_layers(depth: int) -> list:
    """PANGAEA's encoder blocks: [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24; else each quarter's last."""
    return {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}.get(depth, [max(0, math.ceil(depth * k / 4) - 1) for k in (1, 2, 3, 4)])


def conv_bn_relu(cin, cout, k):   # official: the convs keep their biases before the norm
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class UPerNet(nn.Module):
    """PANGAEA's UPerNet (mmseg UPerHead) on four ViT feature maps: neck (Feature2Pyramid) rescaling them x4, x2,
    x1, x0.5; pyramid pooling (1, 2, 3, 6) on the coarsest; FPN top-down; fusion; Dropout2d; 1x1 classifier.
    DEVIATION: BatchNorm2d instead of SyncBatchNorm (we evaluate in one process)."""

    def __init__(self, dim, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        up = lambda: nn.ConvTranspose2d(dim, dim, 2, 2)                                  # noqa: E731
        self.neck = nn.ModuleList([nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up()), up(), nn.Identity(),
                                   nn.MaxPool2d(2)])
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout, self.conv_seg = nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list, size) -> torch.Tensor:   # 4 x (B, D, h, w) -> (B, K, *size)
        def up(x, like):
            return F.interpolate(x, like.shape[2:], mode="bilinear", align_corners=False)
        levels = [op(f) for op, f in zip(self.neck, features)]                    # (B, D, 4h | 2h | h | h/2, ..)
        top = levels[3]
        lat = [conv(x) for conv, x in zip(self.lateral, levels)] + [
            self.bottleneck(torch.cat([top] + [up(p(top), top) for p in self.ppm], 1))]   # (B, channels, ..)
        for i in (3, 2, 1):                                                       # top-down pathway
            lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, lat)] + [lat[3]]
        x = self.fpn_bottleneck(torch.cat([outs[0]] + [up(o, outs[0]) for o in outs[1:]], 1))   # (B, C, 4h, 4w)
        return F.interpolate(self.conv_seg(self.dropout(x)), size, mode="bilinear", align_corners=False)


class LTAE2d(nn.Module):
    """Lightweight Temporal Attention Encoder (Garnot & Landrieu 2020) per pixel with PANGAEA's settings: GroupNorm
    (16) in, 1x1 in-conv, a learned master query per head (16 heads, d_k 4), softmax over T at temperature
    sqrt(d_k), value channels split per head, MLP (Linear, BN, ReLU), dropout 0.2, GroupNorm(16) out, no positions."""

    def __init__(self, dim, heads=16, d_k=4, dropout=0.2):
        super().__init__()
        self.heads, self.d_k = heads, d_k
        self.in_norm, self.inconv = nn.GroupNorm(heads, dim), nn.Conv1d(dim, dim, 1)
        self.query, self.key = nn.Parameter(torch.randn(heads, d_k) * math.sqrt(2 / d_k)), nn.Linear(dim, heads * d_k)
        nn.init.normal_(self.key.weight, std=math.sqrt(2 / d_k))
        self.attn_dropout, self.dropout = nn.Dropout(0.1), nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.out_norm = nn.GroupNorm(heads, dim)

    def forward(self, x):                                                          # (B, D, T, h, w) -> (B, D, h, w)
        B, D, T, h, w = x.shape
        v = self.inconv(self.in_norm(rearrange(x, "b d t h w -> (b h w) d t"))).transpose(1, 2)   # (P, T, D)
        k = self.key(v).view(-1, T, self.heads, self.d_k)                         # (P, T, heads, d_k)
        attn = self.attn_dropout(((k * self.query).sum(-1) / math.sqrt(self.d_k)).softmax(1))   # (P, T, heads)
        out = torch.einsum("pth,pthc->phc", attn, v.view(-1, T, self.heads, D // self.heads)).reshape(-1, D)
        return rearrange(self.out_norm(self.dropout(self.mlp(out))), "(b h w) d -> b d h w", b=B, h=h, w=w)


class TemporalLinear(nn.Linear):
    """PANGAEA's linear temporal mapping: nn.Linear(T, 1) over the time axis."""

    def __init__(self, frames):
        super().__init__(frames, 1)

    def forward(self, x):                                                          # (B, D, T, h, w) -> (B, D, h, w)
        return super().forward(x.movedim(2, -1)).squeeze(-1)


class PangaeaModel(nn.Module):
    """Frozen encoder (TerraMind: `config.dim`, `encode(inputs, layers)` -> `.merge("mean", layer)`), a temporal
    mapping for frames > 1 (one module shared by the four levels, official) and UPerNet."""

    def __init__(self, encoder, num_logits, layers, frames=1, temporal="ltae", channels=512):
        super().__init__()
        self.encoder, self.layers = encoder.eval().requires_grad_(False), list(layers)
        dim = encoder.config.dim
        self.temporal = None if frames == 1 else LTAE2d(dim) if temporal == "ltae" else TemporalLinear(frames)
        self.head = UPerNet(dim, num_logits, channels)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()                                                        # frozen: always in eval
        return self

    def features(self, inputs: dict) -> list:          # {entry: (B, C, T, H, W)} -> 4 x (B, D, h, w)
        B, _, T = next(iter(inputs.values())).shape[:3]
        with torch.no_grad():   # frames run one by one; modalities early-fused, then mean-merged (official)
            enc = self.encoder.encode({e: rearrange(x, "b c t h w -> (b t) c h w") for e, x in inputs.items()},
                                      layers=sorted(set(self.layers)))
            feats = [enc.merge("mean", layer) for layer in self.layers]           # (B*T, D, h, w); last one normed
        if self.temporal is None:
            return feats
        return [self.temporal(rearrange(f, "(b t) d h w -> b d t h w", b=B, t=T)) for f in feats]

    def forward(self, inputs: dict, size=None) -> torch.Tensor:                   # -> (B, K, H, W)
        return self.head(self.features(inputs), size or next(iter(inputs.values())).shape[-2:])


def load_encoder(model=None, official=None, size="smoke", device="cpu"):
    """Our checkpoint (`model`), official weights (`official` + `size`) or a random init of `size`; with a name."""
    from terramind import TerraMind, TerraMindConfig
    if model:
        return TerraMind.from_checkpoint(model, device), f"TerraMind {Path(model).stem}"
    if official:
        return (TerraMind.from_official(official, size).to(device),
                f"TerraMind-{size if isinstance(size, str) else 'custom'} ({Path(official).name})")
    return TerraMind(TerraMindConfig.preset(size)).to(device), f"TerraMind-{size} random init"


# -----------------------------------------------------------------------------------------------------------
# Evaluation: sliding windows, the confusion matrix, mIoU as PANGAEA computes it (pangaea/engine/evaluator.py)

def window_starts(size: int, window: int) -> list:
    """ceil(size / window) window starts spread evenly over [0, size - window] (overlapping), rounded."""
    return np.linspace(0, size - window, math.ceil(size / window)).round().astype(int).tolist()


def sliding_inference(predict, inputs: dict, window: int, batch: int = 8) -> torch.Tensor:
    """inputs {entry: (B, C, T, H, W)} -> averaged logits (B, K, H, W). `predict` maps a dict of windows
    (B', C, T, window, window) to (B', K, window, window); `batch` windows per call; small images are padded."""
    B, H, W = (lambda s: (s[0], s[-2], s[-1]))(next(iter(inputs.values())).shape)
    ph, pw = max(window - H, 0), max(window - W, 0)
    inputs = {e: F.pad(x, (0, pw, 0, ph)) for e, x in inputs.items()}
    corners = [(t, l) for t in window_starts(H + ph, window) for l in window_starts(W + pw, window)]
    out = count = None
    for k in range(0, len(corners), batch):
        chunk = corners[k:k + batch]
        logits = predict({e: torch.cat([x[..., t:t + window, l:l + window] for t, l in chunk]) for e, x in inputs.items()})
        if out is None:
            out, count = logits.new_zeros(B, logits.shape[1], H + ph, W + pw), logits.new_zeros(1, 1, H + ph, W + pw)
        for j, (t, l) in enumerate(chunk):
            out[..., t:t + window, l:l + window] += logits[j * B:(j + 1) * B]
            count[..., t:t + window, l:l + window] += 1
    return (out / count)[..., :H, :W]


def confusion_matrix(pred, target, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows = prediction, columns = target; pixels whose target is the ignore index removed."""
    keep = target != ignore_index
    return torch.bincount(pred[keep] * num_classes + target[keep], minlength=num_classes ** 2).view(num_classes, -1)


def segmentation_scores(cm, ignore_index: int) -> dict:
    """PANGAEA's metrics in %: IoU = tp / (pred + gt - tp + 1e-6) per class; mIoU over all classes except an ignore
    index inside [0, K) (classes absent from prediction and target count, with IoU 0); acc = pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    iou = tp / (cm.sum(1) + cm.sum(0) - tp + 1e-6) * 100
    valid = [k for k in range(len(cm)) if k != ignore_index]
    return {"iou": iou.tolist(), "miou": float(iou[valid].mean()), "acc": float(tp.sum() / cm.sum().clamp(min=1) * 100)}


@torch.no_grad()
def evaluate(model, data: SegmentationData, window: int, device="cpu") -> dict:
    """Whole-split scores, batch 1: sliding windows (or the whole resized image), one confusion matrix.
    Also returns the first sample's prediction and target ("first") for a picture."""
    r, was_training = data.reader, model.training
    model.eval()
    cm, first = torch.zeros(len(r.classes), len(r.classes), dtype=torch.long), None
    for i in tqdm(range(len(data)), desc=f"eval {r.split}", leave=False):
        x, y = data[i]
        x, y = {e: v[None].to(device) for e, v in x.items()}, torch.as_tensor(y)
        logits = model(x, y.shape) if r.prep == "resize" else sliding_inference(model, x, window)
        logits = F.interpolate(logits, y.shape, mode="bilinear") if logits.shape[-2:] != y.shape else logits
        pred = (logits[0, 0].sigmoid() > 0.5).long().cpu() if r.binary else logits[0].argmax(0).cpu()
        cm += confusion_matrix(pred, y, len(r.classes), r.ignore_index)
        first = first or (pred, y)
    model.train(was_training)
    return {**segmentation_scores(cm, r.ignore_index), "first": first}


def dice_loss(logits, target, ignore_index):
    """Soft Dice of a single sigmoid logit, ignored pixels removed: logits (B, 1, H, W), target (B, H, W)."""
    keep = target != ignore_index
    p, t = logits[:, 0].sigmoid()[keep], target[keep].float()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def multistep(opt, total: int):
    """PANGAEA's schedule: lr x0.1 at int(0.6 * total) and int(0.9 * total) iterations, stepped per iteration."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.6), int(total * 0.9)], gamma=0.1)


def train_segmentation(model, train: SegmentationData, val: SegmentationData, epochs=80, batch_size=8, window=224,
                       device="cpu", workers=4, seed=234, lr=1e-4, weight_decay=0.05, eval_every=5) -> dict:
    """The protocol on the head: AdamW, `multistep`, cross-entropy with the ignore index (Dice for 1-logit tasks),
    validation every `eval_every` epochs and at the end; the best-validation head (mIoU; for 1-logit tasks the
    positive class's IoU) is loaded back and its validation scores returned."""
    r = train.reader
    loader = torch.utils.data.DataLoader(train, batch_size, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ValueError(f"{r.name}: {len(train)} training samples < one batch of {batch_size}; use --replicate")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr, (0.9, 0.999), weight_decay=weight_decay)
    total = len(loader) * epochs
    sched = multistep(opt, total)
    ce = nn.CrossEntropyLoss(ignore_index=r.ignore_index)
    best, best_state, step, log_every = None, None, 0, max(1, total // 40)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        for x, y in loader:
            t0 = time.time()
            x, y = {e: v.to(device) for e, v in x.items()}, y.to(device)
            logits = model(x, y.shape[-2:])
            loss = dice_loss(logits, y, r.ignore_index) if r.binary else ce(logits, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}: loss {loss.item()}: training stopped, "
                                       f"nothing written; check the inputs of {r.name} or lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == total:
                dt = time.time() - t0
                print(f"step {step}/{total} | loss {loss.item():.4f} | lr {opt.param_groups[0]['lr']:.1e} | "
                      f"{dt * 1000:.0f} ms | {len(y) / dt:.1f} img/s", flush=True)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            scores = evaluate(model, val, window, device)
            print(f"epoch {epoch + 1}/{epochs} | val mIoU {scores['miou']:.2f} | acc {scores['acc']:.2f} | IoU "
                  + " ".join(f"{v:.1f}" for v in scores["iou"]), flush=True)
            key = (lambda s: s["iou"][1] if r.binary else s["miou"])
            if best is None or key(scores) > key(best):
                best = scores
                best_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    model.load_state_dict(best_state, strict=False)
    return best


# -----------------------------------------------------------------------------------------------------------
# Few-shot classification (paper Tables 5, 11)

@torch.no_grad()
def embed(encoder, data: SegmentationData, batch_size=64, device="cpu") -> tuple:
    """Mean-pooled normed last-layer features (modalities mean-merged) of whole images -> (N, D), labels (N,)."""
    out, labels = [], []
    for x, y in tqdm(torch.utils.data.DataLoader(data, batch_size), desc="embed", leave=False):
        enc = encoder.encode({e: v[:, :, 0].to(device) for e, v in x.items()})    # (B, C, H, W): one frame
        out.append(enc.merge("mean").mean((2, 3)).cpu())                           # (B, D)
        labels.append(torch.as_tensor(y))
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def fewshot_accuracy(support, support_y, query, query_y, ways, shots, runs=200, seed=0, same_pool=False) -> tuple:
    """k-shot n-way accuracy (%), mean and std over runs: each run draws `ways` classes and `shots` support images
    each and assigns every query image of those classes to the nearest prototype (Euclidean; the support mean,
    the 1-NN for one shot). `same_pool`: support and query are one set, the support left out of the queries."""
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(support_y) if (support_y == c).sum() >= shots + same_pool and
               (query_y == c).sum() > shots * same_pool]           # enough support images, and test images
    if len(classes) < ways:
        raise ValueError(f"only {len(classes)} classes have {shots} support and some test images; {ways} ways asked")
    accs = []
    for _ in range(runs):
        chosen = rng.choice(classes, ways, replace=False)
        picks = [rng.choice(np.flatnonzero(support_y == c), shots, replace=False) for c in chosen]
        protos = np.stack([support[p].mean(0) for p in picks])                    # (ways, D)
        mask = np.isin(query_y, chosen)
        mask[np.concatenate(picks) if same_pool else []] = False
        d = ((query[mask][:, None] - protos[None]) ** 2).sum(-1)                   # (Q, ways)
        accs.append(float((chosen[d.argmin(1)] == query_y[mask]).mean() * 100))
    return float(np.mean(accs)), float(np.std(accs))


# -----------------------------------------------------------------------------------------------------------
# Reports: paper Table 6 layout, a picture, commands

TABLE6 = {"hlsburnscars": "HLS Burns", "mados": "MADOS", "pastis": "PASTIS", "sen1floods11": "Sen1Fl11",
          "fivebillionpixels": "FBP", "dynamicen": "DEN", "croptypemapping": "CTM-SS", "spacenet7": "SN7",
          "ai4smallfarms": "AI4Farms"}


def table6(results: dict) -> str:
    """{model: {dataset: test mIoU}} -> markdown in the paper's column order (other datasets after), with the
    average mIoU over each model's datasets and the average rank among the models per column."""
    cols = list(TABLE6) + sorted({d for r in results.values() for d in r} - set(TABLE6))
    ranks = {m: [] for m in results}
    for d in cols:
        for k, (_, m) in enumerate(sorted((-r[d], m) for m, r in results.items() if d in r)):
            ranks[m].append(k + 1)
    return "\n".join(["| Model | " + " | ".join(TABLE6.get(d, d) for d in cols) + " | Avg. mIoU | Avg. Rank |",
                      "|---" * (len(cols) + 3) + "|"] + [
        f"| {m} | " + " | ".join(f"{r[d]:.2f}" if d in r else "–" for d in cols) +
        f" | {np.mean(list(r.values())):.2f} | {np.mean(ranks[m]):.2f} |" for m, r in results.items()])


def save_prediction(path, reader, pred, target):
    """input | target | prediction (ignored pixels white) for the first sample of a split."""
    image, k = reader[0][0], len(reader.classes)
    pal = np.array([(40, 40, 40), (65, 155, 223)], np.uint8) if k <= 2 else np.concatenate(
        [LULC_COLORS[1:], np.random.default_rng(0).integers(0, 255, (max(k - 9, 0), 3), dtype=np.uint8)])
    paint = lambda y: np.where((y >= 0)[..., None], pal[np.clip(y, 0, k - 1)], 255).astype(np.uint8)   # noqa: E731
    rgb = ("B4", "B3", "B2")
    src, codes = next(((m, c) for m, c in reader.bands.items() if set(rgb) <= set(c)), next(iter(reader.bands.items())))
    if set(rgb) <= set(codes):                                                    # true colour, 2-98 % stretch
        x = image[src][[codes.index(c) for c in rgb], 0]
        lo, hi = np.percentile(x, [2, 98])
        rgb = (np.clip((x - lo) / (hi - lo + 1e-6), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    else:                                                                         # S1 false colour, DEM, ...
        rgb = render(src if src in MODALITIES else "S1GRD", image[src][:, 0])
    y = target.numpy()
    save_sheet(path, [("input", rgb), ("target", paint(y)), ("prediction", paint(np.where(y == reader.ignore_index,
                                                                                           -1, pred.numpy())))],
               max_size=256)


def write_json(path, obj):
    """Writes obj as JSON atomically (a temporary file, then a rename); tim_finetune.py uses it too."""
    write_text(path, json.dumps(obj, indent=1))


def run_seg(args):
    writable_folder(args.out)   # before training: a folder it cannot write to would lose every epoch
    torch.manual_seed(args.seed)
    mods = args.modalities.split(",")
    if args.dataset == "terramesh":
        train = TerraMeshLabels(args.root, "train", args.labels, mods, args.classes and args.classes.split(","))
        readers = {"train": train, **{s: TerraMeshLabels(args.root, s, args.labels, mods, train.classes,
                                                         (train.mean, train.std)) for s in ("val", "test")}}
    else:
        readers = {s: READERS[args.dataset](args.root, s) for s in ("train", "val", "test")}
    r = readers["train"]
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(r, mods)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else default_layers(encoder.config.encoder_depth)
    if max(layers) >= encoder.config.encoder_depth:
        raise ValueError(f"--layers {args.layers}: the encoder has {encoder.config.encoder_depth} blocks, "
                         f"0..{encoder.config.encoder_depth - 1}")
    config = dict(dim=encoder.config.dim, num_logits=1 if r.binary else len(r.classes), layers=layers,
                  frames=r.frames, temporal=args.temporal, channels=args.channels)
    model = PangaeaModel(encoder, **{k: v for k, v in config.items() if k != "dim"}).to(args.device)
    print(f"{r.name}: {', '.join(f'{s} {len(d)}' for s, d in readers.items())} samples | encoder {name} | layers "
          f"{layers} | head {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M params")
    print("bands: " + " | ".join(matcher.lines))
    data = {s: SegmentationData(d, matcher, args.crop, s == "train", args.seed, args.replicate if s == "train" else 1)
            for s, d in readers.items()}
    t0 = time.time()
    val = train_segmentation(model, data["train"], data["val"], args.epochs, args.batch_size, args.crop, args.device,
                             args.workers, args.seed)
    test = evaluate(model, data["test"], args.crop, args.device)
    print(f"test: {len(readers['test'])} samples, best-val head ({time.time() - t0:.0f} s): mIoU {test['miou']:.2f} "
          f"| acc {test['acc']:.2f}")
    for k, (c, iou) in enumerate(zip(r.classes, test["iou"])):
        print(f"  {str(c):28s} IoU {iou:6.2f}" + ("  (ignore index, not in mIoU)" if k == r.ignore_index else ""))
    print(table6({name: {r.name: test["miou"]}}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "head.safetensors", {k: v for k, v in model.state_dict().items()   # BN step counters
                                                if not k.startswith("encoder.") and v.ndim},      # (0-dim) unused
                     {"config": config, "encoder": name})
    write_json(out / "results.json", {"model": name, "dataset": r.name, "classes": [str(c) for c in r.classes],
                                       "miou": test["miou"], "iou": test["iou"], "acc": test["acc"],
                                       "val_miou": val["miou"], "bands": matcher.lines, "head": config,
                                       "args": {k: v for k, v in vars(args).items() if k != "command"}})
    save_prediction(out / "prediction.png", readers["test"], *test["first"])
    print(f"wrote {out}/results.json, head.safetensors, prediction.png")


def run_fewshot(args):
    if args.out:
        writable_folder(args.out)
    torch.manual_seed(args.seed)
    root, bands = Path(args.root), args.bands and args.bands.split(",")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    support = ImageFolder(root / "train" if split else root, args.modality, bands)
    query = ImageFolder(root / "test", args.modality, bands, support.classes, (support.mean, support.std)) if split \
        else support
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(support, [args.modality])
    print(f"{root.name}: {len(support.classes)} classes, {len(support)} support / {len(query)} query images | "
          f"encoder {name} | bands: {matcher.lines[0]}")
    xs, ys = embed(encoder, SegmentationData(support, matcher, None, False), args.batch_size, args.device)
    xq, yq = embed(encoder, SegmentationData(query, matcher, None, False), args.batch_size, args.device) if split \
        else (xs, ys)
    mean, std = fewshot_accuracy(xs, ys, xq, yq, args.ways, args.shots, args.runs, args.seed, same_pool=not split)
    print(f"| Model | {args.shots}-shot {args.ways}-way |\n|---|---|\n| {name} | {mean:.2f} ± {std:.2f} |\n"
          f"({args.runs} runs, accuracy % on the full test set; chance {100 / args.ways:.1f})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "results.json", {"model": name, "dataset": root.name, "ways": args.ways,
                                                      "shots": args.shots, "runs": args.runs, "accuracy": mean,
                                                      "std": std, "chance": 100 / args.ways})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    seg, few = sub.add_parser("seg", help="PANGAEA segmentation"), sub.add_parser("fewshot", help="few-shot k-shot n-way")
    for q in (seg, few):
        q.add_argument("--root", required=True, help="dataset folder")
        q.add_argument("--model", default=None, help="our TerraMind checkpoint (.safetensors) or checkpoint folder")
        q.add_argument("--official", default=None, help="official weights, e.g. TerraMind_v1_base.pt (with --size)")
        q.add_argument("--size", default="smoke", help="model size of --official, or of a random init")
        q.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda")
        q.add_argument("--seed", type=nonnegative_int, default=234, help="seed (PANGAEA: 234)")
    seg.add_argument("--dataset", required=True, choices=[*READERS, "terramesh"], help="on-disk format")
    seg.add_argument("--modalities", type=modality_names(PIXEL_MODALITIES), default="S2L2A,S1GRD",
                     help="encoder inputs (PANGAEA's TerraMind: S2L2A,S1GRD)")
    seg.add_argument("--labels", default="label_water", help="terramesh: the label folder")
    seg.add_argument("--classes", default=None, help="terramesh: class names, comma-separated (default 0..max)")
    seg.add_argument("--layers", type=layer_list, default=None, help="encoder blocks, e.g. 3,5,7,11 (default by depth)")
    seg.add_argument("--temporal", default="ltae", choices=["ltae", "linear"], help="multi-temporal mapping")
    seg.add_argument("--crop", type=multiple_of(PATCH), default=224,
                     help="training crop and sliding window (official 224)")
    seg.add_argument("--channels", type=positive_int, default=512, help="UPerNet channels (official 512)")
    seg.add_argument("--epochs", type=positive_int, default=80, help="epochs (official 80)")
    seg.add_argument("--batch-size", type=positive_int, default=8, help="batch size (official 8)")
    seg.add_argument("--replicate", type=positive_int, default=1, help="repeat the train set N times per epoch")
    seg.add_argument("--workers", type=nonnegative_int, default=4, help="data loader workers")
    seg.add_argument("--out", default="runs/pangaea", help="output folder")
    few.add_argument("--modality", type=modality_names(PIXEL_MODALITIES), default="S2L1C",
                     help="the TerraMind modality the images are fed as (default: "
                     "S2L1C, as the paper's Table 5)")
    few.add_argument("--bands", default=None, help="band codes of the files, in order (default: the modality's)")
    few.add_argument("--ways", type=positive_int, default=5, help="classes per run")
    few.add_argument("--shots", type=positive_int, default=1, help="support images per class")
    few.add_argument("--runs", type=positive_int, default=200, help="runs averaged (paper: 200)")
    few.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    few.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    q = sub.add_parser("folders", help="dominant-LULC image folders from a TerraMesh-layout folder")
    q.add_argument("--root", required=True, help="TerraMesh-layout folder with LULC/ and splits/")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--modality", type=modality_names(PIXEL_MODALITIES), default="S2L1C",
                   help="the modality whose files are linked (default: S2L1C, the "
                   "few-shot input of the paper's Table 5)")
    q.add_argument("--min-share", type=fraction, default=0.5, help="minimum share of the dominant class")
    q = sub.add_parser("table", help="results.json files -> paper Table 6 layout")
    q.add_argument("results", nargs="+", help="results.json files")
    args = p.parse_args()
    if args.command == "seg":
        run_seg(args)
    elif args.command == "fewshot":
        run_fewshot(args)
    elif args.command == "folders":
        for (split, name), n in sorted(write_class_folders(args.root, args.out, args.modality, args.min_share).items()):
            print(f"{split:5s} {name:20s} {n}")
    else:
        results = {}
        for f in args.results:
            r = json.loads(Path(f).read_text())
            results.setdefault(r["model"], {})[r["dataset"]] = r["miou"]
        print(table6(results))


if __name__ == "__main__":
    run_main(main)
