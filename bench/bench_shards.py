"""
Read speed of the published TerraMesh format: samples per second of one DataLoader worker (one process, one
thread) reading samples with all eight image modalities at 264 px through terramesh.TerraMeshDataset
(tar seek, zip, zarr metadata, decoding, standardization, a 224 px centre crop), once with the hand-written
decoders of terramesh_shards.py and once with the C decoders of `numcodecs`.

`make` writes the samples with the real zarr library as TerraMesh stores them: zarr's default compressor
(Blosc-LZ4, byte shuffle, clevel 5), one chunk per array, `bands` (1, C, 264, 264) in the published dtypes
(S2 int16, S1 float16, DEM int16, LULC and S2RGB uint8, NDVI float32), the centre, the time and a cloud mask
for the optical modalities. The pixels are the real TerraMesh tiles of assets/terramesh (224 px) reflected out
to 264 px, flipped differently per sample (S1GRD takes the S1RTC values). zarr and numcodecs are never project
dependencies: `make` and the numcodecs timing run in a scratch environment that has them, the latter with the
project's packages on its path:

    python3 -m venv ~/zarrenv && ~/zarrenv/bin/pip install "zarr==2.18.3" "numcodecs==0.13.1" numpy tifffile
    ~/zarrenv/bin/python bench/bench_shards.py make --out /tmp/bench_shards --n 64
    flock /tmp/cpu.lock .venv/bin/python bench/bench_shards.py time --root /tmp/bench_shards --decoder hand
    flock /tmp/cpu.lock env PYTHONPATH=.venv/lib/python3.11/site-packages ~/zarrenv/bin/python \\
        bench/bench_shards.py time --root /tmp/bench_shards --decoder numcodecs

`index` measures the memory of the layout index (shard_index.py) for N synthetic keys in every one of the
eight modality folders (tar indexes made up in memory, 10,240 members per shard as published; no data), as
the compact numpy table and as the dicts of members it replaced (the representation before issue 17's
compact index, rebuilt here for the comparison). Python's tracemalloc counts what each keeps alive:

    flock /tmp/cpu.lock .venv/bin/python bench/bench_shards.py index --keys 1000000

CPU only; there is nothing to run on a GPU.
"""
import argparse
import gc
import io
import os
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "assets" / "terramesh"
TILES = ("38D_378R_2_3", "637U_59R_1_3")
DTYPES = {"S2L1C": "<i2", "S2L2A": "<i2", "S2RGB": "|u1", "S1GRD": "<f2", "S1RTC": "<f2", "DEM": "<i2",
          "LULC": "|u1", "NDVI": "<f4"}
SOURCE = {m: m for m in DTYPES} | {"S1GRD": "S1RTC"}          # the assets have no S1GRD tile
OPTICAL = ("S2L1C", "S2L2A", "S2RGB", "NDVI")


