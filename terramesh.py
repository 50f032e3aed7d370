"""
The data stage: TerraMesh modalities, reading TerraMesh-layout folders, and a synthetic TerraMesh world.

TerraMind is pretrained on TerraMesh: co-registered samples of up to nine modalities (paper §3). This file
is the one place that names a modality. It holds

  * `MODALITIES`, the modality table: kind, bands in the official channel order, how the modality enters
    the model (pixels and/or tokens), vocabulary, the official v1 normalization constants and the
    official state-dict keys (official: terratorch .../terramind/model/terramind_register.py);
  * `TerraMeshDataset`, a reader for `<root>/<MODALITY>/<sample_id>.tif` (+ `caption/<id>.txt`,
    `coords/<id>.txt`) that returns standardized tensors and refuses bad files with a clear error;
  * the `synth` command, which writes the synthetic world of synthetic.py (physically correlated
    modalities, so every later stage can be trained on a laptop);
  * `render`, any modality as an RGB picture (PNGs and sheets via pictures.py, re-exported here).

It consumes GeoTIFF folders and produces nothing but folders and pictures; later stages import it.

    python terramesh.py synth --out data/synth --n 2000 --size 64      # synthetic world (CPU, seconds)
    python terramesh.py stats --root data/synth                        # per-band stats vs official ones
    python terramesh.py show --root data/synth --id 00000 --out sample.png
    python terramesh.py show --root assets/terramesh --id 637U_59R_1_3 --out real.png

There is no GPU or multi-GPU variant of this stage: it is numpy on one CPU process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import textwrap
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import tifffile
import torch
from tqdm import tqdm

from cli import nonnegative_int, positive_int, run_main
from pictures import ramp, save_png, save_sheet  # noqa: F401  (re-exported: stages draw via terramesh)
from terramesh_shards import SPLITS, Member, index_layout, is_shard_root, layout_modalities, read_sample

# -----------------------------------------------------------------------------------------------------------
# The modality table

TILE = 224   # official input size of every image modality
PATCH = 16   # official patch size: 224 / 16 = 14 x 14 = 196 tokens per image modality

S2_BANDS = ("COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3",
            "NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "SWIR_1", "SWIR_2")  # official PRETRAINED_BANDS; L2A has no B10
S2_BAND_CODES = dict(zip(S2_BANDS + ("CIRRUS",), ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A",
                                                   "B9", "B11", "B12", "B10")))


@dataclass(frozen=True)
class Modality:
    name: str                          # the user's name, also the TerraMesh folder name
    kind: str                          # "image" or "sequence"
    bands: tuple = ()                  # official channel order (image modalities)
    pixel_key: str | None = None       # official key when it enters the encoder as raw pixel patches
    token_key: str | None = None       # official key when it enters or leaves as discrete tokens
    vocab_size: int | None = None      # size of the token vocabulary
    fsq_levels: tuple | None = None    # FSQ levels of its image tokenizer (prod = vocab_size)
    decoder: str | None = None         # its tokenizer's decoder: "diffusion" or "vit"
    mean: tuple = ()                   # official v1 standardization, per band (assets/official)
    std: tuple = ()
    dtype: str = "float32"             # dtype of real TerraMesh files
    max_length: int | None = None      # sequence modalities: maximum tokens
    valid: tuple = ()                  # physical range (our choice, generous): values outside it get a warning

    @property
    def channels(self) -> int:
        return len(self.bands)


_FSQ16K, _FSQ4K = (8, 8, 8, 6, 5), (7, 5, 5, 5, 5)
_S2L2A_MEAN = (1390.458, 1503.317, 1718.197, 1853.91, 2199.1, 2779.975, 2987.011, 3083.234, 3132.22,
               3162.988, 2424.884, 1857.648)
_S2L2A_STD = (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257, 1871.918, 1753.829,
              1797.379, 1434.261, 1334.311)

MODALITIES: dict[str, Modality] = {m.name: m for m in [
    Modality("S2L1C", "image", S2_BANDS[:10] + ("CIRRUS",) + S2_BANDS[10:], pixel_key="untok_sen2l1c@224",
             mean=(2357.089, 2137.385, 2018.788, 2082.986, 2295.651, 2854.537, 3122.849, 3040.56, 3306.481,
                   1473.847, 506.07, 2472.825, 1838.929),
             std=(1624.683, 1675.806, 1557.708, 1833.702, 1823.738, 1733.977, 1732.131, 1679.732, 1727.26,
                  1024.687, 442.165, 1331.411, 1160.419), dtype="int16", valid=(-1000, 32767)),
    Modality("S2L2A", "image", S2_BANDS, pixel_key="untok_sen2l2a@224", token_key="tok_sen2l2a@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion", mean=_S2L2A_MEAN, std=_S2L2A_STD,
             dtype="int16", valid=(-1000, 32767)),
    Modality("S2RGB", "image", ("RED", "GREEN", "BLUE"), pixel_key="untok_sen2rgb@224",
             mean=(87.271, 80.931, 66.667), std=(58.767, 47.663, 42.631), dtype="uint8", valid=(0, 255)),
    Modality("S1GRD", "image", ("VV", "VH"), pixel_key="untok_sen1grd@224", token_key="tok_sen1grd@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion", mean=(-12.599, -20.293),
             std=(5.195, 5.890), dtype="float32", valid=(-80, 40)),
    Modality("S1RTC", "image", ("VV", "VH"), pixel_key="untok_sen1rtc@224", token_key="tok_sen1rtc@224",
             vocab_size=15360, fsq_levels=_FSQ16K, decoder="diffusion", mean=(-10.93, -17.329),
             std=(4.391, 4.459), dtype="float64", valid=(-80, 40)),
    Modality("DEM", "image", ("DEM",), pixel_key="untok_dem@224", token_key="tok_dem@224", vocab_size=15360,
             fsq_levels=_FSQ16K, decoder="diffusion", mean=(670.665,), std=(951.272,), dtype="int16",
             valid=(-500, 9000)),
    Modality("LULC", "image", ("LULC",), token_key="tok_lulc@224", vocab_size=4375, fsq_levels=_FSQ4K,
             decoder="vit", mean=(0.0,), std=(1.0,), dtype="uint8"),   # class indices: identity
    Modality("NDVI", "image", ("NDVI",), token_key="tok_ndvi@224", vocab_size=15360, fsq_levels=_FSQ16K,
             decoder="diffusion", mean=(0.327,), std=(0.322,), dtype="float64", valid=(-1.01, 1.01)),
    Modality("caption", "sequence", token_key="caption", vocab_size=30000, max_length=256),
    Modality("coords", "sequence", token_key="coords", vocab_size=30000, max_length=4),
]}
IMAGE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "image")
SEQUENCE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "sequence")
PIXEL_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.pixel_key)   # enter the encoder as pixels
TOKEN_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.token_key)   # enter or leave as tokens
TOKENIZED_IMAGES = tuple(n for n in TOKEN_MODALITIES if MODALITIES[n].kind == "image")  # have an FSQ tokenizer

# ESRI 10 m land cover, the classes of the v1 LULC tokenizer (HF card): index, name, colour (ESRI palette)
LULC_CLASSES = ("no data", "water", "trees", "flooded vegetation", "crops", "built area", "bare ground",
                "snow/ice", "clouds", "rangeland")
LULC_COLORS = np.array([(0, 0, 0), (65, 155, 223), (57, 125, 73), (122, 135, 198), (228, 150, 53),
                        (196, 40, 27), (165, 155, 143), (168, 235, 255), (97, 97, 97), (227, 226, 195)],
                       dtype=np.uint8)
NO_DATA, WATER, TREES, FLOODED, CROPS, BUILT, BARE, SNOW, CLOUDS, RANGE = range(10)


NAN_NO_DATA = ("S1GRD", "S1RTC")   # NaN marks Sentinel-1 no data (read as the band mean); elsewhere it is an error
RESCALED = {"S2L1C": 10000, "S2L2A": 10000, "S2RGB": 255}   # stored scale of values that may come as 0-1 floats


def check_values(name: str, x: np.ndarray, path, nan_ok: bool | None = None):
    """Refuses what cannot be meaningful and warns about what is probably wrong, naming the file: +-inf
    anywhere; NaN outside Sentinel-1 (`nan_ok`, default NAN_NO_DATA); LULC classes that are not whole
    numbers; S-2 / RGB stored as 0-1 floats. Values outside the modality's physical range get a warning."""
    m, integer = MODALITIES[name], np.issubdtype(x.dtype, np.integer)
    finite = x
    if not integer:
        if n_inf := int(np.isinf(x).sum()):
            raise ValueError(f"{path}: {n_inf} infinite values in {name} (e.g. the dB of zero backscatter); "
                             f"fix the file (mark no data as NaN in S-1)")
        nan = np.isnan(x)
        if nan.any() and not (name in NAN_NO_DATA if nan_ok is None else nan_ok):
            raise ValueError(f"{path}: {int(nan.sum())} NaN values in {name}; only Sentinel-1 may mark no data "
                             f"with NaN: fill them in the file")
        finite = x[~nan]
    if finite.size == 0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    if name == "LULC" and not integer and not np.array_equal(finite, np.round(finite)):
        raise ValueError(f"{path}: LULC is stored as {x.dtype} with fractional values ({lo:g}..{hi:g}); "
                         f"LULC holds integer classes 0..9: write the class map, not a resampled one")
    if name in RESCALED and not integer and -0.01 <= lo and hi <= 1.5:
        raise ValueError(f"{path}: {name} values lie in {lo:g}..{hi:g}, 0-1 floats; TerraMesh stores {name} "
                         f"x {RESCALED[name]} ({m.dtype}): multiply by {RESCALED[name]}")
    if name == "LULC" and not integer:
        warnings.warn(f"{path}: LULC stored as {x.dtype}; read as integer classes (TerraMesh: uint8)", stacklevel=3)
    low, high = m.valid or (lo, hi)
    if lo < low or hi > high:
        warnings.warn(f"{path}: {name} values {lo:g}..{hi:g} lie outside its physical range {low:g}..{high:g}; "
                      f"check the units (S-2 reflectance x 10000, S-1 dB, DEM m, NDVI -1..1)", stacklevel=3)


