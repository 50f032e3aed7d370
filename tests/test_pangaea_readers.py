"""Every PANGAEA reader of pangaea_datasets.py against PANGAEA's own dataset classes (pangaea-bench).

tests/fixtures/pangaea_layouts.py writes a small copy of each dataset in its published on-disk format (the real
Sen1Floods11 chip among them); tests/fixtures/pangaea/official_readers.json holds what the official classes
returned on the same files (tests/fixtures/make_pangaea_reader_fixtures.py): every sample of every split, as the
SHA-256 of its float32 images and int64 target. Our readers must give the same samples, in the same order, bit for
bit, and carry the official configs' classes, ignore index, frames, bands and statistics."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pangaea_datasets as pds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from pangaea_layouts import WRITERS, digest  # noqa: E402

FIXTURE = json.loads((ROOT / "tests/fixtures/pangaea/official_readers.json").read_text())
OFFICIAL = FIXTURE["datasets"]
# ours names DynamicEarthNet's Planet NIR band B8 (the config says B5), so that it reaches TerraMind's NIR slot
BAND_NAMES_OURS = {"dynamicen": {"optical": ["B2", "B3", "B4", "B8"]}}


def our_samples(ds) -> list:
    samples = []
    for i in range(len(ds)):
        image, target = ds[i]
        samples.append({**{k: digest(v) for k, v in image.items()}, "target": digest(target)})
    return samples


def official_samples(record: dict) -> list:
    """The fixture's samples without their sums (kept there for a person reading a mismatch)."""
    return [{k: {f: v for f, v in d.items() if f != "sum"} for k, d in s.items()} for s in record["samples"]]


def write_copy(name: str, root: Path) -> Path:
    extra = {"aois_in_split": OFFICIAL[name]["aois_in_split"]} if name == "spacenet7" else {}
    WRITERS[name](root, **extra)
    return root


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_reader_gives_the_official_samples(name, tmp_path):
    root = write_copy(name, tmp_path / name)
    for split, record in OFFICIAL[name]["splits"].items():
        ds = pds.READERS[name](root, split)
        ours, official = our_samples(ds), official_samples(record)
        if name == "mados":
            # the official class lists a scene's crops in file-system order; ours sorts them: match by label file
            labels = [str(item[1].relative_to(root)) for item in ds.items]
            assert labels == sorted(labels) and sorted(labels) == sorted(record["labels"])
            by_label = dict(zip(record["labels"], official))
            official = [by_label[label] for label in labels]
        assert len(ours) == len(official), f"{name} {split}: {len(ours)} samples, official {len(official)}"
        for i, (a, b) in enumerate(zip(ours, official)):
            assert a == b, f"{name} {split} sample {i} ({ds.sample_files(i)}) differs from the official one"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_reader_carries_the_official_config(name):
    config, reader = OFFICIAL[name]["config"], pds.READERS[name]
    assert list(reader.classes) == config["classes"]
    assert reader.ignore_index == config["ignore_index"]
    assert reader.frames == (config["multi_temporal"] or 1)
    bands = BAND_NAMES_OURS.get(name, config["bands"])
    assert {k: list(v) for k, v in reader.bands.items()} == bands
    for ours, official in ((reader.mean, config["data_mean"]), (reader.std, config["data_std"])):
        assert ours.keys() == official.keys()
        for key in ours:
            assert np.allclose(ours[key], official[key], rtol=1e-6, atol=0), (name, key)


def test_spacenet7_aois_are_the_official_split():
    official = OFFICIAL["spacenet7"]["aois_in_split"]
    for split, aois in pds.SN7_AOIS.items():
        assert [f"L15-{aoi}_13" for aoi in aois.split()] == official[split]
