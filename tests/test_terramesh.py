"""The data stage: the modality table against the official constants, real TerraMesh tiles, bad input, the synthetic
world's physical correlations, pictures and checkpoints."""
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import synthetic
import terramesh as tm
from checkpoints import load_safetensors, save_safetensors
from geotiff import TIFF_LAYOUT, read_tiff, write_geotiff
from modalities import (CLOUDS, CROPS, LULC_CLASSES, LULC_COLORS, MODALITIES, SNOW,
                        TOKENIZED_IMAGES, TREES, WATER, destandardize, modality,
                        parse_coords, standardize)
from pictures import save_png, save_sheet
from render import render

ROOT = Path(__file__).resolve().parents[1]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPEC = ASSETS / "official" / "standardization.md"
REAL = ASSETS / "terramesh"
REAL_IDS = ["38D_378R_2_3", "637U_59R_1_3"]


# ---------------------------------------------------------------------------------------------------------
# The modality table against the official constants and keys (assets/official)

def _spec_constants():
    """Parses the official standardization table (assets/official/standardization.md): {key: (mean, std)}."""
    out = {}
    for line in SPEC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.match(r"^(un)?tok_\w+@224", cells[0]):
            if not re.match(r"^-?\d", cells[1]):
                continue
            keys = re.findall(r"(?:un)?tok_\w+@224", cells[0])
            mean = tuple(float(v) for v in cells[1].split(","))
            std = tuple(float(v.split()[0]) for v in cells[2].split(","))
            for k in keys:
                out[k] = (mean, std)
    return out


def test_normalization_constants_match_spec():
    spec = _spec_constants()
    assert len(spec) == 12
    checked = 0
    for m in MODALITIES.values():
        for key in (m.pixel_key, m.token_key):
            if key in spec:
                assert m.mean == spec[key][0], (m.name, key)
                assert m.std == spec[key][1], (m.name, key)
                checked += 1
    assert checked == 12   # 6 pixel keys + 6 token keys: every entry of the official table