def modality_names(allowed, also=()):
    """The argparse type of a comma-separated list of modalities from `allowed` (or one of the words `also`)."""
    def parse(text: str) -> str:
        bad = [m for m in text.split(",") if m not in allowed and m.lower() not in also]
        if bad:
            words = "".join(f"{w} or " for w in also)
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: expected {words}modalities from {', '.join(allowed)}, "
                                             f"comma-separated")
        return text
    return parse


def modality(name: str) -> Modality:
    """Looks a modality up by name; the error lists the known ones."""
    if name not in MODALITIES:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[name]


def _stats(name, x, axis):
    m = modality(name)
    if m.kind != "image":
        raise ValueError(f"{name} is a sequence modality; only image modalities are standardized")
    shape = [1] * x.ndim
    shape[axis] = m.channels
    if x.shape[axis] != m.channels:
        raise ValueError(f"{name} has {m.channels} bands, got an array of shape {tuple(x.shape)} "
                         f"(channel axis {axis})")
    if isinstance(x, torch.Tensor):
        return (torch.tensor(m.mean, dtype=torch.float32, device=x.device).view(shape),
                torch.tensor(m.std, dtype=torch.float32, device=x.device).view(shape))
    return np.asarray(m.mean, np.float32).reshape(shape), np.asarray(m.std, np.float32).reshape(shape)


