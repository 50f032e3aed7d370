"""The published TerraMesh format: tar shards of zarr.zip samples read by hand (terramesh_shards.py) against what
the real zarr library returned for the same files (tests/fixtures/zarr_samples, made by make_zarr_fixtures.py), the LZ4
and shuffle decoders against their format documents, and clear errors for bad shards."""
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import shard_index as si
import terramesh_shards as ts

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "zarr_samples"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
SAMPLES = sorted({key.split("/")[0] for key in EXPECTED})


@pytest.fixture
def hand_written(monkeypatch):
    """The hand-written decoders, whether or not numcodecs is importable here."""
    monkeypatch.setattr(ts, "USE_NUMCODECS", False)
    monkeypatch.setattr(ts, "numcodecs", None)


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "codecs.tar"
    shutil.copy(FIXTURES / "codecs.tar", path)
    return path


def group(shard, sample):
    index = si.tar_index(shard)
    k = index["names"].index(f"{sample}.zarr.zip")
    data = si.read_member(shard, index["names"][k], index["offsets"][k], index["sizes"][k])
    return ts.ZarrGroup(data, f"{shard}, member {sample}")


# ---------------------------------------------------------------------------------------------------------
# Values and metadata equal what zarr returned


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s != "zstd_bitshuffle"])
def test_values_and_metadata_equal_zarr(shard, sample, hand_written):
    expected = np.load(FIXTURES / "expected.npz")
    g = group(shard, sample)
    arrays = [key.split("/", 1)[1] for key in EXPECTED if key.startswith(f"{sample}/")]
    assert sorted(arrays) == sorted(name[:-len("/.zarray")] for name in g.meta if name.endswith("/.zarray"))
    for name in arrays:
        want, meta = expected[f"{sample}/{name}"], EXPECTED[f"{sample}/{name}"]
        got = g.read(name)
        za = g.zarray(name)
        assert got.dtype == want.dtype and got.dtype.str == meta["dtype"], (sample, name)
        assert got.shape == want.shape == tuple(meta["shape"])
        np.testing.assert_array_equal(got, want)
        assert (za["chunks"], za["order"], za["fill_value"], za["compressor"]) == \
            (meta["chunks"], meta["order"], meta["fill_value"], meta["compressor"])


