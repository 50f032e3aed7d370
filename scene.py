"""
Whole scenes in bounded memory: windowed GeoTIFF reading and writing, co-registration, resumable
progress.

A Sentinel-2 tile is 10,980 x 10,980 px (12 bands: 5.8 GB as float32); generate.py and
tim_finetune.py process it window by window and keep only the small token grid of the scene in
memory. This file is their plumbing, no method:

  * `Raster`: a tiled or striped GeoTIFF (Cloud-Optimized GeoTIFFs included) opened for windows:
    a window reads and decodes only the tiles or strips it touches (tifffile's per-segment decode,
    no zarr);
  * `TiledWriter`: a tiled, uncompressed GeoTIFF preallocated at its full size with the input's
    georeferencing tags; rows are written in place as they become final, and a finished file is
    renamed into place;
  * `open_scene`: the input rasters of several modalities, refused with one clear error unless they
    are co-registered (same size, pixel scale, tie point or transformation, CRS keys);
  * `Progress`: the resume state of a scene run (arrays and a fingerprint of the run), written
    atomically;
  * `peak_rss_mb` and `summary`: the closing line of a scene run;
  * `read_window`, `scene_inputs`, `scene_writers`, `write_scene`: generate.py's scene inputs and
    outputs.

It consumes GeoTIFFs and produces GeoTIFFs; generate.py (`--scene`) and tim_finetune.py (`predict`)
import it:

    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=T32TMT.tif --targets LULC --scene --out out/T32TMT   # --resume after a crash
    python tim_finetune.py predict --ckpt runs/tim/s1_lulc/model.safetensors \\
        --input S1GRD=scene.tif --out mask.tif

There is no GPU or torchrun variant of this file: it is file I/O on one CPU process.
"""
from __future__ import annotations

import json
import math
import os
import resource
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
import torch
from tqdm import tqdm

from modalities import MODALITIES, standardize

# GeoTIFF tags that carry the georeferencing: pixel scale, tie points, transformation, GeoKeys,
# doubles, ascii, GDAL no-data (the same table as geotiff.GEO_TAGS, which read_tiff keeps)
GEO_TAGS = {33550: "d", 33922: "d", 34264: "d", 34735: "H", 34736: "d", 34737: "s", 42113: "s"}
CO_REGISTRATION = {
    33550: "pixel scale",
    33922: "tie point",
    34264: "transformation",
    34735: "CRS (GeoKeys)",
}
OUTPUT_TILE = 256       # tile side of the written GeoTIFFs (a multiple of 16, GDAL's default block)
CACHE_BYTES = 16 << 20  # decoded input tiles / strips kept for the next windows of a row