def standardize(name: str, x, axis: int = -3):
    """(x - mean) / std per band with the official v1 constants; x is numpy or torch, channels at `axis`
    ((C, H, W) or (B, C, H, W) by default). LULC class maps pass through unchanged."""
    if name == "LULC":
        return x
    mean, std = _stats(name, x, axis)
    return ((x.float() if isinstance(x, torch.Tensor) else x.astype(np.float32)) - mean) / std


def destandardize(name: str, x, axis: int = -3):
    """Inverse of `standardize`: back to physical units (reflectance x 1e4, dB, metres, NDVI)."""
    if name == "LULC":
        return x
    mean, std = _stats(name, x, axis)
    return x * std + mean


# -----------------------------------------------------------------------------------------------------------
# Reading and writing GeoTIFFs

# GeoTIFF tags that carry the georeferencing: pixel scale, tie points, transformation, GeoKeys, doubles, ascii
GEO_TAGS = {33550: "d", 33922: "d", 34264: "d", 34735: "H", 34736: "d", 34737: "s", 42113: "s"}


# one page, bands interleaved per pixel (H, W, C), as TerraMesh stores them
_TIFF_LAYOUT = {2: dict(photometric="minisblack", metadata=None),
                3: dict(photometric="minisblack", planarconfig="contig", metadata=None)}


def read_tiff(path) -> tuple[np.ndarray, dict]:
    """Reads the first image of a (Geo)TIFF as it is stored, and its georeferencing tags {code: value}.
    A file that is not a TIFF, is truncated or does not decode raises ValueError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            for page in series.pages:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    if count == 0 or offset + count > size:   # tifffile would silently read the missing part
                        raise ValueError(f"truncated: image data runs to byte {offset + count}, file has {size}")
            x = series.asarray()
            geo = {tag.code: tag.value for tag in tif.pages.first.tags.values() if tag.code in GEO_TAGS}
    except Exception as e:
        raise ValueError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from None
    return x, geo


def write_geotiff(path, x: np.ndarray, geo: dict | None = None, offset: tuple = (0, 0)):
    """Writes (C, H, W) or (H, W) channel-last as TerraMesh does, with georeferencing tags from `read_tiff`.
    `offset=(row, col)` shifts the tie point, for a window cut out of the tile the tags came from.
    The write is atomic: a crash never leaves a half-written file."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)                # (H, W) or (H, W, C)
    extratags = []
    for code, value in (geo or {}).items():
        value = list(value) if isinstance(value, (tuple, list)) else value
        if code == 33922 and any(offset) and 33550 in geo:                     # (I, J, K, X, Y, Z) tie point
            sx, sy = geo[33550][0], geo[33550][1]
            value[3] += offset[1] * sx
            value[4] -= offset[0] * sy
        count = len(value) + 1 if GEO_TAGS[code] == "s" else (len(value) if isinstance(value, list) else 1)
        extratags.append((code, GEO_TAGS[code], count, value, True))
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tifffile.imwrite(tmp, x, extratags=extratags, **_TIFF_LAYOUT[x.ndim])
    os.replace(tmp, path)


