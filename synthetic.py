"""
The synthetic TerraMesh world: physically correlated modalities, so every stage can be trained
on a laptop.

Terrain comes first (fractal relief, a river valley, lakes in basins); water, snow and land
cover follow from it and from a latitude-dependent climate; S-2 spectra (L2A, L1C with a simple
atmosphere, RGB), S-1 backscatter (GRD and RTC), DEM, NDVI, the LULC map, a water label, a
caption and the coordinates all derive from that one scene.

`synth_sample(seed, i, size)` returns one sample as arrays laid out as in TerraMesh files.
`synthesize` writes n of them in the GeoTIFF layout that terramesh.TerraMeshDataset reads, plus
splits/{train,val,test}.txt; `synthesize_shards` writes the same world as TerraMesh is
published, `<out>/{train,val,test}/<FOLDER>/<subset>_shard_<NNNNNN>.tar` of `<id>.zarr.zip`
samples (terramesh_shards.py), S1RTC only in the majortom shards and S1GRD only in the
ssl4eos12 ones, with our extras beside the modalities: the test split, `caption/` (`<id>.txt`)
and `label_water/` (`<id>.zarr.zip`). Both split the world alike (`world_splits`, 80/10/10).
terramesh.py's `synth` command runs them:

    python terramesh.py synth --out data/synth --n 2000 --size 64     # GeoTIFFs, CPU, seconds
    python terramesh.py synth --layout shards --out data/synth264 --n 400 --size 264
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from geotiff import TIFF_LAYOUT, write_text
from modalities import (BARE, BUILT, CLOUDS, CROPS, FLOODED, IMAGE_MODALITIES, MODALITIES,
                        NO_DATA, RANGE, SNOW, TREES, WATER, format_coords, parse_coords)
from shard_index import member_suffix
from terramesh_shards import write_shard, zarr_zip

# ----------------------------------------------------------------------------
# The synthetic TerraMesh world: terrain -> water, snow, land cover -> spectra, backscatter,
# NDVI, captions

# Surface reflectance x 1e4 per class (typical published spectra), bands
#      B1    B2    B3    B4    B5    B6    B7    B8   B8A    B9   B11   B12
SIGNATURES = np.array([
    [1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000],  # no data
    [600, 520, 470, 320, 260, 210, 190, 160, 140, 110, 80, 60],                 # water
    [300, 350, 560, 340, 900, 2300, 2800, 3000, 3100, 3100, 1500, 700],         # trees
    [420, 460, 660, 480, 900, 1600, 1900, 2000, 2050, 2000, 900, 450],          # flooded veg.
    [500, 560, 850, 700, 1300, 2800, 3400, 3600, 3700, 3700, 2200, 1200],       # crops
    [1200, 1300, 1450, 1600, 1700, 1800, 1900, 2000, 2050, 2000, 2300, 2100],   # built area
    [1400, 1600, 2000, 2500, 2800, 3000, 3150, 3250, 3350, 3350, 3900, 3300],   # bare ground
    [8500, 8800, 8700, 8500, 8300, 8000, 7700, 7500, 7200, 6800, 1200, 800],    # snow/ice
    [7000, 7200, 7300, 7400, 7500, 7600, 7600, 7700, 7700, 6500, 5500, 4500],   # cloud top
    [700, 800, 1100, 1200, 1600, 2200, 2500, 2650, 2750, 2750, 2800, 1900],     # rangeland
], dtype=np.float32)
# Sentinel-1 terrain-flattened backscatter gamma0 in dB per class (VV, VH); radar sees through
# clouds
BACKSCATTER = np.array([[-12, -19], [-22, -29], [-7.5, -13.5], [-6, -15], [-10, -17],
                        [2, -7], [-14, -23], [-13, -21], [-11, -18], [-11, -18]],
                       dtype=np.float32)
# L1C = L2A * transmittance + path radiance (13 bands, B10 cirrus inserted after B9);
# per unit of aerosol
PATH_RADIANCE = np.array([950, 650, 320, 230, 110, 80, 60, 0, 0, 0, 0, 50, 0],
                         dtype=np.float32)
TRANSMITTANCE = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0.45, 1, 1, 1],
                         dtype=np.float32)                        # B9: water vapour
CAPTION_PHRASES = {WATER: ["open water", "water"],
                   TREES: ["forest", "woodland", "trees"],
                   FLOODED: ["wetland", "flooded vegetation", "marsh"],
                   CROPS: ["cropland", "farm fields", "agricultural fields"],
                   BUILT: ["buildings", "a built-up area", "a small settlement"],
                   BARE: ["bare ground", "bare soil and rock"],
                   SNOW: ["snow and ice", "snow"],
                   CLOUDS: ["clouds", "cloud cover"],
                   RANGE: ["rangeland", "grassland", "shrubland"]}
RELIEF_WORDS = {"flat": ["flat", "low-lying", "level"],
                "rolling": ["gently rolling", "undulating"],
                "hilly": ["hilly", "rugged"],
                "mountainous": ["mountainous", "steep alpine"]}
RIVER_PHRASES = [" A river crosses the scene.", " A river winds through the valley."]
LAKE_PHRASES = [" Water fills a low basin.", " There is a lake."]
# unit vector towards the sensor: 38 deg incidence, looking east
RADAR_LOOK = np.array([-0.616, 0.0, 0.788])
# per terrain: relief (std in metres on a 64 px tile) and base height, uniform ranges
RELIEF = {"flat": (1, 5), "rolling": (5, 20), "hilly": (20, 60), "mountainous": (60, 200)}
BASE_HEIGHT = {"flat": (0, 400), "rolling": (50, 900), "hilly": (200, 1800),
               "mountainous": (900, 4200)}


def _fractal(rng, n, beta):
    """Gaussian 1/f^beta noise on an n x n grid, zero mean and unit std (spectral synthesis,
    cropped from 2n so that it does not wrap around)."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(2 * n), np.fft.fftfreq(2 * n), indexing="ij"))
    f[0, 0] = np.inf
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((2 * n, 2 * n))) * f ** (-beta / 2)).real
    field = field[n // 2:n // 2 + n, n // 2:n // 2 + n]
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _dilate(mask, r):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def _blur(x, r):
    """Box mean over (2r+1)^2 pixels, edges replicated."""
    k = 2 * r + 1
    c = np.pad(x, r, mode="edge").cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / k ** 2


def _climate(lat, rng):
    """Latitude -> (humidity 0..1, snow line in metres): humid tropics, an arid belt near 25
    deg, temperate mid-latitudes, cold poles; with per-sample scatter."""
    a = abs(lat)
    arid_belt = 0.75 * np.exp(-((a - 25) / 9) ** 2)
    temperate = 0.35 * np.clip((a - 10) / 30, 0, 1) * (a < 55)
    humidity = 0.9 - arid_belt - temperate
    humidity = float(np.clip(humidity + rng.normal(0, 0.1), 0.02, 1))
    snowline = float(np.clip(5200 - 85 * max(a - 15, 0) + rng.normal(0, 250), 0, 6000))
    return humidity, snowline


@dataclass
class Scene:
    """One synthetic scene on an n x n grid of 10 m pixels, filled in stage by stage by
    synth_sample: climate, then terrain, then land cover, then what the sensors see."""
    n: int
    humidity: float                    # 0..1, from the latitude
    snowline: float                    # metres
    terrain: str = ""                  # flat, rolling, hilly, mountainous
    dem: np.ndarray | None = None      # (H, W) metres
    river: np.ndarray | None = None    # (H, W) bool
    lake: np.ndarray | None = None     # (H, W) bool
    slope: np.ndarray | None = None    # (H, W) degrees
    normal: np.ndarray | None = None   # (3, H, W) unit surface normals
    texture: np.ndarray | None = None  # (H, W) fine-scale noise shared by the sensors
    ground: np.ndarray | None = None   # (H, W) land cover under the clouds
    lulc: np.ndarray | None = None     # (H, W) land cover as seen, clouds included
    opacity: np.ndarray | None = None  # (H, W) cloud opacity 0..1
    green: np.ndarray | None = None    # (H, W) per-field crop vigour, where there are crops

    @property
    def water(self) -> np.ndarray:
        return self.river | self.lake


def synth_sample(seed: int, i: int, size: int = 64) -> dict:
    """One synthetic sample, deterministic in (seed, i): {modality: array as stored in TerraMesh
    files (channel-last), 'caption': str, 'coords': str, 'label_water': int16 (H, W)}."""
    rng = np.random.default_rng([seed, i])
    lat = float(np.round(rng.uniform(-58, 78) * 4) / 4)
    lon = float(np.round(rng.uniform(-180, 179.75) * 4) / 4)
    humidity, snowline = _climate(lat, rng)
    scene = Scene(size, humidity, snowline)
    _terrain(rng, scene)
    _land_cover(rng, scene)
    refl, l1c = _optical(rng, scene)
    grd, rtc = _radar(rng, scene)
    cloudiness = scene.opacity.mean()
    caption = _caption(rng, scene.ground, scene.lulc, scene.terrain, scene.river.any(),
                       scene.lake.any(), cloudiness)
    red, nir = refl[..., 3], refl[..., 7]
    rgb = np.clip(refl[..., [3, 2, 1]] * 255 / 2000, 0, 255)       # = real S2RGB / L2A
    return {"S2L1C": np.clip(l1c, 0, 32767).astype(np.int16),
            "S2L2A": refl.astype(np.int16),
            "S2RGB": rgb.astype(np.uint8),
            "S1GRD": grd.astype(np.float32),
            "S1RTC": rtc.astype(np.float32),
            "DEM": np.round(scene.dem).astype(np.int16),
            "LULC": scene.lulc,
            "NDVI": ((nir - red) / (nir + red)).astype(np.float32),  # as TerraMesh computes it
            "caption": caption,
            "coords": format_coords(lon, lat),
            "label_water": scene.water.astype(np.int16)}


def _terrain(rng, s: Scene):
    """A fractal DEM, relief from plains to mountains; rivers carve valleys, lakes fill basins."""
    n = s.n
    s.terrain = rng.choice(["flat", "rolling", "hilly", "mountainous"], p=[0.35, 0.25, 0.25, 0.15])
    relief = RELIEF[s.terrain]
    base = BASE_HEIGHT[s.terrain]
    relief = rng.uniform(*relief) * (n / 64) ** 0.8                # std in metres per tile
    height = rng.uniform(*base)
    beta = rng.uniform(3.4, 3.8)
    s.dem = height + relief * _fractal(rng, n, beta)
    s.river = np.zeros((n, n), bool)
    if rng.random() < 0.25 + 0.4 * s.humidity:
        _carve_river(rng, s)
    s.lake = np.zeros((n, n), bool)
    if rng.random() < s.humidity:
        level = np.quantile(s.dem, rng.uniform(0, 0.3) * s.humidity ** 1.5)
        s.lake = s.dem < level
    gy, gx = np.gradient(s.dem, 10.0)                              # 10 m pixels
    s.slope = np.degrees(np.arctan(np.hypot(gx, gy)))
    s.normal = np.stack([-gx, -gy, np.ones_like(s.dem)]) / np.sqrt(gx ** 2 + gy ** 2 + 1)


def _carve_river(rng, s: Scene):
    """A river along the zero line of a smooth field, in a valley cut into the DEM."""
    course = _fractal(rng, s.n, 4.0)
    gy, gx = np.gradient(course)
    distance = np.abs(course) / (np.hypot(gx, gy) + 1e-6)          # in pixels
    width = rng.uniform(0.6, 1.5) * (1 + s.humidity)
    depth = rng.uniform(3, 20)
    s.dem -= depth * np.exp(-(distance / (6 * width)) ** 2)        # the valley
    s.river = distance < width


def _land_cover(rng, s: Scene):
    """Land cover from climate, elevation, slope and noise (`ground`); clouds on top (`lulc`)."""
    n, humidity = s.n, s.humidity
    patches = _fractal(rng, n, 3.0)
    edges = _fractal(rng, n, 2.6)
    s.texture = _fractal(rng, n, 1.6)
    cold = np.clip((s.dem - s.snowline + 900) / 900, 0, 1)         # 0 below treeline
    lulc = np.full((n, n), RANGE, np.uint8)
    wooded = humidity - 0.45 + 0.35 * patches + 0.1 * edges + 0.004 * s.slope - 0.8 * cold
    lulc[wooded > 0] = TREES
    dry = (0.35 - humidity) * 2 + 0.4 * edges + 1.2 * cold + 0.02 * (s.slope - 25)
    lulc[dry > 0.35] = BARE
    if humidity > 0.25 and rng.random() < 0.8 and s.snowline > 1500:
        _fields(rng, s, lulc, cold)
    if rng.random() < 0.5 and s.terrain != "mountainous":
        _settlements(rng, s, lulc, edges)
    shore = _dilate(s.water, 1 + int(3 * humidity))
    lulc[shore & (s.slope < 8) & (humidity > 0.5) & (patches > -0.5)] = FLOODED
    lulc[s.dem + 150 * edges > s.snowline] = SNOW
    lulc[s.water] = WATER
    s.ground = lulc.copy()
    s.opacity = _clouds(rng, n)
    lulc[s.opacity > 0.5] = CLOUDS
    s.lulc = lulc


def _fields(rng, s: Scene, lulc, cold):
    """Square parcels of cropland on flat ground below the treeline."""
    n = s.n
    k = int(rng.integers(6, 14))
    cells = (n + k - 1) // k
    parcels = rng.random((cells, cells)) < rng.uniform(0.3, 0.9)
    fields = np.kron(parcels, np.ones((k, k), bool))[:n, :n]
    lulc[fields & (_blur(s.slope, 3) < 12) & (cold == 0)] = CROPS


def _settlements(rng, s: Scene, lulc, edges):
    """One to three small settlements with ragged edges."""
    n = s.n
    yy, xx = np.mgrid[:n, :n]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.integers(0, n), rng.integers(0, n), rng.uniform(2, n / 8)
        lulc[np.hypot(yy - cy, xx - cx) + 2 * edges < r] = BUILT


def _clouds(rng, n) -> np.ndarray:
    """Cloud opacity (H, W) in 0..1: none in 60% of the scenes, else 5-60% cover."""
    cover = rng.choice([0, rng.uniform(0.05, 0.6)], p=[0.6, 0.4])
    if not cover:
        return np.zeros((n, n), np.float32)
    field = _fractal(rng, n, 2.8)
    threshold = np.quantile(_fractal(rng, 8, 2), 1 - cover)
    return np.clip((field - threshold) * 2, 0, 1)


def _optical(rng, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """S-2 L2A (H, W, 12) and L1C (H, W, 13): class spectra x illumination x texture, per-field
    phenology, clouds blended in; L1C adds a simple atmosphere and the B10 cirrus band."""
    n, ground, opacity = s.n, s.ground, s.opacity
    refl = SIGNATURES[ground].copy()                                # (H, W, 12)
    crop = ground == CROPS
    if crop.any():
        k = max(n // 8, 1)
        cells = (n + k - 1) // k
        s.green = np.kron(rng.uniform(0.5, 1.25, (cells, cells)), np.ones((k, k)))[:n, :n]
        refl[crop, 4:10] *= s.green[crop, None]
        refl[crop, :4] /= s.green[crop, None] ** 0.5
    sun = np.array([0.5, -0.5, 0.707])
    hillshade = np.clip(np.tensordot(sun, s.normal, 1), 0, None)
    light = np.where(s.water, 1.0, 0.45 + 0.75 * hillshade)
    refl *= (light * (1 + 0.06 * s.texture) * rng.uniform(0.9, 1.1))[..., None]
    refl = refl * (1 - opacity[..., None]) + SIGNATURES[CLOUDS] * opacity[..., None]
    refl += rng.normal(0, 25, refl.shape)
    refl = np.clip(refl, 1, 15000)
    aerosol = rng.uniform(0.4, 1.6)
    cirrus = 15 + 2500 * opacity ** 2 * rng.uniform(0, 1)
    l1c = np.insert(refl, 10, cirrus, axis=-1)                      # (H, W, 13), B10 after B9
    l1c = l1c * TRANSMITTANCE + aerosol * PATH_RADIANCE + rng.normal(0, 20, l1c.shape)
    return refl, l1c


def _radar(rng, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """S-1 GRD and RTC in dB (H, W, 2): class gamma0, terrain geometry (GRD keeps it, RTC
    flattens it), one multiplicative speckle for both."""
    n, ground = s.n, s.ground
    gamma0 = 10 ** ((BACKSCATTER[ground] + 1.5 * s.texture[..., None]) / 10)   # (H, W, 2) linear
    crop = ground == CROPS
    if crop.any():
        gamma0[crop] *= s.green[crop, None] ** 1.5
    cos_local = np.clip(np.tensordot(RADAR_LOOK, s.normal, 1), 0.05, 1)
    incidence = np.sin(np.radians(38)) * np.cos(np.radians(38))
    geometry = np.sqrt(1 - cos_local ** 2).clip(0.1) ** -1 * incidence
    speckle = rng.gamma(4.4, 1 / 4.4, (n, n, 2))
    rtc = 10 * np.log10(gamma0 * speckle * geometry[..., None] ** 0.1)
    grd = 10 * np.log10(gamma0 * speckle * geometry[..., None])
    return grd, rtc


def _caption(rng, ground, lulc, terrain, river, lake, cloudiness) -> str:
    share = np.bincount(lulc.ravel(), minlength=10) / lulc.size
    order = [c for c in np.argsort(-share) if share[c] > 0.04 and c != NO_DATA]
    phrase = [str(rng.choice(CAPTION_PHRASES[c])) for c in order]
    relief = str(rng.choice(RELIEF_WORDS[terrain]))
    rest = phrase[1:3]
    mix = f" with {' and '.join(rest)}" if rest else ""
    templates = [f"A {relief} landscape dominated by {phrase[0]}{mix}.",
                 f"Satellite view of {phrase[0]}{mix} in {relief} terrain.",
                 f"Mostly {phrase[0]}{mix}; the terrain is {relief}.",
                 f"This {relief} area is mostly {phrase[0]}{mix}."]
    text = str(rng.choice(templates))
    if river:
        text += str(rng.choice(RIVER_PHRASES))
    if lake:
        text += str(rng.choice(LAKE_PHRASES))
    if cloudiness > 0.1 and order[0] != CLOUDS:
        text += " Partly cloudy."
    return text


def synthesize(out, n=2000, size=64, seed=0, workers=None):
    """Writes n synthetic samples in the TerraMesh layout under `out`, plus
    splits/{train,val,test}.txt (80/10/10) and the water-mapping labels in `label_water/`.
    Deterministic in (seed, sample index)."""
    out = Path(out)
    for m in list(MODALITIES) + ["label_water", "splits"]:
        (out / m).mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, size, str(out)) for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            written = pool.imap_unordered(_write_sample, jobs, chunksize=16)
            list(tqdm(written, total=n, desc="synth"))
    else:
        list(tqdm(map(_write_sample, jobs), total=n, desc="synth"))
    for name, part in world_splits(n, seed).items():
        ids = [f"{i:05d}" for i in part]
        write_text(out / "splits" / f"{name}.txt", "\n".join(ids) + "\n")


def _write_sample(job):
    seed, i, size, out = job
    sid = f"{i:05d}"
    for m, x in synth_sample(seed, i, size).items():
        if isinstance(x, str):
            write_text(Path(out) / m / f"{sid}.txt", x + "\n")
        else:
            tifffile.imwrite(Path(out) / m / f"{sid}.tif", x, **TIFF_LAYOUT[x.ndim])



# ----------------------------------------------------------------------------
# The same world in the published layout: tar shards of zarr.zip samples

# the dtypes of the published TerraMesh arrays (S1 in float16 dB; NDVI ours: the dataset card
# says float)
PUBLISHED_DTYPES = {"S2L1C": "<i2", "S2L2A": "<i2", "S2RGB": "|u1", "S1GRD": "<f2",
                    "S1RTC": "<f2", "DEM": "<i2", "LULC": "|u1", "NDVI": "<f4"}
OPTICAL = ("S2L1C", "S2L2A", "S2RGB", "NDVI")             # the modalities with a cloud_mask
SUBSET_S1 = {"majortom": "S1RTC", "ssl4eos12": "S1GRD"}   # the one S-1 product of each subset
SYNTH_TIME_NS = 1_561_000_000_000_000_000                 # 2019-06-20, the time we write
# xarray's dimension names
BAND_DIMS = {"bands": {"_ARRAY_DIMENSIONS": ["time", "band", "y", "x"]}}


def published(sample: dict) -> dict:
    """A synth_sample's image modalities as the published arrays: (time=1, band, y, x) in
    PUBLISHED_DTYPES."""
    out = {}
    for m in IMAGE_MODALITIES:
        x = sample[m][..., None] if sample[m].ndim == 2 else sample[m]                   # (H, W, C)
        out[m] = np.moveaxis(x, -1, 0)[None].astype(PUBLISHED_DTYPES[m])              # (1, C, H, W)
    return out


def zarr_member(bands: np.ndarray, m: str, coords: str, clouds: np.ndarray) -> bytes:
    """One modality of one sample as a `<key>.zarr.zip` member: bands, centre, time and,
    optical, cloud_mask."""
    lon, lat = parse_coords(coords)
    arrays = {"bands": bands, "center_lat": np.array(lat), "center_lon": np.array(lon),
              "time": np.array(0 if m == "DEM" else SYNTH_TIME_NS, "<i8")}   # DEM: time 0
    if m in OPTICAL:
        arrays["cloud_mask"] = clouds[None].astype(np.uint8)                 # (time, y, x)
    return zarr_zip(arrays, BAND_DIMS)


def _sample_members(job) -> dict:
    """{folder: member bytes} of one sample: its image modalities (one S-1 product, by subset) as
    zarr.zip, and our extras: the caption as UTF-8 text, the water label as a zarr.zip class map."""
    seed, i, size, subset = job
    sample = synth_sample(seed, i, size)
    clouds = sample["LULC"] == CLOUDS
    other_s1 = [s1 for s, s1 in SUBSET_S1.items() if s != subset]
    members = {}
    for m, bands in published(sample).items():
        if m not in other_s1:
            members[m] = zarr_member(bands, m, sample["coords"], clouds)
    members["caption"] = sample["caption"].encode("utf-8")
    water = sample["label_water"][None, None].astype(np.uint8)               # (1, 1, H, W)
    members["label_water"] = zarr_zip({"bands": water}, BAND_DIMS)
    return members


def world_splits(n: int, seed: int) -> dict[str, np.ndarray]:
    """The world's splits, 80/10/10 of a permutation of the sample indices: {split: sorted
    indices}."""
    ids = np.random.default_rng(seed).permutation(n)
    cut = [int(0.8 * n), int(0.9 * n)]
    parts = np.split(ids, cut)
    return {name: np.sort(part) for name, part in zip(("train", "val", "test"), parts)}


def synthesize_shards(out, n=400, size=264, seed=0, workers=None, shard_size=64):
    """Writes the synthetic world in the published layout, split as the GeoTIFF world is
    (`world_splits`): train/, val/ and our extra test/ split, `shard_size` samples per tar (at
    least two tars per split), the first half of each split's shards majortom (S1RTC), the rest
    ssl4eos12 (S1GRD); ours: TerraMesh's shards are 89% majortom. Beside the modalities, our
    extras: caption/ (`<key>.txt`) and label_water/ (`<key>.zarr.zip`). Deterministic in (seed,
    sample index)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    for split, part in world_splits(n, seed).items():
        if not len(part):
            continue
        count = max(min(2, len(part)), -(-len(part) // shard_size))   # both subsets in every split
        shards = np.array_split(part, count)
        for k, members in enumerate(shards):
            subset = "majortom" if k < (len(shards) + 1) // 2 else "ssl4eos12"
            name = f"{subset}_shard_{k + 1:06d}.tar"                    # each split numbers from 1
            jobs = [(seed, int(i), size, subset) for i in members]
            _write_published_shard(Path(out) / split, name, jobs, workers)


def _write_published_shard(folder: Path, name: str, jobs: list, workers: int):
    """One shard name in every folder: the members of `jobs`' samples, written as tars."""
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            made = pool.imap(_sample_members, jobs, chunksize=4)
            samples = list(tqdm(made, total=len(jobs), desc=name))
    else:
        samples = list(tqdm(map(_sample_members, jobs), total=len(jobs), desc=name))
    for m in samples[0]:
        suffix = member_suffix(m)
        members = {f"{i:05d}{suffix}": sample[m] for (_, i, _, _), sample in zip(jobs, samples)}
        write_shard(folder / m / name, members)
