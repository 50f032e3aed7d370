"""
PANGAEA dataset readers (PANGAEA, Marsocci et al. 2024, and its dataset configs): the benchmark's
on-disk formats and configs, and Sen1Floods11 chips as TerraMesh samples.

Consumes dataset folders as the benchmark ships them (each reader's docstring gives its layout).
Produces samples `ds[i]` -> ({"optical" | "sar" | modality: float32 (C, T, H, W) in file units},
int64 target (H, W)), with the dataset's classes, ignore index, band names and mean/std attached.
Users' own data (TerraMesh roots with a label folder, LULC classes, image folders) is read by
terramesh_labels.py on the same `PangaeaDataset` base.

Used by eval_pangaea.py (the protocol), tim_data.py (TiM) and generate.py (Sen1Floods11
chips). Nothing here trains or runs a model, so there are no CPU/GPU/torchrun commands of its
own: see eval_pangaea.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from geotiff import read_tiff, to_channels_first
from modalities import MODALITIES, S2_BAND_CODES, format_coords, standardize
from terramesh import read_input


OPTICAL = ("S2L1C", "S2L2A", "S2RGB")
SAR = ("S1GRD", "S1RTC")
S2_13 = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_10 = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")


def band_codes(modality: str) -> list:
    """A TerraMind modality's bands as Sentinel-2 band codes (B1..B12, B8A); VV, VH, DEM
    otherwise."""
    return [S2_BAND_CODES.get(b, b) for b in MODALITIES[modality].bands]


def source_key(modality: str, available) -> str:
    """The reader key that feeds a TerraMind modality: the same name, else "optical" for the S-2
    modalities and "sar" for the S-1 ones (Sen1Floods11: "optical" = 13 L1C bands, "sar" = VV,
    VH)."""
    if modality in available:
        return modality
    if modality in OPTICAL:
        return "optical"
    if modality in SAR:
        return "sar"
    return modality


def read_tif(path, channels=1) -> np.ndarray:
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


def read_lines(path) -> list:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: split file not found")
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip()]


def _flat(item) -> list:
    """A reader's item (a path, an id, or nested tuples and lists of them) as a flat list."""
    if not isinstance(item, (tuple, list)):
        return [item]
    parts = []
    for part in item:
        parts.extend(_flat(part))
    return parts


def _nearest(x, h, w):
    """Nearest resampling of (..., H, W) to (h, w): source pixel floor((i + 0.5) * H / h), as
    GDAL/rasterio do."""
    rows = ((np.arange(h) + 0.5) * x.shape[-2] / h).astype(int)
    cols = ((np.arange(w) + 0.5) * x.shape[-1] / w).astype(int)
    return x[..., rows[:, None], cols]


# -----------------------------------------------------------------------------------------------
# Dataset readers: the benchmark's on-disk formats and configs
# (PANGAEA configs/dataset/*.yaml and pangaea/datasets/)

class PangaeaDataset(torch.utils.data.Dataset):
    """One split of a dataset in its own format (the class docstring gives the layout).

    `ds[i]` -> ({modality: float32 (C, T, H, W) in file units, NaN -> 0}, int64 target (H, W)).
    A reader carries its dataset's config: classes, ignore_index, bands/mean/std per modality
    ("optical", "sar" or a TerraMind modality), frames (multi_temporal), binary (one sigmoid
    logit), prep ("crop": random crops, sliding windows; "focus": crops around labelled pixels;
    "resize": the whole image resized to the encoder size, no windows)."""
    ignore_index, frames, binary, prep = -1, 1, False, "crop"

    def __init__(self, root, split: str):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        items = self.list_items(split)
        if not items:
            raise FileNotFoundError(f"{self.root}: no {split} samples of {self.name}; "
                                    f"expected {self.__doc__}")
        self.items = items

    def __len__(self):
        return len(self.items)

    def sample_files(self, i: int) -> str:
        """The files of sample i (or its id where the item is one), for messages."""
        return " + ".join(str(part) for part in _flat(self.items[i]))

    def __getitem__(self, i):
        image, target = self.read(self.items[i])
        image = {k: np.nan_to_num(v.astype(np.float32)) for k, v in image.items()}
        image = {k: v[:, None] if v.ndim == 3 else v for k, v in image.items()}     # (C, T, H, W)
        return image, np.asarray(target, np.int64)


