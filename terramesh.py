"""
The data stage: reading TerraMesh, in either of its layouts, and the commands that write and
look at data.

TerraMind is pretrained on TerraMesh: co-registered samples of up to nine modalities (paper §3).
This file holds

  * `TerraMeshDataset`, the reader every stage uses. It consumes a folder in one of two layouts
    and returns standardized tensors, refusing bad files with a clear error:
      - GeoTIFF: `<root>/<MODALITY>/<id>.tif`, `caption/<id>.txt`, `coords/<id>.txt`, label
        folders `label_*/<id>.tif` and `splits/<split>.txt`;
      - published (as TerraMesh is on the Hugging Face hub): `<root>/<split>/<FOLDER>/*.tar` of
        `<key>.zarr.zip` samples (terramesh_shards.py reads them, shard_index.py finds them).
        Published folders: `train/`, `val/` and the modalities in them. Our extras in the same
        structure, which the synthetic world writes and a user may add: a `test/` split,
        `caption/` tars of `<key>.txt` and label folders `label_*` of `<key>.zarr.zip` class maps;
  * `read_input`, one --input tile or text of generate.py and the fine-tuning scripts;
  * the commands: `synth` writes the synthetic world of synthetic.py, `stats` and `show` look at
    a dataset, `export` writes one sample's tiles as GeoTIFFs (a --input for generate.py),
    `captions` writes the captions as one text file (a --corpus for text_tokenizer.py).

The modality table lives in modalities.py, GeoTIFF and text I/O in geotiff.py, checkpoint files
in checkpoints.py and pictures in render.py and pictures.py; a stage imports those names from
the file that defines them (`from modalities import MODALITIES`).

    python terramesh.py synth --out data/synth --n 2000 --size 64    # CPU, seconds
    python terramesh.py synth --layout shards --out data/synth264 --n 400 --size 264
    python terramesh.py stats --root data/synth           # per-band stats vs official ones
    python terramesh.py show --root data/synth --id 00000 --out sample.png
    python terramesh.py show --root assets/terramesh --id 637U_59R_1_3 --out real.png
    python terramesh.py export --root data/synth264 --split test --modality S2L2A --out tiles/
    python terramesh.py captions --root data/synth264 --out captions.txt

There is no GPU or multi-GPU variant of this stage: it is numpy on one CPU process.
"""
from __future__ import annotations

import argparse
import shutil
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import nonnegative_int, output_file, positive_int, run_main
from geotiff import read_text, read_tiff, to_channels_first, write_geotiff, write_text
from modalities import (IMAGE_MODALITIES, LULC_CLASSES, MODALITIES, PATCH,
                        SEQUENCE_MODALITIES, check_values, format_coords, modality,
                        modality_names, parse_coords, standardize)
from pictures import save_sheet
from render import render
from shard_index import (SPLITS, FirstMember, Member, index_layout, is_shard_root,
                         layout_folders, read_member)
from synthetic import synthesize, synthesize_shards
from terramesh_shards import read_sample


def read_input(name: str, value):
    """A --input value -> (physical array or text, georeferencing tags or None).

    Images: a GeoTIFF path; coords / caption: a .txt path or the text itself. S1 no-data (NaN)
    becomes the band mean, with a warning.
    """
    m = MODALITIES.get(name)
    if m is None or not value:
        known = ", ".join(MODALITIES)
        raise ValueError(f"--input {name}={value}: expected MOD=path, MOD one of {known}")
    if m.kind == "sequence":
        text = read_text(value).strip() if Path(value).is_file() else value
        if name == "coords":
            return parse_coords(text, value), None
        return text, None
    x, geo = read_tiff(value)
    x = to_channels_first(x, m.channels, value)
    check_values(name, x, value, nan_ok=name != "LULC")
    if name == "LULC":
        return x[0].astype(np.int64), geo
    x = x.astype(np.float32)
    nan = np.isnan(x)
    if nan.any():
        warnings.warn(f"{value}: {int(nan.sum())} NaN pixels replaced by the {name} band mean")
        band_mean = np.asarray(m.mean, np.float32)[:, None, None]
        x = np.where(nan, band_mean, x)
    return x, geo


def is_label(folder: str) -> bool:
    """Label folders (`label`, `label_water`, ...) hold per-pixel class maps, our extra beside
    the data."""
    return folder == "label" or folder.startswith("label_")


# ----------------------------------------------------------------------------
# The dataset

