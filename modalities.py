"""
The modality table of TerraMind: the one place that names a modality, and what derives from it
alone.

TerraMind is pretrained on TerraMesh: co-registered samples of up to nine modalities (paper §3).
This file holds

  * `MODALITIES`: kind, bands in the official channel order, how the modality enters the model
    (pixels and/or tokens), vocabulary, the official v1 normalization constants and the official
    state-dict keys (official: terratorch .../terramind/model/terramind_register.py);
  * the LULC classes and their colours, `check_values` (what a tile of a modality may hold),
    `standardize` / `destandardize` with the official constants;
  * the coords text (`parse_coords`, `format_coords`) and the token window of a tile
    (`token_window`).

It reads and writes nothing; every other file imports it, directly or through terramesh.py:

    python -c "import modalities as m; print(m.IMAGE_MODALITIES)"
"""
from __future__ import annotations

import argparse
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------
# The modality table

TILE = 224   # official input size of every image modality
PATCH = 16   # official patch size: 224 / 16 = 14 x 14 = 196 tokens per image modality

# official PRETRAINED_BANDS; L2A has no B10
S2_BANDS = ("COASTAL_AEROSOL", "BLUE", "GREEN", "RED",
            "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3",
            "NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "SWIR_1", "SWIR_2")
S2_CODES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12", "B10")
S2_BAND_CODES = dict(zip(S2_BANDS + ("CIRRUS",), S2_CODES))
S2L1C_BANDS = S2_BANDS[:10] + ("CIRRUS",) + S2_BANDS[10:]     # B10 cirrus after B9


@dataclass(frozen=True)
class Modality:
    name: str                          # the user's name, also the TerraMesh folder name
    kind: str                          # "image" or "sequence"
    bands: tuple = ()                  # official channel order (image modalities)
    pixel_key: str | None = None       # official key when it enters the encoder as pixel patches
    token_key: str | None = None       # official key when it enters or leaves as discrete tokens
    vocab_size: int | None = None      # size of the token vocabulary
    fsq_levels: tuple | None = None    # FSQ levels of its image tokenizer (prod = vocab_size)
    decoder: str | None = None         # its tokenizer's decoder: "diffusion" or "vit"
    mean: tuple = ()                   # official v1 standardization, per band (assets/official)
    std: tuple = ()
    dtype: str = "float32"             # dtype of real TerraMesh files
    max_length: int | None = None      # sequence modalities: maximum tokens
    # physical range (our choice, generous): values outside it get a warning
    valid: tuple = ()

    @property
    def channels(self) -> int:
        return len(self.bands)


_FSQ16K = (8, 8, 8, 6, 5)    # 15360 codes
_FSQ4K = (7, 5, 5, 5, 5)     # 4375 codes
_S2L1C_MEAN = (2357.089, 2137.385, 2018.788, 2082.986, 2295.651, 2854.537, 3122.849,
               3040.56, 3306.481, 1473.847, 506.07, 2472.825, 1838.929)
_S2L1C_STD = (1624.683, 1675.806, 1557.708, 1833.702, 1823.738, 1733.977, 1732.131,
              1679.732, 1727.26, 1024.687, 442.165, 1331.411, 1160.419)
_S2L2A_MEAN = (1390.458, 1503.317, 1718.197, 1853.91, 2199.1, 2779.975, 2987.011,
               3083.234, 3132.22, 3162.988, 2424.884, 1857.648)
_S2L2A_STD = (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257,
              1871.918, 1753.829, 1797.379, 1434.261, 1334.311)

MODALITIES: dict[str, Modality] = {m.name: m for m in [
    Modality("S2L1C", "image", S2L1C_BANDS,
             pixel_key="untok_sen2l1c@224",
             mean=_S2L1C_MEAN, std=_S2L1C_STD,
             dtype="int16", valid=(-1000, 32767)),
    Modality("S2L2A", "image", S2_BANDS,
             pixel_key="untok_sen2l2a@224", token_key="tok_sen2l2a@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion",
             mean=_S2L2A_MEAN, std=_S2L2A_STD,
             dtype="int16", valid=(-1000, 32767)),
    Modality("S2RGB", "image", ("RED", "GREEN", "BLUE"),
             pixel_key="untok_sen2rgb@224",
             mean=(87.271, 80.931, 66.667), std=(58.767, 47.663, 42.631),
             dtype="uint8", valid=(0, 255)),
    Modality("S1GRD", "image", ("VV", "VH"),
             pixel_key="untok_sen1grd@224", token_key="tok_sen1grd@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion",
             mean=(-12.599, -20.293), std=(5.195, 5.890),
             dtype="float32", valid=(-80, 40)),
    Modality("S1RTC", "image", ("VV", "VH"),
             pixel_key="untok_sen1rtc@224", token_key="tok_sen1rtc@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion",
             mean=(-10.93, -17.329), std=(4.391, 4.459),
             dtype="float64", valid=(-80, 40)),
    Modality("DEM", "image", ("DEM",),
             pixel_key="untok_dem@224", token_key="tok_dem@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion",
             mean=(670.665,), std=(951.272,),
             dtype="int16", valid=(-500, 9000)),
    Modality("LULC", "image", ("LULC",),
             token_key="tok_lulc@224",
             vocab_size=4375, fsq_levels=_FSQ4K, decoder="vit",
             mean=(0.0,), std=(1.0,),                                 # class indices: identity
             dtype="uint8"),
    Modality("NDVI", "image", ("NDVI",),
             token_key="tok_ndvi@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion",
             mean=(0.327,), std=(0.322,),
             dtype="float64", valid=(-1.01, 1.01)),
    Modality("caption", "sequence", token_key="caption", vocab_size=30000, max_length=256),
    Modality("coords", "sequence", token_key="coords", vocab_size=30000, max_length=4),
]}
IMAGE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "image")
SEQUENCE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "sequence")
# enter the encoder as pixels
PIXEL_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.pixel_key)
# enter or leave as tokens
TOKEN_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.token_key)
# have an FSQ tokenizer
TOKENIZED_IMAGES = tuple(n for n in TOKEN_MODALITIES if MODALITIES[n].kind == "image")