class Sen1Floods11(PangaeaDataset):
    """v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv
    ('<x>_S1Hand.tif,<x>_LabelHand.tif'), v1.1/data/flood_events/HandLabeled/
    {S1Hand,S2Hand,LabelHand}/*.tif"""
    name, classes = "sen1floods11", ("Not Water", "Water")
    bands = {"optical": S2_13, "sar": ("VV", "VH")}
    mean = {"optical": (1626.916, 1396.035, 1364.061, 1218.228, 1466.073, 2386.903, 2845.613,
                        2622.958, 3077.482, 486.8744, 63.77861, 2030.648, 1179.166),
            "sar": (-10.184408, -16.895273)}
    std = {"optical": (700.1713, 739.0945, 735.2482, 864.9367, 776.8803, 921.3683, 1084.373,
                       1022.634, 1196.443, 336.6111, 143.9992, 980.8706, 764.6084),
           "sar": (4.255339, 5.290568)}

    def list_items(self, split):
        d = self.root / "v1.1/data/flood_events/HandLabeled"
        csv = f"flood_{'valid' if split == 'val' else split}_data.csv"
        rows = [r.split(",") for r in read_lines(self.root / "v1.1/splits/flood_handlabeled" / csv)]
        items = []
        for s1, label in rows:
            s2 = s1.replace("S1Hand", "S2Hand")
            items.append((d / "S1Hand" / s1, d / "S2Hand" / s2, d / "LabelHand" / label))
        return items

    def read(self, item):
        image = {"optical": read_tif(item[1], 13), "sar": read_tif(item[0], 2)}
        return image, read_tif(item[2])[0]


class HLSBurnScars(PangaeaDataset):
    """{training,validation}/*merged.tif (H, W, 6) and *mask.tif; `validation` is the test split"""
    name, classes = "hlsburnscars", ("Not burned", "Burn scar")
    bands = {"optical": S2_10[:3] + S2_10[7:]}
    mean = {"optical": (0.03334971, 0.05701186, 0.05889748, 0.2323245, 0.1972855, 0.1194491)}
    std = {"optical": (0.02269136, 0.02680756, 0.0400411, 0.07791732, 0.08708739, 0.07241979)}

    def list_items(self, split):
        d = self.root / ("validation" if split == "test" else "training")
        pairs = _pairs(sorted(d.glob("*merged.tif")), sorted(d.glob("*mask.tif")), d)
        if split == "test":
            return pairs
        # official: sklearn train_test_split(test_size=0.1, random_state=23) of `training`
        n_val = math.ceil(0.1 * len(pairs))
        order = np.random.RandomState(23).permutation(len(pairs))
        chosen = order[n_val:] if split == "train" else order[:n_val]
        return [pairs[i] for i in chosen]

    def read(self, item):
        x = read_tif(item[0], 6)
        x = np.where(x == 9999, 0, x)                                   # official: 9999 -> 0
        return {"optical": x}, read_tif(item[1])[0]


