"""
Where each sample lives in a TerraMesh root of the published layout: the tar index and the
layout index.

TerraMesh is published as `<root>/<split>/<FOLDER>/<subset>_shard_<NNNNNN>.tar` (paper §3;
official: the dataset card's loader `terramesh.py`), one tar member per sample and folder. This
file finds the members without decoding anything:

  * `tar_index`: member name -> (offset, size) of one tar, from its headers alone, cached as
    JSON beside the shard (or under ~/.cache/terramind/tar_index when the dataset folder is
    read-only), so that a restart never rescans;
  * `index_layout`: every tar of some splits and folders as one compact table. At full scale
    (9,089,536 train samples x 8 modalities) a dict of members per modality would take tens of
    GB and be copied into every DataLoader worker; here the keys are one numpy bytes array and
    each folder holds three numpy columns (shard, offset, size), looked up by binary search.
    `SampleKeys` (the sample keys in shard order) and `FolderMembers` (one folder's members by
    key) read that table like a list and a dict.

Folders: the published modalities (train and val), plus extras a user may add in the same
structure and that the synthetic world writes: a `test` split, `caption/` tars of `<key>.txt`
members and label folders `label_*` of `<key>.zarr.zip` members. terramesh_shards.py and
terramesh.py import this file:

    python -c "import shard_index as s; print(s.tar_index('val/S2L2A/majortom_shard_000001.tar'))"
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

INDEX_VERSION = 1
# published: train and val; ours: `test`, an extra split a user may add
# (the synthetic world writes one)
SPLITS = ("train", "val", "test")
PUBLISHED_SPLITS = ("train", "val")

# ----------------------------------------------------------------------------
# The tar index: member -> (offset, size), from headers only, cached


def tar_index(shard) -> dict:
    """{"names": [...], "offsets": [...], "sizes": [...]} of the regular files in a tar, in tar
    order.

    Read from a cache beside the shard (or in the user cache folder) when it matches the shard's
    size and modification time; otherwise built from the tar headers and cached. A truncated tar
    raises ValueError.
    """
    shard = Path(shard)
    stat = shard.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, INDEX_VERSION]
    for cache in _index_caches(shard):
        try:
            index = json.loads(cache.read_text())
        except (OSError, ValueError):
            continue
        if index.get("stamp") == stamp:
            return index
    index = {"stamp": stamp, **_scan_tar(shard, stat.st_size)}
    _write_index(shard, index)
    return index


def _index_caches(shard: Path) -> list[Path]:
    """Where a shard's index may live: beside it, else in the user cache (keyed by its full
    path)."""
    digest = hashlib.sha1(str(shard.resolve()).encode()).hexdigest()[:16]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    beside = shard.with_name(f".{shard.name}.index.json")
    in_home = home / "terramind" / "tar_index" / f"{shard.stem}-{digest}.json"
    return [beside, in_home]


def _write_index(shard: Path, index: dict):
    """Atomic write of the index to the first writable cache location; none writable is no error."""
    text = json.dumps(index)
    for cache in _index_caches(shard):
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, cache)
            return
        except OSError:   # a read-only dataset folder: try the next location
            with contextlib.suppress(OSError):
                tmp.unlink()


def _scan_tar(shard: Path, size: int) -> dict:
    names, offsets, sizes = [], [], []
    try:
        # "r:" = no compression: every member can be reached by seek
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                end = member.offset_data + member.size
                if end > size:
                    raise tarfile.ReadError(
                        f"member {member.name} runs to byte {end}, the file has {size}")
                names.append(member.name)
                offsets.append(member.offset_data)
                sizes.append(member.size)
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{shard}: not a readable tar, truncated? "
                         f"({type(e).__name__}: {e})") from None
    return {"names": names, "offsets": offsets, "sizes": sizes}


def read_member(shard, name: str, offset: int, size: int) -> bytes:
    """The bytes of one tar member, by seek."""
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{shard}: member {name} is truncated ({len(data)} of {size} bytes); "
                         f"re-download the shard")
    return data


# ----------------------------------------------------------------------------
# The layout: <root>/<split>/<FOLDER>/*.tar


class Member(NamedTuple):
    """Where one sample of one folder lives: a tar member, read by seek."""
    shard: Path
    name: str
    offset: int
    size: int

    def __str__(self):
        return f"{self.shard}, member {self.name}"


def member_suffix(folder: str) -> str:
    """The member name of a sample is its key plus this: UTF-8 text for captions, else a zarr
    group."""
    if folder == "caption":
        return ".txt"
    return ".zarr.zip"


def is_shard_root(root) -> bool:
    """True for a folder in the published layout: a split folder with `<FOLDER>/*.tar` inside."""
    root = Path(root)
    for split in SPLITS:
        if next((root / split).glob("*/*.tar"), None) is not None:
            return True
    return False


def layout_folders(root, splits=SPLITS) -> list[str]:
    """The folders (modalities and extras) with at least one tar under the given splits, sorted."""
    found = set()
    for split in splits:
        for tar in (Path(root) / split).glob("*/*.tar"):
            found.add(tar.parent.name)
    return sorted(found)


def index_layout(root, splits, folders) -> tuple[SampleKeys, dict[str, FolderMembers]]:
    """The sample keys of `splits` and {folder: FolderMembers} for each folder.

    Keys are in split order, then shard name order, then tar order (a shard's keys first seen in the
    first folder of `folders` that has them). Tars are indexed by `tar_index`.
    """
    table = LayoutTable(Path(root), splits, list(folders))
    files = {folder: FolderMembers(table, folder) for folder in folders}
    return SampleKeys(table.keys, table.order), files


class LayoutTable:
    """The members of some folders of a published-layout root, as numpy columns.

    `keys` (K,) are the sample keys, sorted, as bytes; `order` (N,) lists positions in `keys` in
    sample order; per folder, `shard` (K,) int32 (-1 where the sample has no member), `offset`
    (K,) int64 and `size` (K,) uint32 describe the member of each key; `shards` names the tar
    files.
    """

    def __init__(self, root: Path, splits, folders: list[str]):
        self.shards: list[Path] = []
        self.columns: dict[str, tuple] = {}
        groups = self._shard_groups(root, splits, folders)
        parts = {folder: [] for folder in folders}
        in_order = []
        for group in tqdm(groups, desc="index shards", disable=len(groups) < 16, leave=False):
            seen = []
            for folder, path in group:
                keys, offsets, sizes = self._read_tar(path, folder)
                parts[folder].append((keys, len(self.shards), offsets, sizes))
                self.shards.append(path)
                seen.append(keys)
            in_order.append(first_seen(np.concatenate(seen)))
        sample_keys = first_seen(np.concatenate(in_order)) if in_order else np.array([], "S1")
        self.keys = np.sort(sample_keys)
        self.order = np.searchsorted(self.keys, sample_keys).astype(np.int64)
        for folder in folders:
            self.columns[folder] = self._columns(parts[folder])

    @staticmethod
    def _shard_groups(root: Path, splits, folders) -> list[list[tuple[str, Path]]]:
        """The tars grouped by (split, shard name): [(folder, path), ...] per group, in sample
        order."""
        groups: dict[tuple[int, str], list] = {}
        for s, split in enumerate(splits):
            for folder in folders:
                for path in sorted((root / split / folder).glob("*.tar")):
                    groups.setdefault((s, path.name), []).append((folder, path))
        return [groups[name] for name in sorted(groups)]

    @staticmethod
    def _read_tar(path: Path, folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys as bytes, offsets, sizes) of the sample members of one tar."""
        index = tar_index(path)
        suffix = member_suffix(folder)
        keep = [k for k, name in enumerate(index["names"]) if name.endswith(suffix)]
        keys = [index["names"][k][:-len(suffix)].encode() for k in keep]
        offsets = np.array([index["offsets"][k] for k in keep], np.int64)
        sizes = np.array([index["sizes"][k] for k in keep], np.int64)
        if sizes.size and sizes.max() >= 2 ** 32:
            raise ValueError(f"{path}: a member of {sizes.max()} bytes; "
                             f"samples are expected under 4 GB")
        return np.array(keys, dtype=bytes), offsets, sizes.astype(np.uint32)

    def _columns(self, parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One folder's (shard, offset, size) columns, aligned with `keys`; a later member of a
        key wins."""
        shard = np.full(len(self.keys), -1, np.int32)
        offset = np.zeros(len(self.keys), np.int64)
        size = np.zeros(len(self.keys), np.uint32)
        for keys, shard_number, offsets, sizes in parts:
            at = np.searchsorted(self.keys, keys)
            shard[at] = shard_number
            offset[at] = offsets
            size[at] = sizes
        return shard, offset, size

    def position(self, key) -> int:
        """The position of `key` in `keys`, or -1."""
        return find_key(self.keys, key)

    def nbytes(self) -> int:
        """Memory held by the numpy columns (the index's size, without the few shard paths)."""
        arrays = [self.keys, self.order]
        for columns in self.columns.values():
            arrays += list(columns)
        return sum(a.nbytes for a in arrays)


def find_key(keys: np.ndarray, key) -> int:
    """The position of the string `key` in the sorted bytes array `keys` (binary search), or -1."""
    if not isinstance(key, str):
        return -1
    encoded = key.encode()
    at = int(np.searchsorted(keys, encoded))
    if at < len(keys) and keys[at] == encoded:
        return at
    return -1


def first_seen(keys: np.ndarray) -> np.ndarray:
    """The distinct keys in the order of their first occurrence."""
    _, first = np.unique(keys, return_index=True)
    return keys[np.sort(first)]


class SampleKeys(Sequence):
    """The sample keys in sample order, as strings, read from the table's bytes (a read-only
    list)."""

    def __init__(self, keys: np.ndarray, order: np.ndarray):
        self.keys, self.order = keys, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.keys[self.order[i]].decode()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __contains__(self, key) -> bool:
        return self.index_or_none(key) is not None

    def index(self, key, *args) -> int:
        """The sample position of `key`, as list.index (ValueError when absent)."""
        found = self.index_or_none(key)
        if found is None:
            raise ValueError(f"{key!r} is not a sample key")
        return found

    def index_or_none(self, key) -> int | None:
        at = find_key(self.keys, key)
        hits = np.flatnonzero(self.order == at) if at >= 0 else []
        return int(hits[0]) if len(hits) else None

    def select(self, keep: np.ndarray) -> SampleKeys:
        """The keys whose table position is True in `keep` (K,), in the same order."""
        return SampleKeys(self.keys, self.order[keep[self.order]])


class FolderMembers(Mapping):
    """One folder's members by sample key, read from the table: `files[key]` is a Member."""

    def __init__(self, table: LayoutTable, folder: str):
        self.table, self.folder = table, folder
        self.suffix = member_suffix(folder)

    def present(self) -> np.ndarray:
        """(K,) bool: which keys of the table have a member in this folder."""
        return self.table.columns[self.folder][0] >= 0

    def __getitem__(self, key: str) -> Member:
        at = self.table.position(key)
        shard, offset, size = self.table.columns[self.folder]
        if at < 0 or shard[at] < 0:
            raise KeyError(key)
        path = self.table.shards[shard[at]]
        return Member(path, key + self.suffix, int(offset[at]), int(size[at]))

    def __iter__(self):
        for key in self.table.keys[self.present()]:
            yield key.decode()

    def __len__(self) -> int:
        return int(self.present().sum())


class FirstMember(Mapping):
    """The member of a key in the first of several folders that has one (where to read a centre)."""

    def __init__(self, folders: list[FolderMembers]):
        self.folders = folders

    def present(self) -> np.ndarray:
        masks = [f.present() for f in self.folders]
        return np.logical_or.reduce(masks) if masks else np.zeros(0, bool)

    def __getitem__(self, key: str) -> Member:
        for folder in self.folders:
            if key in folder:
                return folder[key]
        raise KeyError(key)

    def __iter__(self):
        if not self.folders:
            return
        for key in self.folders[0].table.keys[self.present()]:
            yield key.decode()

    def __len__(self) -> int:
        return int(self.present().sum())
