"""
Any modality as an RGB picture: true colour for Sentinel-2, false colour for Sentinel-1, shaded
terrain for the DEM, the ESRI palette for LULC and label maps, a ramp for NDVI.

`render` turns one tile, in physical units or standardized, into uint8 RGB (H, W, 3);
pictures.py encodes PNGs and lays out sheets. Every stage that draws imports `render` (through
terramesh.py):

    python terramesh.py show --root data/synth --id 00005 --out sample.png
"""
from __future__ import annotations

import numpy as np
import torch

from modalities import LULC_COLORS, MODALITIES, destandardize
from pictures import ramp

# ----------------------------------------------------------------------------
# Pictures: any modality as RGB (the PNG encoder and sheets are in pictures.py)

WATER_PALETTE = np.array([[0, 0, 0], [65, 155, 223]], np.uint8)   # label maps: land, water
DEM_STOPS = [(0, (70, 120, 60)), (0.4, (190, 185, 100)),
             (0.75, (150, 105, 70)), (1, (250, 250, 250))]
NDVI_STOPS = [(-1, (30, 60, 140)), (0, (150, 110, 70)), (0.3, (230, 220, 140)),
              (0.6, (110, 180, 60)), (1, (0, 90, 20))]


def render(name: str, x, standardized: bool = False) -> np.ndarray:
    """Any modality as uint8 RGB (H, W, 3).

    True colour for S2, VV/VH/VV-VH false colour for S1, terrain colours for DEM, the ESRI palette
    for LULC (class map or (10, H, W) logits), a brown-green ramp for NDVI. `x` is (C, H, W) or
    (H, W) in physical units, or standardized ones if `standardized`.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if name == "LULC" or name.startswith("label"):
        return render_classes(name, x)
    if x.ndim == 2:
        x = x[None]                                                   # (1, H, W)
    if standardized:
        x = destandardize(name, x)
    x = np.nan_to_num(x.astype(np.float32))
    if name in ("S2L2A", "S2L1C"):
        rgb = [MODALITIES[name].bands.index(c) for c in ("RED", "GREEN", "BLUE")]
        return to_uint8(np.clip(x[rgb] / 3000, 0, 1) ** 0.8 * 255)
    if name == "S2RGB":
        return to_uint8(np.clip(x, 0, 255))
    if name in ("S1GRD", "S1RTC"):
        return render_radar(x)
    if name == "DEM":
        return render_terrain(x[0])
    if name == "NDVI":
        return ramp(np.clip(x[0], -1, 1), NDVI_STOPS).astype(np.uint8)
    raise ValueError(f"cannot render modality {name!r}")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in 0..255 -> uint8 (H, W, 3)."""
    return x.transpose(1, 2, 0).astype(np.uint8)


def render_classes(name: str, x: np.ndarray) -> np.ndarray:
    """A class map (H, W) or logits (K, H, W) in the ESRI palette (labels: land / water);
    negative classes (ignored pixels) white."""
    if x.ndim == 3 and x.shape[0] > 1:
        x = x.argmax(0)                                              # logits -> classes
    x = np.asarray(x).reshape(x.shape[-2:]).astype(np.int64)
    palette = LULC_COLORS if name == "LULC" else WATER_PALETTE
    colours = palette[np.clip(x, 0, len(palette) - 1)]
    return np.where((x >= 0)[..., None], colours, 255).astype(np.uint8)


def render_radar(x: np.ndarray) -> np.ndarray:
    """VV, VH, VV - VH in dB as red, green, blue (the common S1 false colour)."""
    vv, vh = x[0], x[1]
    rgb = [(vv + 25) / 25, (vh + 32) / 25, (vv - vh) / 15]
    return (np.clip(np.stack(rgb, -1), 0, 1) * 255).astype(np.uint8)


def render_terrain(z: np.ndarray) -> np.ndarray:
    """Elevation (H, W) in metres: a colour ramp stretched per tile, shaded by the slope."""
    t = (z - z.min()) / max(float(z.max() - z.min()), 1.0)
    gy, gx = np.gradient(z, 10.0)                                     # 10 m pixels
    light = 0.75 + 0.5 * (gx - gy) / (np.hypot(gx, gy).max() + 1e-6)
    shade = np.clip(light, 0.4, 1.15)
    return np.clip(ramp(t, DEM_STOPS) * shade[..., None], 0, 255).astype(np.uint8)