class MADOS(PangaeaDataset):
    """splits/{train,val,test}_X.txt ('Scene_<n>_<crop>'),
    Scene_*/{10,20,60}/*_L2R_rhorc_<nm>_<crop>.tif, labels Scene_*/10/*_L2R_cl_<crop>.tif"""
    name, prep = "mados", "focus"
    bands = {"optical": S2_13[:9] + S2_13[11:]}
    classes = ("Marine Debris", "Dense Sargassum", "Sparse Floating Algae",
               "Natural Organic Material", "Ship", "Oil Spill", "Marine Water",
               "Sediment-Laden Water", "Foam", "Turbid Water", "Shallow Water", "Waves & Wakes",
               "Oil Platform", "Jellyfish", "Sea snot")
    mean = {"optical": (.0582676, .05223386, .04381474, .0357083, .03412902, .03680401,
                        .03999107, .03566642, .03965081, .0267993, .01978944)}
    std = {"optical": (.03240627, .03432253, .0354812, .0375769, .03785412, .04992323,
                       .05884482, .05545856, .06423746, .04211187, .03019115)}

    def list_items(self, split):
        names = set(read_lines(self.root / "splits" / f"{split}_X.txt"))
        items = []
        for scene in sorted(self.root.glob("Scene_*")):
            for label in sorted((scene / "10").glob("*_cl_*")):
                crop = label.name.split("_cl_")[-1]                      # "<crop>.tif"
                if f"{scene.name}_{crop[:-4]}" not in names:
                    continue
                bands = scene.glob(f"*/*L2R_rhorc*_{crop}")
                by_wavelength = sorted(bands, key=lambda p: int(p.name.split("_")[-2]))   # nm
                items.append((by_wavelength, label))
        return items

    def read(self, item):
        if len(item[0]) != 11:
            raise ValueError(f"{item[1]}: {len(item[0])} rhorc bands for this crop, expected 11")
        y = read_tif(item[1])[0].astype(np.int64) - 1          # official: 0 -> -1 (ignore)
        bands = [_nearest(read_tif(b)[0], *y.shape) for b in item[0]]       # 20/60 m -> 10 m
        return {"optical": np.stack(bands)}, y


class PASTIS(PangaeaDataset):
    """metadata.geojson (ID_PATCH, Fold: 1-3 train, 4 val, 5 test), DATA_S2/S2_<id>.npy,
    DATA_S1A/S1A_<id>.npy (T, C, 128, 128), ANNOTATIONS/TARGET_<id>.npy (channel 0: classes)"""
    name, ignore_index, frames, prep = "pastis", 19, 6, "resize"
    classes = ("Background", "Meadow", "Soft Winter Wheat", "Corn", "Winter Barley",
               "Winter Rapeseed", "Spring Barley", "Sunflower", "Grapevine", "Beet",
               "Winter Triticale", "Winter Durum Wheat", "Fruits, Vegetables, Flowers",
               "Potatoes", "Leguminous Fodder", "Soybeans", "Orchard", "Mixed Cereal", "Sorghum",
               "Void Label")
    bands = {"optical": S2_10, "sar": ("VV", "VH", "VV-VH")}
    mean = {"optical": (1161.676, 1371.431, 1423.407, 1759.725, 2714.526, 3055.838, 3197.896,
                        3313.358, 2415.968, 1626.843),
            "sar": (-10.9433, -17.36, 6.4167)}
    std = {"optical": (2045.070, 1983.176, 2060.797, 1968.817, 1867.216, 1885.136, 1897.511,
                       1885.164, 1542.767, 1375.251),
           "sar": (3.3847, 3.3727, 3.3874)}

    def list_items(self, split):
        folds = {"train": (1, 2, 3), "val": (4,), "test": (5,)}[split]
        features = json.loads((self.root / "metadata.geojson").read_text())["features"]
        patches = [f["properties"] for f in features]
        # official: the folds one after another, each in the metadata's order
        return [p["ID_PATCH"] for fold in folds for p in patches if p["Fold"] == fold]

    def pick_frames(self, x):
        """(T, C, H, W) -> (C, 6, H, W): 6 frames evenly spaced (linspace), as the official class
        picks them from series of up to 50 dates. DEVIATION: from a longer series it first draws 50
        dates at random and out of order, anew at each read; here the 6 span the whole series."""
        frames = np.linspace(0, len(x) - 1, self.frames).astype(np.int64)
        return x[frames].transpose(1, 0, 2, 3)

    def read(self, pid):
        s2 = _npy(self.root / "DATA_S2" / f"S2_{pid}.npy")
        s1 = _npy(self.root / "DATA_S1A" / f"S1A_{pid}.npy")
        target = _npy(self.root / f"ANNOTATIONS/TARGET_{pid}.npy")[0]
        return {"optical": self.pick_frames(s2), "sar": self.pick_frames(s1)}, target


