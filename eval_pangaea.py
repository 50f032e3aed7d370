"""
PANGAEA evaluation (paper Table 6) and few-shot classification (paper Tables 5, 11) of a frozen TerraMind encoder.

Segmentation, the PANGAEA protocol (../shared/spec/pangaea.md §3): frozen encoder; four encoder blocks ([3, 5, 7,
11] of 12, [7, 11, 15, 23] of 24) as grids into UPerNet (neck x4/x2/x1/x0.5, pooling 1/2/3/6, 512 channels,
dropout 0.1); AdamW lr 1e-4, wd 0.05, batch 8, 80 epochs, lr x0.1 at 60%/90% of the iterations; random 224 crops;
224 sliding windows, overlaps averaged; one confusion matrix per split -> IoU and mIoU as PANGAEA computes them.
Bands are matched by name (missing ones zero-filled and reported) and standardized with the dataset's statistics;
multi-temporal data runs the encoder per frame, then L-TAE or Linear(T, 1). Readers: the benchmark's on-disk
formats (READERS) and TerraMesh-layout folders with a label folder. Few-shot: mean-pooled embeddings of image
folders (<root>/[train|test/]<class>/*.tif), k-shot n-way, nearest prototype, 200 runs on the full test set.

Consumes our checkpoint (`--model`), official weights (`--official` + `--size`) or a random init (neither);
writes <out>/results.json, head.safetensors, prediction.png. CPU smoke runs on the synthetic world with the smoke
model of pretrain.py (ckpt/; without --model: a random-init --size smoke), then one GPU:
    python eval_pangaea.py seg --dataset terramesh --root data/synth --labels label_water --classes land,water \
        --modalities S2L2A,S1GRD --model ckpt/terramind.safetensors --crop 64 --channels 64 --epochs 20 --workers 0 \
        --out runs/pangaea/water
    python eval_pangaea.py folders --root data/synth --out data/synth_classes        # dominant-LULC classes
    python eval_pangaea.py fewshot --root data/synth_classes --modality S2L2A --ways 5 --shots 1 \
        --model ckpt/terramind.safetensors
    python eval_pangaea.py seg --dataset sen1floods11 --root data/sen1floods11_v1.1 --official TerraMind_v1_base.pt \
        --size base --modalities S2L1C,S1GRD --device cuda --out runs/pangaea/sen1floods11
    python eval_pangaea.py table runs/pangaea/*/results.json                        # paper Table 6 layout
The head trains on frozen features in one process: there is no torchrun variant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

from pictures import save_sheet
from terramesh import (CLOUDS, LULC_CLASSES, LULC_COLORS, MODALITIES, NO_DATA, S2_BAND_CODES, TerraMeshDataset,
                       destandardize, read_tiff, render, save_safetensors, to_channels_first)

OPTICAL, SAR = ("S2L1C", "S2L2A", "S2RGB"), ("S1GRD", "S1RTC")
S2_13 = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_10 = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")


def band_codes(modality: str) -> list:
    """A TerraMind modality's bands as Sentinel-2 band codes (B1..B12, B8A); VV, VH, DEM otherwise."""
    return [S2_BAND_CODES.get(b, b) for b in MODALITIES[modality].bands]


def _tif(path, channels=1) -> np.ndarray:
    return to_channels_first(read_tiff(path)[0], channels, path)                     # (C, H, W)