class TerraMeshDataset(torch.utils.data.Dataset):
    """Samples of a TerraMesh folder in the GeoTIFF or the published layout (module docstring).

    `ds[i]` is a dict with one entry per modality the sample has: image modalities as
    standardized float32 (C, H, W), LULC as an int64 class map (H, W), caption and coords as
    strings, the label (if asked for) as int64 (H, W). Missing modalities are simply absent.
    `size` crops every image to size x size ("center" or "random" crop, the same window for all
    modalities of a sample); `size=None` keeps the full tile.

    GeoTIFF layout: `split` reads the sample ids from `<root>/splits/<split>.txt`;
    `files[m][id]` is a path. Published layout: ids are the sample keys in shard order (`ds.ids`
    a read-only sequence over a compact index), `split` is a split folder (all of them when
    None), `files[m][key]` is a tar member, and coords is the text of the sample's centre (any
    image member has it).
    """

    def __init__(self, root, modalities=None, size=224, crop="center", seed=0, split=None,
                 labels=None):
        self.root, self.size, self.crop = Path(root), size, crop
        self.seed, self.labels = seed, labels
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        self.epoch = 0
        # modality -> NaN pixels replaced (this process)
        self.nan_replaced: dict[str, int] = {}
        self.published = is_shard_root(self.root)
        if self.published:
            self._index_shards(modalities, split, labels)
        else:
            self._index_tiffs(modalities, split, labels)

    def _index_tiffs(self, modalities, split, labels):
        """The GeoTIFF layout: a file per modality and sample; ids from a split file or the
        folders."""
        folders = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        unknown = {f for f in folders - set(MODALITIES) - {"splits"} if not is_label(f)}
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
            self.files[m] = files_by_id(self.root / m, ext)
        if split is not None:
            split_file = self.root / "splits" / f"{split}.txt"
            if not split_file.exists():
                raise FileNotFoundError(f"{split_file}: no such split file")
            self.ids = read_text(split_file).split()
        else:
            found = set().union(*(self.files[m] for m in self.modalities))
            self.ids = sorted(found)
        if labels:
            self.ids = [i for i in self.ids if i in self.files[labels]]

    def _index_shards(self, modalities, split, labels):
        """The published layout: every tar of the split(s) indexed (cached beside it), keys in
        shard order."""
        splits = self._shard_splits(split)
        folders = layout_folders(self.root, splits)
        known = IMAGE_MODALITIES + ("caption",)
        unknown = [f for f in folders if f not in known and not is_label(f)]
        if unknown:
            where = "/".join(splits)
            raise ValueError(f"{self.root}: unknown modality folder(s) {unknown} in {where}; "
                             f"known: {', '.join(known)} (plus label folders 'label_*')")
        if modalities is None:
            modalities = dataset_modalities(self.root, split)
        for m in modalities:
            modality(m)
        self.modalities = list(modalities)
        images = [f for f in folders if f in IMAGE_MODALITIES]
        wanted = [f for f in folders if f in self.modalities or f == labels]
        scan = wanted
        if "coords" in self.modalities:                        # any image member has the centre
            scan = images + [f for f in wanted if f not in images]
        ids, found = index_layout(self.root, splits, scan)
        self.files = {}
        for m in self.modalities + ([labels] if labels else []):
            self.files[m] = found.get(m, {})
        if "coords" in self.modalities:
            self.files["coords"] = FirstMember([found[m] for m in images])
        self.ids = ids.select(self._have_any(ids, labels))

    def _shard_splits(self, split) -> list[str]:
        """The split folders to read: `split`, or every split folder of the root when None."""
        if split is None:
            return [s for s in SPLITS if (self.root / s).is_dir()]
        if split not in SPLITS or not (self.root / split).is_dir():
            raise ValueError(f"{self.root}: no split folder {split!r}; the published layout "
                             f"has train/ and val/ (test/ is an optional extra)")
        return [split]

    def _have_any(self, ids, labels) -> np.ndarray:
        """(K,) bool over the index: keys with any of the modalities (and the label, if asked
        for)."""
        keep = np.zeros(len(ids.keys), bool)
        for m in self.modalities:
            if hasattr(self.files[m], "present"):
                keep |= self.files[m].present()
        if labels:
            label = self.files[labels]
            keep &= label.present() if hasattr(label, "present") else False
        return keep

    def __len__(self):
        return len(self.ids)

    def set_epoch(self, epoch: int):
        """Random crops depend on (seed, epoch, index): call once per epoch for new windows."""
        self.epoch = epoch

    def available(self, i: int) -> list[str]:
        sid = self.ids[i]
        return [m for m in self.modalities if sid in self.files[m]]

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        if self.published:
            sample, arrays = self._read_shards(i)
        else:
            sample, arrays = self._read_tiffs(i)
        if not arrays:
            return sample
        shapes = {m: x.shape[-2:] for m, (_, x) in arrays.items()}
        if len(set(shapes.values())) > 1:
            sizes = [f"{arrays[m][0]} {h}x{w}" for m, (h, w) in shapes.items()]
            raise ValueError(f"sample {sid}: modalities differ in size: " + ", ".join(sizes))
        top, left = self._window(i, *next(iter(shapes.values())), arrays)
        s = self.size
        for m, (path, x) in arrays.items():
            if s:
                x = x[..., top:top + s, left:left + s]
            if m in IMAGE_MODALITIES and m != "LULC":
                # elementwise, so cropping first gives the same values for less work
                x = self._standardize(m, x, path)
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
        """The modalities of sample i from their GeoTIFF and text files, and its label if asked
        for."""
        sid, sample, arrays = self.ids[i], {}, {}
        for m in self.available(i):
            path = self.files[m][sid]
            if MODALITIES[m].kind == "image":
                arrays[m] = (path, self._read_image(m, path))
                continue
            text = read_text(path).strip()
            if m == "coords":
                parse_coords(text, path)
            sample[m] = text
        if self.labels and sid in self.files[self.labels]:
            path = self.files[self.labels][sid]
            x, _ = read_tiff(path)
            label = to_channels_first(x, 1, path)[0].astype(np.int64)
            arrays[self.labels] = (path, label)
        return sample, arrays

    def _read_shards(self, i: int) -> tuple[dict, dict]:
        """Sample i from its tar members: images and label from zarr.zip, caption from text, and
        coords from the centre of any image member."""
        sid, sample, arrays, centre = self.ids[i], {}, {}, None
        for m in self.available(i):
            member = self.files[m][sid]
            if m == "caption":
                sample[m] = member_text(member)
            elif m != "coords":
                zarr = read_sample(*member)
                x = self._prepare(m, self._bands(m, zarr["bands"], member), member)
                arrays[m] = (member, x)
                centre = (zarr["center_lon"], zarr["center_lat"])
        if "coords" in self.available(i):
            if centre is None:
                zarr = read_sample(*self.files["coords"][sid])
                centre = (zarr["center_lon"], zarr["center_lat"])
            sample["coords"] = format_coords(float(centre[0]), float(centre[1]))
        if self.labels and sid in self.files[self.labels]:
            member = self.files[self.labels][sid]
            bands = read_sample(*member)["bands"]
            if bands.ndim != 4 or bands.shape[:2] != (1, 1):
                raise ValueError(f"{member}: expected a label map (1, 1, y, x), got {bands.shape}")
            arrays[self.labels] = (member, bands[0, 0].astype(np.int64))
        return sample, arrays

    @staticmethod
    def _bands(m: str, bands: np.ndarray, member: Member) -> np.ndarray:
        """`bands` (time=1, band, y, x) -> (C, H, W), its band count checked against the
        modality table."""
        channels = MODALITIES[m].channels
        if bands.ndim != 4 or bands.shape[1] != channels:
            raise ValueError(f"{member}: expected bands (time, {channels}, y, x) for {m}, "
                             f"got {bands.shape}")
        return bands[0]

    def _read_image(self, m: str, path) -> np.ndarray:
        x, _ = read_tiff(path)
        return self._prepare(m, to_channels_first(x, MODALITIES[m].channels, path), path)

    def _prepare(self, m: str, x: np.ndarray, path) -> np.ndarray:
        """(C, H, W) as stored, its values checked over the whole tile; LULC -> int64 (H, W).
        Standardization waits for the crop (`_standardize`)."""
        check_values(m, x, path)
        if m == "LULC":
            x = x[0].astype(np.int64)
            if x.min() < 0 or x.max() >= len(LULC_CLASSES):
                raise ValueError(f"{path}: LULC classes must lie in 0..{len(LULC_CLASSES) - 1}, "
                                 f"found {x.min()}..{x.max()}")
        return x

    def _standardize(self, m: str, x: np.ndarray, path) -> np.ndarray:
        """(C, h, w) as stored -> standardized float32, NaN -> the band mean."""
        x = standardize(m, x)
        # Sentinel-1 no-data: the band mean, i.e. 0 after standardization
        if np.isnan(x.min()):   # min carries NaN through
            nan = np.isnan(x)
            n = int(nan.sum())
            x[nan] = 0.0
            self.nan_replaced[m] = self.nan_replaced.get(m, 0) + n
            warnings.warn(f"{path}: replaced {n} NaN pixels by the {m} mean", stacklevel=2)
        return x