def _latest_frames(x, frames=6):
    """(C, H, W, T) -> (C, frames, H, W): time flipped (latest first), cut or zero-padded."""
    latest = x[..., ::-1][..., :frames]
    padding = [(0, 0)] * 3 + [(0, max(frames - x.shape[-1], 0))]
    return np.pad(latest, padding).transpose(0, 3, 1, 2)


class CropTypeMapping(PangaeaDataset):
    """southsudan/list_eval_partition.csv (id,partition: 0/1/2 = train/val/test),
    southsudan/npy/southsudan_<id:06d>.npz (s1, s2: C x H x W x T),
    southsudan/truth/southsudan_<id:06d>.npz (truth: 1..4 the classes)"""
    name, frames, prep = "croptypemapping", 6, "resize"
    classes = ("Sorghum", "Maize", "Rice", "Groundnut")
    bands = {"optical": S2_10, "sar": ("VV", "VH")}
    mean = {"optical": (2031.169, 1961.431, 1979.410, 2145.663, 2700.288, 3006.880, 2870.535,
                        3215.056, 2367.765, 1645.224),
            "sar": (-9.448692, -15.309401)}
    std = {"optical": (2112.213, 2027.464, 2136.804, 2100.725, 2082.193, 2142.973, 2071.283,
                       2152.289, 1334.547, 1059.039),
           "sar": (4.107619, 5.676464)}

    def list_items(self, split):
        lines = read_lines(self.root / "southsudan/list_eval_partition.csv")[1:]
        rows = [r.split(",") for r in lines]
        part = ("train", "val", "test").index(split)
        return [int(i) for i, p in rows if int(p) == part]

    def read(self, sid):   # official: latest frame first, 6 frames
        npz = _npy(self.root / f"southsudan/npy/southsudan_{sid:06d}.npz")
        y = _npy(self.root / f"southsudan/truth/southsudan_{sid:06d}.npz")["truth"]
        image = {"optical": _latest_frames(npz["s2"][:10]),
                 "sar": _latest_frames(npz["s1"][:2])}                  # s1: VV, VH of its channels
        return image, np.where((y >= 1) & (y <= 4), y - 1, -1)


class AI4SmallFarms(PangaeaDataset):
    """sentinel-2-asia/{train,val,test}/{images,masks}/*.tif (images H x W x 4, masks 0/255)"""
    name, classes, binary = "ai4smallfarms", ("Background", "Crop Field"), True
    bands = {"optical": ("B2", "B3", "B4", "B8")}
    mean = {"optical": (750.2136, 1032.7277, 1165.1279, 2416.0448)}
    std = {"optical": (283.3842, 332.728, 518.9025, 702.3791)}

    def list_items(self, split):
        d = self.root / "sentinel-2-asia" / split
        images = sorted((d / "images").glob("*.tif"))
        return _pairs(images, sorted((d / "masks").glob("*.tif")), d)

    def read(self, item):
        mask = read_tif(item[1])[0] > 0                                 # official: 0/255 -> 0/1
        return {"optical": read_tif(item[0], 4)}, mask