def test_fixtures_cover_the_decoding_paths():
    """Zarr's default Blosc-LZ4 byte shuffle with split blocks, bit shuffle with a leftover block, order F,
    a missing chunk, big-endian, zlib, Blosc-zlib and no compression: the fixture is what the tests claim."""
    compressors = {k.split("/")[0]: v["compressor"] for k, v in EXPECTED.items() if k.endswith("/bands")}
    assert compressors["lz4_default"] == {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
    assert compressors["lz4_bitshuffle"]["shuffle"] == 2 and compressors["zstd_bitshuffle"]["cname"] == "zstd"
    assert compressors["zlib"]["id"] == "zlib" and compressors["raw"] is None
    assert EXPECTED["lz4_bitshuffle/bands"]["order"] == "F" and EXPECTED["raw/bands"]["dtype"] == ">i2"
    with tarfile.open(FIXTURES / "codecs.tar") as tar:
        zipped = zipfile.ZipFile(io.BytesIO(tar.extractfile("lz4_shuffle.zarr.zip").read()))
    assert "bands/0.0.0.0" not in zipped.namelist() and "bands/0.0.0.1" in zipped.namelist()


def test_zstd_is_a_clear_error_without_numcodecs(shard, hand_written):
    message = r"codecs.tar, member zstd_bitshuffle, array bands.*blosc-zstd.*numcodecs"
    with pytest.raises(ValueError, match=message):
        group(shard, "zstd_bitshuffle").read("bands")


def test_numcodecs_path_when_installed(shard):
    pytest.importorskip("numcodecs", reason="the optional numcodecs fast path needs the numcodecs package")
    expected = np.load(FIXTURES / "expected.npz")
    for sample in SAMPLES:
        np.testing.assert_array_equal(group(shard, sample).read("bands"), expected[f"{sample}/bands"])


def test_read_sample(shard, hand_written):
    index = si.tar_index(shard)
    k = index["names"].index("lz4_shuffle.zarr.zip")
    sample = ts.read_sample(shard, index["names"][k], index["offsets"][k], index["sizes"][k])
    expected = np.load(FIXTURES / "expected.npz")
    np.testing.assert_array_equal(sample["bands"], expected["lz4_shuffle/bands"])
    np.testing.assert_array_equal(sample["cloud_mask"], expected["lz4_shuffle/cloud_mask"])
    scalars = (sample["center_lat"], sample["center_lon"], sample["time"])
    assert scalars == (47.125, -3.5, 1_561_000_000_000_000_000)


# ---------------------------------------------------------------------------------------------------------
# The decoders against their format documents


def test_lz4_block_by_the_format_document():
    """Hand-assembled blocks (lz4 doc/lz4_Block_format.md): literals, a match, an overlapping match (offset 1
    repeats one byte), length bytes of 255, and the last sequence of literals only."""
    block = bytes([0x11, ord("a"), 1, 0, 0x50]) + b"bcdef"                 # 'a', match 5 at offset 1, 'bcdef'
    assert ts.lz4_decompress(block, 11) == b"aaaaaabcdef"
    literals = bytes(range(256)) * 2
    block = bytes([0xF0, 255, 2]) + literals[:272] + bytes([0x00])        # 15 + 255 + 2 = 272 literals
    assert ts.lz4_decompress(block[:-1], 272) == literals[:272]
    block = bytes([0x3F, 1, 2, 3, 3, 0, 255, 1, 0x00])                   # match 4 + 15 + 255 + 1 = 275 at offset 3
    assert ts.lz4_decompress(block, 278) == (b"\x01\x02\x03" * 93)[:278]
    with pytest.raises(ValueError, match="corrupt lz4 block"):
        ts.lz4_decompress(bytes([0x10, 7, 0, 0, 0x00]), 5)               # offset 0 is invalid
    with pytest.raises(ValueError, match="corrupt lz4 block"):
        ts.lz4_decompress(bytes([0x50, 1, 2]), 5)                         # ends inside the literals


def test_bit_unshuffle_inverts_the_bit_transpose():
    """Bit row 8j+k holds bit k of byte j of every element, 8 elements per byte, least significant first."""
    x = np.random.default_rng(0).integers(0, 2 ** 16, 64).astype("<u2")
    bits = np.unpackbits(x.view(np.uint8).reshape(64, 2), axis=1, bitorder="little")     # (element, 16 bits)
    rows = np.packbits(bits.T, axis=1, bitorder="little")                                # (16 rows, 8 bytes)
    assert ts.bit_unshuffle(rows.tobytes(), 2) == x.tobytes()


# ---------------------------------------------------------------------------------------------------------
# The tar index


def test_index_is_cached_and_matches_tarfile(shard, monkeypatch):
    with tarfile.open(shard) as tar:
        truth = [(m.name, m.offset_data, m.size) for m in tar]
    index = si.tar_index(shard)
    assert list(zip(index["names"], index["offsets"], index["sizes"])) == truth
    assert (shard.parent / f".{shard.name}.index.json").exists()
    monkeypatch.setattr(si, "_scan_tar", lambda *a: pytest.fail("rescanned a shard whose index is cached"))
    assert si.tar_index(shard)["names"] == index["names"]


def test_index_of_a_read_only_folder_goes_to_the_user_cache(shard, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    replace = os.replace

    def read_only_dataset(src, dst):   # chmod does not stop root: refuse writes beside the shard instead
        if Path(dst).parent == shard.parent:
            raise PermissionError(13, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(si.os, "replace", read_only_dataset)
    index = si.tar_index(shard)
    cached = list((tmp_path / "cache" / "terramind" / "tar_index").glob("codecs-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["names"] == index["names"]
    assert not list(shard.parent.glob(".*.json*"))


# ---------------------------------------------------------------------------------------------------------
# Bad shards: one clear line naming the shard, the member, the array and the codec


def write_tar(path, members: dict):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def member(shard, name):
    with tarfile.open(shard) as tar:
        return tar.extractfile(name).read()


def rezip(data: bytes, change) -> bytes:
    """A copy of a zarr.zip whose entries pass through change(name, bytes) -> bytes or None (dropped)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            new = change(name, src.read(name))
            if new is not None:
                dst.writestr(name, new)
    return out.getvalue()


def test_truncated_tar(shard):
    shard.write_bytes(shard.read_bytes()[:30_000])
    with pytest.raises(ValueError, match=r"codecs.tar: not a readable tar, truncated\?"):
        si.tar_index(shard)


def test_member_that_is_not_a_zip(tmp_path):
    bad = write_tar(tmp_path / "bad.tar", {"k1.zarr.zip": b"this is not a zip file at all"})
    index = si.tar_index(bad)
    with pytest.raises(ValueError, match=r"bad.tar, member k1.zarr.zip: not a zip file"):
        ts.read_sample(bad, "k1.zarr.zip", index["offsets"][0], index["sizes"][0])


def test_zip_without_zmetadata(shard, tmp_path):
    data = rezip(member(shard, "zlib.zarr.zip"), lambda name, b: None if name == ".zmetadata" else b)
    bad = write_tar(tmp_path / "bad.tar", {"k2.zarr.zip": data})
    index = si.tar_index(bad)
    with pytest.raises(ValueError, match=r"bad.tar, member k2.zarr.zip: the zip has no .zmetadata"):
        ts.read_sample(bad, "k2.zarr.zip", index["offsets"][0], index["sizes"][0])


def consolidated(change_zarray):
    def change(name, data):
        if name != ".zmetadata":
            return data
        meta = json.loads(data)
        change_zarray(meta["metadata"]["bands/.zarray"])
        return json.dumps(meta).encode()
    return change


@pytest.mark.parametrize("sample", ["zlib", "lz4_default", "raw"])
def test_chunk_size_disagrees_with_zarray(shard, tmp_path, sample, hand_written):
    def wider(za):
        za["chunks"][-1] += 1
    bad = write_tar(tmp_path / "bad.tar", {"k3.zarr.zip": rezip(member(shard, f"{sample}.zarr.zip"),
                                                                consolidated(wider))})
    index = si.tar_index(bad)
    with pytest.raises(ValueError, match=r"bad.tar, member k3.zarr.zip, array bands, chunk bands/0\.0\.0\.0.*"
                                         r"(decompressed to \d+ bytes|lz4 block decompressed to)"):
        ts.read_sample(bad, "k3.zarr.zip", index["offsets"][0], index["sizes"][0])


def test_unsupported_codec_and_filter(shard, tmp_path, hand_written):
    def lzma(za):
        za["compressor"] = {"id": "lzma", "preset": 1}

    def delta(za):
        za["filters"] = [{"id": "delta", "dtype": "<i2"}]
    for change, message in [(lzma, r"array bands, chunk bands/0.0.0.0: unsupported codec 'lzma'"),
                            (delta, r"array bands: unsupported zarr filters \['delta'\]")]:
        bad = write_tar(tmp_path / "bad.tar", {"k4.zarr.zip": rezip(member(shard, "zlib.zarr.zip"),
                                                                    consolidated(change))})
        index = si.tar_index(bad)
        with pytest.raises(ValueError, match=r"bad.tar, member k4.zarr.zip, " + message):
            ts.read_sample(bad, "k4.zarr.zip", index["offsets"][0], index["sizes"][0])
        os.remove(bad)


# ---------------------------------------------------------------------------------------------------------
# The published layout through TerraMeshDataset: the same samples as the GeoTIFF layout


def write_both_layouts(tmp_path, n=3, size=264):
    """The same synthetic samples as published shards (zarr.zip, S1 in float16) and as GeoTIFFs of the
    same stored values: ids 00000.. in train/, the last one in val/ (an ssl4eos12 shard: S1GRD, no S1RTC)."""
    import tifffile
    import synthetic
    from geotiff import write_text
    from modalities import CLOUDS
    tiffs, shards = tmp_path / "tiff", tmp_path / "shards"
    members = {}
    for i in range(n):
        sample = synthetic.synth_sample(0, i, size)
        split, subset = ("train", "majortom") if i < n - 1 else ("val", "ssl4eos12")
        clouds = sample["LULC"] == CLOUDS
        for m, bands in synthetic.published(sample).items():
            if m == synthetic.SUBSET_S1["majortom" if subset == "ssl4eos12" else "ssl4eos12"]:
                continue
            name = f"{split}/{m}/{subset}_shard_{1 if split == 'train' else 2:06d}.tar"
            members.setdefault(name, {})[f"{i:05d}.zarr.zip"] = synthetic.zarr_member(bands, m, sample["coords"],
                                                                                         clouds)
            (tiffs / m).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tiffs / m / f"{i:05d}.tif", np.moveaxis(bands[0], 0, -1))        # channel-last
        write_text(tiffs / "coords" / f"{i:05d}.txt", sample["coords"] + "\n")
    for name, files in members.items():
        ts.write_shard(shards / name, files)
    return tiffs, shards


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_both_layouts(tmp_path_factory.mktemp("layouts"))


def test_centre_crop_of_a_264_px_sample_equals_the_geotiff_path(layouts):
    import terramesh as tm
    from modalities import MODALITIES
    tiffs, shards = layouts
    a, b = tm.TerraMeshDataset(tiffs, size=224), tm.TerraMeshDataset(shards, size=224)
    assert b.published and not a.published
    assert b.ids == a.ids == ["00000", "00001", "00002"]
    assert b.modalities == [m for m in MODALITIES if m != "caption"]
    for k in range(len(a)):
        x, y = a[k], b[k]
        assert sorted(x) == sorted(y), k
        for m in x:
            if isinstance(x[m], str):
                assert x[m] == y[m]
            else:
                assert x[m].shape[-2:] == (224, 224) and x[m].dtype == y[m].dtype
                assert torch.equal(x[m], y[m]), (k, m)


def test_missing_s1_product_and_splits(layouts):
    import terramesh as tm
    _, shards = layouts
    train, val = tm.TerraMeshDataset(shards, split="train", size=None), tm.TerraMeshDataset(shards, split="val")
    assert train.ids == ["00000", "00001"] and val.ids == ["00002"]
    assert "S1RTC" in train.available(0) and "S1GRD" not in train.available(0) and "S1GRD" not in train[0]
    assert "S1GRD" in val[0] and "S1RTC" not in val[0] and train[0]["S2L2A"].shape == (12, 264, 264)
    assert str(train.files["DEM"]["00001"]).endswith("majortom_shard_000001.tar, member 00001.zarr.zip")
    assert tm.dataset_modalities(shards, "val") == ["S2L1C", "S2L2A", "S2RGB", "S1GRD", "DEM", "LULC", "NDVI",
                                                    "coords"]
    assert tm.has_split(shards, "val") and not tm.has_split(shards, "test")
    with pytest.raises(ValueError, match="no split folder 'test'; the published layout has train/ and val/"):
        tm.TerraMeshDataset(shards, split="test")
    assert len(tm.TerraMeshDataset(shards, labels="label_water")) == 0      # no label folder: no sample


def test_coords_only_and_unknown_folder(layouts, tmp_path):
    import terramesh as tm
    tiffs, shards = layouts
    coords = tm.TerraMeshDataset(shards, ["coords"])
    assert [coords[k]["coords"] for k in range(3)] == [(tiffs / "coords" / f"{i:05d}.txt").read_text().strip()
                                                       for i in range(3)]
    shutil.copytree(shards, tmp_path / "s")
    (tmp_path / "s" / "train" / "S3OLCI").mkdir()
    ts.write_shard(tmp_path / "s" / "train" / "S3OLCI" / "x.tar", {"00000.zarr.zip": b""})
    with pytest.raises(ValueError, match=r"unknown modality folder\(s\) \['S3OLCI'\] in train/val"):
        tm.TerraMeshDataset(tmp_path / "s")


def test_written_samples_read_by_zarr(layouts, tmp_path):
    zarr = pytest.importorskip("zarr", reason="reading our zarr.zip with the real library needs the zarr package")
    _, shards = layouts
    shard = shards / "val" / "S1GRD" / "ssl4eos12_shard_000002.tar"
    index = si.tar_index(shard)
    path = tmp_path / "sample.zarr.zip"
    path.write_bytes(si.read_member(shard, index["names"][0], index["offsets"][0], index["sizes"][0]))
    group = zarr.open_consolidated(zarr.ZipStore(str(path), mode="r"), mode="r")
    mine = ts.read_sample(shard, index["names"][0], index["offsets"][0], index["sizes"][0])
    assert group["bands"].dtype == np.float16 and group["bands"].shape == (1, 2, 264, 264)
    np.testing.assert_array_equal(group["bands"][...], mine["bands"])
    assert group["center_lat"][()] == mine["center_lat"] and group["time"][()] == mine["time"]


def test_tokenizer_crops_and_token_window():
    import modalities
    import tokenizer_data
    assert tokenizer_data.crop_sizes(256) == [224, 240, 256] and tokenizer_data.crop_sizes(64) == [64]
    assert modalities.token_window(264) == (4, 256) and modalities.token_window(224) == (0, 224)
    assert modalities.token_window(72) == (4, 64)
    x = torch.arange(2 * 264 * 264).view(2, 1, 264, 264)
    assert torch.equal(tokenizer_data.token_window(x), x[..., 4:260, 4:260])
    cut = modalities.whole_patches({"S2L2A": x[0], "LULC": x[0, 0], "coords": "lat=1.00 lon=2.00"})
    assert torch.equal(cut["S2L2A"], x[0, :, 4:260, 4:260]) and cut["LULC"].shape == (256, 256)
    assert cut["coords"] == "lat=1.00 lon=2.00"
    torch.manual_seed(0)
    sides = set()
    for _ in range(40):
        crop = tokenizer_data.random_crop(x, [224, 240, 256])
        s = crop.shape[-1]
        sides.add(s)
        top, left = divmod(int(crop[0, 0, 0, 0]) - 0, 264)                   # the window's first pixel
        assert torch.equal(crop[0], x[0, :, top:top + s, left:left + s])
    assert sides == {224, 240, 256}
    y = torch.zeros(3, 2, 64, 64)
    assert tokenizer_data.random_crop(y, [64]) is y                             # tiles of the preset size: as is


def test_stats_and_show_on_the_published_layout(layouts, tmp_path):
    import terramesh as tm
    tiffs, shards = layouts
    a, b = tm.dataset_stats(tiffs), tm.dataset_stats(shards)
    assert sorted(a) == sorted(b) and b["S2L2A"][2] == 3 and b["S1GRD"][2] == 1
    for m in a:
        np.testing.assert_allclose(b[m][0], a[m][0], rtol=1e-12)
        np.testing.assert_allclose(b[m][1], a[m][1], rtol=1e-9)
    tm._show(shards, "00002", tmp_path / "show.png")
    assert (tmp_path / "show.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no sample with key 'nope'"):
        tm._show(shards, "nope", tmp_path / "show.png")


def test_synthetic_world_in_the_published_layout(tmp_path):
    import synthetic
    import terramesh as tm
    from modalities import destandardize
    synthetic.synthesize_shards(tmp_path, n=10, size=72, workers=1)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/S2L2A/*.tar"))
    assert names == ["test/S2L2A/majortom_shard_000001.tar",          # 10 samples: 8 / 1 / 1
                     "train/S2L2A/majortom_shard_000001.tar", "train/S2L2A/ssl4eos12_shard_000002.tar",
                     "val/S2L2A/majortom_shard_000001.tar"]
    assert not list(tmp_path.glob("*/S1GRD/majortom*")) and not list(tmp_path.glob("*/S1RTC/ssl4eos12*"))
    ds = tm.TerraMeshDataset(tmp_path, size=None)
    assert sorted(ds.ids) == [f"{i:05d}" for i in range(10)] and "caption" in ds.modalities
    sample, truth = ds[0], synthetic.synth_sample(0, int(ds.ids[0]), 72)
    assert sample["coords"] == truth["coords"] and sample["S2L2A"].shape == (12, 72, 72)
    assert sample["caption"] == truth["caption"]
    np.testing.assert_array_equal(destandardize("DEM", sample["DEM"].numpy())[0].round(), truth["DEM"])


def test_the_same_world_in_both_layouts(tmp_path):
    """synth --layout shards writes the GeoTIFF world's splits, captions, coords and water labels."""
    import synthetic
    import terramesh as tm
    synthetic.synthesize(tmp_path / "tiff", n=20, size=64, workers=1)
    synthetic.synthesize_shards(tmp_path / "shards", n=20, size=64, workers=1, shard_size=4)
    for layout in ("tiff", "shards"):
        assert tm.has_folder(tmp_path / layout, "label_water") and tm.has_folder(tmp_path / layout, "caption")
        assert not tm.has_folder(tmp_path / layout, "label_floods")
    for split in ("train", "val", "test"):
        a = tm.TerraMeshDataset(tmp_path / "tiff", split=split, labels="label_water", size=64)
        b = tm.TerraMeshDataset(tmp_path / "shards", split=split, labels="label_water", size=64)
        assert sorted(b.ids) == list(a.ids) and len(b) > 0, split
        for k in range(len(b)):
            x, y = a[a.ids.index(b.ids[k])], b[k]
            for key in ("caption", "coords", "label_water", "S2L2A", "DEM", "LULC"):
                if isinstance(x[key], str):
                    assert x[key] == y[key]
                else:
                    assert torch.equal(x[key], y[key]), (split, key)
            s1 = [m for m in ("S1GRD", "S1RTC") if m in y]
            assert len(s1) == 1                                       # one S-1 product per subset
            torch.testing.assert_close(y[s1[0]], x[s1[0]], atol=0.01, rtol=0)   # float16 dB


def test_compact_index_reads_like_lists_and_dicts(layouts):
    import terramesh as tm
    _, shards = layouts
    ds = tm.TerraMeshDataset(shards, size=None)
    assert list(ds.ids) == ["00000", "00001", "00002"] and ds.ids[1:] == ["00001", "00002"]
    assert ds.ids.index("00002") == 2 and "00001" in ds.ids and "nope" not in ds.ids
    with pytest.raises(ValueError, match="'nope' is not a sample key"):
        ds.ids.index("nope")
    for m in ("S1GRD", "S1RTC", "DEM"):
        truth = {}
        for tar_path in sorted(shards.glob(f"*/{m}/*.tar")):
            with tarfile.open(tar_path) as tar:
                for info in tar:
                    truth[info.name[:-len(".zarr.zip")]] = (tar_path, info.name, info.offset_data, info.size)
        assert {k: tuple(v) for k, v in ds.files[m].items()} == truth and len(ds.files[m]) == len(truth)
    assert ds.files["S1GRD"].get("00000") is None and "00002" in ds.files["coords"]
    kept = tm.TerraMeshDataset(shards, ["S1GRD"])
    assert list(kept.ids) == ["00002"]                      # only samples that have a modality asked for


def test_export_and_captions_commands(layouts, tmp_path, monkeypatch):
    import synthetic
    import terramesh as tm
    from geotiff import read_tiff
    tiffs, shards = layouts
    key = tm.export_sample(shards, tmp_path / "x", split="train", names=["S2L2A", "DEM", "S1RTC"])
    assert key == "00000"
    for m in ("S2L2A", "DEM", "S1RTC"):
        got, want = read_tiff(tmp_path / "x" / f"{m}.tif")[0], read_tiff(tiffs / m / f"{key}.tif")[0]
        np.testing.assert_array_equal(got.reshape(want.shape), want.astype(got.dtype))
    assert tm.export_sample(shards, tmp_path / "y", names=["S1GRD"]) == "00002"   # first with S1GRD
    with pytest.raises(ValueError, match="the file exists; pass --overwrite"):
        tm.export_sample(shards, tmp_path / "y", names=["S1GRD"])
    synthetic.synthesize_shards(tmp_path / "w", n=10, size=64, workers=1)
    monkeypatch.setattr("sys.argv", ["terramesh.py", "captions", "--root", str(tmp_path / "w"),
                                     "--split", "train", "--out", str(tmp_path / "c.txt")])
    tm.main()
    ids = synthetic.world_splits(10, 0)["train"]
    lines = (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(synthetic.synth_sample(0, int(i), 64)["caption"] for i in ids)