def files_by_id(folder: Path, ext: str) -> dict[str, Path]:
    """{id: path} of the files `<id><ext>` in a folder (empty when there is no such folder)."""
    if not folder.is_dir():
        return {}
    return {p.name[:-len(ext)]: p for p in folder.iterdir() if p.name.endswith(ext)}


def member_text(member: Member) -> str:
    """A text member (a caption) as a stripped string; not UTF-8 is an error naming the member."""
    data = read_member(*member)
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{member}: not UTF-8 text (byte {e.start}: {e.reason})") from None


# ----------------------------------------------------------------------------
# What a dataset folder holds

def dataset_modalities(root, split=None) -> list[str]:
    """The modalities a dataset folder holds: its modality folders (GeoTIFF layout), or the modality
    folders of its split folders plus coords (the published layout: every sample has a centre)."""
    root = Path(root)
    if is_shard_root(root):
        splits = [split] if split else SPLITS
        folders = layout_folders(root, splits)
        return [m for m in MODALITIES if m in folders] + ["coords"]
    return [m for m in MODALITIES if (root / m).is_dir() and any((root / m).iterdir())]


def has_split(root, split) -> bool:
    """Whether `split` selects samples: a split folder (published layout), or splits/<split>.txt."""
    if is_shard_root(root):
        return split in SPLITS and (Path(root) / split).is_dir()
    return bool(split) and (Path(root) / "splits" / f"{split}.txt").exists()