class Raster:
    """A GeoTIFF's first image, read by windows: `read(r0, r1, c0, c1)` -> (C, r1 - r0, c1 - c0) in
    the stored dtype. Tiled, striped, interleaved (H, W, C) and planar (C, H, W) layouts, any
    compression tifffile decodes. A window reads the bytes of the segments it touches only."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.tif = tifffile.TiffFile(self.path)
            page = self.tif.pages.first
        except Exception as e:
            raise ValueError(f"{self.path}: cannot read TIFF ({type(e).__name__}: {e})") from None
        pages = len(self.tif.series[0].pages)
        if pages > 1:
            raise ValueError(f"{self.path}: bands stored as {pages} pages; windowed reading takes "
                             f"one multi-band page (gdal_translate writes one)")
        self.page, self.size = page, self.path.stat().st_size
        self.height, self.width = page.imagelength, page.imagewidth
        self.bands = page.samplesperpixel
        self.dtype, self.planar = page.dtype, page.planarconfig == 2
        if page.is_tiled:
            self.block = (page.tilelength, page.tilewidth)                 # one segment, px
        else:
            rows = min(page.rowsperstrip or page.imagelength, page.imagelength)
            self.block = (rows, page.imagewidth)
        self.across = math.ceil(self.width / self.block[1])
        self.down = math.ceil(self.height / self.block[0])
        self.geo = {t.code: t.value for t in page.tags.values() if t.code in GEO_TAGS}
        self.cache, self.cached_bytes = OrderedDict(), 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bands, self.height, self.width

    def segment(self, index: int) -> np.ndarray:
        """One decoded tile or strip (rows, cols, samples), from the cache or the file."""
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if offset + count > self.size:
            raise ValueError(f"{self.path}: truncated: segment {index} runs to byte "
                             f"{offset + count}, file has {self.size}")
        if count == 0:   # a sparse segment (GDAL): no data stored, zeros
            samples = 1 if self.planar else self.bands
            block = np.zeros((*self.block, samples), self.dtype)
        else:
            self.tif.filehandle.seek(offset)
            data = self.tif.filehandle.read(count)
            block = self.page.decode(data, index)[0][0]                    # (rows, cols, samples)
        self.cache[index] = block
        self.cached_bytes += block.nbytes
        while self.cached_bytes > CACHE_BYTES and len(self.cache) > 1:
            self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        return block

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The window rows [r0, r1) x columns [c0, c1), inside the image -> (C, r1 - r0, c1 - c0)."""
        if not (0 <= r0 < r1 <= self.height and 0 <= c0 < c1 <= self.width):
            raise ValueError(f"{self.path}: window [{r0}:{r1}, {c0}:{c1}] outside "
                             f"{self.height}x{self.width}")
        out = np.empty((self.bands, r1 - r0, c1 - c0), self.dtype)
        bh, bw = self.block
        planes = range(self.bands) if self.planar else [0]
        for ty in range(r0 // bh, (r1 - 1) // bh + 1):
            for tx in range(c0 // bw, (c1 - 1) // bw + 1):
                # the part of this segment in the window
                y0, y1 = max(r0, ty * bh), min(r1, (ty + 1) * bh)
                x0, x1 = max(c0, tx * bw), min(c1, (tx + 1) * bw)
                for p in planes:
                    block = self.segment((p * self.down + ty) * self.across + tx)
                    part = block[y0 - ty * bh:y1 - ty * bh, x0 - tx * bw:x1 - tx * bw]  # (h, w, s)
                    bands = slice(p, p + 1) if self.planar else slice(None)
                    out[bands, y0 - r0:y1 - r0, x0 - c0:x1 - c0] = np.moveaxis(part, -1, 0)
        return out

    def read_reflected(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """A window that may run past the bottom / right edge, filled there by reflection (torch's
        F.pad(mode="reflect"): row H + k is row H - 2 - k), as the in-memory path pads to whole
        patches."""
        rows = np.array([reflect(r, self.height) for r in range(r0, r1)])
        cols = np.array([reflect(c, self.width) for c in range(c0, c1)])
        box = self.read(int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
        return box[:, rows - rows.min()][:, :, cols - cols.min()]

    def read_padded(self, r0: int, r1: int, c0: int, c1: int, value=0) -> np.ndarray:
        """A window that may run past the bottom / right edge, filled there with `value`."""
        out = np.full((self.bands, r1 - r0, c1 - c0), value, self.dtype)
        h, w = min(r1, self.height) - r0, min(c1, self.width) - c0
        out[:, :h, :w] = self.read(r0, r0 + h, c0, c0 + w)
        return out

    def close(self):
        self.tif.close()


def reflect(i: int, size: int) -> int:
    """Index i of an axis of `size` reflected past its end (F.pad(mode="reflect"))."""
    return i if i < size else 2 * (size - 1) - i


def same_place(a, b) -> bool:
    """Two values of a georeferencing tag agree (either missing counts as agreeing)."""
    if a is None or b is None:
        return True
    return np.allclose(np.asarray(a, float), np.asarray(b, float))


def open_scene(paths: dict) -> dict:
    """{modality: path} -> {modality: Raster}; one ValueError unless all are co-registered: the same
    size and, where both files carry it, the same pixel scale, tie point, transformation and CRS
    keys."""
    rasters = {name: Raster(path) for name, path in paths.items()}
    first_name, first = next(iter(rasters.items()))
    for name, r in rasters.items():
        if (r.height, r.width) != (first.height, first.width):
            raise ValueError(f"not co-registered: {first.path} is {first.height}x{first.width} px, "
                             f"{r.path} is {r.height}x{r.width} px")
        for code, what in CO_REGISTRATION.items():
            a, b = first.geo.get(code), r.geo.get(code)
            if not same_place(a, b):
                raise ValueError(f"not co-registered: {what} of {first.path} ({first_name}) is {a}, "
                                 f"of {r.path} ({name}) {b}")
    return rasters


def _extratags(geo: dict) -> list:
    """Georeferencing tags {code: value} -> tifffile extratags (ascii counts include the
    terminating NUL)."""
    tags = []
    for code, value in geo.items():
        value = list(value) if isinstance(value, (tuple, list)) else value
        if GEO_TAGS[code] == "s":
            count = len(value) + 1
        else:
            count = len(value) if isinstance(value, list) else 1
        tags.append((code, GEO_TAGS[code], count, value, True))
    return tags


class TiledWriter:
    """A (C, H, W) GeoTIFF written by rows in bounded memory: preallocated at its full size as
    `<path>.partial` (tiled, uncompressed, bands interleaved), rows written in place into their
    tiles, renamed to `path` by `finish`. `resume=True` reopens an existing `.partial` file, so a
    crashed run continues in it."""

    def __init__(self, path, bands: int, height: int, width: int, dtype, geo: dict | None = None,
                 resume: bool = False):
        self.path, self.partial = Path(path), Path(f"{path}.partial")
        self.bands, self.height, self.width = bands, height, width
        self.dtype = np.dtype(dtype)
        if not (resume and self.partial.exists()):
            self.create(geo or {})
        with tifffile.TiffFile(self.partial) as tif:
            page = tif.pages.first
            ours = page.compression == 1 and page.is_tiled and page.shape[:2] == (height, width)
            if not ours:
                raise ValueError(f"{self.partial}: not this run's output ({page.shape}); delete it "
                                 f"or drop --resume")
            self.offsets = list(page.dataoffsets)
        self.across = math.ceil(width / OUTPUT_TILE)
        self.file = open(self.partial, "r+b")

    def create(self, geo: dict):
        """The `.partial` file at its full size, every tile zero."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        many = self.bands > 1
        shape = (self.height, self.width, self.bands) if many else (self.height, self.width)
        tifffile.imwrite(self.partial, shape=shape, dtype=self.dtype,
                         tile=(OUTPUT_TILE, OUTPUT_TILE), photometric="minisblack",
                         planarconfig="contig" if many else None, metadata=None,
                         extratags=_extratags(geo))

    def write_rows(self, r0: int, rows: np.ndarray):
        """rows (C, h, W) -> image rows [r0, r0 + h): per tile one write of its rows (a tile's rows
        are contiguous)."""
        if rows.shape != (self.bands, rows.shape[1], self.width):
            raise ValueError(f"rows of shape {rows.shape}, the image is "
                             f"({self.bands}, H, {self.width})")
        t, r1 = OUTPUT_TILE, r0 + rows.shape[1]
        row_bytes = t * self.bands * self.dtype.itemsize         # one row of one tile
        for y in range(r0, r1):
            if y != r0 and y % t != 0:   # only where the rows of the next tile row start
                continue
            y1 = min(r1, (y // t + 1) * t)
            band = np.moveaxis(rows[:, y - r0:y1 - r0], 0, -1).astype(self.dtype)   # (h, W, C)
            edge = self.across * t - self.width                       # edge tiles: zeros
            band = np.pad(band, ((0, 0), (0, edge), (0, 0)))
            for tx in range(self.across):
                offset = self.offsets[(y // t) * self.across + tx]
                self.file.seek(offset + (y % t) * row_bytes)
                self.file.write(np.ascontiguousarray(band[:, tx * t:(tx + 1) * t]).tobytes())

    def flush(self):
        """The rows written so far on disk (before a progress checkpoint names them done)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self):
        self.flush()
        self.file.close()
        os.replace(self.partial, self.path)


class Progress:
    """The resume state of a scene run, `<path>`: numpy arrays and a JSON `meta` dict, written
    atomically. `fingerprint` (the run's inputs and settings) must match on resume, or the run is
    refused."""

    def __init__(self, path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    def load(self) -> tuple[dict, dict] | None:
        """(arrays, meta) of the last checkpoint, or None when there is none."""
        if not self.path.exists():
            return None
        with np.load(self.path) as f:
            arrays = {k: f[k] for k in f.files if k != "meta"}
            meta = json.loads(str(f["meta"]))
        if meta["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.path}: a checkpoint of another run (inputs or settings "
                             f"differ); delete it or run without --resume")
        return arrays, meta

    def save(self, arrays: dict, **meta):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            header = json.dumps({"fingerprint": self.fingerprint, **meta})
            np.savez(f, meta=header, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self):
        self.path.unlink(missing_ok=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(height: int, width: int, windows: int, seconds: float,
            pixel_m: float | None = None) -> str:
    """The closing line of a scene run: size, windows, time (and per km² where the pixel size is
    known), peak RSS."""
    line = f"scene {height}x{width} px | {windows} windows | {seconds:.1f} s"
    if pixel_m:
        km2 = height * width * pixel_m ** 2 / 1e6
        line += f" | {km2:.1f} km², {seconds / km2:.3f} s/km²"
    return line + f" | peak RSS {peak_rss_mb():.0f} MB"


# ------------------------------------------------------------------------------
# generate.py --scene: its inputs and outputs


def read_window(raster: Raster, name: str, r: int, c: int, h: int, w: int, dev) -> torch.Tensor:
    """A scene input's window -> standardized (1, C, h, w) (LULC: classes (1, h, w)), reflected
    past the bottom / right edge as generate() pads, NaN (no data) as the band mean as read_input
    does."""
    x = raster.read_reflected(r, r + h, c, c + w)
    if name == "LULC":
        return torch.from_numpy(x[0].astype(np.int64))[None].to(dev)
    x = x.astype(np.float32)
    mean = np.asarray(MODALITIES[name].mean, np.float32)[:, None, None]
    x = np.where(np.isnan(x), mean, x)
    return standardize(name, torch.from_numpy(x)[None].to(dev))


def scene_inputs(paths: dict) -> dict:
    """{modality: GeoTIFF} -> co-registered Rasters with the modality's band count."""
    rasters = open_scene(paths)
    for name, r in rasters.items():
        want = 1 if name == "LULC" else MODALITIES[name].channels
        if MODALITIES[name].kind != "image" or r.bands != want:
            raise ValueError(f"--input {name}={r.path}: expected an image of {want} band(s), "
                             f"got {r.bands}")
    return rasters


def scene_writers(folder: Path, targets: list, H: int, W: int, geo: dict, resume: bool) -> dict:
    """{target: TiledWriter} of <folder>/<target>.tif: LULC as uint8 classes, others float32."""
    writers = {}
    for n in targets:
        bands = 1 if n == "LULC" else MODALITIES[n].channels
        dtype = np.uint8 if n == "LULC" else np.float32
        writers[n] = TiledWriter(folder / f"{n}.tif", bands, H, W, dtype, geo, resume=resume)
    return writers


def write_scene(writers: dict, decoders: dict, H: int, W: int, rows: range, after_row):
    """Each window row of every target decoded (windows.decode_rows) and written; after_row(i) once
    row i is on disk."""
    for i in tqdm(rows, desc="decode", unit="row", initial=rows.start, total=rows.stop):
        for name, decoder in decoders.items():
            a, band = next(decoder)
            band = band[0, ..., :max(0, H - a), :W]                       # ([C,] h, W)
            band = band.reshape(-1, *band.shape[-2:])                      # (C, h, W)
            writers[name].write_rows(a, band.cpu().numpy())
            writers[name].flush()
        after_row(i)