def read_text(path) -> str:
    """A UTF-8 text file (caption, coords, split list); a file in another encoding raises ValueError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def write_text(path, text: str):
    """Writes a text file atomically (a temporary file beside it, then a rename); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_channels_first(x: np.ndarray, channels: int, path) -> np.ndarray:
    """(H, W, C), (C, H, W) or (H, W) -> (C, H, W); TerraMesh files are channel-last, others channel-first."""
    if x.ndim == 2 and channels == 1:
        return x[None]
    if x.ndim == 3:
        if x.shape[-1] == channels:            # channel-last wins when both fit (TerraMesh convention)
            return np.moveaxis(x, -1, 0)
        if x.shape[0] == channels:
            return x
    raise ValueError(f"{path}: expected {channels} band(s), got an array of shape {x.shape}")


def read_input(name: str, value):
    """A --input value -> (physical array or text, georeferencing tags or None). Images: a GeoTIFF path;
    coords / caption: a .txt path or the text itself. S1 no-data (NaN) becomes the band mean, with a warning."""
    if (m := MODALITIES.get(name)) is None or not value:
        raise ValueError(f"--input {name}={value}: expected MOD=path, MOD one of {', '.join(MODALITIES)}")
    if m.kind == "sequence":
        text = read_text(value).strip() if Path(value).is_file() else value
        return (parse_coords(text, value) if name == "coords" else text), None
    x, geo = read_tiff(value)
    x = to_channels_first(x, m.channels, value)
    check_values(name, x, value, nan_ok=name != "LULC")
    if name == "LULC":
        return x[0].astype(np.int64), geo
    if np.isnan(x := x.astype(np.float32)).any():
        warnings.warn(f"{value}: {int(np.isnan(x).sum())} NaN pixels replaced by the {name} band mean")
        x = np.where(np.isnan(x), np.asarray(m.mean, np.float32)[:, None, None], x)
    return x, geo


def parse_coords(text: str, path="coords") -> tuple[float, float]:
    """'lat=35.75 lon=-89.00' -> (lon, lat), the official order; a malformed or out-of-range text raises."""
    match = re.fullmatch(r"\s*lat=\s*([-+]?\d+(?:\.\d*)?)\s+lon=\s*([-+]?\d+(?:\.\d*)?)\s*", text)
    if not match:
        raise ValueError(f"{path}: cannot parse coords {text.strip()[:60]!r}; expected 'lat=35.75 lon=-89.00'")
    lat, lon = float(match[1]), float(match[2])
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"{path}: coords out of range (lat {lat}, lon {lon})")
    return lon, lat


def token_window(n: int) -> tuple[int, int]:
    """(offset, length) of the centred run of whole patches in a side of n px: the window a tile's token grid
    covers. TerraMesh's 264 px tiles -> (4, 256); 224 and 64 px tiles -> (0, n)."""
    length = n // PATCH * PATCH
    return (n - length) // 2, length


def whole_patches(sample: dict) -> dict:
    """A sample dict with every image cut to its token window (`token_window`): 264 px tiles -> 256 px."""
    out = dict(sample)
    for m, x in sample.items():
        if not isinstance(x, str):
            (top, h), (left, w) = token_window(x.shape[-2]), token_window(x.shape[-1])
            out[m] = x[..., top:top + h, left:left + w]
    return out


def format_coords(lon: float, lat: float) -> str:
    """(lon, lat) -> 'lat=35.75 lon=-89.00' on the official 0.25 degree grid (never '-0.00')."""
    lat, lon = round(lat * 4) / 4 + 0.0, round(lon * 4) / 4 + 0.0
    return f"lat={lat:.2f} lon={lon:.2f}"


# -----------------------------------------------------------------------------------------------------------
# The dataset

