"""
The tiles the image tokenizers see: which samples, in which batches, which window and which crop.

Plumbing of `fsq_tokenizer.py` (training, `tokenize`) and `tokenizer_eval.py` (`reconstruct`), kept
out of the method. It consumes a TerraMesh-layout folder (terramesh.py) and produces tensors:

  * `dataset(root, m, split)`: the samples of a split that have modality m;
  * `batches(ds, m, batch_size, indices)`: whole tiles stacked (B, C, H, W) (LULC: (B, H, W));
  * `token_window(x)`: the centred window of whole patches a tile's token grid covers;
  * `crop_sizes`, `random_crop`: the training crops of paper §8.1;
  * `WithIds`: samples with their ids, so that a batch that breaks training can be named.

It has no command line: `python fsq_tokenizer.py train|tokenize|reconstruct` uses it.
"""
from __future__ import annotations

import torch

import modalities
import terramesh
from modalities import PATCH
from terramesh import TerraMeshDataset


def dataset(root, m: str, split: str | None, **kw) -> TerraMeshDataset:
    """The samples of `split` (all when the folder has no such split) that have modality m."""
    split = split if terramesh.has_split(root, split) else None
    ds = TerraMeshDataset(root, [m], split=split, **kw)
    # the published layout's index already holds only the keys that have m; it stays a
    # compact numpy table rather than a Python list of 9M strings in every worker
    if not ds.published:
        ds.ids = [sid for k, sid in enumerate(ds.ids) if m in ds.available(k)]
    return ds


def batches(ds, m: str, batch_size: int, indices):
    """Stacked whole tiles (B, C, H, W) (LULC: (B, H, W)) of ds[indices]."""
    for i in range(0, len(indices), batch_size):
        items = [ds[j][m] for j in indices[i:i + batch_size]]
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) > 1:
            raise ValueError(f"{ds.root}: {m} tiles differ in size ({sorted(shapes)})")
        yield torch.stack(items)


def token_window(x: torch.Tensor) -> torch.Tensor:
    """The centred window of whole patches that a tile's token grid covers
    (modalities.token_window: 264 px TerraMesh tiles -> 256 px, 4 px in).
    tokenize encodes it, pretraining crops its windows inside it."""
    top, h = modalities.token_window(x.shape[-2])
    left, w = modalities.token_window(x.shape[-1])
    return x[..., top:top + h, left:left + w]


def crop_sizes(image_size: int) -> list[int]:
    """Training crop sides: multiples of 16 from 7/8 of the preset's image size up to it
    (paper §8.1: random crops of 224-256 px for the official 256)."""
    patch = PATCH
    low = -(-image_size * 7 // 8 // patch) * patch
    return list(range(low, image_size + 1, patch))


def random_crop(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) -> one random side of `sizes` (that fits) for the batch, a
    random window per tile (torch's global generator). Tiles that are already one allowed side
    pass unchanged."""
    H, W = x.shape[-2:]
    fits = [s for s in sizes if s <= min(H, W)]
    if not fits or (H == W and fits == [H]):
        return x
    s = fits[int(torch.randint(len(fits), ()))]
    tops = torch.randint(H - s + 1, (len(x),)).tolist()
    lefts = torch.randint(W - s + 1, (len(x),)).tolist()
    crops = [t[..., a:a + s, b:b + s] for t, a, b in zip(x, tops, lefts)]
    return torch.stack(crops)


class WithIds(torch.utils.data.Dataset):
    """A TerraMeshDataset's samples with their ids, so that a batch that breaks training can
    be named."""

    def __init__(self, ds: TerraMeshDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "id": self.ds.ids[i]}
