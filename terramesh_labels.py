"""
Readers of users' own data for the downstream evaluations, on pangaea_datasets' `PangaeaDataset`
base: a TerraMesh root with a label folder (`TerraMeshLabels`: the GeoTIFF layout or the
published shard layout, terramesh.py), the dominant-LULC classes of a TerraMesh root
(`LULCClasses`, and `write_class_folders` which writes them as files), and class folders of
GeoTIFFs (`ImageFolder`) for few-shot classification.

Consumes folders; produces samples `ds[i]` -> ({modality | "optical" | "sar": float32
(C, T, H, W) in file units}, int64 target), standardized later with the train split's own
statistics (`band_stats`). Used by eval_pangaea.py and tim_data.py; `python eval_pangaea.py
folders` runs `write_class_folders`. Nothing here trains a model: see eval_pangaea.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from geotiff import write_geotiff
from modalities import CLOUDS, LULC_CLASSES, MODALITIES, NO_DATA, destandardize
from pangaea_datasets import PangaeaDataset, band_codes, read_lines, read_tif, source_key
from shard_index import Member, is_shard_root
from terramesh import TerraMeshDataset, dataset_modalities, has_split
from terramesh_shards import read_sample


def band_stats(reader, limit=500) -> tuple:
    """Per-band ({modality: mean}, {modality: std}) over the first `limit` samples of a reader."""
    sums = {}                       # modality -> (3, C): sum, sum of squares, pixel count
    for i in range(min(len(reader), limit)):
        for k, x in reader[i][0].items():
            x = x.reshape(len(x), -1).astype(np.float64)
            acc = sums.setdefault(k, np.zeros((3, len(x))))
            acc[:] += [x.sum(1), (x ** 2).sum(1), np.full(len(x), x.shape[1])]
    mean, std = {}, {}
    for k, (total, squares, count) in sums.items():
        mean[k] = total / count
        std[k] = np.sqrt(np.maximum(squares / count - mean[k] ** 2, 1e-12))
    return ({k: tuple(v) for k, v in mean.items()}, {k: tuple(v) for k, v in std.items()})


# -----------------------------------------------------------------------------------------------
# Users' data in a TerraMesh root: the GeoTIFF layout or the published shards (terramesh.py)

def stored(m: str, where, channels: int) -> np.ndarray:
    """(C, H, W) of modality m as stored: a GeoTIFF path, or a zarr.zip tar member (published
    layout; its `bands` are (time=1, C, y, x))."""
    if not isinstance(where, Member):
        return read_tif(where, channels)
    bands = read_sample(*where)["bands"]
    if bands.ndim != 4 or bands.shape[:2] != (1, channels):
        raise ValueError(f"{where}: expected bands (1, {channels}, y, x) for {m}, "
                         f"got {bands.shape}")
    return bands[0]


def held_modalities(root, split, wanted) -> list:
    """The pixel modalities of `wanted` that a TerraMesh root holds (either layout)."""
    if is_shard_root(root):
        held = dataset_modalities(root, split)
    else:
        held = [m for m in MODALITIES if (Path(root) / m).is_dir()]
    return [m for m in wanted if MODALITIES[m].pixel_key and m in held]


def split_folders(root) -> dict:
    """{train, val, test: the split that stands for it}. The published layout has train/ and
    val/, test/ only as an extra: without it, the test scores are on val (callers say so)."""
    splits = {"train": "train", "val": "val", "test": "test"}
    if is_shard_root(root) and not has_split(root, "test"):
        splits["test"] = "val"
    return splits


class TerraMeshLabels(PangaeaDataset):
    """<root>/<MODALITY>/<id>.tif, <root>/<labels>/<id>.tif (class map; negative = ignored),
    <root>/splits/<split>.txt (users' own data, the synthetic world's label_water), or the same
    in the published layout (<root>/<split>/<MODALITY>/*.tar, label maps in
    <root>/<split>/<labels>/*.tar); standardized with its train split's statistics"""

    def __init__(self, root, split, labels="label_water", modalities=None, classes=None,
                 stats=None):
        modalities = held_modalities(root, split, modalities or MODALITIES)
        self.data = TerraMeshDataset(root, modalities, size=None, split=split, labels=labels)
        self.name = f"{Path(root).name}/{labels}"
        self.bands = {m: tuple(band_codes(m)) for m in modalities}
        super().__init__(root, split)
        self.classes = tuple(classes or range(1 + self.largest_class()))
        self.mean, self.std = stats or band_stats(self)

    def largest_class(self) -> int:
        files = self.data.files[self.data.labels]
        keys = [self.data.ids[i] for i in self.items]
        return max(int(stored("label", files[k], 1).max()) for k in keys)

    def list_items(self, split):
        """Every sample; in the published layout those with all the modalities asked for (a
        shard has S1GRD or S1RTC, never both)."""
        if not self.data.published:
            return list(range(len(self.data)))
        wanted = len(self.bands)
        return [i for i in range(len(self.data)) if len(self.data.available(i)) == wanted]

    def sample_files(self, i: int) -> str:
        sid = self.data.ids[self.items[i]]
        folders = [*self.bands, self.data.labels]
        files = [self.data.files[m][sid] for m in folders if sid in self.data.files[m]]
        return " + ".join(str(f) for f in files)

    def read(self, i):
        s = self.data[i]   # TerraMeshDataset standardizes with the official constants: undone here
        missing = [m for m in self.bands if m not in s]
        if missing:
            sid = self.data.ids[i]
            raise ValueError(f"{self.root}: sample {sid} has no {', '.join(missing)}")
        image = {m: destandardize(m, s[m].numpy()) for m in self.bands}
        return image, s[self.data.labels].numpy()


class ImageFolder(PangaeaDataset):
    """<root>/<class>/<id>.tif, one modality (bands in the modality's order, or given);
    the target is the class"""

    def __init__(self, root, modality, bands=None, classes=None, stats=None):
        self.key = source_key(modality, ())
        folders = [d.name for d in Path(root).iterdir() if d.is_dir()]
        self.classes = classes or sorted(folders)
        self.name = Path(root).name
        self.bands = {self.key: tuple(bands or band_codes(modality))}
        super().__init__(root, "test")
        self.mean, self.std = stats or band_stats(self)

    def list_items(self, split):
        items = []
        for k, c in enumerate(self.classes):
            items += [(f, k) for f in sorted((self.root / c).glob("*.tif"))]
        return items

    def read(self, item):
        return {self.key: read_tif(item[0], len(self.bands[self.key]))}, item[1]


# -----------------------------------------------------------------------------------------------
# Few-shot image folders from a TerraMesh-layout folder

def dominant_class(lulc: np.ndarray, min_share: float) -> str | None:
    """The LULC class covering >= min_share of a tile (no data and clouds counted in the total,
    never as the class), as a folder name; None where no class does."""
    n = np.bincount(lulc.ravel(), minlength=len(LULC_CLASSES))
    total = n.sum()
    n[[NO_DATA, CLOUDS]] = 0
    if n.max() < min_share * total:
        return None
    return LULC_CLASSES[n.argmax()].replace(" ", "_").replace("/", "_")


def _link_or_copy(src: Path, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class LULCClasses(PangaeaDataset):
    """The samples of a TerraMesh root (either layout) whose LULC map has a dominant class
    (`dominant_class`): one modality as the image (bands in the modality's order), that class
    as the target. Few-shot straight from TerraMesh, the same samples and classes that
    `write_class_folders` writes as files."""

    def __init__(self, root, split, modality, min_share=0.5, classes=None, stats=None):
        self.data = TerraMeshDataset(root, ["LULC", modality], size=None, split=split)
        self.modality, self.key = modality, source_key(modality, ())
        self.name = Path(root).name
        self.bands = {self.key: tuple(band_codes(modality))}
        self.found = self.dominant(min_share)
        self.classes = classes or sorted({name for _, name in self.found})
        super().__init__(root, split)
        self.mean, self.std = stats or band_stats(self)

    def dominant(self, min_share: float) -> list:
        """[(sample index, class folder name)] of the samples with both modalities and a
        dominant class."""
        found = []
        files = self.data.files
        for i, sid in enumerate(tqdm(self.data.ids, desc="LULC classes", leave=False)):
            if sid not in files["LULC"] or sid not in files[self.modality]:
                continue
            name = dominant_class(stored("LULC", files["LULC"][sid], 1), min_share)
            if name is not None:
                found.append((i, name))
        return found

    def list_items(self, split):
        index = {name: k for k, name in enumerate(self.classes)}
        return [(i, index[name]) for i, name in self.found if name in index]

    def sample_files(self, i: int) -> str:
        sid = self.data.ids[self.items[i][0]]
        return str(self.data.files[self.modality][sid])

    def image(self, i: int) -> np.ndarray:
        """(C, H, W) of sample i of the dataset as stored."""
        where = self.data.files[self.modality][self.data.ids[i]]
        return stored(self.modality, where, MODALITIES[self.modality].channels)

    def read(self, item):
        return {self.key: self.image(item[0])}, item[1]


def write_class_folders(root, out, modality="S2L2A", min_share=0.5) -> dict:
    """<out>/{train,test}/<class>/<id>.tif from a TerraMesh root: the class is the dominant LULC
    class where it covers >= min_share of the tile. GeoTIFF layout: hard links; published
    layout: GeoTIFFs of the members as stored (float16 as float32). -> counts."""
    if is_shard_root(root):
        return write_class_tiles(root, out, modality, min_share)
    root, out, counts = Path(root), Path(out), {}
    for split in ("train", "test"):
        for sid in tqdm(read_lines(root / "splits" / f"{split}.txt"), desc=split, leave=False):
            name = dominant_class(read_tif(root / "LULC" / f"{sid}.tif"), min_share)
            if name is None:
                continue
            _link_or_copy(root / modality / f"{sid}.tif", out / split / name / f"{sid}.tif")
            counts[split, name] = counts.get((split, name), 0) + 1
    return counts


def write_class_tiles(root, out, modality: str, min_share: float) -> dict:
    """write_class_folders of a published root (its test/ split, else val/ as test)."""
    counts = {}
    for split, folder in (("train", "train"), ("test", split_folders(root)["test"])):
        reader = LULCClasses(root, folder, modality, min_share, stats=({}, {}))
        for i, k in reader.items:
            name = reader.classes[k]
            x = reader.image(i)
            if x.dtype == np.float16:
                x = x.astype(np.float32)
            dst = Path(out) / split / name / f"{reader.data.ids[i]}.tif"
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_geotiff(dst, x)
            counts[split, name] = counts.get((split, name), 0) + 1
    return counts