class TerraMeshDataset(torch.utils.data.Dataset):
    """Samples of a TerraMesh-layout folder: `<root>/<MODALITY>/<id>.tif`, `<root>/caption/<id>.txt`,
    `<root>/coords/<id>.txt`, and optionally a label folder `<root>/<labels>/<id>.tif`.

    `ds[i]` is a dict with one entry per modality the sample has: image modalities as standardized float32
    (C, H, W), LULC as an int64 class map (H, W), caption and coords as strings, the label (if asked for) as
    int64 (H, W). Missing modalities are simply absent. `size` crops every image to size x size ("center" or
    "random" crop, the same window for all modalities of a sample); `size=None` keeps the full tile.
    `split` reads the sample ids from `<root>/splits/<split>.txt`.

    A root in the published layout, `<root>/{train,val}/<MODALITY>/*.tar` of `<key>.zarr.zip` samples
    (terramesh_shards.py), gives the same dict: ids are the sample keys, `split` is the train or val folder
    (both when None), `files[m][key]` is a tar member, and coords is the text of the sample's centre."""

    def __init__(self, root, modalities=None, size=224, crop="center", seed=0, split=None, labels=None):
        self.root, self.size, self.crop, self.seed, self.labels = Path(root), size, crop, seed, labels
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        self.epoch = 0
        self.nan_replaced: dict[str, int] = {}          # modality -> NaN pixels replaced (this process)
        self.published = is_shard_root(self.root)
        if self.published:
            self._index_shards(modalities, split, labels)
            return
        folders = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        unknown = {f for f in folders - set(MODALITIES) - {"splits"} if f != "label" and
                   not f.startswith("label_")}
        if unknown:
            raise ValueError(f"{self.root}: unknown modality folder(s) {sorted(unknown)}; known: "
                             f"{', '.join(MODALITIES)} (plus 'splits' and label folders 'label*')")
        if modalities is None:
            modalities = [m for m in MODALITIES if m in folders]
        for m in modalities:
            modality(m)
        self.modalities = list(modalities)
        self.files: dict[str, dict[str, Path]] = {}     # modality -> {id: path}
        for m in self.modalities + ([labels] if labels else []):
            ext = ".txt" if m in SEQUENCE_MODALITIES else ".tif"
            folder = self.root / m
            self.files[m] = {p.name[:-len(ext)]: p for p in folder.iterdir()
                             if p.name.endswith(ext)} if folder.is_dir() else {}
        if split is not None:
            split_file = self.root / "splits" / f"{split}.txt"
            if not split_file.exists():
                raise FileNotFoundError(f"{split_file}: no such split file")
            self.ids = read_text(split_file).split()
        else:
            self.ids = sorted(set().union(*(self.files[m] for m in self.modalities)) if self.modalities else [])
        if labels:
            self.ids = [i for i in self.ids if i in self.files[labels]]

    def _index_shards(self, modalities, split, labels):
        """The published layout: every tar of the split(s) indexed (cached beside it), keys in shard order."""
        if labels:
            raise ValueError(f"{self.root}: label folders need the GeoTIFF layout, the published shards have none")
        if split is not None and split not in SPLITS:
            raise ValueError(f"{self.root}: the published layout has the splits {', '.join(SPLITS)}, not {split!r}")
        splits = [split] if split else list(SPLITS)
        folders = layout_modalities(self.root, splits)
        unknown = sorted(set(folders) - set(IMAGE_MODALITIES))
        if unknown:
            raise ValueError(f"{self.root}: unknown modality folder(s) {unknown} in {'/'.join(splits)}; known: "
                             f"{', '.join(IMAGE_MODALITIES)}")
        if modalities is None:
            modalities = dataset_modalities(self.root, split)
        for m in modalities:
            modality(m)
        self.modalities = list(modalities)
        scan = folders if "coords" in self.modalities else [m for m in folders if m in self.modalities]
        ids, found = index_layout(self.root, splits, scan)
        self.files = {m: found.get(m, {}) for m in self.modalities}      # caption: TerraMesh has none
        if "coords" in self.modalities:                                  # any modality's member has the centre
            self.files["coords"] = {key: member for m in reversed(scan) for key, member in found[m].items()}
        self.ids = [key for key in ids if any(key in self.files[m] for m in self.modalities)]

    def __len__(self):
        return len(self.ids)

    def set_epoch(self, epoch: int):
        """Random crops depend on (seed, epoch, index): call once per epoch for new windows."""
        self.epoch = epoch

    def available(self, i: int) -> list[str]:
        return [m for m in self.modalities if self.ids[i] in self.files[m]]

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        sample, arrays = self._read_shards(i) if self.published else self._read_tiffs(i)
        if not arrays:
            return sample
        shapes = {m: x.shape[-2:] for m, (_, x) in arrays.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"sample {sid}: modalities differ in size: " + ", ".join(
                f"{arrays[m][0]} {h}x{w}" for m, (h, w) in shapes.items()))
        top, left = self._window(i, *next(iter(shapes.values())), arrays)
        s = self.size
        for m, (path, x) in arrays.items():
            x = x[..., top:top + s, left:left + s] if s else x
            sample[m] = torch.from_numpy(np.ascontiguousarray(x))
        return sample

    def _window(self, i, h, w, arrays):
        s = self.size
        if s is None:
            return 0, 0
        if h < s or w < s:
            path = next(iter(arrays.values()))[0]
            raise ValueError(f"{path}: tile is {h}x{w}, smaller than the requested size {s}")
        if self.crop == "center":
            return (h - s) // 2, (w - s) // 2
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))

    def _read_tiffs(self, i: int) -> tuple[dict, dict]:
        """The modalities of sample i from their GeoTIFF and text files, and its label if asked for."""
        sid, sample, arrays = self.ids[i], {}, {}
        for m in self.available(i):
            path = self.files[m][sid]
            if MODALITIES[m].kind == "sequence":
                text = read_text(path).strip()
                if m == "coords":
                    parse_coords(text, path)
                sample[m] = text
            else:
                arrays[m] = (path, self._read_image(m, path))
        if self.labels and sid in self.files[self.labels]:
            path = self.files[self.labels][sid]
            x, _ = read_tiff(path)
            arrays[self.labels] = (path, to_channels_first(x, 1, path)[0].astype(np.int64))
        return sample, arrays

    def _read_shards(self, i: int) -> tuple[dict, dict]:
        """The image modalities of sample i from their zarr.zip members, and its coords from their centre."""
        sid, sample, arrays, centre = self.ids[i], {}, {}, None
        for m in self.available(i):
            if MODALITIES[m].kind == "image":
                member = self.files[m][sid]
                zarr = read_sample(*member)
                arrays[m] = (member, self._prepare(m, self._bands(m, zarr["bands"], member), member))
                centre = (zarr["center_lon"], zarr["center_lat"])
        if "coords" in self.available(i):
            if centre is None:
                zarr = read_sample(*self.files["coords"][sid])
                centre = (zarr["center_lon"], zarr["center_lat"])
            sample["coords"] = format_coords(float(centre[0]), float(centre[1]))
        return sample, arrays

    @staticmethod
    def _bands(m: str, bands: np.ndarray, member: Member) -> np.ndarray:
        """`bands` (time=1, band, y, x) -> (C, H, W), its band count checked against the modality table."""
        if bands.ndim != 4 or bands.shape[1] != MODALITIES[m].channels:
            raise ValueError(f"{member}: expected bands (time, {MODALITIES[m].channels}, y, x) for {m}, got "
                             f"{bands.shape}")
        return bands[0]

    def _read_image(self, m: str, path) -> np.ndarray:
        x, _ = read_tiff(path)
        return self._prepare(m, to_channels_first(x, MODALITIES[m].channels, path), path)

    def _prepare(self, m: str, x: np.ndarray, path) -> np.ndarray:
        """(C, H, W) as stored -> standardized float32, NaN -> the band mean; LULC -> int64 (H, W) classes."""
        check_values(m, x, path)
        if m == "LULC":
            x = x[0].astype(np.int64)
            if x.min() < 0 or x.max() >= len(LULC_CLASSES):
                raise ValueError(f"{path}: LULC classes must lie in 0..{len(LULC_CLASSES) - 1}, "
                                 f"found {x.min()}..{x.max()}")
            return x
        x = standardize(m, x)
        nan = np.isnan(x)
        if nan.any():                   # Sentinel-1 no-data: the band mean, i.e. 0 after standardization
            n = int(nan.sum())
            x[nan] = 0.0
            self.nan_replaced[m] = self.nan_replaced.get(m, 0) + n
            warnings.warn(f"{path}: replaced {n} NaN pixels by the {m} mean", stacklevel=2)
        return x


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: every stage writes safetensors with its config as JSON metadata (STYLE.md point 6)