def test_keys_and_channels_match_official_state_dict():
    shapes = {}
    for line in (ASSETS / "official" / "keys" / "terramind_tiny_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    for m in MODALITIES.values():
        if m.pixel_key:   # bias-free Linear over (16 x 16 x C) pixel features
            assert shapes[f"encoder_embeddings.{m.pixel_key}.proj.weight"] == (192, m.channels * 256)
        if m.token_key and m.name != "caption":   # the v1 checkpoints carry no caption table
            assert shapes[f"encoder_embeddings.{m.token_key}.token_emb.weight"][0] == m.vocab_size
        if m.fsq_levels:
            assert int(np.prod(m.fsq_levels)) == m.vocab_size


def test_table_facts():
    assert list(MODALITIES) == ["S2L1C", "S2L2A", "S2RGB", "S1GRD", "S1RTC", "DEM", "LULC", "NDVI",
                                   "caption", "coords"]
    assert MODALITIES["S2L1C"].bands[9:11] == ("WATER_VAPOR", "CIRRUS")      # B10 after B9
    assert "CIRRUS" not in MODALITIES["S2L2A"].bands
    assert MODALITIES["S2RGB"].bands == ("RED", "GREEN", "BLUE")
    assert MODALITIES["LULC"].vocab_size == 4375 and MODALITIES["NDVI"].vocab_size == 15360
    assert MODALITIES["coords"].vocab_size == 30000 and MODALITIES["coords"].max_length == 4
    assert TOKENIZED_IMAGES == ("S2L2A", "S1GRD", "S1RTC", "DEM", "LULC", "NDVI")
    assert len(LULC_CLASSES) == 10 and LULC_CLASSES[WATER] == "water"
    with pytest.raises(KeyError, match="known"):
        modality("S3OLCI")


def test_standardize_round_trip():
    x = np.random.default_rng(0).uniform(0, 1e4, (2, 12, 8, 8)).astype(np.float32)
    z = standardize("S2L2A", x)
    assert np.allclose(z[0, 3], (x[0, 3] - 1853.91) / 2134.138, atol=1e-5)
    assert np.allclose(destandardize("S2L2A", z), x, rtol=1e-5, atol=1e-2)
    t = torch.from_numpy(x[:, :2])
    assert torch.allclose(destandardize("S1GRD", standardize("S1GRD", t)), t, atol=1e-3)
    with pytest.raises(ValueError, match="12 bands"):
        standardize("S2L2A", x[:, :5])


# ---------------------------------------------------------------------------------------------------------
# Real TerraMesh tiles

def test_real_tiles_load():
    ds = tm.TerraMeshDataset(REAL)
    assert ds.ids == REAL_IDS
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {"S2L1C", "S2L2A", "S2RGB", "S1RTC", "DEM", "LULC", "NDVI"}
        for m, x in s.items():
            if m == "LULC":
                assert x.shape == (224, 224) and x.dtype == torch.int64
                assert 0 < x.min() and x.max() <= 9
                continue
            assert x.shape == (MODALITIES[m].channels, 224, 224) and x.dtype == torch.float32
            assert torch.isfinite(x).all()
            assert x.abs().max() < 8 and x.mean().abs() < 2, m    # standardized: roughly unit scale
    # site 1 is 89% crops (README); its DEM is near sea level (Denmark)
    lulc = ds[1]["LULC"]
    assert (lulc == CROPS).float().mean() > 0.8
    assert destandardize("DEM", ds[1]["DEM"]).max() < 50


def test_real_tile_crop_and_geotags(tmp_path):
    ds = tm.TerraMeshDataset(REAL, modalities=["S2L2A", "LULC"], size=64, crop="random", seed=3)
    a, b = ds[0], ds[0]
    assert torch.equal(a["S2L2A"], b["S2L2A"]) and a["S2L2A"].shape == (12, 64, 64)
    full = tm.TerraMeshDataset(REAL, modalities=["S2L2A", "LULC"], size=None)[0]
    top, left = ds._window(0, 224, 224, {"x": (None, None)})
    assert torch.equal(a["LULC"], full["LULC"][top:top + 64, left:left + 64])     # same window everywhere
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["S2L2A"], a["S2L2A"])
    x, geo = read_tiff(REAL / "DEM" / f"{REAL_IDS[1]}.tif")
    write_geotiff(tmp_path / "dem.tif", x[None, 10:20, 30:50], geo, offset=(10, 30))
    y, geo2 = read_tiff(tmp_path / "dem.tif")
    assert np.array_equal(y, x[10:20, 30:50])
    assert geo2[34737] == geo[34737] and geo2[34735] == geo[34735]
    assert geo2[33922][3] == pytest.approx(geo[33922][3] + 30 * geo[33550][0])
    assert geo2[33922][4] == pytest.approx(geo[33922][4] - 10 * geo[33550][1])


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file and the problem

def _tiny_root(tmp_path, modalities=("S2L2A", "S1GRD", "DEM")):
    root = tmp_path / "root"
    s = synthetic.synth_sample(0, 1, 32)
    for m in modalities:
        (root / m).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / m / "a.tif", s[m], **TIFF_LAYOUT[s[m].ndim])
    return root, s


def test_truncated_and_unreadable_tiff(tmp_path):
    root, _ = _tiny_root(tmp_path)
    path = root / "S2L2A" / "a.tif"
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[: len(data) - 2000], b"not a tiff at all", b""):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=r"S2L2A/a\.tif: cannot read TIFF"):
            tm.TerraMeshDataset(root, size=None)[0]


