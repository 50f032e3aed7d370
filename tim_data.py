"""
The data side of TiM fine-tuning (tim_finetune.py): the readers of Sen1Floods11
(pangaea_datasets.py) or of a TerraMesh root with a label folder (terramesh_labels.py, either
layout), their bands matched to TerraMind's modalities by name, standardized with TerraMind's
pretraining constants (official configs), NaN -> the mean, and the training crops.

Consumes a reader; produces ({modality: float32 (C, H, W)}, int64 label (H, W), key) samples,
where key = (i, top, left) names the generator input for the TiM token cache. Nothing here
runs on its own: the commands are in tim_finetune.py's docstring.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from modalities import PATCH, standardize
from pangaea_datasets import READERS, band_codes, source_key
from terramesh_labels import TerraMeshLabels, split_folders

IGNORE = -1   # label value of unlabelled pixels (Sen1Floods11, TerraMesh label folders)


def band_plan(reader, modalities) -> dict:
    """{modality: (reader key, index of each of its bands in that key's bands, -1 = missing)}:
    the same name, else optical / sar (Sen1Floods11 "optical" = 13 L1C bands, "sar" = VV, VH)."""
    plan = {}
    for m in modalities:
        src = source_key(m, reader.bands)
        if src not in reader.bands:
            raise ValueError(f"{reader.name}: no data for {m} (it has {list(reader.bands)})")
        have = list(reader.bands[src])
        index = [have.index(b) if b in have else -1 for b in band_codes(m)]
        plan[m] = (src, np.array(index))
    return plan


def prepare(name: str, x: np.ndarray, index=None) -> torch.Tensor:
    """Physical (C, H, W) -> standardized float32 with TerraMind's pretraining constants
    (official configs); bands the data lack (index -1) and NaN (no data) become 0 = the mean."""
    if index is not None:
        x = np.where((index >= 0)[:, None, None], x[np.maximum(index, 0)], np.nan)
    x = torch.from_numpy(np.asarray(x, np.float32))
    return torch.nan_to_num(standardize(name, x), 0.0)


class TiMData(torch.utils.data.Dataset):
    """A reader's samples as ({modality: (C, H, W)}, label (H, W), key).

    Training: a random `crop` per sample and epoch, at whole-patch offsets, rng(seed, epoch, i);
    small images padded (inputs 0, labels ignored). Evaluation: whole images.
    key = (i, top, left) names the generator input for the TiM cache."""

    def __init__(self, reader, modalities, crop: int, train: bool, seed: int = 0):
        self.reader, self.plan = reader, band_plan(reader, modalities)
        self.crop, self.train = crop, train
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.reader)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        # reader.read: file units with NaN kept (PangaeaDataset[i] would make NaN 0)
        image, y = self.reader.read(self.reader.items[i])
        x = {m: prepare(m, image[src], index) for m, (src, index) in self.plan.items()}
        y = torch.as_tensor(np.asarray(y, np.int64))
        if not self.train:
            return x, y, torch.tensor([i, 0, 0])
        return self.random_crop(x, y, i)

    def random_crop(self, x: dict, y: torch.Tensor, i: int) -> tuple:
        s = self.crop
        ph, pw = max(s - y.shape[0], 0), max(s - y.shape[1], 0)
        x = {m: F.pad(v, (0, pw, 0, ph)) for m, v in x.items()}
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top = int(rng.integers(0, (y.shape[0] - s) // PATCH + 1)) * PATCH
        left = int(rng.integers(0, (y.shape[1] - s) // PATCH + 1)) * PATCH
        x = {m: v[:, top:top + s, left:left + s] for m, v in x.items()}
        return x, y[top:top + s, left:left + s], torch.tensor([i, top, left])


def readers(args) -> dict:
    """{split: reader} of `--dataset` at `--data` (TerraMesh, either layout: the label folder
    `--labels`; a published root without test/ is tested on val/, and says so)."""
    if args.dataset != "terramesh":
        return {s: READERS[args.dataset](args.data, s) for s in ("train", "val", "test")}
    classes = args.classes.split(",") if args.classes else None
    folders = split_folders(args.data)
    if folders["test"] != "test":
        print(f"{args.data}: no test/ split folder; the test scores are on {folders['test']}/")
    out = {}
    for s, folder in folders.items():
        out[s] = TerraMeshLabels(args.data, folder, args.labels, args.modalities, classes,
                                 stats=({}, {}))
        classes = out["train"].classes
    return out