def real_tile(m: str, k: int) -> np.ndarray:
    """(1, C, 264, 264) in the published dtype: asset tile k % 2, reflected out by 20 px, flipped by k."""
    import tifffile
    x = tifffile.imread(ASSETS / SOURCE[m] / f"{TILES[k % 2]}.tif")
    x = x[..., None] if x.ndim == 2 else x                                            # (224, 224, C)
    x = np.pad(x, ((20, 20), (20, 20), (0, 0)), mode="reflect")                       # (264, 264, C)
    x = x[::-1] if (k // 2) % 2 else x
    x = x[:, ::-1] if (k // 4) % 2 else x
    return np.moveaxis(x, -1, 0)[None].astype(DTYPES[m])


def zarr_sample(m: str, k: int) -> bytes:
    """One modality of sample k as a zarr.zip written by zarr (default compressor), its bytes."""
    import zarr
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.zarr.zip"
        with zarr.ZipStore(str(path), mode="w") as store:
            group = zarr.group(store)
            group.create_dataset("bands", data=real_tile(m, k), chunks=False)
            group.create_dataset("center_lat", data=np.array(45.0 + k))
            group.create_dataset("center_lon", data=np.array(7.25))
            group.create_dataset("time", data=np.array(0 if m == "DEM" else 1_561_000_000_000_000_000, "<i8"))
            if m in OPTICAL:
                group.create_dataset("cloud_mask", data=np.zeros((1, 264, 264), "u1"), chunks=False)
            zarr.consolidate_metadata(store)
        return path.read_bytes()


def make(out: Path, n: int):
    for m in DTYPES:
        shard = out / "train" / m / "majortom_shard_000001.tar"
        shard.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k in range(n):
                data = zarr_sample(m, k)
                info = tarfile.TarInfo(f"sample_{k:05d}.zarr.zip")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        print(f"wrote {shard} ({n} samples, {shard.stat().st_size / n / 1e6:.2f} MB each)")


def best_rate(fn, n_items, repeats):
    """Items per second of the fastest of `repeats` runs of fn()."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def time_reads(root: Path, decoder: str, repeats: int):
    import torch
    import terramesh
    import terramesh_shards
    torch.set_num_threads(1)
    if decoder == "numcodecs" and terramesh_shards.numcodecs is None:
        sys.exit("--decoder numcodecs: numcodecs is not importable in this Python (see the docstring)")
    terramesh_shards.USE_NUMCODECS = decoder == "numcodecs"
    ds = terramesh.TerraMeshDataset(root, size=224, split="train")
    sample = ds[0]
    assert sorted(k for k in sample if k != "coords") == sorted(DTYPES), sorted(sample)
    rate = best_rate(lambda: [ds[i] for i in range(len(ds))], len(ds), repeats)
    print(f"{decoder:9s} decoders: {rate:6.1f} samples/s per worker ({len(ds)} samples of all 8 image modalities, "
          f"264 px, best of {repeats}; {os.cpu_count()} CPUs)")
    for m in DTYPES:
        member = ds.files[m][ds.ids[0]]
        per = 1 / best_rate(lambda: terramesh_shards.read_sample(*member), 1, 5)
        print(f"  {m:6s} read_sample {per * 1e3:6.1f} ms ({member.size / 1e6:.2f} MB stored)")


PER_SHARD = 10_240   # samples per published shard


def fake_layout(root: Path, n_keys: int) -> dict:
    """Empty shard files under root/train/<MOD>/ and the made-up tar index of each: {path: index}."""
    indexes = {}
    n_shards = -(-n_keys // PER_SHARD)
    for m in DTYPES:
        folder = root / "train" / m
        folder.mkdir(parents=True, exist_ok=True)
        for s in range(n_shards):
            path = folder / f"majortom_shard_{s + 1:06d}.tar"
            path.touch()
            keys = range(s * PER_SHARD, min((s + 1) * PER_SHARD, n_keys))
            names = [f"{k:07d}_grid_cell_majortom.zarr.zip" for k in keys]   # 28-character keys
            offsets = [512 + 2_000_000 * j for j in range(len(names))]
            indexes[path] = {"names": names, "offsets": offsets, "sizes": [1_999_000] * len(names)}
    return indexes


def dict_index(root: Path, indexes: dict):
    """The index as it was before the compact table: sample keys as a list, {key: Member} per modality."""
    from shard_index import Member
    files, ids = {m: {} for m in DTYPES}, {}
    for path, index in indexes.items():
        found = files[path.parent.name]
        for name, offset, size in zip(index["names"], index["offsets"], index["sizes"]):
            key = name[:-len(".zarr.zip")]
            found[key] = Member(path, name, offset, size)
            ids[key] = None
    return list(ids), files


def retained_bytes(build) -> tuple[int, object]:
    """Bytes that the result of build() keeps allocated (tracemalloc), and the result."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, result


def index_memory(n_keys: int):
    import shard_index
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        indexes = fake_layout(root, n_keys)
        shard_index.tar_index = lambda path: indexes[Path(path)]       # no tar to read: the made-up index
        folders = list(DTYPES)
        t0 = time.perf_counter()
        compact, (ids, files) = retained_bytes(lambda: shard_index.index_layout(root, ["train"], folders))
        seconds = time.perf_counter() - t0
        assert len(ids) == n_keys and files["DEM"][ids[n_keys // 2]].size == 1_999_000
        del ids, files
        old, _ = retained_bytes(lambda: dict_index(root, indexes))
    per = 8 * n_keys
    print(f"layout index of {n_keys:,} keys x 8 modalities ({os.cpu_count()} CPUs):")
    print(f"  dicts of members (before): {old / 2 ** 20:8.1f} MiB ({old / per:5.1f} bytes per member)")
    print(f"  compact numpy table (now): {compact / 2 ** 20:8.1f} MiB ({compact / per:5.1f} bytes per member)"
          f", built in {seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the samples with zarr (needs zarr and numcodecs)")
    p.add_argument("--out", type=Path, required=True, help="output root (published layout)")
    p.add_argument("--n", type=int, default=64, help="samples")
    p = sub.add_parser("time", help="samples/s of one worker")
    p.add_argument("--root", type=Path, required=True, help="the root `make` wrote")
    p.add_argument("--decoder", choices=["hand", "numcodecs"], default="hand", help="decoding path")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all samples (best counts)")
    p = sub.add_parser("index", help="memory of the layout index for made-up keys")
    p.add_argument("--keys", type=int, default=1_000_000, help="samples (each in all 8 modality folders)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.n)
    elif args.command == "index":
        index_memory(args.keys)
    else:
        time_reads(args.root, args.decoder, args.repeats)


if __name__ == "__main__":
    main()