def test_wrong_band_count(tmp_path):
    root, s = _tiny_root(tmp_path)
    tifffile.imwrite(root / "S1GRD" / "a.tif", s["S2L2A"][..., :3], **TIFF_LAYOUT[3])
    with pytest.raises(ValueError, match=r"S1GRD/a\.tif: expected 2 band\(s\), got .*\(32, 32, 3\)"):
        tm.TerraMeshDataset(root, size=None)[0]


def test_channel_first_accepted(tmp_path):
    root, s = _tiny_root(tmp_path)
    ref = tm.TerraMeshDataset(root, size=None)[0]["S2L2A"]
    tifffile.imwrite(root / "S2L2A" / "a.tif", np.moveaxis(s["S2L2A"], -1, 0), photometric="minisblack")
    assert torch.equal(tm.TerraMeshDataset(root, size=None)[0]["S2L2A"], ref)


def test_size_mismatch_across_modalities(tmp_path):
    root, s = _tiny_root(tmp_path)
    tifffile.imwrite(root / "DEM" / "a.tif", s["DEM"][:16, :16])
    with pytest.raises(ValueError, match=r"sample a: modalities differ in size: .*DEM/a\.tif 16x16"):
        tm.TerraMeshDataset(root, size=None)[0]


def test_bad_coords_unknown_folder_and_small_tile(tmp_path):
    root, _ = _tiny_root(tmp_path)
    (root / "coords").mkdir()
    for text in ("lat=35.75", "lat=abc lon=3", "lat=95.00 lon=10.00", "lon=1.00 lat=2.00"):
        (root / "coords" / "a.txt").write_text(text)
        with pytest.raises(ValueError, match=r"coords/a\.txt: (cannot parse|coords out of range)"):
            tm.TerraMeshDataset(root, size=None)[0]
    (root / "coords" / "a.txt").write_text("lat=35.75 lon=-89.00\n")
    assert tm.TerraMeshDataset(root, size=None)[0]["coords"] == "lat=35.75 lon=-89.00"
    assert parse_coords("lat=35.75 lon=-89.00") == (-89.0, 35.75)
    with pytest.raises(ValueError, match="larger|smaller than the requested size 64"):
        tm.TerraMeshDataset(root, size=64)[0]
    (root / "S2L3A").mkdir()
    with pytest.raises(ValueError, match=r"unknown modality folder\(s\) \['S2L3A'\]"):
        tm.TerraMeshDataset(root)


def test_nan_pixels_become_the_mean(tmp_path):
    root, s = _tiny_root(tmp_path)
    x = s["S1GRD"].copy()
    x[:4, :, 0] = np.nan
    tifffile.imwrite(root / "S1GRD" / "a.tif", x, **TIFF_LAYOUT[3])
    ds = tm.TerraMeshDataset(root, size=None)
    with pytest.warns(UserWarning, match=r"S1GRD/a\.tif: replaced 128 NaN pixels"):
        out = ds[0]["S1GRD"]
    assert ds.nan_replaced == {"S1GRD": 128}
    assert torch.isfinite(out).all() and (out[0, :4] == 0).all()
    assert torch.allclose(destandardize("S1GRD", out)[0, :4], torch.tensor(-12.599))


def test_lulc_class_out_of_range(tmp_path):
    root, s = _tiny_root(tmp_path, ("LULC",))
    tifffile.imwrite(root / "LULC" / "a.tif", np.full((32, 32), 12, np.uint8))
    with pytest.raises(ValueError, match=r"LULC/a\.tif: LULC classes must lie in 0\.\.9"):
        tm.TerraMeshDataset(root, size=None)[0]


# ---------------------------------------------------------------------------------------------------------
# The synthetic world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.synthesize(root, n=120, size=64, seed=7, workers=1)
    return root