def save_safetensors(path, tensors: dict, meta: dict):
    """Writes tensors plus JSON-able metadata ({"config": {...}, ...}) atomically: temp file, fsync, rename.
    A crash mid-write leaves the previous file intact. Shared storage (tied weights) is cloned apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    meta = {**meta, "crc32": _crc32(out)}           # detects flipped bytes that safetensors would load
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    safetensors.torch.save_file(out, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors(path, device="cpu") -> tuple[dict, dict]:
    """Reads a checkpoint written by `save_safetensors` -> (tensors, metadata). A missing, truncated or
    corrupted file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupted? "
                         f"({type(e).__name__}: {e})") from None
    if "crc32" in meta and meta.pop("crc32") != _crc32(tensors):
        raise ValueError(f"{path}: checkpoint is corrupted (checksum mismatch)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): written by a run that "
                         f"diverged; use an earlier checkpoint")
    return tensors, meta


CHECKPOINT_KINDS = {   # what each stage writes, told apart by the metadata keys it stores
    "pretrain state": "pretrain.py's pretrain_state.safetensors, read by --resume",
    "TerraMind model": "pretrain.py's terramind.safetensors or terramind.py convert's output",
    "tokenizer state": "fsq_tokenizer.py train's tokenizer_<MOD>.state.safetensors",
    "image tokenizer": "fsq_tokenizer.py train's tokenizer_<MOD>.safetensors",
    "TiM state": "tim_finetune.py train's state.safetensors",
    "TiM model": "tim_finetune.py train's model.safetensors",
    "PANGAEA head": "eval_pangaea.py seg's head.safetensors",
    "token shard": "fsq_tokenizer.py tokenize's shard_<N>.safetensors",
}