# ESRI 10 m land cover, the classes of the v1 LULC tokenizer (HF card): index, name, colour
LULC_CLASSES = ("no data", "water", "trees", "flooded vegetation", "crops", "built area",
                "bare ground", "snow/ice", "clouds", "rangeland")
LULC_COLORS = np.array([(0, 0, 0), (65, 155, 223), (57, 125, 73), (122, 135, 198),
                        (228, 150, 53), (196, 40, 27), (165, 155, 143), (168, 235, 255),
                        (97, 97, 97), (227, 226, 195)], dtype=np.uint8)   # ESRI palette
NO_DATA, WATER, TREES, FLOODED, CROPS, BUILT, BARE, SNOW, CLOUDS, RANGE = range(10)

# NaN marks Sentinel-1 no data (read as the band mean); elsewhere it is an error
NAN_NO_DATA = ("S1GRD", "S1RTC")
# stored scale of values that may come as 0-1 floats
RESCALED = {"S2L1C": 10000, "S2L2A": 10000, "S2RGB": 255}


# ----------------------------------------------------------------------------
# What a tile may hold

def check_values(name: str, x: np.ndarray, path, nan_ok: bool | None = None):
    """Refuses what cannot be meaningful and warns about what is probably wrong, naming the file.

    Refused: +-inf anywhere; NaN outside Sentinel-1 (`nan_ok`, default NAN_NO_DATA); LULC classes
    that are not whole numbers; S-2 / RGB stored as 0-1 floats. Values outside the modality's
    physical range get a warning.
    """
    integer = np.issubdtype(x.dtype, np.integer)
    if x.size == 0:
        return
    # min and max carry NaN and inf through, so a finite pair clears the whole tile
    lo, hi = float(x.min()), float(x.max())
    finite = x
    if not (integer or math.isfinite(lo) and math.isfinite(hi)):
        finite = _finite_values(name, x, path, nan_ok)
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
    if name == "LULC" and not integer:
        _check_float_classes(x, finite, lo, hi, path)
    if name in RESCALED and not integer and -0.01 <= lo and hi <= 1.5:
        scale, dtype = RESCALED[name], MODALITIES[name].dtype
        raise ValueError(f"{path}: {name} values lie in {lo:g}..{hi:g}, 0-1 floats; "
                         f"TerraMesh stores {name} x {scale} ({dtype}): multiply by {scale}")
    low, high = MODALITIES[name].valid or (lo, hi)
    if lo < low or hi > high:
        warnings.warn(f"{path}: {name} values {lo:g}..{hi:g} lie outside its physical range "
                      f"{low:g}..{high:g}; check the units (S-2 reflectance x 10000, S-1 dB, "
                      f"DEM m, NDVI -1..1)", stacklevel=3)


def _finite_values(name, x, path, nan_ok) -> np.ndarray:
    """The values of a float tile that are not NaN; infinities and NaN where not allowed raise."""
    n_inf = int(np.isinf(x).sum())
    if n_inf:
        raise ValueError(f"{path}: {n_inf} infinite values in {name} (e.g. the dB of zero "
                         f"backscatter); fix the file (mark no data as NaN in S-1)")
    nan = np.isnan(x)
    allowed = name in NAN_NO_DATA if nan_ok is None else nan_ok
    if nan.any() and not allowed:
        raise ValueError(f"{path}: {int(nan.sum())} NaN values in {name}; only Sentinel-1 may "
                         f"mark no data with NaN: fill them in the file")
    return x[~nan]


