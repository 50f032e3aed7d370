"""
Large tiles in windows (paper §11.1): where the windows lie, which of them run together, the token
grid they share, and the decoding of that grid in tile-sized windows blended into one image.

generate.py runs an input larger than the model's tile (config.grid x 16 px) in overlapping
windows:

  * `plan_windows`: tile-sized windows at a 3/4-tile stride (official notebook: crop 256,
    stride 192), grouped in waves of windows that do not overlap, each wave cut into chunks of one batch;
  * `new_canvas`: the one token grid (B, Hp/16, Wp/16) all windows read their known tokens from and
    write their generated tokens to;
  * `decode_rows`: the grid decoded by the tokenizers in tile-sized windows at a half-tile stride,
    blended with `ramp` weights, one window row at a time (so a scene is written as rows become
    final); `window_noise` gives each 16 px patch its own diffusion start noise, shared by the
    windows over it.

This file holds no model and no sampling: it consumes token grids and tokenizers, and produces
pixels. It has no command of its own; generate.py (in memory and `--scene`) imports it:

    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=data/synth/S2L2A/00005.tif --targets LULC --out out/gen
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from modalities import MODALITIES, PATCH, destandardize
from terramind import entry_kind


def window_starts(size: int, tile: int) -> list[int]:
    """Window offsets covering [0, size) with tile-wide windows at a 3/4-tile stride rounded to
    whole patches (official notebook: crop 256, stride 192), so the token grids of overlapping
    windows line up."""
    if size <= tile:
        return [0]
    stride = max(PATCH, tile * 3 // 4 // PATCH * PATCH)
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)          # the last window flush with the end
    return starts


@dataclass
class WindowPlan:
    """The windows over a padded (Hp, Wp) image (paper §11.1): tile-sized at a 3/4-tile stride,
    grouped in waves that do not overlap (later waves are conditioned on the tokens of earlier
    ones), each wave cut into chunks that run as one batch. rows, cols: the window offsets along
    each axis."""
    rows: list
    cols: list
    th: int
    tw: int
    chunks: list      # [[(r, c), ...], ...] in run order
    centre: tuple     # the window nearest the image centre (sequence targets)

    @property
    def windows(self) -> int:
        return sum(map(len, self.chunks))

    def cell(self, r: int, c: int) -> tuple:
        """The token cells of the window at pixel (r, c) in a grid (B, Hp/16, Wp/16)."""
        rows = slice(r // PATCH, (r + self.th) // PATCH)
        cols = slice(c // PATCH, (c + self.tw) // PATCH)
        return slice(None), rows, cols


def centre_window(wins: list, th: int, tw: int, Hp: int, Wp: int) -> tuple:
    """The window whose centre lies nearest the image centre."""
    def distance(win):
        r, c = win
        return (2 * r + th - Hp) ** 2 + (2 * c + tw - Wp) ** 2
    return min(wins, key=distance)


def overlaps(win: tuple, other: tuple, th: int, tw: int) -> bool:
    return abs(win[0] - other[0]) < th and abs(win[1] - other[1]) < tw


def group_in_waves(wins: list, th: int, tw: int) -> list:
    """Windows in run order -> waves: each window joins the first wave it overlaps no window of."""
    waves = []
    for win in wins:
        free = [w for w in waves if not any(overlaps(win, o, th, tw) for o in w)]
        if free:
            free[0].append(win)
        else:
            waves.append([win])
    return waves


def plan_windows(Hp: int, Wp: int, tile: int, per: int, centre_only: bool = False) -> WindowPlan:
    """The WindowPlan of a (Hp, Wp) image, `per` windows a chunk; `centre_only`: the centre window
    alone."""
    th, tw = min(tile, Hp), min(tile, Wp)
    rows, cols = window_starts(Hp, tile), window_starts(Wp, tile)
    wins = [(r, c) for r in rows for c in cols]
    centre = centre_window(wins, th, tw, Hp, Wp)
    waves = group_in_waves([centre] if centre_only else wins, th, tw)
    chunks = []
    for wave in waves:
        for k in range(0, len(wave), per):
            chunks.append(wave[k:k + per])
    return WindowPlan(rows, cols, th, tw, chunks, centre)


def new_canvas(entries: list, B: int, Hp: int, Wp: int, dev) -> dict:
    """{token entry: (ids, known)} (B, Hp/16, Wp/16): the one token grid all windows share."""
    shape = (B, Hp // PATCH, Wp // PATCH)
    canvas = {}
    for e in entries:
        if entry_kind(e) == "tokens":
            ids = torch.zeros(shape, dtype=torch.long, device=dev)
            known = torch.zeros(shape, dtype=torch.bool, device=dev)
            canvas[e] = (ids, known)
    return canvas


def window_inputs(read, seqs: dict, chunk: list) -> dict:
    """The inputs of the windows of `chunk`, stacked along the batch: read(r, c) -> {image: (B, C,
    th, tw)}, each sequence input repeated once per window."""
    crops = [read(r, c) for r, c in chunk]
    inputs = {n: torch.cat([crop[n] for crop in crops]) for n in crops[0]}
    for n, ids in seqs.items():
        inputs[n] = ids.repeat(len(chunk), 1)
    return inputs


def known_tokens(canvas: dict, plan: WindowPlan, chunk: list) -> dict:
    """{entry: [ids, known]} of the windows of `chunk`, stacked along the batch (n B, h, w)."""
    known = {}
    for e, grids in canvas.items():
        known[e] = [torch.cat([grid[plan.cell(r, c)] for r, c in chunk]) for grid in grids]
    return known


def grid_state(canvas: dict, generator: torch.Generator) -> dict:
    """The resume state of a scene's token generation: the token grid and the sampling
    generator."""
    arrays = {}
    for e, (ids, known) in canvas.items():
        arrays[f"{e}.ids"] = ids.cpu().numpy()
        arrays[f"{e}.known"] = known.cpu().numpy()
    arrays["generator"] = generator.get_state().numpy()
    return arrays


def restore_grid(arrays: dict, canvas: dict, generator: torch.Generator):
    for e, (ids, known) in canvas.items():
        ids.copy_(torch.from_numpy(arrays[f"{e}.ids"]))
        known.copy_(torch.from_numpy(arrays[f"{e}.known"]))
    generator.set_state(torch.from_numpy(arrays["generator"]))


# ------------------------------------------------------------------------------
# Decoding the token grid in windows


def window_noise(seed: int, name: str, r: int, c: int, shape: tuple) -> torch.Tensor:
    """The diffusion start noise (B, C, h, w) of the window at pixel (r, c): each 16 px patch of
    the scene draws its own from a generator seeded by (seed, modality, patch row, patch column),
    so overlapping windows start from the same noise where they overlap, and a window's noise does
    not depend on what ran before it."""
    B, C, h, w = shape
    m, rows = list(MODALITIES).index(name), []
    for i in range(r // PATCH, (r + h) // PATCH):
        patches = []
        for j in range(c // PATCH, (c + w) // PATCH):
            rng = np.random.default_rng([seed, m, i, j])
            patches.append(rng.standard_normal((B, C, PATCH, PATCH), np.float32))
        rows.append(np.concatenate(patches, -1))
    return torch.from_numpy(np.concatenate(rows, -2))                    # (B, C, h, w)


def decode_starts(size: int, tile: int) -> list[int]:
    """Offsets of the decoding windows along one axis: tile-wide at a half-tile stride on the patch
    grid, the last one flush with the end, so every pixel away from the image border lies in two
    windows."""
    if size <= tile:
        return [0]
    stride = max(PATCH, tile // 2 // PATCH * PATCH)
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def ramp(n: int) -> torch.Tensor:
    """(n,) blending weights across a window: distance to its nearer edge (0.5 at the edge
    pixels)."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 0.5, n - i - 0.5)