def has_folder(root, folder: str, split=None) -> bool:
    """Whether a dataset holds a folder (a modality, caption/ or a label folder such as
    label_water): `<root>/<folder>` (GeoTIFF layout), or `<split>/<folder>` of any split
    (published layout)."""
    root = Path(root)
    if is_shard_root(root):
        splits = [split] if split else SPLITS
        return folder in layout_folders(root, splits)
    return (root / folder).is_dir()


def dataset_stats(root, limit=None) -> dict:
    """Per-band mean and std of every image modality under `root` in physical units (NaN
    ignored), with the number of files read: {modality: (mean, std, files)}."""
    out = {}
    for m in IMAGE_MODALITIES:
        files = _stored_tiles(root, m)[:limit]
        if not files or m == "LULC":
            continue
        c = MODALITIES[m].channels
        acc = np.zeros((3, c))                            # sum, sum of squares, count
        for f in tqdm(files, desc=m, leave=False):
            x = _read_stored(m, f).reshape(c, -1).astype(np.float64)
            ok = ~np.isnan(x)
            x = np.where(ok, x, 0)
            acc += [x.sum(1), (x ** 2).sum(1), ok.sum(1)]
        mean = acc[0] / acc[2]
        std = np.sqrt(np.maximum(acc[1] / acc[2] - mean ** 2, 0))
        out[m] = (mean, std, len(files))
    return out


def _stored_tiles(root, m: str) -> list:
    """The files (GeoTIFF layout) or tar members (published layout, split by split) of modality
    m."""
    if is_shard_root(root):
        _, files = index_layout(root, SPLITS, [m])
        return list(files[m].values())
    return sorted((Path(root) / m).glob("*.tif"))


def _read_stored(m: str, where) -> np.ndarray:
    """(C, H, W) as stored, from a GeoTIFF path or a tar member."""
    if isinstance(where, Member):
        return TerraMeshDataset._bands(m, read_sample(*where)["bands"], where)
    return to_channels_first(read_tiff(where)[0], MODALITIES[m].channels, where)


# ----------------------------------------------------------------------------
# Commands

