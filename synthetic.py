"""
The synthetic TerraMesh world: physically correlated modalities, so every stage can be trained on a laptop.

Terrain comes first (fractal relief, a river valley, lakes in basins); water, snow and land cover follow from
it and from a latitude-dependent climate; S-2 spectra (L2A, L1C with a simple atmosphere, RGB), S-1
backscatter (GRD and RTC), DEM, NDVI, the LULC map, a water label, a caption and the coordinates all derive
from that one scene. Samples are written in the TerraMesh layout that terramesh.TerraMeshDataset reads:

    python terramesh.py synth --out data/synth --n 2000 --size 64      # 2000 tiles of 64 px (CPU, seconds)

`synth_sample(seed, i, size)` returns one sample as arrays laid out as in TerraMesh files;
`synthesize(out, n, size)` writes n of them plus splits/{train,val,test}.txt. `synthesize(..., layout="shards")` writes the same world as
TerraMesh is published: `<out>/{train,val}/<MODALITY>/<subset>_shard_<NNNNNN>.tar` of `<id>.zarr.zip` samples
(terramesh_shards.py), no captions, S1RTC only in the majortom shards and S1GRD only in the ssl4eos12 ones:

    python terramesh.py synth --layout shards --out data/synth264 --n 400 --size 264
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from geotiff import TIFF_LAYOUT, write_text
from modalities import (BARE, BUILT, CLOUDS, CROPS, FLOODED, IMAGE_MODALITIES, MODALITIES,
                        NO_DATA, RANGE, SNOW, TREES, WATER, format_coords, parse_coords)
from shard_index import member_suffix
from terramesh_shards import write_shard, zarr_zip

# -----------------------------------------------------------------------------------------------------------
# The synthetic TerraMesh world: terrain -> water, snow, land cover -> spectra, backscatter, NDVI, captions

# Surface reflectance x 1e4 per class, bands B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12 (typical published spectra)
SIGNATURES = np.array([
    [1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000],   # no data (unused)
    [600, 520, 470, 320, 260, 210, 190, 160, 140, 110, 80, 60],                  # water
    [300, 350, 560, 340, 900, 2300, 2800, 3000, 3100, 3100, 1500, 700],          # trees
    [420, 460, 660, 480, 900, 1600, 1900, 2000, 2050, 2000, 900, 450],           # flooded vegetation
    [500, 560, 850, 700, 1300, 2800, 3400, 3600, 3700, 3700, 2200, 1200],        # crops
    [1200, 1300, 1450, 1600, 1700, 1800, 1900, 2000, 2050, 2000, 2300, 2100],    # built area
    [1400, 1600, 2000, 2500, 2800, 3000, 3150, 3250, 3350, 3350, 3900, 3300],    # bare ground
    [8500, 8800, 8700, 8500, 8300, 8000, 7700, 7500, 7200, 6800, 1200, 800],     # snow/ice
    [7000, 7200, 7300, 7400, 7500, 7600, 7600, 7700, 7700, 6500, 5500, 4500],    # clouds (cloud top)
    [700, 800, 1100, 1200, 1600, 2200, 2500, 2650, 2750, 2750, 2800, 1900],      # rangeland
], dtype=np.float32)
# Sentinel-1 terrain-flattened backscatter gamma0 in dB per class (VV, VH); radar sees through clouds
BACKSCATTER = np.array([[-12, -19], [-22, -29], [-7.5, -13.5], [-6, -15], [-10, -17], [2, -7], [-14, -23],
                        [-13, -21], [-11, -18], [-11, -18]], dtype=np.float32)
# L1C = L2A * transmittance + path radiance (13 bands, B10 cirrus inserted after B9); per unit of aerosol
PATH_RADIANCE = np.array([950, 650, 320, 230, 110, 80, 60, 0, 0, 0, 0, 50, 0], dtype=np.float32)
TRANSMITTANCE = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0.45, 1, 1, 1], dtype=np.float32)   # B9: water vapour
CAPTION_PHRASES = {WATER: ["open water", "water"], TREES: ["forest", "woodland", "trees"],
                   FLOODED: ["wetland", "flooded vegetation", "marsh"],
                   CROPS: ["cropland", "farm fields", "agricultural fields"],
                   BUILT: ["buildings", "a built-up area", "a small settlement"],
                   BARE: ["bare ground", "bare soil and rock"], SNOW: ["snow and ice", "snow"],
                   CLOUDS: ["clouds", "cloud cover"], RANGE: ["rangeland", "grassland", "shrubland"]}
RADAR_LOOK = np.array([-0.616, 0.0, 0.788])   # unit vector towards the sensor: 38 deg incidence, looking east


def _fractal(rng, n, beta):
    """Gaussian 1/f^beta noise on an n x n grid, zero mean and unit std (spectral synthesis, cropped from 2n
    so that it does not wrap around)."""
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
    """Latitude -> (humidity 0..1, snow line in metres): humid tropics, an arid belt near 25 deg, temperate
    mid-latitudes, cold poles; with per-sample scatter."""
    a = abs(lat)
    humidity = 0.9 - 0.75 * np.exp(-((a - 25) / 9) ** 2) - 0.35 * np.clip((a - 10) / 30, 0, 1) * (a < 55)
    humidity = float(np.clip(humidity + rng.normal(0, 0.1), 0.02, 1))
    snowline = float(np.clip(5200 - 85 * max(a - 15, 0) + rng.normal(0, 250), 0, 6000))
    return humidity, snowline


def synth_sample(seed: int, i: int, size: int = 64) -> dict:
    """One synthetic sample, deterministic in (seed, i): {modality: array as stored in TerraMesh files
    (channel-last), 'caption': str, 'coords': str, 'label_water': int16 (H, W)}."""
    rng = np.random.default_rng([seed, i])
    n = size
    lat = float(np.round(rng.uniform(-58, 78) * 4) / 4)
    lon = float(np.round(rng.uniform(-180, 179.75) * 4) / 4)
    humidity, snowline = _climate(lat, rng)

    # terrain: a fractal DEM; relief from plains to mountains; rivers carve valleys, lakes fill basins
    terrain = rng.choice(["flat", "rolling", "hilly", "mountainous"], p=[0.35, 0.25, 0.25, 0.15])
    relief = {"flat": (1, 5), "rolling": (5, 20), "hilly": (20, 60), "mountainous": (60, 200)}[terrain]
    base = {"flat": (0, 400), "rolling": (50, 900), "hilly": (200, 1800), "mountainous": (900, 4200)}[terrain]
    relief = rng.uniform(*relief) * (n / 64) ** 0.8                               # std in metres per tile
    dem = rng.uniform(*base) + relief * _fractal(rng, n, rng.uniform(3.4, 3.8))
    river = np.zeros((n, n), bool)
    if rng.random() < 0.25 + 0.4 * humidity:
        course = _fractal(rng, n, 4.0)                    # a river follows the zero line of a smooth field
        gy, gx = np.gradient(course)
        distance = np.abs(course) / (np.hypot(gx, gy) + 1e-6)                      # in pixels
        width = rng.uniform(0.6, 1.5) * (1 + humidity)
        dem -= rng.uniform(3, 20) * np.exp(-(distance / (6 * width)) ** 2)        # the valley
        river = distance < width
    lake = dem < np.quantile(dem, rng.uniform(0, 0.3) * humidity ** 1.5) if rng.random() < humidity else \
        np.zeros((n, n), bool)
    water = river | lake
    gy, gx = np.gradient(dem, 10.0)                                                # 10 m pixels
    slope = np.degrees(np.arctan(np.hypot(gx, gy)))
    normal = np.stack([-gx, -gy, np.ones_like(dem)]) / np.sqrt(gx ** 2 + gy ** 2 + 1)
    hillshade = np.clip(np.tensordot(np.array([0.5, -0.5, 0.707]) / 1.0, normal, 1), 0, None)

    # land cover from climate, elevation, slope and noise; clouds on top
    patches, edges, texture = _fractal(rng, n, 3.0), _fractal(rng, n, 2.6), _fractal(rng, n, 1.6)
    cold = np.clip((dem - snowline + 900) / 900, 0, 1)                            # 0 below treeline
    lulc = np.full((n, n), RANGE, np.uint8)
    trees = humidity - 0.45 + 0.35 * patches + 0.1 * edges + 0.004 * slope - 0.8 * cold > 0
    lulc[trees] = TREES
    lulc[(0.35 - humidity) * 2 + 0.4 * edges + 1.2 * cold + 0.02 * (slope - 25) > 0.35] = BARE
    if humidity > 0.25 and rng.random() < 0.8 and snowline > 1500:                 # fields on flat ground
        k = int(rng.integers(6, 14))
        parcels = rng.random(((n + k - 1) // k, (n + k - 1) // k)) < rng.uniform(0.3, 0.9)
        fields = np.kron(parcels, np.ones((k, k), bool))[:n, :n]
        lulc[fields & (_blur(slope, 3) < 12) & (cold == 0)] = CROPS
    if rng.random() < 0.5 and terrain != "mountainous":                            # small settlements
        yy, xx = np.mgrid[:n, :n]
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.integers(0, n), rng.integers(0, n), rng.uniform(2, n / 8)
            lulc[np.hypot(yy - cy, xx - cx) + 2 * edges < r] = BUILT
    lulc[_dilate(water, 1 + int(3 * humidity)) & (slope < 8) & (humidity > 0.5) & (patches > -0.5)] = FLOODED
    lulc[dem + 150 * edges > snowline] = SNOW
    lulc[water] = WATER
    ground = lulc.copy()
    cover = rng.choice([0, rng.uniform(0.05, 0.6)], p=[0.6, 0.4])
    opacity = np.clip((_fractal(rng, n, 2.8) - np.quantile(_fractal(rng, 8, 2), 1 - cover)) * 2, 0, 1) \
        if cover else np.zeros((n, n), np.float32)
    lulc[opacity > 0.5] = CLOUDS

    # optical: class spectra x illumination x texture, per-field phenology, clouds blended in
    refl = SIGNATURES[ground].copy()                                               # (H, W, 12)
    if (ground == CROPS).any():
        k = max(n // 8, 1)
        green = np.kron(rng.uniform(0.5, 1.25, ((n + k - 1) // k,) * 2), np.ones((k, k)))[:n, :n]
        crop = ground == CROPS
        refl[crop, 4:10] *= green[crop, None]
        refl[crop, :4] /= green[crop, None] ** 0.5
    light = np.where(water, 1.0, 0.45 + 0.75 * hillshade)
    refl *= (light * (1 + 0.06 * texture) * rng.uniform(0.9, 1.1))[..., None]
    refl = refl * (1 - opacity[..., None]) + SIGNATURES[CLOUDS] * opacity[..., None]
    refl += rng.normal(0, 25, refl.shape)
    refl = np.clip(refl, 1, 15000)
    aerosol = rng.uniform(0.4, 1.6)
    l1c = np.insert(refl, 10, 15 + 2500 * opacity ** 2 * rng.uniform(0, 1), axis=-1)  # B10 cirrus
    l1c = l1c * TRANSMITTANCE + aerosol * PATH_RADIANCE + rng.normal(0, 20, l1c.shape)
    red, nir = refl[..., 3], refl[..., 7]

    # radar: class gamma0, terrain geometry (GRD keeps it, RTC flattens it), shared multiplicative speckle
    gamma0 = 10 ** ((BACKSCATTER[ground] + 1.5 * texture[..., None]) / 10)        # (H, W, 2) linear
    if (ground == CROPS).any():
        gamma0[ground == CROPS] *= green[ground == CROPS, None] ** 1.5
    cos_local = np.clip(np.tensordot(RADAR_LOOK, normal, 1), 0.05, 1)
    geometry = np.sqrt(1 - cos_local ** 2).clip(0.1) ** -1 * np.sin(np.radians(38)) * np.cos(np.radians(38))
    speckle = rng.gamma(4.4, 1 / 4.4, (n, n, 2))
    rtc = 10 * np.log10(gamma0 * speckle * geometry[..., None] ** 0.1)
    grd = 10 * np.log10(gamma0 * speckle * geometry[..., None])

    caption = _caption(rng, ground, lulc, terrain, river.any(), lake.any(), opacity.mean())
    return {"S2L1C": np.clip(l1c, 0, 32767).astype(np.int16), "S2L2A": refl.astype(np.int16),
            "S2RGB": np.clip(refl[..., [3, 2, 1]] * 255 / 2000, 0, 255).astype(np.uint8),  # = real S2RGB/L2A
            "S1GRD": grd.astype(np.float32), "S1RTC": rtc.astype(np.float32),
            "DEM": np.round(dem).astype(np.int16), "LULC": lulc,
            "NDVI": ((nir - red) / (nir + red)).astype(np.float32),                # as TerraMesh computes it
            "caption": caption, "coords": format_coords(lon, lat),
            "label_water": water.astype(np.int16)}


def _caption(rng, ground, lulc, terrain, river, lake, cloudiness) -> str:
    share = np.bincount(lulc.ravel(), minlength=10) / lulc.size
    order = [c for c in np.argsort(-share) if share[c] > 0.04 and c != NO_DATA]
    phrase = [str(rng.choice(CAPTION_PHRASES[c])) for c in order]
    relief = {"flat": ["flat", "low-lying", "level"], "rolling": ["gently rolling", "undulating"],
              "hilly": ["hilly", "rugged"], "mountainous": ["mountainous", "steep alpine"]}[terrain]
    relief = str(rng.choice(relief))
    rest = phrase[1:3]
    mix = f" with {' and '.join(rest)}" if rest else ""
    templates = [f"A {relief} landscape dominated by {phrase[0]}{mix}.",
                 f"Satellite view of {phrase[0]}{mix} in {relief} terrain.",
                 f"Mostly {phrase[0]}{mix}; the terrain is {relief}.",
                 f"This {relief} area is mostly {phrase[0]}{mix}."]
    text = str(rng.choice(templates))
    if river:
        text += str(rng.choice([" A river crosses the scene.", " A river winds through the valley."]))
    if lake:
        text += str(rng.choice([" Water fills a low basin.", " There is a lake."]))
    if cloudiness > 0.1 and order[0] != CLOUDS:
        text += " Partly cloudy."
    return text


def synthesize(out, n=2000, size=64, seed=0, workers=None):
    """Writes n synthetic samples in the TerraMesh layout under `out`, plus splits/{train,val,test}.txt
    (80/10/10) and the water-mapping labels in `label_water/`. Deterministic in (seed, sample index)."""
    out = Path(out)
    for m in list(MODALITIES) + ["label_water", "splits"]:
        (out / m).mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, size, str(out)) for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            list(tqdm(pool.imap_unordered(_write_sample, jobs, chunksize=16), total=n, desc="synth"))
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



# -----------------------------------------------------------------------------------------------------------
# The same world in the published layout: tar shards of zarr.zip samples

# the dtypes of the published TerraMesh arrays (S1 in float16 dB; NDVI ours: the dataset card says float)
PUBLISHED_DTYPES = {"S2L1C": "<i2", "S2L2A": "<i2", "S2RGB": "|u1", "S1GRD": "<f2", "S1RTC": "<f2", "DEM": "<i2",
                    "LULC": "|u1", "NDVI": "<f4"}
OPTICAL = ("S2L1C", "S2L2A", "S2RGB", "NDVI")                       # the modalities that carry a cloud_mask
SUBSET_S1 = {"majortom": "S1RTC", "ssl4eos12": "S1GRD"}             # the one S-1 product of each subset
SYNTH_TIME_NS = 1_561_000_000_000_000_000                           # 2019-06-20, the acquisition time we write
BAND_DIMS = {"bands": {"_ARRAY_DIMENSIONS": ["time", "band", "y", "x"]}}   # xarray's dimension names


def published(sample: dict) -> dict:
    """A synth_sample's image modalities as the published arrays: (time=1, band, y, x) in PUBLISHED_DTYPES."""
    out = {}
    for m in IMAGE_MODALITIES:
        x = sample[m][..., None] if sample[m].ndim == 2 else sample[m]                   # (H, W, C)
        out[m] = np.moveaxis(x, -1, 0)[None].astype(PUBLISHED_DTYPES[m])              # (1, C, H, W)
    return out