def decoded(name: str, x: torch.Tensor, standardized: bool = False) -> torch.Tensor:
    """Tokenizer output (B, C, H, W) -> LULC classes (B, H, W) (argmax), else physical units (or
    standardized)."""
    if name == "LULC":
        return x.argmax(1)
    return x if standardized else destandardize(name, x)


def decoder_stage(name: str) -> str:
    """The timer's name for decoding `name`."""
    return "diffusion" if MODALITIES[name].decoder == "diffusion" else f"{name} decoder"


def decode_window_row(tokenizer, name: str, ids: torch.Tensor, r: int, th: int, cols: list, tw: int,
                      steps: int, seed: int, per: int, timer):
    """The windows of one decoding row at pixel row r, decoded `per` at a time and blended with
    `ramp` weights -> yields (c0, weighted sum (B, C, th, c1 - c0), weights (th, c1 - c0)) for
    columns [c0, c1) once no later window reaches them, so only the columns of one chunk of
    windows are held, not the whole row."""
    B, C = ids.shape[0], tokenizer.channels
    w = (ramp(th)[:, None] * ramp(tw)[None, :]).to(ids.device)           # (th, tw)
    diffusion = MODALITIES[name].decoder == "diffusion"
    rows = slice(r // PATCH, (r + th) // PATCH)
    start = 0                                       # the first column not yet yielded
    total = ids.new_zeros(B, C, th, 0, dtype=torch.float32)              # (B, C, th, columns)
    weights = ids.new_zeros(th, 0, dtype=torch.float32)
    for k in range(0, len(cols), per):
        chunk = cols[k:k + per]
        cells = torch.cat([ids[:, rows, c // PATCH:(c + tw) // PATCH] for c in chunk])
        noise = None
        if diffusion:
            noise = torch.cat([window_noise(seed, name, r, c, (B, C, th, tw)) for c in chunk])
        with timer(decoder_stage(name)):
            x = tokenizer.decode(cells, steps=steps, noise=noise).float()   # (n B, C, th, tw)
        grow = chunk[-1] + tw - start - total.shape[-1]
        total = torch.cat([total, total.new_zeros(B, C, th, grow)], -1)
        weights = torch.cat([weights, weights.new_zeros(th, grow)], -1)
        for part, c in zip(x.split(B), chunk):
            total[..., c - start:c - start + tw] += part * w
            weights[:, c - start:c - start + tw] += w
        # later windows start at or right of this column
        done = cols[k + per] if k + per < len(cols) else chunk[-1] + tw
        yield start, total[..., :done - start], weights[:, :done - start]
        total, weights, start = total[..., done - start:], weights[:, done - start:], done


def decode_rows(tokenizer, name: str, ids: torch.Tensor, tile: int, steps: int, seed: int,
                batch_size: int, timer, first_row: int = 0, standardized: bool = False,
                generator=None):
    """Token grid (B, Hp/16, Wp/16) -> yields (a, `decoded` rows a..b (B, [C,] b - a, Wp)) once per
    decoding row from `first_row` on, each band final.

    A grid of one tile is one window: decoded whole from `generator`'s noise, as the official code
    decodes a tile. A larger grid is decoded window by window at the model's tile size, as in
    training, from the shared noise of its patches (window_noise); overlapping windows are averaged
    with `ramp` weights. DEVIATION (paper §11.1: a plain average of windows at the generation
    stride): half-tile stride and weights that fall to the window edges, so no window border shows
    (measured, tests/test_scene.py). The rows of earlier windows that reach into `first_row` are
    decoded again, so a resumed run needs no saved pixels.

    Memory: one tile-high band of weighted sums across the width (B, C, th, Wp) holds the rows not
    yet final; it is shifted up in place as rows are yielded, so no buffer grows with the scene's
    height and none is copied whole per row (ours, issue 22)."""
    Hp, Wp = ids.shape[-2] * PATCH, ids.shape[-1] * PATCH
    per = max(1, batch_size // ids.shape[0])
    th, tw = min(tile, Hp), min(tile, Wp)
    rows, cols = decode_starts(Hp, tile), decode_starts(Wp, tile)
    if len(rows) == len(cols) == 1:   # one tile: the one window is the grid
        with timer(decoder_stage(name)):
            x = tokenizer.decode(ids, steps=steps, generator=generator)
        yield 0, decoded(name, x, standardized)
        return
    base = rows[first_row] if first_row < len(rows) else Hp   # first row not yet final
    B, C = ids.shape[0], tokenizer.channels
    total = ids.new_zeros(B, C, th, Wp, dtype=torch.float32)             # rows base..base + th
    weights = ids.new_zeros(th, Wp, dtype=torch.float32)
    for i, r in enumerate(rows):
        if i < first_row and r + th <= base:
            continue
        lo = max(base - r, 0)   # rows above `base` are final already
        band = slice(r + lo - base, r + th - base)
        spans = decode_window_row(tokenizer, name, ids, r, th, cols, tw, steps, seed, per, timer)
        for c, part, w in spans:
            c1 = c + part.shape[-1]
            total[..., band, c:c1] += part[..., lo:, :]
            weights[band, c:c1] += w[lo:]
        if i < first_row:
            continue
        done = rows[i + 1] if i + 1 < len(rows) else Hp   # later windows start at or below this row
        d = done - base
        yield base, decoded(name, total[..., :d, :] / weights[:d], standardized)
        keep = th - d                                     # shift the rows not yet final up
        total[..., :keep, :] = total[..., d:, :].clone()
        weights[:keep] = weights[d:].clone()
        total[..., keep:, :] = 0
        weights[keep:] = 0
        base = done