def _show(root, sid, out, max_size=None):
    """All modalities (and label folders) of one sample side by side, caption and coords as text."""
    root = Path(root)
    if is_shard_root(root):
        return _show_published(root, sid, out, max_size)
    panels, lines = [], []
    folders = [m for m in MODALITIES if (root / m).is_dir()]
    folders += sorted(p.name for p in root.glob("label*"))
    for folder in folders:
        mod = MODALITIES.get(folder)
        text_file = root / folder / f"{sid}.txt"
        tile = root / folder / f"{sid}.tif"
        if mod and mod.kind == "sequence":
            if text_file.exists():
                text = f"{folder}: {read_text(text_file).strip()}"
                lines += textwrap.wrap(text, 110, subsequent_indent="  ")
        elif tile.exists():
            channels = mod.channels if mod else 1
            x = to_channels_first(read_tiff(tile)[0], channels, tile)
            panels.append((folder, render(folder, x)))
    if not panels and not lines:
        raise FileNotFoundError(f"{root}: no sample with id {sid!r}")
    save_sheet(out, panels, lines=lines, max_size=max_size)
    print(f"wrote {out}: {', '.join(p[0] for p in panels)}")


def _show_published(root, sid, out, max_size=None):
    """`show` for the published layout: the image modalities, caption and centre as text below."""
    ds = TerraMeshDataset(root, size=None)
    if sid not in ds.files["coords"]:
        raise FileNotFoundError(f"{root}: no sample with key {sid!r} in {', '.join(SPLITS)}")
    sample = ds[ds.ids.index(sid)]
    panels = []
    for m, x in sample.items():
        if not isinstance(x, str):
            panels.append((m, render(m, x, standardized=True)))
    lines = []
    if "caption" in sample:
        lines += textwrap.wrap(f"caption: {sample['caption']}", 110, subsequent_indent="  ")
    lines.append(f"coords: {sample['coords']}")
    save_sheet(out, panels, lines=lines, max_size=max_size)
    print(f"wrote {out}: {', '.join(p[0] for p in panels)}")


def export_sample(root, out, sid=None, split=None, names=None, overwrite=False) -> str:
    """Writes one sample's image modalities as GeoTIFFs `<out>/<MOD>.tif`, channel-last in
    physical units as stored (float16 as float32): the `--input MOD=file.tif` of generate.py.
    The sample is `sid`, or the first of `split` that has all of `names`. Returns its key."""
    ds = TerraMeshDataset(root, names, size=None, split=split)
    if sid is None:
        sid = first_complete(ds, root, split)
    targets = []
    for m in ds.modalities:
        if MODALITIES[m].kind == "image" and sid in ds.files[m]:
            path = output_file(Path(out) / f"{m}.tif", "--out", overwrite)
            targets.append((m, path))
    if not targets:
        raise ValueError(f"--root {root}: sample {sid!r} has none of the image modalities "
                         f"asked for")
    for m, path in targets:
        x = _read_stored(m, ds.files[m][sid])
        if x.dtype == np.float16:
            x = x.astype(np.float32)
        write_geotiff(path, x)
    print(f"wrote {', '.join(str(p) for _, p in targets)} (sample {sid})")
    return sid


def first_complete(ds: TerraMeshDataset, root, split) -> str:
    """The first sample of `ds` that has every modality of `ds.modalities`."""
    for k, sid in enumerate(ds.ids):
        if len(ds.available(k)) == len(ds.modalities):
            return sid
    wanted = ", ".join(ds.modalities)
    raise ValueError(f"--root {root}: no sample of split {split!r} has all of {wanted}")


def export_captions(root, out, split=None, overwrite=False) -> int:
    """Writes every caption of the dataset (or of `split`) as one line of a UTF-8 text file: the
    --corpus of text_tokenizer.py. Returns the number of captions."""
    path = output_file(out, "--out", overwrite)
    ds = TerraMeshDataset(root, ["caption"], size=None, split=split)
    if not len(ds):
        raise ValueError(f"--root {root}: no captions (no caption/ folder)")
    lines = [ds[i]["caption"].replace("\n", " ") for i in tqdm(range(len(ds)), desc="captions")]
    write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} captions to {path}")
    return len(lines)