def _npy(path) -> np.ndarray:
    try:
        return np.load(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _pairs(images, labels, where) -> list:
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")
    return list(zip(images, labels))


def _lines(path) -> list:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: split file not found")
    return [s.strip() for s in Path(path).read_text().splitlines() if s.strip()]


def _nearest(x, h, w):
    """Nearest resampling of (..., H, W) to (h, w): source pixel floor((i + 0.5) * H / h), as GDAL/rasterio."""
    rows, cols = (((np.arange(n) + 0.5) * x.shape[a] / n).astype(int) for n, a in ((h, -2), (w, -1)))
    return x[..., rows[:, None], cols]


# -----------------------------------------------------------------------------------------------------------
# Dataset readers: the benchmark's on-disk formats and configs (spec §1, PANGAEA configs/dataset/*.yaml)

class PangaeaDataset(torch.utils.data.Dataset):
    """One split of a dataset in its own format (the class docstring gives the layout). `ds[i]` -> ({modality:
    float32 (C, T, H, W) in file units, NaN -> 0}, int64 target (H, W)). A reader carries its dataset's config:
    classes, ignore_index, bands/mean/std per modality ("optical", "sar" or a TerraMind modality), frames
    (multi_temporal), binary (one sigmoid logit), prep ("crop": random crops, sliding windows; "focus": crops
    around labelled pixels; "resize": the whole image resized to the encoder size, no windows)."""
    ignore_index, frames, binary, prep = -1, 1, False, "crop"

    def __init__(self, root, split: str):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        if not (items := self.list_items(split)):
            raise FileNotFoundError(f"{self.root}: no {split} samples of {self.name}; expected {self.__doc__}")
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, target = self.read(self.items[i])
        image = {k: np.nan_to_num(v.astype(np.float32)) for k, v in image.items()}
        return {k: v[:, None] if v.ndim == 3 else v for k, v in image.items()}, np.asarray(target, np.int64)


class Sen1Floods11(PangaeaDataset):
    """v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv ('<x>_S1Hand.tif,<x>_LabelHand.tif'),
    v1.1/data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand}/*.tif"""
    name, classes, bands = "sen1floods11", ("Not Water", "Water"), {"optical": S2_13, "sar": ("VV", "VH")}
    mean = {"optical": (1626.916, 1396.035, 1364.061, 1218.228, 1466.073, 2386.903, 2845.613, 2622.958, 3077.482,
                        486.874, 63.779, 2030.648, 1179.166), "sar": (-10.184408, -16.895273)}
    std = {"optical": (700.171, 739.095, 735.248, 864.937, 776.880, 921.368, 1084.373, 1022.634, 1196.443, 336.611,
                       143.999, 980.871, 764.608), "sar": (4.255339, 5.290568)}

    def list_items(self, split):
        d, csv = self.root / "v1.1/data/flood_events/HandLabeled", f"flood_{'valid' if split == 'val' else split}_data"
        rows = [r.split(",") for r in _lines(self.root / f"v1.1/splits/flood_handlabeled/{csv}.csv")]
        return [(d / "S1Hand" / a, d / "S2Hand" / a.replace("S1Hand", "S2Hand"), d / "LabelHand" / b) for a, b in rows]

    def read(self, item):
        return {"optical": _tif(item[1], 13), "sar": _tif(item[0], 2)}, _tif(item[2])[0]


class HLSBurnScars(PangaeaDataset):
    """{training,validation}/*merged.tif (H, W, 6) and *mask.tif; `validation` is the test split"""
    name, classes, bands = "hlsburnscars", ("Not burned", "Burn scar"), {"optical": S2_10[:3] + S2_10[7:]}
    mean = {"optical": (0.033350, 0.057012, 0.058897, 0.232325, 0.197285, 0.119449)}
    std = {"optical": (0.022691, 0.026808, 0.040041, 0.077917, 0.087087, 0.072420)}

    def list_items(self, split):   # official: sklearn train_test_split(test_size=0.1, random_state=23) of `training`
        d = self.root / ("validation" if split == "test" else "training")
        pairs = _pairs(sorted(d.glob("*merged.tif")), sorted(d.glob("*mask.tif")), d)
        n_val, order = math.ceil(0.1 * len(pairs)), np.random.RandomState(23).permutation(len(pairs))
        return pairs if split == "test" else [pairs[i] for i in (order[n_val:] if split == "train" else order[:n_val])]

    def read(self, item):
        x = _tif(item[0], 6)
        return {"optical": np.where(x == 9999, 0, x)}, _tif(item[1])[0]              # official: 9999 -> 0


class MADOS(PangaeaDataset):
    """splits/{train,val,test}_X.txt ('Scene_<n>_<crop>'), Scene_*/{10,20,60}/*_L2R_rhorc_<nm>_<crop>.tif, labels
    Scene_*/10/*_L2R_cl_<crop>.tif"""
    name, bands, prep = "mados", {"optical": S2_13[:9] + S2_13[11:]}, "focus"
    classes = ("Marine Debris", "Dense Sargassum", "Sparse Floating Algae", "Natural Organic Material", "Ship",
               "Oil Spill", "Marine Water", "Sediment-Laden Water", "Foam", "Turbid Water", "Shallow Water",
               "Waves & Wakes", "Oil Platform", "Jellyfish", "Sea snot")
    mean = {"optical": (.05827, .05223, .04381, .03571, .03413, .03680, .03999, .03567, .03965, .02680, .01979)}
    std = {"optical": (.03241, .03432, .03548, .03758, .03785, .04992, .05884, .05546, .06424, .04211, .03019)}

    def list_items(self, split):   # bands sorted by wavelength (nm in the name)
        names, crop = set(_lines(self.root / "splits" / f"{split}_X.txt")), lambda p: p.name.split("_cl_")[-1]
        return [(sorted(scene.glob(f"*/*L2R_rhorc*_{crop(y)}"), key=lambda p: int(p.name.split("_")[-2])), y)
                for scene in sorted(self.root.glob("Scene_*")) for y in sorted((scene / "10").glob("*_cl_*"))
                if f"{scene.name}_{crop(y)[:-4]}" in names]

    def read(self, item):
        if len(item[0]) != 11:
            raise ValueError(f"{item[1]}: {len(item[0])} rhorc bands for this crop, expected 11")
        y = _tif(item[1])[0].astype(np.int64) - 1                                    # official: 0 -> -1 (ignore)
        return {"optical": np.stack([_nearest(_tif(b)[0], *y.shape) for b in item[0]])}, y   # 20/60 m -> 10 m


class PASTIS(PangaeaDataset):
    """metadata.geojson (ID_PATCH, Fold: 1-3 train, 4 val, 5 test), DATA_S2/S2_<id>.npy, DATA_S1A/S1A_<id>.npy
    (T, C, 128, 128), ANNOTATIONS/TARGET_<id>.npy (channel 0: classes)"""
    name, ignore_index, frames, prep = "pastis", 19, 6, "resize"
    classes = ("Background", "Meadow", "Soft Winter Wheat", "Corn", "Winter Barley", "Winter Rapeseed", "Spring Barley",
               "Sunflower", "Grapevine", "Beet", "Winter Triticale", "Winter Durum Wheat", "Fruits, Vegetables, Flowers",
               "Potatoes", "Leguminous Fodder", "Soybeans", "Orchard", "Mixed Cereal", "Sorghum", "Void Label")
    bands = {"optical": S2_10, "sar": ("VV", "VH", "VV-VH")}
    mean = {"optical": (1161.676, 1371.431, 1423.407, 1759.725, 2714.526, 3055.838, 3197.896, 3313.358, 2415.968,
                        1626.843), "sar": (-10.9433, -17.36, 6.4167)}
    std = {"optical": (2045.070, 1983.176, 2060.797, 1968.817, 1867.216, 1885.136, 1897.511, 1885.164, 1542.767,
                       1375.251), "sar": (3.3847, 3.3727, 3.3874)}

    def list_items(self, split):
        folds = {"train": (1, 2, 3), "val": (4,), "test": (5,)}[split]
        feats = json.loads((self.root / "metadata.geojson").read_text())["features"]
        return [f["properties"]["ID_PATCH"] for f in feats if f["properties"]["Fold"] in folds]

    def read(self, pid):   # 6 frames evenly spaced (linspace), (T, C, H, W) -> (C, 6, H, W)
        pick = lambda x: x[np.linspace(0, len(x) - 1, self.frames).astype(np.int64)].transpose(1, 0, 2, 3)  # noqa: E731
        s2, s1 = (_npy(self.root / f"DATA_{m}" / f"{m}_{pid}.npy") for m in ("S2", "S1A"))
        return {"optical": pick(s2), "sar": pick(s1)}, _npy(self.root / f"ANNOTATIONS/TARGET_{pid}.npy")[0]


class CropTypeMapping(PangaeaDataset):
    """southsudan/list_eval_partition.csv (id,partition: 0/1/2 = train/val/test), southsudan/npy/southsudan_<id:06d>
    .npz (s1, s2: C x H x W x T), southsudan/truth/southsudan_<id:06d>.npz (truth: 1..4 the classes)"""
    name, classes, frames, prep = "croptypemapping", ("Sorghum", "Maize", "Rice", "Groundnut"), 6, "resize"
    bands = {"optical": S2_10, "sar": ("VV", "VH")}
    mean = {"optical": (2031.169, 1961.431, 1979.410, 2145.663, 2700.288, 3006.880, 2870.535, 3215.056, 2367.765,
                        1645.224), "sar": (-9.448692, -15.309401)}
    std = {"optical": (2112.213, 2027.464, 2136.804, 2100.725, 2082.193, 2142.973, 2071.283, 2152.289, 1334.547,
                       1059.039), "sar": (4.107619, 5.676464)}

    def list_items(self, split):
        rows = [r.split(",") for r in _lines(self.root / "southsudan/list_eval_partition.csv")[1:]]
        return [int(i) for i, part in rows if int(part) == ("train", "val", "test").index(split)]

    def read(self, sid):   # official: time flipped (latest first), cut or zero-padded to 6 frames -> (C, 6, H, W)
        latest = lambda x: np.pad(x[..., ::-1][..., :6], [(0, 0)] * 3 + [(0, max(6 - x.shape[-1], 0))]).transpose(0, 3, 1, 2)  # noqa: E731,E501
        npz, y = (_npy(self.root / f"southsudan/{d}/southsudan_{sid:06d}.npz") for d in ("npy", "truth"))
        y = y["truth"]
        return ({"optical": latest(npz["s2"][:10]), "sar": latest(npz["s1"][:2])},   # s1: VV, VH of its channels
                np.where((y >= 1) & (y <= 4), y - 1, -1))


class AI4SmallFarms(PangaeaDataset):
    """sentinel-2-asia/{train,val,test}/{images,masks}/*.tif (images H x W x 4, masks 0/255)"""
    name, classes, bands, binary = "ai4smallfarms", ("Background", "Crop Field"), {"optical": ("B2", "B3", "B4", "B8")}, True
    mean, std = {"optical": (750.2136, 1032.7277, 1165.1279, 2416.0448)}, {"optical": (283.3842, 332.728, 518.9025, 702.3791)}

    def list_items(self, split):
        d = self.root / "sentinel-2-asia" / split
        return _pairs(sorted((d / "images").glob("*.tif")), sorted((d / "masks").glob("*.tif")), d)

    def read(self, item):
        return {"optical": _tif(item[0], 4)}, _tif(item[1])[0] > 0                    # official: 0/255 -> 0/1


SN7_AOIS = {  # official: the domain-shift split by AOI, 30 train / 15 val / 14 test; names are L15-<this>_13
    "train": "0331E-1257N_1327_3160 0358E-1220N_1433_3310 0457E-1135N_1831_3648 0487E-1246N_1950_3207 0577E-1243N_2309"
             "_3217 0586E-1127N_2345_3680 0595E-1278N_2383_3079 0632E-0892N_2528_4620 0683E-1006N_2732_4164 0924E-1108N"
             "_3699_3757 1015E-1062N_4061_3941 1138E-1216N_4553_3325 1203E-1203N_4815_3378 1204E-1202N_4816_3380 1209E-"
             "1113N_4838_3737 1210E-1025N_4840_4088 1276E-1107N_5105_3761 1298E-1322N_5193_2903 1389E-1284N_5557_3054 "
             "1438E-1134N_5753_3655 1439E-1134N_5759_3655 1481E-1119N_5927_3715 1538E-1163N_6154_3539 1615E-1206N_6460"
             "_3366 1669E-1153N_6678_3579 1669E-1160N_6679_3549 1672E-1207N_6691_3363 1703E-1219N_6813_3313 1709E-1112N"
             "_6838_3742 1716E-1211N_6864_3345",
    "val": "0357E-1223N_1429_3296 0361E-1300N_1446_2989 0368E-1245N_1474_3210 0566E-1185N_2265_3451 0614E-0946N_2459_"
           "4406 0760E-0887N_3041_4643 1014E-1375N_4056_2688 1049E-1370N_4196_2710 1185E-0935N_4742_4450 1289E-1169N_"
           "5156_3514 1296E-1198N_5184_3399 1615E-1205N_6460_3370 1617E-1207N_6468_3360 1669E-1160N_6678_3548 1748E-"
           "1247N_6993_3202",
    "test": "0387E-1276N_1549_3087 0434E-1218N_1736_3318 0506E-1204N_2027_3374 0544E-1228N_2176_3279 0977E-1187N_3911"
            "_3441 1025E-1366N_4102_2726 1172E-1306N_4688_2967 1200E-0847N_4802_4803 1204E-1204N_4819_3372 1335E-1166N"
            "_5342_3524 1479E-1101N_5916_3785 1690E-1211N_6763_3346 1691E-1211N_6764_3347 1848E-0793N_7394_5018"}


class SpaceNet7(PangaeaDataset):
    """metadata_train.json ({AOI: [{aoi_id, year, month, label, mask}]}), train/<AOI>/images_masked/global_monthly_
    <YYYY>_<MM>_mosaic_<AOI>.tif (RGB + alpha), train/<AOI>/labels_raster/global_monthly_..._Buildings.tif"""
    name, classes, bands, binary = "spacenet7", ("Background", "Building"), {"optical": ("B4", "B3", "B2")}, True
    mean, std = {"optical": (121.826, 106.52838, 78.372116)}, {"optical": (56.717068, 44.517075, 40.451515)}
    mosaic, tile = 1024, 256                    # official: mosaics read at 1024 x 1024, cut into 16 tiles of 256

    def list_items(self, split):   # official: labelled, unmasked months only
        meta, ts = json.loads((self.root / "metadata_train.json").read_text()), range(0, self.mosaic, self.tile)
        return [(t["aoi_id"], int(t["year"]), int(t["month"]), i, j) for a in SN7_AOIS[split].split()
                for t in meta.get(f"L15-{a}_13", []) if t["label"] and not t["mask"] for i in ts for j in ts]

    def read(self, item):
        aoi, year, month, i, j = item
        f = str(self.root / "train" / aoi / "{}" / f"global_monthly_{year}_{month:02d}_mosaic_{aoi}{{}}.tif")
        x = _nearest(_tif(f.format("images_masked", ""), 4)[:3], self.mosaic, self.mosaic)         # alpha dropped
        y = _nearest(_tif(f.format("labels_raster", "_Buildings"))[0] > 0, self.mosaic, self.mosaic)
        return {"optical": x[:, i:i + self.tile, j:j + self.tile]}, y[i:i + self.tile, j:j + self.tile]


class DynamicEarthNet(PangaeaDataset):
    """dynnet_training_splits/{train,val,test}.txt ('<image dir> <label.tif> <YYYY-MM>'), <image dir>/<YYYY-MM>-<DD>
    .npy daily frames (C, H, W), labels as .npy class maps (H, W)"""
    name, frames, bands = "dynamicen", 6, {"optical": ("B2", "B3", "B4", "B8")}   # DEVIATION: the config names
    classes = ("impervious surface", "agriculture", "forest & other vegetation", "wetlands", "soil", "water")  # NIR B5
    mean, std = {"optical": (671.2606, 915.6184, 1042.5924, 2605.2092)}, {"optical": (596.9439, 715.5488, 957.9584, 1059.9032)}

    def list_items(self, split):   # official: days 01-06 of the labelled month
        rows = [r.split() for r in _lines(self.root / "dynnet_training_splits" / f"{split}.txt")]
        return [([self.root / d.replace("/reprocess-cropped/UTM-24000/", "/planet/").lstrip("/") /
                  f"{month}-{day:02d}.npy" for day in range(1, 7)], self.root / y.lstrip("/").replace(".tif", ".npy"))
                for d, y, month in rows]

    def read(self, item):
        return {"optical": np.stack([_npy(f) for f in item[0]], 1)}, _npy(item[1])        # (C, T, H, W)


class FiveBillionPixels(PangaeaDataset):
    """{train,val,test}/{imgs or images,labels}/*.tif (images H x W x 4: NIR, R, G, B; label 0 = unlabeled)"""
    name, ignore_index, bands = "fivebillionpixels", 0, {"optical": ("B8", "B4", "B3", "B2")}
    classes = ("unlabeled", "industrial area", "paddy field", "irrigated field", "dry cropland", "garden land",
               "arbor forest", "shrub forest", "park", "natural meadow", "artificial meadow", "river", "urban residential",
               "lake", "pond", "fish pond", "snow", "bareland", "rural residential", "stadium", "square", "road",
               "overpass", "railway station", "airport")
    mean, std = {"optical": (92.6, 124.3, 94.2, 98.0)}, {"optical": (44.5, 51.0, 50.0, 47.1)}

    def list_items(self, split):
        d = self.root / split
        images = sorted((d / "imgs").glob("*.tif")) or sorted((d / "images").glob("*.tif"))
        return _pairs(images, sorted((d / "labels").glob("*.tif")), d)

    def read(self, item):
        return {"optical": _tif(item[0], 4)}, _tif(item[1])[0]


READERS = {r.name: r for r in (HLSBurnScars, MADOS, PASTIS, Sen1Floods11, FiveBillionPixels, DynamicEarthNet,
                               CropTypeMapping, SpaceNet7, AI4SmallFarms)}


def band_stats(reader, limit=500) -> tuple:
    """Per-band ({modality: mean}, {modality: std}) over the first `limit` samples of a reader."""
    sums = {}
    for i in range(min(len(reader), limit)):
        for k, x in reader[i][0].items():
            x = x.reshape(len(x), -1).astype(np.float64)
            sums.setdefault(k, np.zeros((3, len(x))))[:] += [x.sum(1), (x ** 2).sum(1), np.full(len(x), x.shape[1])]
    mean = {k: s[0] / s[2] for k, s in sums.items()}
    return ({k: tuple(v) for k, v in mean.items()},
            {k: tuple(np.sqrt(np.maximum(s[1] / s[2] - mean[k] ** 2, 1e-12))) for k, s in sums.items()})


class TerraMeshLabels(PangaeaDataset):
    """<root>/<MODALITY>/<id>.tif, <root>/<labels>/<id>.tif (class map; negative = ignored), <root>/splits/<split>.txt
    (users' own data, the synthetic world's label_water); standardized with its train split's statistics"""

    def __init__(self, root, split, labels="label_water", modalities=None, classes=None, stats=None):
        modalities = [m for m in (modalities or MODALITIES) if MODALITIES[m].pixel_key and (Path(root) / m).is_dir()]
        self.data = TerraMeshDataset(root, modalities, size=None, split=split, labels=labels)
        self.name, self.bands = f"{Path(root).name}/{labels}", {m: tuple(band_codes(m)) for m in modalities}
        super().__init__(root, split)
        self.classes = tuple(classes or range(1 + max(int(_tif(self.data.files[labels][i]).max()) for i in self.data.ids)))
        self.mean, self.std = stats or band_stats(self)

    def list_items(self, split):
        return list(range(len(self.data)))

    def read(self, i):
        s = self.data[i]   # TerraMeshDataset standardizes with the official constants: back to file units
        if missing := [m for m in self.bands if m not in s]:
            raise ValueError(f"{self.root}: sample {self.data.ids[i]} has no {', '.join(missing)}")
        return {m: destandardize(m, s[m].numpy()) for m in self.bands}, s[self.data.labels].numpy()


class ImageFolder(PangaeaDataset):
    """<root>/<class>/<id>.tif, one modality (bands in the modality's order, or given); the target is the class"""

    def __init__(self, root, modality, bands=None, classes=None, stats=None):
        self.key = "optical" if modality in OPTICAL else "sar" if modality in SAR else modality
        self.classes = classes or sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        self.name, self.bands = Path(root).name, {self.key: tuple(bands or band_codes(modality))}
        super().__init__(root, "test")
        self.mean, self.std = stats or band_stats(self)

    def list_items(self, split):
        return [(f, k) for k, c in enumerate(self.classes) for f in sorted((self.root / c).glob("*.tif"))]

    def read(self, item):
        return {self.key: _tif(item[0], len(self.bands[self.key]))}, item[1]


# -----------------------------------------------------------------------------------------------------------
# Input pipeline: bands by name, the dataset's standardization, crops (spec §3.3)

class BandMatcher:
    """PANGAEA's BandFilter + NormalizeMeanStd + BandPadding. Each encoder input (a TerraMind modality) is fed
    from the dataset modality of its kind (optical: S2L1C/S2L2A/S2RGB, sar: S1GRD/S1RTC, or the same name); bands
    are matched by name in the encoder's order, standardized with the dataset's statistics; bands the dataset
    lacks are 0 (= the mean). `lines` reports it. DEVIATION: PANGAEA feeds B10 into S2L2A's B9 slot."""

    def __init__(self, reader, entries):
        self.plan, self.lines = {}, []
        for e in entries:
            if e not in MODALITIES or not MODALITIES[e].pixel_key:
                raise ValueError(f"{e!r} is not a TerraMind pixel modality: {[m for m in MODALITIES if MODALITIES[m].pixel_key]}")
            src = e if e in reader.bands else "optical" if e in OPTICAL else "sar" if e in SAR else e
            if src not in reader.bands:
                self.lines.append(f"{e}: not fed ({reader.name} has no {src})")
                continue
            have, want = list(reader.bands[src]), band_codes(e)
            index = np.array([have.index(c) if c in have else -1 for c in want])
            self.plan[e] = (src, index, *(np.asarray(s[src], np.float32)[np.maximum(index, 0), None, None, None]
                                          for s in (reader.mean, reader.std)))
            missing, unused = [c for c, i in zip(want, index) if i < 0], [c for c in have if c not in want]
            self.lines.append(f"{e} <- {src}: {int((index >= 0).sum())}/{len(want)} bands" +
                              (f", zero-filled {','.join(missing)}" if missing else "") +
                              (f", unused {','.join(unused)}" if unused else ""))
        if not self.plan:
            raise ValueError(f"no encoder input of {list(entries)} can be fed from {reader.name} ({list(reader.bands)})")

    def __call__(self, image: dict) -> dict:           # {modality: (C, T, H, W)} -> {entry: (C_e, T, H, W)}
        return {e: torch.from_numpy(np.where((index >= 0)[:, None, None, None],
                                             (image[src][np.maximum(index, 0)] - mean) / std, 0).astype(np.float32))
                for e, (src, index, mean, std) in self.plan.items()}


class SegmentationData(torch.utils.data.Dataset):
    """A reader through the protocol's transforms: training samples are random `crop` windows (focus: around a
    random labelled pixel; smaller images padded), evaluation samples whole images; "resize" datasets are always
    the whole image resized to `crop` (image only). `replicate` repeats the set per epoch (data_replicate)."""

    def __init__(self, reader, matcher, crop, train, seed=0, replicate=1):
        self.reader, self.matcher, self.crop, self.train = reader, matcher, crop, train
        self.seed, self.replicate, self.epoch = seed, replicate, 0

    def __len__(self):
        return len(self.reader) * self.replicate

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        (image, y), r, s = self.reader[i % len(self.reader)], self.reader, self.crop
        x = self.matcher(image)
        if r.prep == "resize":    # official: bilinear + antialias, image only
            return {e: F.interpolate(v.flatten(0, 1)[None], (s, s), mode="bilinear", antialias=True)[0]
                    .view(*v.shape[:2], s, s) for e, v in x.items()}, y
        if not self.train:
            return x, y
        ph, pw = max(s - y.shape[0], 0), max(s - y.shape[1], 0)
        x = {e: F.pad(v, (0, pw, 0, ph)) for e, v in x.items()}                   # inputs: the mean
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=r.ignore_index)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top, left = rng.integers(0, y.shape[0] - s + 1), rng.integers(0, y.shape[1] - s + 1)
        labelled = np.argwhere(y != r.ignore_index) if r.prep == "focus" else []
        if len(labelled):
            row, col = labelled[rng.integers(len(labelled))]
            top, left = np.clip(row - s // 2, 0, y.shape[0] - s), np.clip(col - s // 2, 0, y.shape[1] - s)
        return {e: v[..., top:top + s, left:left + s] for e, v in x.items()}, y[top:top + s, left:left + s]


# -----------------------------------------------------------------------------------------------------------
# The model: frozen encoder, temporal mapping, UPerNet (spec §3.1, §3.4)

def default_layers(depth: int) -> list:
    """PANGAEA's encoder blocks: [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24; else each quarter's last."""
    return {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}.get(depth, [max(0, math.ceil(depth * k / 4) - 1) for k in (1, 2, 3, 4)])


def conv_bn_relu(cin, cout, k):   # official: the convs keep their biases before the norm
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class UPerNet(nn.Module):
    """PANGAEA's UPerNet (mmseg UPerHead) on four ViT feature maps: neck (Feature2Pyramid) rescaling them x4, x2,
    x1, x0.5; pyramid pooling (1, 2, 3, 6) on the coarsest; FPN top-down; fusion; Dropout2d; 1x1 classifier.
    DEVIATION: BatchNorm2d instead of SyncBatchNorm (one process, as the spec advises)."""

    def __init__(self, dim, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        up = lambda: nn.ConvTranspose2d(dim, dim, 2, 2)                                  # noqa: E731
        self.neck = nn.ModuleList([nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up()), up(), nn.Identity(),
                                   nn.MaxPool2d(2)])
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout, self.conv_seg = nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list, size) -> torch.Tensor:   # 4 x (B, D, h, w) -> (B, K, *size)
        def up(x, like):
            return F.interpolate(x, like.shape[2:], mode="bilinear", align_corners=False)
        levels = [op(f) for op, f in zip(self.neck, features)]                    # (B, D, 4h | 2h | h | h/2, ..)
        top = levels[3]
        lat = [conv(x) for conv, x in zip(self.lateral, levels)] + [
            self.bottleneck(torch.cat([top] + [up(p(top), top) for p in self.ppm], 1))]   # (B, channels, ..)
        for i in (3, 2, 1):                                                       # top-down pathway
            lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, lat)] + [lat[3]]
        x = self.fpn_bottleneck(torch.cat([outs[0]] + [up(o, outs[0]) for o in outs[1:]], 1))   # (B, C, 4h, 4w)
        return F.interpolate(self.conv_seg(self.dropout(x)), size, mode="bilinear", align_corners=False)


