"""
Sliding-window inference over images larger than the model's window, as PANGAEA evaluates
(pangaea/engine/evaluator.py): ceil(size / window) overlapping windows per axis, spread evenly,
their logits averaged where they overlap; small images padded to one window.

Consumes a prediction function and input tensors; produces averaged logits. eval_pangaea.py and
tim_finetune.py use it (scene.py streams the same windows from files); nothing here runs on
its own, so there are no CPU/GPU/torchrun commands.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(size: int, window: int) -> list:
    """ceil(size / window) window starts spread evenly over [0, size - window] (overlapping),
    rounded."""
    starts = np.linspace(0, size - window, math.ceil(size / window))
    return starts.round().astype(int).tolist()


def sliding_inference(predict, inputs: dict, window: int, batch: int = 8) -> torch.Tensor:
    """inputs {entry: (B, C, T, H, W)} -> averaged logits (B, K, H, W). `predict` maps a dict of
    windows (B', C, T, window, window) to (B', K, window, window); `batch` windows per call;
    small images are padded."""
    shape = next(iter(inputs.values())).shape
    B, H, W = shape[0], shape[-2], shape[-1]
    ph, pw = max(window - H, 0), max(window - W, 0)
    inputs = {e: F.pad(x, (0, pw, 0, ph)) for e, x in inputs.items()}
    rows, cols = window_starts(H + ph, window), window_starts(W + pw, window)
    corners = [(t, left) for t in rows for left in cols]
    out = count = None
    for k in range(0, len(corners), batch):
        chunk = corners[k:k + batch]
        windows = {}
        for e, x in inputs.items():
            crops = [x[..., t:t + window, left:left + window] for t, left in chunk]
            windows[e] = torch.cat(crops)                            # (len(chunk) * B, ..)
        logits = predict(windows)
        if out is None:
            out = logits.new_zeros(B, logits.shape[1], H + ph, W + pw)
            count = logits.new_zeros(1, 1, H + ph, W + pw)
        for j, (t, left) in enumerate(chunk):
            out[..., t:t + window, left:left + window] += logits[j * B:(j + 1) * B]
            count[..., t:t + window, left:left + window] += 1
    return (out / count)[..., :H, :W]