def clear_world(out, overwrite: bool):
    """synth writes into an empty folder; --overwrite removes the folders a world consists of
    (and nothing else), so that no tile of an earlier world (another size, another count) stays
    beside the new ones."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out}: the folder is not empty; choose a new folder, or pass "
                         f"--overwrite to replace the world in it")
    for name in list(MODALITIES) + ["label_water", "splits", *SPLITS]:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def synth(args, parser):
    """The `synth` command: checks the tile size, clears --out, writes the world."""
    t0 = time.time()
    whole = args.size % PATCH == 0
    with_margin = args.layout == "shards" and (args.size - 8) % PATCH == 0
    if not whole and not with_margin:
        parser.error(f"--size {args.size}: tiles are a multiple of {PATCH} px "
                     f"(shards: {PATCH} k + 8, e.g. 264)")
    clear_world(args.out, args.overwrite)
    if args.layout == "shards":
        synthesize_shards(args.out, args.n, args.size, args.seed, args.workers)
    else:
        synthesize(args.out, args.n, args.size, args.seed, args.workers)
    seconds = time.time() - t0
    print(f"wrote {args.n} samples of {args.size}x{args.size} to {args.out} in {seconds:.1f} s")


def print_stats(root, limit):
    """The `stats` command: per-band mean and std next to the official constants."""
    print(f"{'modality':8s} {'band':16s} {'mean':>10s} {'std':>10s} | {'official mean':>13s} "
          f"{'official std':>12s} | (mean-official)/std")
    for m, (mean, std, n) in dataset_stats(root, limit).items():
        mod = MODALITIES[m]
        for b, band in enumerate(mod.bands):
            shift = (mean[b] - mod.mean[b]) / mod.std[b]
            print(f"{m:8s} {band:16s} {mean[b]:10.3f} {std[b]:10.3f} | {mod.mean[b]:13.3f} "
                  f"{mod.std[b]:12.3f} | {shift:+.2f}")
        print(f"{'':8s} ({n} files)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic TerraMesh-like world")
    p.add_argument("--out", default="data/synth", help="output folder (TerraMesh layout)")
    p.add_argument("--n", type=positive_int, default=2000, help="number of samples")
    p.add_argument("--size", type=positive_int, default=64,
                   help=f"tile size in pixels (10 m each); a multiple of {PATCH}, "
                        f"or of {PATCH} plus 8 with --layout shards (TerraMesh: 264)")
    p.add_argument("--layout", choices=["tiff", "shards"], default="tiff",
                   help="GeoTIFF folders, or the published layout: "
                        "{train,val,test}/<FOLDER>/*.tar of zarr.zip samples, "
                        "with our caption/ and label_water/ extras")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="world seed; a sample depends only on (seed, index)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default: all cores, at most 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the world in a non-empty --out (its modality, "
                        "label_water, splits and split folders are removed first)")
    p = sub.add_parser("stats",
                       help="per-band mean/std of a dataset next to the official constants")
    p.add_argument("--root", required=True, help="TerraMesh folder (either layout)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="read at most this many files per modality")
    p = sub.add_parser("show", help="draw all modalities of one sample side by side (PNG)")
    p.add_argument("--root", required=True, help="TerraMesh folder (either layout)")
    p.add_argument("--id", required=True, help="sample id (file name without extension) or key")
    p.add_argument("--out", default="sample.png", help="output PNG")
    p.add_argument("--max-size", type=positive_int, default=None,
                   help="subsample larger tiles to this many pixels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p = sub.add_parser("export", help="write one sample's tiles as GeoTIFFs <out>/<MOD>.tif")
    p.add_argument("--root", required=True, help="TerraMesh folder (either layout)")
    p.add_argument("--id", default=None,
                   help="sample id or key (default: the first of --split with every --modality)")
    p.add_argument("--split", default=None, help="split to take the first sample from")
    p.add_argument("--modality", type=modality_names(IMAGE_MODALITIES), default=None,
                   help="image modalities, comma-separated (default: all the sample has)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing <out>/<MOD>.tif files")
    p = sub.add_parser("captions", help="write every caption as one line of a text file")
    p.add_argument("--root", required=True, help="TerraMesh folder with captions (either layout)")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.add_argument("--out", required=True,
                   help="output text file (a --corpus of text_tokenizer.py)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.command == "synth":
        synth(args, parser)
    elif args.command == "stats":
        print_stats(args.root, args.limit)
    elif args.command == "show":
        output_file(args.out, "--out", args.overwrite)               # before any work
        _show(args.root, args.id, args.out, args.max_size)
    elif args.command == "export":
        names = args.modality.split(",") if args.modality else None
        export_sample(args.root, args.out, args.id, args.split, names, args.overwrite)
    else:
        export_captions(args.root, args.out, args.split, args.overwrite)


if __name__ == "__main__":
    run_main(main)
