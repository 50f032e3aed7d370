"""
Metrics of the held-out evaluations: reconstruction quality of the image tokenizers (paper
Table 10: MAE, RMSE, SSIM, PSNR in physical units, LULC accuracy and mIoU, codebook usage), of
generation (paper Tables 3-4: the same, plus zero-shot water IoU and geolocation error) and of
segmentation (paper Tables 6, 8: PANGAEA's IoU and mIoU). fsq_tokenizer.py reconstruct,
generate.py eval, eval_pangaea.py and tim_finetune.py report them; nothing here runs on its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modalities import WATER, destandardize

# -----------------------------------------------------------------------------------------------
# Reconstruction (paper Table 10): MAE, RMSE, SSIM, PSNR in physical units; codebook usage

def physical(name: str, x: torch.Tensor) -> torch.Tensor:
    """Standardized -> physical units: reflectance (S2), dB (S1), metres (DEM), NDVI."""
    x = destandardize(name, x.double())
    return x / 1e4 if name.startswith("S2") else x


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pair -> SSIM per (sample, band), 11x11 Gaussian window, sigma 1.5
    (Wang et al. 2004)."""
    g = torch.exp(-(torch.arange(11, dtype=x.dtype) - 5) ** 2 / (2 * 1.5 ** 2))
    w = ((g[:, None] * g[None]) / g.sum() ** 2).expand(x.shape[1], 1, 11, 11)

    def mu(t):                                                   # local Gaussian mean
        return F.conv2d(t, w, groups=x.shape[1])
    c1 = (0.01 * data_range.view(1, -1, 1, 1)) ** 2
    c2 = (0.03 * data_range.view(1, -1, 1, 1)) ** 2
    mx, my = mu(x), mu(y)
    vx, vy, cxy = mu(x * x) - mx ** 2, mu(y * y) - my ** 2, mu(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean((-2, -1))                                      # (B, C)


def lulc_metrics(target: torch.Tensor, logits: torch.Tensor) -> dict:
    """Class map (B, H, W) vs logits (B, K, H, W): pixel accuracy and the mean IoU over the
    classes present in the prediction or the target."""
    pred = logits.argmax(1)
    ious = []
    for c in range(logits.shape[1]):
        union = (pred == c) | (target == c)
        if union.any():
            ious.append(((pred == c) & (target == c)).sum() / union.sum())
    return {"acc": float((pred == target).double().mean()), "mIoU": float(torch.stack(ious).mean())}


def reconstruction_metrics(name: str, target: torch.Tensor, recon: torch.Tensor,
                           data_range=None) -> dict:
    """target, recon standardized (B, C, H, W) (LULC: class map (B, H, W) and logits
    (B, 10, H, W)). PSNR and SSIM use `data_range` per band (default: the target's max - min
    over the whole set)."""
    if name == "LULC":
        return lulc_metrics(target, recon)
    x, y = physical(name, target), physical(name, recon)
    rng = data_range
    if rng is None:
        rng = (x.amax((0, 2, 3)) - x.amin((0, 2, 3))).clamp_min(1e-12)
    mse = ((x - y) ** 2).mean((2, 3))                            # (B, C)
    return {"MAE": float((x - y).abs().mean()), "RMSE": float(mse.mean().sqrt()),
            "SSIM": float(ssim(x, y, rng).mean()),
            "PSNR": float((10 * torch.log10(rng ** 2 / mse)).mean())}


def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict:
    """Share of the codebook used and the perplexity exp(H) of the token histogram."""
    p = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return {"used": float(len(p) / vocab_size), "perplexity": float(torch.exp(-(p * p.log()).sum()))}


# -----------------------------------------------------------------------------------------------
# Generation (paper Tables 3-4): zero-shot water mapping, geolocation

def water_iou(lulc: torch.Tensor, label: torch.Tensor) -> tuple[int, int]:
    """Generated LULC water class vs a water label (1 water, 0 not, -1 ignored) ->
    (intersection, union)."""
    ok = label >= 0
    p, t = (lulc == WATER) & ok, (label == 1) & ok
    return int((p & t).sum()), int((p | t).sum())


def haversine_km(a, b) -> float:
    """Great-circle distance between (lon, lat) points in km (Earth radius 6371 km)."""
    (lo1, la1), (lo2, la2) = (map(math.radians, p) for p in (a, b))
    h = (math.sin((la2 - la1) / 2) ** 2
         + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2)
    return 2 * 6371.0 * math.asin(math.sqrt(min(1.0, h)))


# -----------------------------------------------------------------------------------------------
# Segmentation (paper Tables 6, 8): PANGAEA's IoU and mIoU (pangaea/engine/evaluator.py)

def confusion_matrix(pred, target, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows = prediction, columns = target; pixels whose target is the ignore
    index removed."""
    keep = target != ignore_index
    pairs = pred[keep] * num_classes + target[keep]
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, -1)


def segmentation_scores(cm, ignore_index: int) -> dict:
    """PANGAEA's metrics in %: IoU = tp / (pred + gt - tp + 1e-6) per class; mIoU over all
    classes except an ignore index inside [0, K) (classes absent from prediction and target
    count, with IoU 0); acc = pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    iou = tp / (cm.sum(1) + cm.sum(0) - tp + 1e-6) * 100
    valid = [k for k in range(len(cm)) if k != ignore_index]
    acc = tp.sum() / cm.sum().clamp(min=1) * 100
    return {"iou": iou.tolist(), "miou": float(iou[valid].mean()), "acc": float(acc)}