# official: the domain-shift split by AOI, 30 train / 15 val / 14 test; names are L15-<this>_13
SN7_AOIS = {
    "train": """
        0331E-1257N_1327_3160 0358E-1220N_1433_3310 0457E-1135N_1831_3648 0487E-1246N_1950_3207
        0577E-1243N_2309_3217 0586E-1127N_2345_3680 0595E-1278N_2383_3079 0632E-0892N_2528_4620
        0683E-1006N_2732_4164 0924E-1108N_3699_3757 1015E-1062N_4061_3941 1138E-1216N_4553_3325
        1203E-1203N_4815_3378 1204E-1202N_4816_3380 1209E-1113N_4838_3737 1210E-1025N_4840_4088
        1276E-1107N_5105_3761 1298E-1322N_5193_2903 1389E-1284N_5557_3054 1438E-1134N_5753_3655
        1439E-1134N_5759_3655 1481E-1119N_5927_3715 1538E-1163N_6154_3539 1615E-1206N_6460_3366
        1669E-1153N_6678_3579 1669E-1160N_6679_3549 1672E-1207N_6691_3363 1703E-1219N_6813_3313
        1709E-1112N_6838_3742 1716E-1211N_6864_3345""",
    "val": """
        0357E-1223N_1429_3296 0361E-1300N_1446_2989 0368E-1245N_1474_3210 0566E-1185N_2265_3451
        0614E-0946N_2459_4406 0760E-0887N_3041_4643 1014E-1375N_4056_2688 1049E-1370N_4196_2710
        1185E-0935N_4742_4450 1289E-1169N_5156_3514 1296E-1198N_5184_3399 1615E-1205N_6460_3370
        1617E-1207N_6468_3360 1669E-1160N_6678_3548 1748E-1247N_6993_3202""",
    "test": """
        0387E-1276N_1549_3087 0434E-1218N_1736_3318 0506E-1204N_2027_3374 0544E-1228N_2176_3279
        0977E-1187N_3911_3441 1025E-1366N_4102_2726 1172E-1306N_4688_2967 1200E-0847N_4802_4803
        1204E-1204N_4819_3372 1335E-1166N_5342_3524 1479E-1101N_5916_3785 1690E-1211N_6763_3346
        1691E-1211N_6764_3347 1848E-0793N_7394_5018"""}


class SpaceNet7(PangaeaDataset):
    """metadata_train.json ({AOI: [{aoi_id, year, month, label, mask}]}),
    train/<AOI>/images_masked/global_monthly_<YYYY>_<MM>_mosaic_<AOI>.tif (RGB + alpha),
    train/<AOI>/labels_raster/global_monthly_..._Buildings.tif"""
    name, classes, binary = "spacenet7", ("Background", "Building"), True
    bands = {"optical": ("B4", "B3", "B2")}
    mean = {"optical": (121.826, 106.52838, 78.372116)}
    std = {"optical": (56.717068, 44.517075, 40.451515)}
    mosaic, tile = 1024, 256   # official: mosaics read at 1024 x 1024, cut into 16 tiles of 256

    def list_items(self, split):   # official: labelled, unmasked months only
        meta = json.loads((self.root / "metadata_train.json").read_text())
        starts = range(0, self.mosaic, self.tile)
        items = []
        for aoi in SN7_AOIS[split].split():
            months = meta.get(f"L15-{aoi}_13", [])
            for t in months:
                if not t["label"] or t["mask"]:
                    continue
                month = (t["aoi_id"], int(t["year"]), int(t["month"]))
                items += [(*month, i, j) for i in starts for j in starts]
        return items

    def read(self, item):
        aoi, year, month, i, j = item
        name = f"global_monthly_{year}_{month:02d}_mosaic_{aoi}"
        folder = self.root / "train" / aoi
        image = read_tif(folder / "images_masked" / f"{name}.tif", 4)[:3]          # alpha dropped
        label = read_tif(folder / "labels_raster" / f"{name}_Buildings.tif")[0] > 0
        x = _nearest(image, self.mosaic, self.mosaic)
        y = _nearest(label, self.mosaic, self.mosaic)
        window = (slice(i, i + self.tile), slice(j, j + self.tile))
        return {"optical": x[(slice(None), *window)]}, y[window]