def test_synth_layout_and_determinism(world):
    ds = tm.TerraMeshDataset(world, size=64, labels="label_water")
    assert len(ds) == 120 and set(ds.modalities) == set(MODALITIES)
    splits = {k: (world / "splits" / f"{k}.txt").read_text().split() for k in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [96, 12, 12]
    assert not set(splits["train"]) & set(splits["test"])
    assert len(tm.TerraMeshDataset(world, split="val")) == 12
    a, b = synthetic.synth_sample(7, 5, 64), synthetic.synth_sample(7, 5, 64)
    assert all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
    x, _ = read_tiff(world / "S2L2A" / "00005.tif")
    assert np.array_equal(x, a["S2L2A"]) and x.dtype == np.int16


def _pool(world, n=120):
    """All pixels of the world: physical values per modality, flattened."""
    out = {m: [] for m in ("S2L2A", "S1GRD", "S1RTC", "DEM", "LULC", "NDVI", "label_water")}
    for i in range(n):
        for m in out:
            x, _ = read_tiff(world / m / f"{i:05d}.tif")
            out[m].append(x.reshape(64 * 64, -1))
    return {m: np.concatenate(v) for m, v in out.items()}


def test_synth_correlations(world):
    p = _pool(world)
    lulc = p["LULC"][:, 0]
    water, trees, snow, crops = (lulc == WATER), (lulc == TREES), (lulc == SNOW), (lulc == CROPS)
    assert min(water.mean(), trees.mean(), snow.mean(), crops.mean()) > 0.01   # every class occurs
    nir, vv = p["S2L2A"][:, 7], p["S1GRD"][:, 0]
    assert nir[water].mean() < 0.3 * nir[trees].mean()                         # water is dark in NIR
    assert vv[water].mean() < vv[trees].mean() - 8                             # and in radar
    assert p["DEM"][snow, 0].mean() > p["DEM"][crops, 0].mean() + 1000         # snow sits high
    assert p["NDVI"][trees, 0].mean() > 0.6 > 0.0 > p["NDVI"][water, 0].mean()
    assert (p["label_water"][:, 0] == 1)[lulc != CLOUDS].mean() == pytest.approx(
        water[lulc != CLOUDS].mean())
    clouds = lulc == CLOUDS                                                 # bright in optical data,
    assert p["S2L2A"][clouds, 1].mean() > 3 * p["S2L2A"][~clouds & ~snow, 1].mean()
    cloudy_water = clouds & (p["label_water"][:, 0] == 1)                      # invisible to radar
    assert vv[cloudy_water].mean() < vv[clouds & ~cloudy_water].mean() - 5
    # GRD keeps the terrain geometry that RTC flattens: GRD varies more on the same class
    assert np.std(p["S1GRD"][trees, 0]) > np.std(p["S1RTC"][trees, 0])


def test_synth_values_in_real_ranges(world):
    ds = tm.TerraMeshDataset(world, size=64)
    stats = {m: [] for m in ("S2L1C", "S2L2A", "S1GRD", "S1RTC", "DEM", "NDVI")}
    for i in range(0, 120, 4):
        s = ds[i]
        for m in stats:
            stats[m].append(s[m])
    for m, xs in stats.items():
        x = torch.stack(xs)
        assert x.mean().abs() < 0.6 and 0.4 < x.std() < 2.0, (m, x.mean(), x.std())


def test_synth_captions_mention_dominant_class(world):
    hits = 0
    for i in range(120):
        lulc, _ = read_tiff(world / "LULC" / f"{i:05d}.tif")
        dominant = int(np.bincount(lulc.ravel(), minlength=10).argmax())
        caption = (world / "caption" / f"{i:05d}.txt").read_text().lower()
        hits += any(p in caption for p in synthetic.CAPTION_PHRASES[dominant])
        assert parse_coords((world / "coords" / f"{i:05d}.txt").read_text())
    assert hits == 120


def test_synth_climate_by_latitude(world):
    """Snow belongs to high latitudes or high ground; the arid belt has less vegetation."""
    lat, snow, ndvi = [], [], []
    for i in range(120):
        lon_lat = parse_coords((world / "coords" / f"{i:05d}.txt").read_text())
        x, _ = read_tiff(world / "LULC" / f"{i:05d}.tif")
        n, _ = read_tiff(world / "NDVI" / f"{i:05d}.tif")
        lat.append(abs(lon_lat[1]))
        snow.append((x == SNOW).mean())
        ndvi.append(n.mean())
    lat, snow, ndvi = map(np.array, (lat, snow, ndvi))
    assert snow[lat > 55].mean() > 3 * snow[lat < 35].mean()
    assert ndvi[(lat > 18) & (lat < 32)].mean() < ndvi[lat < 10].mean()


# ---------------------------------------------------------------------------------------------------------
# Pictures and checkpoints

def _read_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, -1)
    assert (rows[:, 0] == 0).all() and depth == 8 and b"IEND" in chunks
    return rows[:, 1:].reshape(h, w, 3 if color == 2 else 1)


