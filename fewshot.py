"""
Few-shot classification with a frozen encoder (paper Tables 5, 11): mean-pooled embeddings of
whole images, k-shot n-way episodes, each query assigned to the nearest class prototype.

Consumes an encoder with TerraMind's `encode(...).merge("mean")` and datasets of whole images
(eval_pangaea.SegmentationData over pangaea_datasets.ImageFolder); produces accuracies.
`python eval_pangaea.py fewshot` runs it (the commands are in eval_pangaea.py's docstring).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from modalities import token_window


@torch.no_grad()
def embed(encoder, data, batch_size=64, device="cpu") -> tuple:
    """Mean-pooled normed last-layer features (modalities mean-merged) of whole images (a
    dataset of ({entry: (C, T, H, W)}, class)) -> (N, D), labels (N,)."""
    out, labels = [], []
    loader = torch.utils.data.DataLoader(data, batch_size)
    for x, y in tqdm(loader, desc="embed", leave=False):
        # (B, C, H, W): one frame, its centred whole patches (TerraMesh's 264 px -> 256)
        frames = {e: whole_patches(v[:, :, 0]).to(device) for e, v in x.items()}
        enc = encoder.encode(frames)
        out.append(enc.merge("mean").mean((2, 3)).cpu())                  # (B, D)
        labels.append(torch.as_tensor(y))
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def whole_patches(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> the centred window of whole 16 px patches (unchanged where H, W are
    multiples of 16)."""
    (top, h), (left, w) = token_window(x.shape[-2]), token_window(x.shape[-1])
    return x[..., top:top + h, left:left + w]


def fewshot_classes(support_y, query_y, shots: int, same_pool: bool) -> list:
    """The classes with enough support images and some query images left to classify."""
    classes = []
    for c in np.unique(support_y):
        enough = (support_y == c).sum() >= shots + same_pool
        queried = (query_y == c).sum() > shots * same_pool
        if enough and queried:
            classes.append(c)
    return classes


def fewshot_accuracy(support, support_y, query, query_y, ways, shots, runs=200, seed=0,
                     same_pool=False) -> tuple:
    """k-shot n-way accuracy (%), mean and std over runs: each run draws `ways` classes and
    `shots` support images each and assigns every query image of those classes to the nearest
    prototype (Euclidean; the support mean, the 1-NN for one shot). `same_pool`: support and
    query are one set, the support left out of the queries."""
    rng = np.random.default_rng(seed)
    classes = fewshot_classes(support_y, query_y, shots, same_pool)
    if len(classes) < ways:
        raise ValueError(f"only {len(classes)} classes have {shots} support and some test "
                         f"images; {ways} ways asked")
    accs = []
    for _ in range(runs):
        chosen = rng.choice(classes, ways, replace=False)
        picks = [rng.choice(np.flatnonzero(support_y == c), shots, replace=False) for c in chosen]
        protos = np.stack([support[p].mean(0) for p in picks])                  # (ways, D)
        mask = np.isin(query_y, chosen)
        mask[np.concatenate(picks) if same_pool else []] = False
        d = ((query[mask][:, None] - protos[None]) ** 2).sum(-1)                # (Q, ways)
        accs.append(float((chosen[d.argmin(1)] == query_y[mask]).mean() * 100))
    return float(np.mean(accs)), float(np.std(accs))
