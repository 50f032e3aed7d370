"""
The data stream of pretraining (pretrain.py): which entries the data has, the
masked sample at each stream position, and the micro-batches of each process.

Consumes a TerraMesh-layout folder (pixel tiles, caption and coords text), the
token shards of `fsq_tokenizer.py tokenize` and a WordPiece vocabulary; produces
dicts of fixed-shape tensors from masking.Masking, one per sample.

Exactness: the samples of step s are the stream positions [s * total,
(s + 1) * total); position k is sample perm_e[k mod n] of epoch e = k div n
(perm_e from (seed, e)) and its crop and masks come from rng(seed, e, k mod n).
Nothing depends on the number of processes, workers or micro-batches, so 2 ranks
give the losses of 1 rank with 2 accumulation steps, and a resumed run the
losses of an uninterrupted one.

    entries, shards = available_entries("data/synth", "tokens", print)
    data = PretrainData("data/synth", "train", shards, text, masking, 64, 0, True)
    sampler = StepBatches(0, 300, rank=0, world=1, micro=32, accum=1)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from entries import ENTRIES, entry_kind
from masking import Masking
from modalities import PATCH, parse_coords, token_window
from shard_index import is_shard_root
from terramesh import TerraMeshDataset, dataset_modalities
from text_tokenizer import WordPieceTokenizer
from token_shards import TokenShards

TRAIN, VAL = 0, 1   # stream tags in the per-sample seeds


def short(entry: str) -> str:
    """The modality of an entry: tok_S2L2A -> S2L2A."""
    return entry.removeprefix("tok_")


class PretrainData(Dataset):
    """Masked samples of one split, indexed by stream position k (see the module
    docstring): item k is a dict of fixed-shape tensors from masking.Masking,
    deterministic in (seed, epoch, k mod n)."""

    def __init__(self, root, split, tokens, text: WordPieceTokenizer,
                 masking: Masking, tile: int, seed: int, shuffle: bool):
        self.root = root
        self.text = text
        self.masking = masking
        self.tile = tile
        self.seed = seed
        self.shuffle = shuffle
        pixel_like = [e for e in masking.entries if entry_kind(e) != "tokens"]
        want = [short(e) for e in pixel_like]
        present = dataset_modalities(root, split)
        read = [m for m in want if m in present]
        self.ds = TerraMeshDataset(root, read, size=None, split=split)
        self.tokens = tokens   # TokenShards or None
        self.token_entries = [e for e in masking.entries if entry_kind(e) == "tokens"]
        self._perm = (None, None)

    def __len__(self):
        return len(self.ds)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch: the same in every worker and rank."""
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, TRAIN, epoch])
            self._perm = (epoch, rng.permutation(len(self.ds)))
        return self._perm[1]

    def sample_index(self, k: int) -> int:
        """The dataset index of stream position k."""
        if not self.shuffle:
            return k
        epoch, j = divmod(k, len(self.ds))
        return int(self.order(epoch)[j])

    def __getitem__(self, k: int) -> dict:
        epoch, j = divmod(k, len(self.ds)) if self.shuffle else (0, k)
        stream = TRAIN if self.shuffle else VAL
        rng = np.random.default_rng([self.seed, stream, epoch, j])
        return self.masking(self.sample(self.sample_index(k), rng), rng)

    def tile_pixels(self, raw: dict, sid: str) -> tuple:
        """(H, W) of the sample's tiles in px; from its token grid when it has
        only token entries; (None, None) when it has neither."""
        pixels = [m for m in raw if not isinstance(raw[m], str)]
        if pixels:
            return raw[pixels[0]].shape[-2:]
        if self.tokens is None:
            return None, None
        h, w = self.tile // PATCH, self.tile // PATCH
        for e in self.token_entries:
            if self.tokens.has(short(e), sid):
                h, w = self.tokens.get(short(e), sid).shape
                break
        return h * PATCH, w * PATCH

    def crop_corner(self, gh: int, gw: int, rng) -> tuple:
        """(top, left) in px of the tile-sized crop inside the gh x gw px token
        window: whole patches, random when shuffling, else centred."""
        t = self.tile
        if (gh, gw) == (t, t):
            return 0, 0
        corner = []
        for n in (gh, gw):
            room = (n - t) // PATCH
            offset = int(rng.integers(0, room + 1)) if self.shuffle else room // 2
            corner.append(offset * PATCH)
        return tuple(corner)

    def sample(self, i: int, rng) -> dict:
        """Sample i as masking.py reads it: cropped pixels, cropped token grids,
        caption and coords ids."""
        raw, sid, t = self.ds[i], self.ds.ids[i], self.tile
        H, W = self.tile_pixels(raw, sid)
        top = left = dy = dx = 0
        if H is not None:
            # the token grid covers the centred whole-patch window: 264 px tiles -> 256, 4 px in
            (dy, gh), (dx, gw) = token_window(H), token_window(W)
            if gh < t or gw < t:
                raise ValueError(f"{self.root}: sample {sid} is {H}x{W} px, "
                                 f"smaller than the tile size {t}")
            top, left = self.crop_corner(gh, gw, rng)
        out = {}
        for m, x in raw.items():   # a patch-aligned crop: the same window for pixels and tokens
            if not isinstance(x, str):
                out[m] = x[:, dy + top:dy + top + t, dx + left:dx + left + t]
        out.update(self.token_crops(sid, H, W, top, left))
        if "caption" in raw:
            out["caption"] = self.text.encode(raw["caption"])
        if "coords" in raw:   # official CoordsTokenizer ids, snapped to the 0.25 degree grid
            where = self.ds.files["coords"][sid]
            lat_lon = parse_coords(raw["coords"], where)
            out["coords"] = self.text.encode_coords(*lat_lon)
        return out

    def token_crops(self, sid: str, H, W, top: int, left: int) -> dict:
        """The token grids of sample `sid`, cropped to the pixel crop's window."""
        out = {}
        if self.tokens is None:
            return out
        t = self.tile
        rows = slice(top // PATCH, (top + t) // PATCH)
        cols = slice(left // PATCH, (left + t) // PATCH)
        for e in self.token_entries:
            if not self.tokens.has(short(e), sid):
                continue
            g = self.tokens.get(short(e), sid)                        # (h, w)
            if tuple(g.shape) != (H // PATCH, W // PATCH):
                raise ValueError(
                    f"{self.tokens.folder / short(e)}: sample {sid} has a "
                    f"{tuple(g.shape)} token grid, its tiles are {H}x{W} px; "
                    f"tokenize the same tiles")
            out[e] = g[rows, cols]
        return out


class StepBatches:
    """Batch sampler: the micro-batches of this rank for steps start..steps-1.
    Micro-batch a of rank r at step s holds positions
    s * total + (a * world + r) * micro + [0, micro)."""

    def __init__(self, start, steps, rank, world, micro, accum):
        self.start = start
        self.steps = steps
        self.rank = rank
        self.world = world
        self.micro = micro
        self.accum = accum

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        total = self.world * self.accum * self.micro
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                first = s * total + (a * self.world + self.rank) * self.micro
                yield list(range(first, first + self.micro))


def token_modalities(tokens_folder) -> list:
    """The token entries' modalities that have shards in `tokens_folder`."""
    folder = Path(tokens_folder)
    found = []
    for e in ENTRIES:
        if entry_kind(e) != "tokens":
            continue
        if any((folder / short(e)).glob("shard_*.safetensors")):
            found.append(short(e))
    return found


def available_entries(root, tokens_folder, log) -> tuple[list, TokenShards | None]:
    """The entries the data has (in ENTRIES order) and the token shards; says
    what is missing."""
    root, have = Path(root), []
    shards, present = None, dataset_modalities(root)
    if tokens_folder and Path(tokens_folder).is_dir():
        found = token_modalities(tokens_folder)
        shards = TokenShards(tokens_folder, found) if found else None
    for e in ENTRIES:
        kind, m = entry_kind(e), short(e)
        if kind == "tokens":
            ok = shards is not None and m in shards.modalities
        else:
            ok = m in present
        if ok:
            have.append(e)
        elif kind == "tokens":
            log(f"  {e}: no token shards in {tokens_folder}/{m} -> left out (budget 0)")
        elif is_shard_root(root):   # said once at start: TerraMesh as published has no captions
            log(f"  {e}: the published TerraMesh layout has no {m} -> left out (budget 0)")
        else:
            log(f"  {e}: no folder {root / m} -> left out (budget 0)")
    return have, shards