def checkpoint_kind(meta: dict) -> str:
    """Which stage wrote a checkpoint, from its metadata: a key of CHECKPOINT_KINDS, or 'unknown file'."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if "opt_ids" in meta:
        return "TiM state" if "sched" in meta else "pretrain state"
    if "opt" in meta:
        return "tokenizer state"
    if meta.get("kind") == "tokenizer":
        return "image tokenizer"
    if "ids" in meta and "modality" in meta:
        return "token shard"
    if "encoder" in config:
        return "TiM model"
    if "encoder" in meta:
        return "PANGAEA head"
    if "encoder_depth" in config:
        return "TerraMind model"
    return "unknown file"


def expect_kind(path, meta: dict, *expected: str):
    """Refuses a checkpoint another stage wrote: the error names the kind given and the kind expected."""
    kind = checkpoint_kind(meta)
    article = lambda k: "an" if k[0] in "aeiou" else "a"   # noqa: E731
    if kind not in expected:
        given = f"{article(kind)} {kind} ({CHECKPOINT_KINDS[kind]})" if kind in CHECKPOINT_KINDS else \
            "not a checkpoint of this project"
        want = " or ".join(f"{article(k)} {k} ({CHECKPOINT_KINDS[k]})" for k in expected)
        raise ValueError(f"{path}: is {given}; expected {want}")


def _crc32(tensors: dict) -> int:
    crc = 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        crc = zlib.crc32(t.view(torch.uint8).numpy() if t.numel() else b"", zlib.crc32(k.encode(), crc))
    return crc


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


# -----------------------------------------------------------------------------------------------------------
# Commands

def dataset_modalities(root, split=None) -> list[str]:
    """The modalities a dataset folder holds: its modality folders (GeoTIFF layout), or the modality folders
    of its train/val shards plus coords (the published layout: every sample has a centre, none a caption)."""
    root = Path(root)
    if is_shard_root(root):
        folders = layout_modalities(root, [split] if split else SPLITS)
        return [m for m in MODALITIES if m in folders] + ["coords"]
    return [m for m in MODALITIES if (root / m).is_dir() and any((root / m).iterdir())]


def has_split(root, split) -> bool:
    """Whether `split` selects samples: a published split folder, or a GeoTIFF root's splits/<split>.txt."""
    if is_shard_root(root):
        return split in SPLITS and (Path(root) / split).is_dir()
    return bool(split) and (Path(root) / "splits" / f"{split}.txt").exists()


def dataset_stats(root, limit=None) -> dict:
    """Per-band mean and std of every image modality under `root` in physical units (NaN ignored), with the
    number of files read: {modality: (mean, std, files)}."""
    out = {}
    for m in IMAGE_MODALITIES:
        files = _stored_tiles(root, m)[:limit]
        if not files or m == "LULC":
            continue
        c = MODALITIES[m].channels
        acc = np.zeros((3, c))                                                     # sum, sum of squares, count
        for f in tqdm(files, desc=m, leave=False):
            x = _read_stored(m, f).reshape(c, -1).astype(np.float64)
            ok = ~np.isnan(x)
            x = np.where(ok, x, 0)
            acc += [x.sum(1), (x ** 2).sum(1), ok.sum(1)]
        mean = acc[0] / acc[2]
        out[m] = (mean, np.sqrt(np.maximum(acc[1] / acc[2] - mean ** 2, 0)), len(files))
    return out


def _stored_tiles(root, m: str) -> list:
    """The files (GeoTIFF layout) or tar members (published layout, train then val) of modality m."""
    if is_shard_root(root):
        return list(index_layout(root, SPLITS, [m])[1][m].values())
    return sorted((Path(root) / m).glob("*.tif"))


def _read_stored(m: str, where) -> np.ndarray:
    """(C, H, W) as stored, from a GeoTIFF path or a tar member."""
    if isinstance(where, Member):
        return TerraMeshDataset._bands(m, read_sample(*where)["bands"], where)
    return to_channels_first(read_tiff(where)[0], MODALITIES[m].channels, where)