def _check_float_classes(x, finite, lo, hi, path):
    """LULC stored as floats: fractional values are refused, whole ones read with a warning."""
    if not np.array_equal(finite, np.round(finite)):
        raise ValueError(f"{path}: LULC is stored as {x.dtype} with fractional values "
                         f"({lo:g}..{hi:g}); LULC holds integer classes 0..9: write the class "
                         f"map, not a resampled one")
    warnings.warn(f"{path}: LULC stored as {x.dtype}; read as integer classes "
                  f"(TerraMesh: uint8)", stacklevel=4)


def modality_names(allowed, also=()):
    """The argparse type of a comma-separated list of modalities from `allowed` (or one of the
    words `also`)."""
    def parse(text: str) -> str:
        bad = [m for m in text.split(",") if m not in allowed and m.lower() not in also]
        if bad:
            words = "".join(f"{w} or " for w in also)
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad)}: expected {words}modalities from {', '.join(allowed)}, "
                f"comma-separated")
        return text
    return parse


def modality(name: str) -> Modality:
    """Looks a modality up by name; the error lists the known ones."""
    if name not in MODALITIES:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[name]


# ----------------------------------------------------------------------------
# Standardization with the official constants

def _stats(name, x, axis):
    """The modality's per-band mean and std, shaped to broadcast against x along `axis`."""
    m = modality(name)
    if m.kind != "image":
        raise ValueError(f"{name} is a sequence modality; only image modalities are standardized")
    shape = [1] * x.ndim
    shape[axis] = m.channels
    if x.shape[axis] != m.channels:
        raise ValueError(f"{name} has {m.channels} bands, got an array of shape "
                         f"{tuple(x.shape)} (channel axis {axis})")
    if isinstance(x, torch.Tensor):
        mean = torch.tensor(m.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(m.std, dtype=torch.float32, device=x.device)
        return mean.view(shape), std.view(shape)
    mean = np.asarray(m.mean, np.float32)
    std = np.asarray(m.std, np.float32)
    return mean.reshape(shape), std.reshape(shape)


def standardize(name: str, x, axis: int = -3):
    """(x - mean) / std per band with the official v1 constants.

    x is numpy or torch, channels at `axis` ((C, H, W) or (B, C, H, W) by default). LULC class
    maps pass through unchanged.
    """
    if name == "LULC":
        return x
    mean, std = _stats(name, x, axis)
    if isinstance(x, torch.Tensor):
        return (x.float() - mean) / std
    x = x.astype(np.float32)   # a new array: the steps below work in place
    x -= mean
    x /= std
    return x


def destandardize(name: str, x, axis: int = -3):
    """Inverse of `standardize`: back to physical units (reflectance x 1e4, dB, metres, NDVI)."""
    if name == "LULC":
        return x
    mean, std = _stats(name, x, axis)
    return x * std + mean


# ----------------------------------------------------------------------------
# Coordinates and the token window

COORDS = re.compile(r"\s*lat=\s*([-+]?\d+(?:\.\d*)?)\s+lon=\s*([-+]?\d+(?:\.\d*)?)\s*")


def parse_coords(text: str, path="coords") -> tuple[float, float]:
    """'lat=35.75 lon=-89.00' -> (lon, lat), the official order; a malformed or out-of-range
    text raises."""
    match = COORDS.fullmatch(text)
    if not match:
        raise ValueError(f"{path}: cannot parse coords {text.strip()[:60]!r}; "
                         f"expected 'lat=35.75 lon=-89.00'")
    lat, lon = float(match[1]), float(match[2])
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"{path}: coords out of range (lat {lat}, lon {lon})")
    return lon, lat


def format_coords(lon: float, lat: float) -> str:
    """(lon, lat) -> 'lat=35.75 lon=-89.00' on the official 0.25 degree grid (never '-0.00')."""
    lat = round(lat * 4) / 4 + 0.0
    lon = round(lon * 4) / 4 + 0.0
    return f"lat={lat:.2f} lon={lon:.2f}"


def token_window(n: int) -> tuple[int, int]:
    """(offset, length) of the centred run of whole patches in a side of n px: the window a
    tile's token grid covers. TerraMesh's 264 px tiles -> (4, 256); 224 and 64 px -> (0, n)."""
    length = n // PATCH * PATCH
    return (n - length) // 2, length


def whole_patches(sample: dict) -> dict:
    """A sample dict with every image cut to its token window (`token_window`): 264 px tiles
    -> 256 px."""
    out = dict(sample)
    for m, x in sample.items():
        if isinstance(x, str):
            continue
        top, h = token_window(x.shape[-2])
        left, w = token_window(x.shape[-1])
        out[m] = x[..., top:top + h, left:left + w]
    return out
