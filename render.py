"""
Any modality as an RGB picture: true colour for Sentinel-2, false colour for Sentinel-1, shaded terrain for
the DEM, the ESRI palette for LULC and label maps, a ramp for NDVI.

`render` turns one tile, in physical units or standardized, into uint8 RGB (H, W, 3); pictures.py encodes
PNGs and lays out sheets. Every stage that draws imports `render` (through terramesh.py):

    python terramesh.py show --root data/synth --id 00005 --out sample.png
"""
from __future__ import annotations

import numpy as np
import torch

from modalities import LULC_COLORS, MODALITIES, destandardize
from pictures import ramp

# -----------------------------------------------------------------------------------------------------------
# Pictures: any modality as RGB (the PNG encoder and sheets are in pictures.py)
def render(name: str, x, standardized: bool = False) -> np.ndarray:
    """Any modality as uint8 RGB (H, W, 3): true colour for S2, VV/VH/VV-VH false colour for S1, terrain
    colours for DEM, the ESRI palette for LULC (class map or (10, H, W) logits), a brown-green ramp for
    NDVI. `x` is (C, H, W) or (H, W) in physical units, or standardized ones if `standardized`."""
    x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if name == "LULC" or name.startswith("label"):
        if x.ndim == 3 and x.shape[0] > 1:
            x = x.argmax(0)                                                    # logits -> classes
        x = np.asarray(x).reshape(x.shape[-2:]).astype(np.int64)
        palette = LULC_COLORS if name == "LULC" else np.array([[0, 0, 0], [65, 155, 223]], np.uint8)
        return np.where((x >= 0)[..., None], palette[np.clip(x, 0, len(palette) - 1)], 255).astype(np.uint8)
    if x.ndim == 2:
        x = x[None]
    if standardized:
        x = destandardize(name, x)
    x = np.nan_to_num(x.astype(np.float32))
    if name in ("S2L2A", "S2L1C"):
        b = [MODALITIES[name].bands.index(c) for c in ("RED", "GREEN", "BLUE")]
        return (np.clip(x[b] / 3000, 0, 1) ** 0.8 * 255).transpose(1, 2, 0).astype(np.uint8)
    if name == "S2RGB":
        return np.clip(x, 0, 255).transpose(1, 2, 0).astype(np.uint8)
    if name in ("S1GRD", "S1RTC"):
        vv, vh = x[0], x[1]
        rgb = [(vv + 25) / 25, (vh + 32) / 25, (vv - vh) / 15]                   # common S1 false colour
        return (np.clip(np.stack(rgb, -1), 0, 1) * 255).astype(np.uint8)
    if name == "DEM":
        z = x[0]
        t = (z - z.min()) / max(float(z.max() - z.min()), 1.0)                   # stretched per tile
        stops = [(0, (70, 120, 60)), (0.4, (190, 185, 100)), (0.75, (150, 105, 70)), (1, (250, 250, 250))]
        gy, gx = np.gradient(z, 10.0)
        shade = np.clip(0.75 + 0.5 * (gx - gy) / (np.hypot(gx, gy).max() + 1e-6), 0.4, 1.15)
        return np.clip(ramp(t, stops) * shade[..., None], 0, 255).astype(np.uint8)
    if name == "NDVI":
        stops = [(-1, (30, 60, 140)), (0, (150, 110, 70)), (0.3, (230, 220, 140)), (0.6, (110, 180, 60)),
                 (1, (0, 90, 20))]
        return ramp(np.clip(x[0], -1, 1), stops).astype(np.uint8)
    raise ValueError(f"cannot render modality {name!r}")