def _show(root, sid, out, max_size=None):
    """All modalities (and label folders) of one sample side by side, caption and coords as text below."""
    root, panels, lines = Path(root), [], []
    if is_shard_root(root):
        return _show_published(root, sid, out, max_size)
    for folder in [m for m in MODALITIES if (root / m).is_dir()] + sorted(p.name for p in root.glob("label*")):
        mod = MODALITIES.get(folder)
        if mod and mod.kind == "sequence":
            if (root / folder / f"{sid}.txt").exists():
                text = f"{folder}: {read_text(root / folder / f'{sid}.txt').strip()}"
                lines += textwrap.wrap(text, 110, subsequent_indent="  ")
        elif (root / folder / f"{sid}.tif").exists():
            path = root / folder / f"{sid}.tif"
            panels.append((folder, render(folder, to_channels_first(read_tiff(path)[0], mod.channels if mod else 1,
                                                                     path))))
    if not panels and not lines:
        raise FileNotFoundError(f"{root}: no sample with id {sid!r}")
    save_sheet(out, panels, lines=lines, max_size=max_size)
    print(f"wrote {out}: {', '.join(p[0] for p in panels)}")


def _show_published(root, sid, out, max_size=None):
    """`show` for the published layout: the sample's image modalities, its centre as text below."""
    ds = TerraMeshDataset(root, size=None)
    if sid not in ds.files["coords"]:
        raise FileNotFoundError(f"{root}: no sample with key {sid!r} in train/ or val/")
    sample = ds[ds.ids.index(sid)]
    panels = [(m, render(m, x, standardized=True)) for m, x in sample.items() if m != "coords"]
    save_sheet(out, panels, lines=[f"coords: {sample['coords']}"], max_size=max_size)
    print(f"wrote {out}: {', '.join(p[0] for p in panels)}")


def clear_world(out, overwrite: bool):
    """synth writes into an empty folder; --overwrite removes the folders a world consists of (and nothing
    else), so that no tile of an earlier world (another size, another count) stays beside the new ones."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out}: the folder is not empty; choose a new folder, or pass --overwrite to "
                         f"replace the world in it")
    for name in list(MODALITIES) + ["label_water", "splits", *SPLITS]:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic TerraMesh-like world")
    p.add_argument("--out", default="data/synth", help="output folder (TerraMesh layout)")
    p.add_argument("--n", type=positive_int, default=2000, help="number of samples")
    p.add_argument("--size", type=positive_int, default=64, help="tile size in pixels (10 m each); a multiple of "
                   f"{PATCH}, or of {PATCH} plus 8 with --layout shards (TerraMesh: 264)")
    p.add_argument("--layout", choices=["tiff", "shards"], default="tiff", help="GeoTIFF folders, or the published "
                   "layout: {train,val}/<MOD>/*.tar of zarr.zip samples, no captions")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="world seed; a sample depends only on (seed, index)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace the world in a non-empty --out (its modality, "
                   "label_water and splits folders are removed first)")
    p = sub.add_parser("stats", help="per-band mean/std of a dataset next to the official constants")
    p.add_argument("--root", required=True, help="TerraMesh-layout folder")
    p.add_argument("--limit", type=positive_int, default=None, help="read at most this many files per modality")
    p = sub.add_parser("show", help="draw all modalities of one sample side by side (PNG)")
    p.add_argument("--root", required=True, help="TerraMesh-layout folder")
    p.add_argument("--id", required=True, help="sample id (file name without extension)")
    p.add_argument("--out", default="sample.png", help="output PNG")
    p.add_argument("--max-size", type=positive_int, default=None, help="subsample larger tiles to this many pixels")
    args = parser.parse_args()
    if args.command == "synth":
        t0 = time.time()
        from synthetic import synthesize, synthesize_shards   # the synthetic world builds on this file's table
        if args.size % PATCH and (args.layout == "tiff" or (args.size - 8) % PATCH):
            parser.error(f"--size {args.size}: tiles are a multiple of {PATCH} px (shards: {PATCH} k + 8, e.g. 264)")
        clear_world(args.out, args.overwrite)
        if args.layout == "shards":
            synthesize_shards(args.out, args.n, args.size, args.seed, args.workers)
        else:
            synthesize(args.out, args.n, args.size, args.seed, args.workers)
        print(f"wrote {args.n} samples of {args.size}x{args.size} to {args.out} in {time.time() - t0:.1f} s")
    elif args.command == "stats":
        print(f"{'modality':8s} {'band':16s} {'mean':>10s} {'std':>10s} | {'official mean':>13s} "
              f"{'official std':>12s} | (mean-official)/std")
        for m, (mean, std, n) in dataset_stats(args.root, args.limit).items():
            mod = MODALITIES[m]
            for b, band in enumerate(mod.bands):
                print(f"{m:8s} {band:16s} {mean[b]:10.3f} {std[b]:10.3f} | {mod.mean[b]:13.3f} "
                      f"{mod.std[b]:12.3f} | {(mean[b] - mod.mean[b]) / mod.std[b]:+.2f}")
            print(f"{'':8s} ({n} files)")
    else:
        _show(args.root, args.id, args.out, args.max_size)


if __name__ == "__main__":
    run_main(main)