class DynamicEarthNet(PangaeaDataset):
    """dynnet_training_splits/{train,val,test}.txt ('<image dir> <label.tif> <YYYY-MM>'),
    <image dir>/<YYYY-MM>-<DD>.npy daily frames (C, H, W), labels as .npy class maps (H, W)"""
    name, frames = "dynamicen", 6
    bands = {"optical": ("B2", "B3", "B4", "B8")}   # DEVIATION: the config names NIR B5
    classes = ("impervious surface", "agriculture", "forest & other vegetation", "wetlands",
               "soil", "water")
    mean = {"optical": (671.2606, 915.6184, 1042.5924, 2605.2092)}
    std = {"optical": (596.9439, 715.5488, 957.9584, 1059.9032)}

    def list_items(self, split):   # official: days 01-06 of the labelled month
        lines = read_lines(self.root / "dynnet_training_splits" / f"{split}.txt")
        rows = [r.split() for r in lines]
        items = []
        for folder, label, month in rows:
            folder = folder.replace("/reprocess-cropped/UTM-24000/", "/planet/").lstrip("/")
            days = [self.root / folder / f"{month}-{day:02d}.npy" for day in range(1, 7)]
            items.append((days, self.root / label.lstrip("/").replace(".tif", ".npy")))
        return items

    def read(self, item):
        frames = np.stack([_npy(f) for f in item[0]], 1)                      # (C, T, H, W)
        return {"optical": frames}, _npy(item[1])


class FiveBillionPixels(PangaeaDataset):
    """{train,val,test}/{imgs or images,labels}/*.tif (images H x W x 4: NIR, R, G, B;
    label 0 = unlabeled)"""
    name, ignore_index = "fivebillionpixels", 0
    bands = {"optical": ("B8", "B4", "B3", "B2")}
    classes = ("unlabeled", "industrial area", "paddy field", "irrigated field", "dry cropland",
               "garden land", "arbor forest", "shrub forest", "park", "natural meadow",
               "artificial meadow", "river", "urban residential", "lake", "pond", "fish pond",
               "snow", "bareland", "rural residential", "stadium", "square", "road", "overpass",
               "railway station", "airport")
    mean = {"optical": (92.6, 124.3, 94.2, 98.0)}
    std = {"optical": (44.5, 51.0, 50.0, 47.1)}

    def list_items(self, split):
        d = self.root / split
        images = sorted((d / "imgs").glob("*.tif")) or sorted((d / "images").glob("*.tif"))
        return _pairs(images, sorted((d / "labels").glob("*.tif")), d)

    def read(self, item):
        return {"optical": read_tif(item[0], 4)}, read_tif(item[1])[0]


READERS = {r.name: r for r in (HLSBurnScars, MADOS, PASTIS, Sen1Floods11, FiveBillionPixels,
                               DynamicEarthNet, CropTypeMapping, SpaceNet7, AI4SmallFarms)}


def read_sen1floods11(root, labels: str) -> list[dict]:
    """Sen1Floods11 chips as standardized samples: S1Hand as S1GRD (dB), S2Hand as S2L1C,
    LabelHand as the water label, and the coords of the chip centre from its EPSG:4326 tie point
    and pixel size."""
    samples = []
    for path in sorted(Path(root, "Labels").glob("*_LabelHand.tif")):
        chip = path.name.removesuffix("_LabelHand.tif")
        s1, geo = read_input("S1GRD", Path(root, "S1", f"{chip}_S1Hand.tif"))
        s2, _ = read_input("S2L1C", Path(root, "S2", f"{chip}_S2Hand.tif"))
        x0, y0 = geo[33922][3:5]                                 # tie point (lon, lat)
        sx, sy = geo[33550][:2]                                  # pixel size
        h, w = s1.shape[-2:]
        label = read_tiff(path)[0].astype(np.int64)
        samples.append({"S1GRD": standardize("S1GRD", torch.from_numpy(s1)),
                        "S2L1C": standardize("S2L1C", torch.from_numpy(s2)),
                        "coords": format_coords(x0 + w / 2 * sx, y0 - h / 2 * sy),
                        labels: torch.from_numpy(label)})
    return samples
