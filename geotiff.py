"""
GeoTIFF tiles and the UTF-8 text files beside them, read and written as TerraMesh stores them.

A TerraMesh-layout folder holds one GeoTIFF per modality and sample, channel-last (H, W, C),
with the georeferencing tags of its tile, and captions / coordinates as UTF-8 text. This file
reads a tile as it is stored (`read_tiff`: the array and its georeferencing tags), writes one
back (`write_geotiff`, with the tie point moved for a window cut from the tile), puts the
channels first (`to_channels_first`), and reads and writes text (`read_text`, `write_text`).
Every write is atomic (temporary file, then rename); a file that cannot be read raises one
ValueError line naming it.

    python -c "import geotiff; print(geotiff.read_tiff('assets/terramesh/DEM/637U_59R_1_3.tif')[1])"
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

# ----------------------------------------------------------------------------
# Reading and writing GeoTIFFs
# GeoTIFF tags that carry the georeferencing: pixel scale, tie points, transformation,
# GeoKeys, doubles, ascii
GEO_TAGS = {33550: "d", 33922: "d", 34264: "d", 34735: "H", 34736: "d", 34737: "s", 42113: "s"}


# one page, bands interleaved per pixel (H, W, C), as TerraMesh stores them
TIFF_LAYOUT = {2: dict(photometric="minisblack", metadata=None),
                3: dict(photometric="minisblack", planarconfig="contig", metadata=None)}


def read_tiff(path) -> tuple[np.ndarray, dict]:
    """Reads the first image of a (Geo)TIFF as it is stored, and its georeferencing tags {code:
    value}. A file that is not a TIFF, is truncated or does not decode raises ValueError naming
    the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            for page in series.pages:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    end = offset + count
                    # tifffile would silently read the missing part
                    if count == 0 or end > size:
                        raise ValueError(f"truncated: image data runs to byte {end}, file has {size}")
            x = series.asarray()
            tags = tif.pages.first.tags.values()
            geo = {tag.code: tag.value for tag in tags if tag.code in GEO_TAGS}
    except Exception as e:
        raise ValueError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from None
    return x, geo


def write_geotiff(path, x: np.ndarray, geo: dict | None = None, offset: tuple = (0, 0)):
    """Writes (C, H, W) or (H, W) channel-last as TerraMesh does, with georeferencing tags from
    `read_tiff`. `offset=(row, col)` shifts the tie point, for a window cut out of the tile the
    tags came from. The write is atomic: a crash never leaves a half-written file."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)                # (H, W) or (H, W, C)
    extratags = []
    for code, value in (geo or {}).items():
        value = list(value) if isinstance(value, (tuple, list)) else value
        if code == 33922 and any(offset) and 33550 in geo:   # (I, J, K, X, Y, Z) tie point
            sx, sy = geo[33550][0], geo[33550][1]
            value[3] += offset[1] * sx
            value[4] -= offset[0] * sy
        if GEO_TAGS[code] == "s":
            count = len(value) + 1                                # ascii: with its NUL
        elif isinstance(value, list):
            count = len(value)
        else:
            count = 1
        extratags.append((code, GEO_TAGS[code], count, value, True))
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tifffile.imwrite(tmp, x, extratags=extratags, **TIFF_LAYOUT[x.ndim])
    os.replace(tmp, path)


def read_text(path) -> str:
    """A UTF-8 text file (caption, coords, split list); a file in another encoding raises
    ValueError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                         f"save it as UTF-8") from None


def write_text(path, text: str):
    """Writes a text file atomically (a temporary file beside it, then a rename); creates the
    folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_channels_first(x: np.ndarray, channels: int, path) -> np.ndarray:
    """(H, W, C), (C, H, W) or (H, W) -> (C, H, W); TerraMesh files are channel-last, others
    channel-first."""
    if x.ndim == 2 and channels == 1:
        return x[None]
    if x.ndim == 3:
        # channel-last wins when both fit (TerraMesh convention)
        if x.shape[-1] == channels:
            return np.moveaxis(x, -1, 0)
        if x.shape[0] == channels:
            return x
    raise ValueError(f"{path}: expected {channels} band(s), got an array of shape {x.shape}")
