"""The published TerraMesh format: tar shards of zarr.zip samples read by hand (terramesh_shards.py) against what
the real zarr library returned for the same files (tests/fixtures/zarr, made by make_zarr_fixtures.py), the LZ4
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

import terramesh_shards as ts

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "zarr"
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
    index = ts.tar_index(shard)
    k = index["names"].index(f"{sample}.zarr.zip")
    data = ts.read_member(shard, index["names"][k], index["offsets"][k], index["sizes"][k])
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
    with pytest.raises(ValueError, match=r"codecs.tar, member zstd_bitshuffle, array bands.*blosc-zstd.*numcodecs"):
        group(shard, "zstd_bitshuffle").read("bands")


def test_numcodecs_path_when_installed(shard):
    pytest.importorskip("numcodecs", reason="the optional numcodecs fast path needs the numcodecs package")
    expected = np.load(FIXTURES / "expected.npz")
    for sample in SAMPLES:
        np.testing.assert_array_equal(group(shard, sample).read("bands"), expected[f"{sample}/bands"])


def test_read_sample(shard, hand_written):
    index = ts.tar_index(shard)
    k = index["names"].index("lz4_shuffle.zarr.zip")
    sample = ts.read_sample(shard, index["names"][k], index["offsets"][k], index["sizes"][k])
    expected = np.load(FIXTURES / "expected.npz")
    np.testing.assert_array_equal(sample["bands"], expected["lz4_shuffle/bands"])
    np.testing.assert_array_equal(sample["cloud_mask"], expected["lz4_shuffle/cloud_mask"])
    assert (sample["center_lat"], sample["center_lon"], sample["time"]) == (47.125, -3.5, 1_561_000_000_000_000_000)


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
    index = ts.tar_index(shard)
    assert list(zip(index["names"], index["offsets"], index["sizes"])) == truth
    assert (shard.parent / f".{shard.name}.index.json").exists()
    monkeypatch.setattr(ts, "_scan_tar", lambda *a: pytest.fail("rescanned a shard whose index is cached"))
    assert ts.tar_index(shard)["names"] == index["names"]


def test_index_of_a_read_only_folder_goes_to_the_user_cache(shard, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    replace = os.replace

    def read_only_dataset(src, dst):   # chmod does not stop root: refuse writes beside the shard instead
        if Path(dst).parent == shard.parent:
            raise PermissionError(13, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(ts.os, "replace", read_only_dataset)
    index = ts.tar_index(shard)
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
        ts.tar_index(shard)


def test_member_that_is_not_a_zip(tmp_path):
    bad = write_tar(tmp_path / "bad.tar", {"k1.zarr.zip": b"this is not a zip file at all"})
    index = ts.tar_index(bad)
    with pytest.raises(ValueError, match=r"bad.tar, member k1.zarr.zip: not a zip file"):
        ts.read_sample(bad, "k1.zarr.zip", index["offsets"][0], index["sizes"][0])


def test_zip_without_zmetadata(shard, tmp_path):
    data = rezip(member(shard, "zlib.zarr.zip"), lambda name, b: None if name == ".zmetadata" else b)
    bad = write_tar(tmp_path / "bad.tar", {"k2.zarr.zip": data})
    index = ts.tar_index(bad)
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
    index = ts.tar_index(bad)
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
        index = ts.tar_index(bad)
        with pytest.raises(ValueError, match=r"bad.tar, member k4.zarr.zip, " + message):
            ts.read_sample(bad, "k4.zarr.zip", index["offsets"][0], index["sizes"][0])
        os.remove(bad)