def test_png_round_trip_and_render(tmp_path, world):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", rgb)
    assert np.array_equal(_read_png(tmp_path / "a.png"), rgb)
    lulc = np.array([[WATER, TREES], [CROPS, CLOUDS]])
    assert np.array_equal(render("LULC", lulc)[0, 0], LULC_COLORS[WATER])
    logits = torch.nn.functional.one_hot(torch.from_numpy(lulc), 10).permute(2, 0, 1).float()
    assert np.array_equal(render("LULC", logits), render("LULC", lulc))
    s = tm.TerraMeshDataset(world, size=64)[3]
    for m in ("S2L2A", "S2L1C", "S2RGB", "S1GRD", "S1RTC", "DEM", "NDVI"):
        img = render(m, s[m], standardized=True)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0
    save_sheet(tmp_path / "sheet.png", [("S2L2A", img), ("LULC", render("LULC", s["LULC"]))],
                  lines=["lat=1.00 lon=2.00"])
    sheet = _read_png(tmp_path / "sheet.png")
    assert sheet.shape[0] > 128 and sheet.shape[1] > 2 * 128


def test_show_command(tmp_path, world, capsys):
    tm._show(world, "00003", tmp_path / "s.png")
    assert "S2L2A" in capsys.readouterr().out
    assert _read_png(tmp_path / "s.png").shape[1] > 9 * 128
    with pytest.raises(FileNotFoundError, match="no sample with id"):
        tm._show(world, "nope", tmp_path / "t.png")


def test_show_never_replaces_a_file_without_overwrite(tmp_path, world):
    """The PNG of `show` is refused where a file exists, before any tile is read; --overwrite replaces it."""
    out = tmp_path / "mine.png"
    out.write_bytes(b"a user's file")
    cmd = [sys.executable, str(ROOT / "terramesh.py"), "show", "--root", str(world), "--id", "00003",
           "--out", str(out)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1 and "the file exists; pass --overwrite" in refused.stderr
    assert out.read_bytes() == b"a user's file"
    replaced = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert replaced.returncode == 0, replaced.stderr
    assert _read_png(out).shape[1] > 9 * 128


def test_stats_match_computed(world):
    stats = tm.dataset_stats(world, limit=10)
    x = np.stack([read_tiff(world / "DEM" / f"{i:05d}.tif")[0] for i in range(10)]).astype(np.float64)
    assert stats["DEM"][0][0] == pytest.approx(x.mean()) and stats["DEM"][1][0] == pytest.approx(x.std())


def test_checkpoint_round_trip_and_corruption(tmp_path):
    w = torch.randn(4, 3)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": w, "tied": w, "n": torch.arange(3)}, {"config": {"dim": 3}})
    tensors, meta = load_safetensors(path)
    assert torch.equal(tensors["tied"], w) and meta == {"config": {"dim": 3}}
    good = path.read_bytes()
    path.write_bytes(good[:-7])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_safetensors(path)
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_safetensors(path)
    assert not list(tmp_path.glob("*.tmp*"))