class LTAE2d(nn.Module):
    """Lightweight Temporal Attention Encoder (Garnot & Landrieu 2020) per pixel with PANGAEA's settings: GroupNorm
    (16) in, 1x1 in-conv, a learned master query per head (16 heads, d_k 4), softmax over T at temperature
    sqrt(d_k), value channels split per head, MLP (Linear, BN, ReLU), dropout 0.2, GroupNorm(16) out, no positions."""

    def __init__(self, dim, heads=16, d_k=4, dropout=0.2):
        super().__init__()
        self.heads, self.d_k = heads, d_k
        self.in_norm, self.inconv = nn.GroupNorm(heads, dim), nn.Conv1d(dim, dim, 1)
        self.query, self.key = nn.Parameter(torch.randn(heads, d_k) * math.sqrt(2 / d_k)), nn.Linear(dim, heads * d_k)
        nn.init.normal_(self.key.weight, std=math.sqrt(2 / d_k))
        self.attn_dropout, self.dropout = nn.Dropout(0.1), nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.out_norm = nn.GroupNorm(heads, dim)

    def forward(self, x):                                                          # (B, D, T, h, w) -> (B, D, h, w)
        B, D, T, h, w = x.shape
        v = self.inconv(self.in_norm(rearrange(x, "b d t h w -> (b h w) d t"))).transpose(1, 2)   # (P, T, D)
        k = self.key(v).view(-1, T, self.heads, self.d_k)                         # (P, T, heads, d_k)
        attn = self.attn_dropout(((k * self.query).sum(-1) / math.sqrt(self.d_k)).softmax(1))   # (P, T, heads)
        out = torch.einsum("pth,pthc->phc", attn, v.view(-1, T, self.heads, D // self.heads)).reshape(-1, D)
        return rearrange(self.out_norm(self.dropout(self.mlp(out))), "(b h w) d -> b d h w", b=B, h=h, w=w)


class TemporalLinear(nn.Linear):
    """PANGAEA's linear temporal mapping: nn.Linear(T, 1) over the time axis."""

    def __init__(self, frames):
        super().__init__(frames, 1)

    def forward(self, x):                                                          # (B, D, T, h, w) -> (B, D, h, w)
        return super().forward(x.movedim(2, -1)).squeeze(-1)


class PangaeaModel(nn.Module):
    """Frozen encoder (TerraMind: `config.dim`, `encode(inputs, layers)` -> `.merge("mean", layer)`), a temporal
    mapping for frames > 1 (one module shared by the four levels, official) and UPerNet."""

    def __init__(self, encoder, num_logits, layers, frames=1, temporal="ltae", channels=512):
        super().__init__()
        self.encoder, self.layers = encoder.eval().requires_grad_(False), list(layers)
        dim = encoder.config.dim
        self.temporal = None if frames == 1 else LTAE2d(dim) if temporal == "ltae" else TemporalLinear(frames)
        self.head = UPerNet(dim, num_logits, channels)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()                                                        # frozen: always in eval
        return self

    def features(self, inputs: dict) -> list:          # {entry: (B, C, T, H, W)} -> 4 x (B, D, h, w)
        B, _, T = next(iter(inputs.values())).shape[:3]
        with torch.no_grad():   # frames run one by one; modalities early-fused, then mean-merged (official)
            enc = self.encoder.encode({e: rearrange(x, "b c t h w -> (b t) c h w") for e, x in inputs.items()},
                                      layers=sorted(set(self.layers)))
            feats = [enc.merge("mean", layer) for layer in self.layers]           # (B*T, D, h, w); last one normed
        if self.temporal is None:
            return feats
        return [self.temporal(rearrange(f, "(b t) d h w -> b d t h w", b=B, t=T)) for f in feats]

    def forward(self, inputs: dict, size=None) -> torch.Tensor:                   # -> (B, K, H, W)
        return self.head(self.features(inputs), size or next(iter(inputs.values())).shape[-2:])


def load_encoder(model=None, official=None, size="smoke", device="cpu"):
    """Our checkpoint (`model`), official weights (`official` + `size`) or a random init of `size`; with a name."""
    from terramind import TerraMind, TerraMindConfig
    if model:
        return TerraMind.from_checkpoint(model, device), f"TerraMind {Path(model).stem}"
    if official:
        return (TerraMind.from_official(official, size).to(device),
                f"TerraMind-{size if isinstance(size, str) else 'custom'} ({Path(official).name})")
    return TerraMind(TerraMindConfig.preset(size)).to(device), f"TerraMind-{size} random init"


# -----------------------------------------------------------------------------------------------------------
# Evaluation: sliding windows, the confusion matrix, mIoU as PANGAEA computes it (spec §3.6)

def window_starts(size: int, window: int) -> list:
    """ceil(size / window) window starts spread evenly over [0, size - window] (overlapping), rounded."""
    return np.linspace(0, size - window, math.ceil(size / window)).round().astype(int).tolist()


def sliding_inference(predict, inputs: dict, window: int, batch: int = 8) -> torch.Tensor:
    """inputs {entry: (B, C, T, H, W)} -> averaged logits (B, K, H, W). `predict` maps a dict of windows
    (B', C, T, window, window) to (B', K, window, window); `batch` windows per call; small images are padded."""
    B, H, W = (lambda s: (s[0], s[-2], s[-1]))(next(iter(inputs.values())).shape)
    ph, pw = max(window - H, 0), max(window - W, 0)
    inputs = {e: F.pad(x, (0, pw, 0, ph)) for e, x in inputs.items()}
    corners = [(t, l) for t in window_starts(H + ph, window) for l in window_starts(W + pw, window)]
    out = count = None
    for k in range(0, len(corners), batch):
        chunk = corners[k:k + batch]
        logits = predict({e: torch.cat([x[..., t:t + window, l:l + window] for t, l in chunk]) for e, x in inputs.items()})
        if out is None:
            out, count = logits.new_zeros(B, logits.shape[1], H + ph, W + pw), logits.new_zeros(1, 1, H + ph, W + pw)
        for j, (t, l) in enumerate(chunk):
            out[..., t:t + window, l:l + window] += logits[j * B:(j + 1) * B]
            count[..., t:t + window, l:l + window] += 1
    return (out / count)[..., :H, :W]


def confusion_matrix(pred, target, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows = prediction, columns = target; pixels whose target is the ignore index removed."""
    keep = target != ignore_index
    return torch.bincount(pred[keep] * num_classes + target[keep], minlength=num_classes ** 2).view(num_classes, -1)


def segmentation_scores(cm, ignore_index: int) -> dict:
    """PANGAEA's metrics in %: IoU = tp / (pred + gt - tp + 1e-6) per class; mIoU over all classes except an ignore
    index inside [0, K) (classes absent from prediction and target count, with IoU 0); acc = pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    iou = tp / (cm.sum(1) + cm.sum(0) - tp + 1e-6) * 100
    valid = [k for k in range(len(cm)) if k != ignore_index]
    return {"iou": iou.tolist(), "miou": float(iou[valid].mean()), "acc": float(tp.sum() / cm.sum().clamp(min=1) * 100)}


@torch.no_grad()
def evaluate(model, data: SegmentationData, window: int, device="cpu") -> dict:
    """Whole-split scores, batch 1: sliding windows (or the whole resized image), one confusion matrix.
    Also returns the first sample's prediction and target ("first") for a picture."""
    r, was_training = data.reader, model.training
    model.eval()
    cm, first = torch.zeros(len(r.classes), len(r.classes), dtype=torch.long), None
    for i in tqdm(range(len(data)), desc=f"eval {r.split}", leave=False):
        x, y = data[i]
        x, y = {e: v[None].to(device) for e, v in x.items()}, torch.as_tensor(y)
        logits = model(x, y.shape) if r.prep == "resize" else sliding_inference(model, x, window)
        logits = F.interpolate(logits, y.shape, mode="bilinear") if logits.shape[-2:] != y.shape else logits
        pred = (logits[0, 0].sigmoid() > 0.5).long().cpu() if r.binary else logits[0].argmax(0).cpu()
        cm += confusion_matrix(pred, y, len(r.classes), r.ignore_index)
        first = first or (pred, y)
    model.train(was_training)
    return {**segmentation_scores(cm, r.ignore_index), "first": first}


def dice_loss(logits, target, ignore_index):
    """Soft Dice of a single sigmoid logit, ignored pixels removed: logits (B, 1, H, W), target (B, H, W)."""
    keep = target != ignore_index
    p, t = logits[:, 0].sigmoid()[keep], target[keep].float()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def multistep(opt, total: int):
    """PANGAEA's schedule: lr x0.1 at int(0.6 * total) and int(0.9 * total) iterations, stepped per iteration."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.6), int(total * 0.9)], gamma=0.1)


def train_segmentation(model, train: SegmentationData, val: SegmentationData, epochs=80, batch_size=8, window=224,
                       device="cpu", workers=4, seed=234, lr=1e-4, weight_decay=0.05, eval_every=5) -> dict:
    """The protocol on the head: AdamW, `multistep`, cross-entropy with the ignore index (Dice for 1-logit tasks),
    validation every `eval_every` epochs and at the end; the best-validation head (mIoU; for 1-logit tasks the
    positive class's IoU) is loaded back and its validation scores returned."""
    r = train.reader
    loader = torch.utils.data.DataLoader(train, batch_size, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ValueError(f"{r.name}: {len(train)} training samples < one batch of {batch_size}; use --replicate")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr, (0.9, 0.999), weight_decay=weight_decay)
    total = len(loader) * epochs
    sched = multistep(opt, total)
    ce = nn.CrossEntropyLoss(ignore_index=r.ignore_index)
    best, best_state, step, log_every = None, None, 0, max(1, total // 40)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        for x, y in loader:
            t0 = time.time()
            x, y = {e: v.to(device) for e, v in x.items()}, y.to(device)
            logits = model(x, y.shape[-2:])
            loss = dice_loss(logits, y, r.ignore_index) if r.binary else ce(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == total:
                dt = time.time() - t0
                print(f"step {step}/{total} | loss {loss.item():.4f} | lr {opt.param_groups[0]['lr']:.1e} | "
                      f"{dt * 1000:.0f} ms | {len(y) / dt:.1f} img/s", flush=True)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            scores = evaluate(model, val, window, device)
            print(f"epoch {epoch + 1}/{epochs} | val mIoU {scores['miou']:.2f} | acc {scores['acc']:.2f} | IoU "
                  + " ".join(f"{v:.1f}" for v in scores["iou"]), flush=True)
            key = (lambda s: s["iou"][1] if r.binary else s["miou"])
            if best is None or key(scores) > key(best):
                best = scores
                best_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    model.load_state_dict(best_state, strict=False)
    return best


# -----------------------------------------------------------------------------------------------------------
# Few-shot classification (paper Tables 5, 11)

@torch.no_grad()
def embed(encoder, data: SegmentationData, batch_size=64, device="cpu") -> tuple:
    """Mean-pooled normed last-layer features (modalities mean-merged) of whole images -> (N, D), labels (N,)."""
    out, labels = [], []
    for x, y in tqdm(torch.utils.data.DataLoader(data, batch_size), desc="embed", leave=False):
        enc = encoder.encode({e: v[:, :, 0].to(device) for e, v in x.items()})    # (B, C, H, W): one frame
        out.append(enc.merge("mean").mean((2, 3)).cpu())                           # (B, D)
        labels.append(torch.as_tensor(y))
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def fewshot_accuracy(support, support_y, query, query_y, ways, shots, runs=200, seed=0, same_pool=False) -> tuple:
    """k-shot n-way accuracy (%), mean and std over runs: each run draws `ways` classes and `shots` support images
    each and assigns every query image of those classes to the nearest prototype (Euclidean; the support mean,
    the 1-NN for one shot). `same_pool`: support and query are one set, the support left out of the queries."""
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(support_y) if (support_y == c).sum() >= shots + same_pool and
               (query_y == c).sum() > shots * same_pool]           # enough support images, and test images
    if len(classes) < ways:
        raise ValueError(f"only {len(classes)} classes have {shots} support and some test images; {ways} ways asked")
    accs = []
    for _ in range(runs):
        chosen = rng.choice(classes, ways, replace=False)
        picks = [rng.choice(np.flatnonzero(support_y == c), shots, replace=False) for c in chosen]
        protos = np.stack([support[p].mean(0) for p in picks])                    # (ways, D)
        mask = np.isin(query_y, chosen)
        mask[np.concatenate(picks) if same_pool else []] = False
        d = ((query[mask][:, None] - protos[None]) ** 2).sum(-1)                   # (Q, ways)
        accs.append(float((chosen[d.argmin(1)] == query_y[mask]).mean() * 100))
    return float(np.mean(accs)), float(np.std(accs))


def write_class_folders(root, out, modality="S2L2A", min_share=0.5) -> dict:
    """<out>/{train,test}/<class>/<id>.tif (hard links) from a TerraMesh-layout folder: the class is the dominant
    LULC class (no data and clouds not counted) where it covers >= min_share of the tile. -> counts."""
    root, out, counts = Path(root), Path(out), {}
    for split in ("train", "test"):
        for sid in tqdm(_lines(root / "splits" / f"{split}.txt"), desc=split, leave=False):
            n = np.bincount(_tif(root / "LULC" / f"{sid}.tif").ravel(), minlength=len(LULC_CLASSES))
            total, n[[NO_DATA, CLOUDS]] = n.sum(), 0
            if n.max() >= min_share * total:
                dst = out / split / LULC_CLASSES[n.argmax()].replace(" ", "_").replace("/", "_") / f"{sid}.tif"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.unlink(missing_ok=True)
                try:
                    os.link(root / modality / f"{sid}.tif", dst)
                except OSError:
                    shutil.copyfile(root / modality / f"{sid}.tif", dst)
                counts[split, dst.parent.name] = counts.get((split, dst.parent.name), 0) + 1
    return counts


# -----------------------------------------------------------------------------------------------------------
# Reports: paper Table 6 layout, a picture, commands

TABLE6 = {"hlsburnscars": "HLS Burns", "mados": "MADOS", "pastis": "PASTIS", "sen1floods11": "Sen1Fl11",
          "fivebillionpixels": "FBP", "dynamicen": "DEN", "croptypemapping": "CTM-SS", "spacenet7": "SN7",
          "ai4smallfarms": "AI4Farms"}


def table6(results: dict) -> str:
    """{model: {dataset: test mIoU}} -> markdown in the paper's column order (other datasets after), with the
    average mIoU over each model's datasets and the average rank among the models per column."""
    cols = list(TABLE6) + sorted({d for r in results.values() for d in r} - set(TABLE6))
    ranks = {m: [] for m in results}
    for d in cols:
        for k, (_, m) in enumerate(sorted((-r[d], m) for m, r in results.items() if d in r)):
            ranks[m].append(k + 1)
    return "\n".join(["| Model | " + " | ".join(TABLE6.get(d, d) for d in cols) + " | Avg. mIoU | Avg. Rank |",
                      "|---" * (len(cols) + 3) + "|"] + [
        f"| {m} | " + " | ".join(f"{r[d]:.2f}" if d in r else "–" for d in cols) +
        f" | {np.mean(list(r.values())):.2f} | {np.mean(ranks[m]):.2f} |" for m, r in results.items()])


def save_prediction(path, reader, pred, target):
    """input | target | prediction (ignored pixels white) for the first sample of a split."""
    image, k = reader[0][0], len(reader.classes)
    pal = np.array([(40, 40, 40), (65, 155, 223)], np.uint8) if k <= 2 else np.concatenate(
        [LULC_COLORS[1:], np.random.default_rng(0).integers(0, 255, (max(k - 9, 0), 3), dtype=np.uint8)])
    paint = lambda y: np.where((y >= 0)[..., None], pal[np.clip(y, 0, k - 1)], 255).astype(np.uint8)   # noqa: E731
    rgb = ("B4", "B3", "B2")
    src, codes = next(((m, c) for m, c in reader.bands.items() if set(rgb) <= set(c)), next(iter(reader.bands.items())))
    if set(rgb) <= set(codes):                                                    # true colour, 2-98 % stretch
        x = image[src][[codes.index(c) for c in rgb], 0]
        lo, hi = np.percentile(x, [2, 98])
        rgb = (np.clip((x - lo) / (hi - lo + 1e-6), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    else:                                                                         # S1 false colour, DEM, ...
        rgb = render(src if src in MODALITIES else "S1GRD", image[src][:, 0])
    y = target.numpy()
    save_sheet(path, [("input", rgb), ("target", paint(y)), ("prediction", paint(np.where(y == reader.ignore_index,
                                                                                           -1, pred.numpy())))],
               max_size=256)


def _write_json(path, obj):
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_seg(args):
    torch.manual_seed(args.seed)
    mods = args.modalities.split(",")
    if args.dataset == "terramesh":
        train = TerraMeshLabels(args.root, "train", args.labels, mods, args.classes and args.classes.split(","))
        readers = {"train": train, **{s: TerraMeshLabels(args.root, s, args.labels, mods, train.classes,
                                                         (train.mean, train.std)) for s in ("val", "test")}}
    else:
        readers = {s: READERS[args.dataset](args.root, s) for s in ("train", "val", "test")}
    r = readers["train"]
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(r, mods)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else default_layers(encoder.config.encoder_depth)
    config = dict(dim=encoder.config.dim, num_logits=1 if r.binary else len(r.classes), layers=layers,
                  frames=r.frames, temporal=args.temporal, channels=args.channels)
    model = PangaeaModel(encoder, **{k: v for k, v in config.items() if k != "dim"}).to(args.device)
    print(f"{r.name}: {', '.join(f'{s} {len(d)}' for s, d in readers.items())} samples | encoder {name} | layers "
          f"{layers} | head {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M params")
    print("bands: " + " | ".join(matcher.lines))
    data = {s: SegmentationData(d, matcher, args.crop, s == "train", args.seed, args.replicate if s == "train" else 1)
            for s, d in readers.items()}
    t0 = time.time()
    val = train_segmentation(model, data["train"], data["val"], args.epochs, args.batch_size, args.crop, args.device,
                             args.workers, args.seed)
    test = evaluate(model, data["test"], args.crop, args.device)
    print(f"test: {len(readers['test'])} samples, best-val head ({time.time() - t0:.0f} s): mIoU {test['miou']:.2f} "
          f"| acc {test['acc']:.2f}")
    for k, (c, iou) in enumerate(zip(r.classes, test["iou"])):
        print(f"  {str(c):28s} IoU {iou:6.2f}" + ("  (ignore index, not in mIoU)" if k == r.ignore_index else ""))
    print(table6({name: {r.name: test["miou"]}}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "head.safetensors", {k: v for k, v in model.state_dict().items()   # BN step counters
                                                if not k.startswith("encoder.") and v.ndim},      # (0-dim) unused
                     {"config": config, "encoder": name})
    _write_json(out / "results.json", {"model": name, "dataset": r.name, "classes": [str(c) for c in r.classes],
                                       "miou": test["miou"], "iou": test["iou"], "acc": test["acc"],
                                       "val_miou": val["miou"], "bands": matcher.lines, "head": config,
                                       "args": {k: v for k, v in vars(args).items() if k != "command"}})
    save_prediction(out / "prediction.png", readers["test"], *test["first"])
    print(f"wrote {out}/results.json, head.safetensors, prediction.png")


def run_fewshot(args):
    torch.manual_seed(args.seed)
    root, bands = Path(args.root), args.bands and args.bands.split(",")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    support = ImageFolder(root / "train" if split else root, args.modality, bands)
    query = ImageFolder(root / "test", args.modality, bands, support.classes, (support.mean, support.std)) if split \
        else support
    encoder, name = load_encoder(args.model, args.official, args.size, args.device)
    matcher = BandMatcher(support, [args.modality])
    print(f"{root.name}: {len(support.classes)} classes, {len(support)} support / {len(query)} query images | "
          f"encoder {name} | bands: {matcher.lines[0]}")
    xs, ys = embed(encoder, SegmentationData(support, matcher, None, False), args.batch_size, args.device)
    xq, yq = embed(encoder, SegmentationData(query, matcher, None, False), args.batch_size, args.device) if split \
        else (xs, ys)
    mean, std = fewshot_accuracy(xs, ys, xq, yq, args.ways, args.shots, args.runs, args.seed, same_pool=not split)
    print(f"| Model | {args.shots}-shot {args.ways}-way |\n|---|---|\n| {name} | {mean:.2f} ± {std:.2f} |\n"
          f"({args.runs} runs, accuracy % on the full test set; chance {100 / args.ways:.1f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    seg, few = sub.add_parser("seg", help="PANGAEA segmentation"), sub.add_parser("fewshot", help="few-shot k-shot n-way")
    for q in (seg, few):
        q.add_argument("--root", required=True, help="dataset folder")
        q.add_argument("--model", default=None, help="our TerraMind checkpoint (.safetensors)")
        q.add_argument("--official", default=None, help="official weights, e.g. TerraMind_v1_base.pt (with --size)")
        q.add_argument("--size", default="smoke", help="model size of --official, or of a random init")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
        q.add_argument("--seed", type=int, default=234, help="seed (PANGAEA: 234)")
    seg.add_argument("--dataset", required=True, choices=[*READERS, "terramesh"], help="on-disk format")
    seg.add_argument("--modalities", default="S2L2A,S1GRD", help="encoder inputs (PANGAEA's TerraMind: S2L2A,S1GRD)")
    seg.add_argument("--labels", default="label_water", help="terramesh: the label folder")
    seg.add_argument("--classes", default=None, help="terramesh: class names, comma-separated (default 0..max)")
    seg.add_argument("--layers", default=None, help="encoder blocks, e.g. 3,5,7,11 (default by depth)")
    seg.add_argument("--temporal", default="ltae", choices=["ltae", "linear"], help="multi-temporal mapping")
    seg.add_argument("--crop", type=int, default=224, help="training crop and sliding window (official 224)")
    seg.add_argument("--channels", type=int, default=512, help="UPerNet channels (official 512)")
    seg.add_argument("--epochs", type=int, default=80, help="epochs (official 80)")
    seg.add_argument("--batch-size", type=int, default=8, help="batch size (official 8)")
    seg.add_argument("--replicate", type=int, default=1, help="repeat the train set N times per epoch")
    seg.add_argument("--workers", type=int, default=4, help="data loader workers")
    seg.add_argument("--out", default="runs/pangaea", help="output folder")
    few.add_argument("--modality", default="S2L2A", help="the TerraMind modality the images are fed as")
    few.add_argument("--bands", default=None, help="band codes of the files, in order (default: the modality's)")
    few.add_argument("--ways", type=int, default=5, help="classes per run")
    few.add_argument("--shots", type=int, default=1, help="support images per class")
    few.add_argument("--runs", type=int, default=200, help="runs averaged (paper: 200)")
    few.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    q = sub.add_parser("folders", help="dominant-LULC image folders from a TerraMesh-layout folder")
    q.add_argument("--root", required=True, help="TerraMesh-layout folder with LULC/ and splits/")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--modality", default="S2L2A", help="the modality whose files are linked")
    q.add_argument("--min-share", type=float, default=0.5, help="minimum share of the dominant class")
    q = sub.add_parser("table", help="results.json files -> paper Table 6 layout")
    q.add_argument("results", nargs="+", help="results.json files")
    args = p.parse_args()
    if args.command == "seg":
        run_seg(args)
    elif args.command == "fewshot":
        run_fewshot(args)
    elif args.command == "folders":
        for (split, name), n in sorted(write_class_folders(args.root, args.out, args.modality, args.min_share).items()):
            print(f"{split:5s} {name:20s} {n}")
    else:
        results = {}
        for f in args.results:
            r = json.loads(Path(f).read_text())
            results.setdefault(r["model"], {})[r["dataset"]] = r["miou"]
        print(table6(results))


if __name__ == "__main__":
    main()