def zarr_member(bands: np.ndarray, m: str, coords: str, clouds: np.ndarray) -> bytes:
    """One modality of one sample as a `<key>.zarr.zip` member: bands, centre, time and, optical, cloud_mask."""
    lon, lat = parse_coords(coords)
    arrays = {"bands": bands, "center_lat": np.array(lat), "center_lon": np.array(lon),
              "time": np.array(0 if m == "DEM" else SYNTH_TIME_NS, "<i8")}                # DEM has time 0
    if m in OPTICAL:
        arrays["cloud_mask"] = clouds[None].astype(np.uint8)                              # (time, y, x)
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
    """The world's splits, 80/10/10 of a permutation of the sample indices: {split: sorted indices}."""
    ids = np.random.default_rng(seed).permutation(n)
    cut = [int(0.8 * n), int(0.9 * n)]
    parts = np.split(ids, cut)
    return {name: np.sort(part) for name, part in zip(("train", "val", "test"), parts)}


def synthesize_shards(out, n=400, size=264, seed=0, workers=None, shard_size=64):
    """Writes the synthetic world in the published layout, split as the GeoTIFF world is (`world_splits`):
    train/, val/ and our extra test/ split, `shard_size` samples per tar (at least two tars per split),
    the first half of each split's shards majortom (S1RTC), the rest ssl4eos12 (S1GRD); ours: TerraMesh's
    shards are 89% majortom. Beside the modalities, our extras: caption/ (`<key>.txt`) and label_water/
    (`<key>.zarr.zip`). Deterministic in (seed, sample index)."""
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
            samples = list(tqdm(pool.imap(_sample_members, jobs, chunksize=4), total=len(jobs), desc=name))
    else:
        samples = list(tqdm(map(_sample_members, jobs), total=len(jobs), desc=name))
    for m in samples[0]:
        suffix = member_suffix(m)
        members = {f"{i:05d}{suffix}": sample[m] for (_, i, _, _), sample in zip(jobs, samples)}
        write_shard(folder / m / name, members)
