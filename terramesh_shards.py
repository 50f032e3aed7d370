"""
Reading the published TerraMesh shards as they are: tar files of `<key>.zarr.zip` samples, no
conversion.

TerraMesh is published as `<root>/{train,val}/<MODALITY>/<subset>_shard_<NNNNNN>.tar` (paper §3;
official: the dataset card's loader `terramesh.py`). Each tar member `<key>.zarr.zip` is a zip
holding a zarr v2 group with consolidated metadata (`.zmetadata`): `bands` (time=1, band, y, x),
the scalars `center_lat`, `center_lon`, `time`, and `cloud_mask` for optical modalities. This
file reads that with the standard library (tarfile, zipfile, json, zlib) and numpy only:

  * `ZarrGroup`: the arrays of one zarr.zip, `.zarray` fields (dtype, shape, chunks, order,
    fill_value, filters, compressor) and chunk assembly (missing chunks are the fill value);
  * the codecs: the Blosc container (header, blocks, splits, byte and bit shuffle) with a
    hand-written LZ4 block decoder inside, and zlib; zstd and blosclz only where `numcodecs`
    happens to be importable (an optional fast path for every Blosc chunk; the project never
    requires it);
  * `read_sample`: one TerraMesh sample as numpy arrays.

Where a sample lives (the tar index, the layout) is shard_index.py's; `zarr_zip` and `write_shard`
write samples in the same format (the synthetic world, tests). Every failure is one ValueError line
naming the shard, the member, the array and the codec. terramesh.py imports this file (never the
other way); it has no command of its own:

    python -c "import terramesh_shards as s; print(s.read_sample('x.tar', 'k.zarr.zip', 512, 9000))"
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from shard_index import read_member

# optional fast path: the C decoders of numcodecs, used when installed (never a requirement)
try:
    import numcodecs
except ImportError:
    numcodecs = None

# bench/bench_shards.py switches it off to time the hand-written path
USE_NUMCODECS = numcodecs is not None

# ----------------------------------------------------------------------------
# A zarr v2 group in a zip (consolidated metadata)


class ZarrGroup:
    """The zarr v2 group of one `<key>.zarr.zip` member. `where` names the shard and member in
    errors."""

    def __init__(self, data: bytes, where: str):
        self.where = where
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise ValueError(f"{where}: not a zip file (expected a zarr.zip sample)") from None
        self.names = set(self.zip.namelist())
        if ".zmetadata" not in self.names:
            raise ValueError(f"{where}: the zip has no .zmetadata "
                             f"(not a consolidated zarr v2 group)")
        self.meta = json.loads(self.zip.read(".zmetadata"))["metadata"]

    def __contains__(self, name: str) -> bool:
        return f"{name}/.zarray" in self.meta

    def attrs(self, name: str) -> dict:
        return self.meta.get(f"{name}/.zattrs", {})

    def zarray(self, name: str) -> dict:
        if name not in self:
            raise ValueError(f"{self.where}: no array {name!r} in the zarr group")
        return self.meta[f"{name}/.zarray"]

    def read(self, name: str) -> np.ndarray:
        """The whole array, chunks assembled; a chunk absent from the zip is the fill value."""
        za = self.zarray(name)
        where = f"{self.where}, array {name}"
        dtype, shape, chunks = _dtype(za["dtype"], where), tuple(za["shape"]), tuple(za["chunks"])
        if za.get("filters"):
            ids = [f.get("id") for f in za["filters"]]
            raise ValueError(f"{where}: unsupported zarr filters {ids}")
        out = np.full(shape, _fill_value(za.get("fill_value"), dtype), dtype)
        sep = za.get("dimension_separator", ".")
        grid = [range(-(-n // c)) for n, c in zip(shape, chunks)] if shape else []
        for index in np.ndindex(*[len(g) for g in grid]):
            key = f"{name}/{sep.join(map(str, index)) if shape else '0'}"
            if key in self.names:
                self._place(out, index, chunks, self.zip.read(key), za, f"{where}, chunk {key}")
        return out

    def _place(self, out, index, chunks, raw, za, where):
        dtype = out.dtype
        expected = int(np.prod(chunks)) * dtype.itemsize
        data = decode_chunk(raw, za.get("compressor"), expected, where)
        if len(data) != expected:
            raise ValueError(f"{where}: decompressed to {len(data)} bytes, .zarray says {expected} "
                             f"({chunks} x {dtype.itemsize} bytes)")
        chunk = np.frombuffer(data, dtype).reshape(chunks, order=za.get("order", "C"))
        window = tuple(slice(i * c, min((i + 1) * c, n))
                       for i, c, n in zip(index, chunks, out.shape))
        edge = tuple(slice(0, s.stop - s.start) for s in window)   # edge chunks are stored padded
        out[window] = chunk[edge]


def _dtype(spec, where) -> np.dtype:
    try:
        return np.dtype(spec)
    except TypeError:
        raise ValueError(f"{where}: unsupported dtype {spec!r}") from None


def _fill_value(value, dtype: np.dtype):
    """zarr v2 fill values: numbers, "NaN" / "Infinity" / "-Infinity" for floats, null (zeros
    here)."""
    if value is None:
        return np.zeros((), dtype)[()]
    if isinstance(value, str) and dtype.kind == "f":
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[value]
    if isinstance(value, str):   # bytes and string dtypes store the fill value base64-encoded
        return np.zeros((), dtype)[()]
    return value


# ----------------------------------------------------------------------------
# Codecs: zarr compressors, the Blosc container, LZ4 blocks, shuffles

BLOSC_CODECS = {0: "blosclz", 1: "lz4", 2: "snappy", 3: "zlib", 4: "zstd"}   # header flags bits 5-7
BLOSC_DOSHUFFLE, BLOSC_MEMCPYED, BLOSC_DOBITSHUFFLE, BLOSC_DONT_SPLIT = 0x1, 0x2, 0x4, 0x10
MAX_SPLITS, MIN_BUFFERSIZE = 16, 128   # official: c-blosc blosc/blosc.c, the rule for split blocks


def decode_chunk(raw: bytes, compressor: dict | None, expected: int, where: str) -> bytes:
    """One stored chunk -> its bytes, by the zarr compressor of its `.zarray`."""
    if compressor is None:
        return raw
    codec = compressor.get("id")
    if codec == "zlib":
        return _zlib(raw, where)
    if codec == "blosc":
        if USE_NUMCODECS:
            return bytes(numcodecs.Blosc.decode(numcodecs.Blosc(), raw))
        return blosc_decompress(raw, where)
    if numcodecs is not None and codec in numcodecs.registry.codec_registry:
        return bytes(numcodecs.get_codec(compressor).decode(raw))
    raise ValueError(f"{where}: unsupported codec {codec!r} (install numcodecs to read it)")


def _zlib(raw, where) -> bytes:
    try:
        return zlib.decompress(raw)
    except zlib.error as e:
        raise ValueError(f"{where}: codec zlib: corrupt stream ({e})") from None


def blosc_decompress(buf: bytes, where: str = "blosc") -> bytes:
    """A Blosc 1 container -> its bytes (official: c-blosc README_HEADER.rst and blosc.c
    blosc_d). Header: version, versionlz, flags, typesize (uint8), nbytes, blocksize, cbytes
    (uint32 LE); then one uint32 start offset per block; each block is 1 or `typesize` streams,
    each `int32 size + data`."""
    if len(buf) < 16:
        raise ValueError(f"{where}: codec blosc: {len(buf)} bytes, shorter than the 16-byte header")
    flags, typesize = buf[2], buf[3]
    nbytes, blocksize, cbytes = np.frombuffer(buf, "<u4", 3, 4).tolist()
    codec = BLOSC_CODECS.get(flags >> 5, f"#{flags >> 5}")
    where = f"{where}: codec blosc-{codec}"
    if cbytes != len(buf):
        raise ValueError(f"{where}: header says {cbytes} compressed bytes, "
                         f"the chunk has {len(buf)}")
    if flags & BLOSC_MEMCPYED:
        return bytes(buf[16:16 + nbytes])
    if codec not in ("lz4", "zlib"):
        raise ValueError(f"{where}: inner codec {codec} is not decoded here "
                         f"(install numcodecs to read it)")
    nblocks = -(-nbytes // blocksize) if nbytes else 0
    starts = np.frombuffer(buf, "<u4", nblocks, 16).tolist()
    out = bytearray()
    for j, start in enumerate(starts):
        size = min(blocksize, nbytes - j * blocksize)
        block = _blosc_block(buf, start, size, size < blocksize, flags, typesize, codec, where)
        out += _unshuffle(block, typesize, flags)
    return bytes(out)


def _blosc_block(buf, start, size, leftover, flags, typesize, codec, where) -> bytes:
    """The (still shuffled) bytes of one block: its streams decompressed and joined."""
    split = (not flags & BLOSC_DONT_SPLIT
             and typesize <= MAX_SPLITS
             and size // typesize >= MIN_BUFFERSIZE
             and not leftover)
    nsplits = typesize if split else 1
    stream_size = size // nsplits
    parts, pos = [], start
    for _ in range(nsplits):
        csize = -1
        if pos + 4 <= len(buf):
            csize = int(np.frombuffer(buf, "<i4", 1, pos)[0])
        pos += 4
        if csize < 0 or pos + csize > len(buf):
            raise ValueError(f"{where}: block at byte {start} runs past the end of the chunk")
        data = buf[pos:pos + csize]
        # a stream as long as its output is stored as it is
        if csize != stream_size and codec == "lz4":
            data = lz4_decompress(data, stream_size, where)
        elif csize != stream_size:
            data = _zlib(data, where)
        if len(data) != stream_size:
            raise ValueError(f"{where}: a block stream decompressed to {len(data)} bytes, "
                             f"expected {stream_size}")
        parts.append(data)
        pos += csize
    return b"".join(parts)


def _unshuffle(block: bytes, typesize: int, flags: int) -> bytes:
    """Undoes Blosc's byte shuffle (byte k of every element together) or bit shuffle (bit k
    together)."""
    n = len(block) // typesize
    body, rest = block[:n * typesize], block[n * typesize:]
    if flags & BLOSC_DOSHUFFLE and typesize > 1:
        x = np.frombuffer(body, np.uint8).reshape(typesize, n)          # (byte, element)
        return x.T.tobytes() + rest
    if flags & BLOSC_DOBITSHUFFLE and len(block) >= typesize and n % 8 == 0:
        return bit_unshuffle(body, typesize) + rest
    return block


def bit_unshuffle(body: bytes, typesize: int) -> bytes:
    """Bit shuffle (official: c-blosc bitshuffle-generic.c): the stream holds 8 * typesize bit
    rows, row 8 * j + k the bit k of byte j of every element, packed 8 elements per byte, least
    significant bit first."""
    n = len(body) // typesize
    rows = np.frombuffer(body, np.uint8).reshape(typesize * 8, n // 8)
    bits = np.unpackbits(rows, axis=1, bitorder="little")       # (8 * typesize, n)
    bits = bits.reshape(typesize, 8, n).transpose(2, 0, 1)       # (n, byte, bit)
    return np.packbits(bits, axis=-1, bitorder="little").tobytes()


def lz4_decompress(src: bytes, size: int, where: str = "lz4") -> bytes:
    """An LZ4 block (official: lz4 doc/lz4_Block_format.md) -> `size` bytes. Sequences of a
    token (literal length high nibble, match length - 4 low nibble; 15 = more length bytes
    follow, 255 = and more), the literals, a 2-byte little-endian offset back into the output,
    the match; the last sequence is literals. Plain Python: bytes indexing and bytearray
    appends, the fastest of the variants we timed (about 0.4 us a sequence on our AMD EPYC)."""
    src, out = bytes(src), bytearray()
    i, end = 0, len(src)
    try:
        while True:
            token = src[i]
            i += 1
            literals = token >> 4
            if literals:
                if literals == 15:
                    while True:
                        byte = src[i]
                        i += 1
                        literals += byte
                        if byte != 255:
                            break
                out += src[i:i + literals]
                i += literals
            if i == end:
                break
            offset = src[i] | src[i + 1] << 8
            i += 2
            length = (token & 15) + 4
            if length == 19:
                while True:
                    byte = src[i]
                    i += 1
                    length += byte
                    if byte != 255:
                        break
            start = len(out) - offset
            if start < 0 or not offset:
                raise ValueError(f"offset {offset} points before the start of the output")
            if offset >= length:
                out += out[start:start + length]
            else:   # overlapping match: the last `offset` bytes repeat
                out += (out[-offset:] * (length // offset + 1))[:length]
    except (IndexError, ValueError) as e:
        raise ValueError(f"{where}: corrupt lz4 block ({e or 'ends inside a sequence'})") from None
    if len(out) != size:
        raise ValueError(f"{where}: lz4 block decompressed to {len(out)} bytes, expected {size}")
    return bytes(out)


# ----------------------------------------------------------------------------
# One TerraMesh sample

def read_sample(shard, name: str, offset: int, size: int) -> dict:
    """One `<key>.zarr.zip` member -> {"bands": (time, band, y, x), "center_lat", "center_lon",
    "time", and "cloud_mask" where present}, numpy arrays as stored."""
    where = f"{shard}, member {name}"
    group = ZarrGroup(read_member(shard, name, offset, size), where)
    out = {"bands": group.read("bands")}
    for scalar in ("center_lat", "center_lon", "time"):
        if scalar in group:
            out[scalar] = group.read(scalar)[()]
    if "cloud_mask" in group:
        out["cloud_mask"] = group.read("cloud_mask")
    return out


# ----------------------------------------------------------------------------
# Writing samples in the published format (the synthetic world; tests)

def zarr_zip(arrays: dict, attrs: dict | None = None) -> bytes:
    """A zarr v2 group in a zip, as TerraMesh stores a sample: consolidated metadata, each array one
    zlib-compressed chunk (C order), 0-d arrays under the chunk key "0"."""
    meta = {".zgroup": {"zarr_format": 2}}
    chunks = {}
    for name, a in arrays.items():
        a = np.asarray(a)                  # tobytes() below is C order whatever the layout
        meta[f"{name}/.zarray"] = {
            "chunks": list(a.shape),
            "compressor": {"id": "zlib", "level": 1},
            "dtype": a.dtype.str,
            "fill_value": None,
            "filters": None,
            "order": "C",
            "shape": list(a.shape),
            "zarr_format": 2,
        }
        if name in (attrs or {}):
            meta[f"{name}/.zattrs"] = attrs[name]
        key = ".".join("0" * a.ndim) if a.ndim else "0"
        chunks[f"{name}/{key}"] = zlib.compress(a.tobytes(), 1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, value in meta.items():
            z.writestr(name, json.dumps(value))
        z.writestr(".zmetadata", json.dumps({"metadata": meta, "zarr_consolidated_format": 1}))
        for name, data in chunks.items():
            z.writestr(name, data)
    return out.getvalue()


def write_shard(path, members: dict):
    """A tar of {member name: bytes}, written atomically (a temporary file beside it, then a
    rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
