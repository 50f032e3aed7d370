"""
TiM inference on inputs of any size (`python tim_finetune.py predict`): sliding windows of the
model's tile, each window's TiM tokens generated and its classes predicted, logits averaged where
windows overlap. `predict` works on arrays in memory; `predict_scene` streams co-registered
GeoTIFFs window by window (scene.py) into a tiled class mask GeoTIFF with the inputs'
georeferencing, in bounded memory and resumable, and equals `predict` bit for bit.

Consumes a TiMSegmenter (tim_finetune.py; only its `config`, `think` and forward are used) and
physical inputs; produces a uint8 class mask (NODATA where every input band is NaN) and a PNG
overlay. The commands are in tim_finetune.py's docstring.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import distinct_outputs, output_file
from modalities import LULC_COLORS, MODALITIES
from scene import Progress, Raster, TiledWriter, open_scene, summary
from sliding_windows import sliding_inference, window_starts
from tim_data import prepare

NODATA = 255  # predicted mask value where every input band is NaN
OVERLAY_MAX = 2048   # px: larger scenes get no PNG overlay (it holds the whole image)


@torch.no_grad()
def predict(model, images: dict, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """{modality: physical (C, H, W)} of any size -> class map (H, W): sliding windows of
    config.tile."""
    dev = next(model.head.parameters()).device
    x = {m: prepare(m, v)[None].to(dev) for m, v in images.items()}
    rng = torch.Generator(dev).manual_seed(seed)

    def segment(windows):
        return model(windows, model.think(windows, rng))
    logits = sliding_inference(segment, x, model.config.tile, batch)      # (1, K, H, W)
    return logits[0].argmax(0).cpu()


def overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes painted over the image at 50 %: water blue for two classes, else the LULC
    palette; class 0 clear."""
    if num_classes <= 2:
        pal = np.array([[0, 0, 0], [30, 110, 255]], np.uint8)
    else:
        pal = LULC_COLORS[1:][np.arange(num_classes) % 9]
    out = rgb.astype(np.float32)
    paint = (mask > 0) & (mask < num_classes)
    out[paint] = 0.5 * out[paint] + 0.5 * pal[mask[paint]]
    return out.astype(np.uint8)


def overlay_path(out: Path) -> Path:
    """The PNG overlay beside the mask: mask.tif -> mask.png, mask.png -> mask_overlay.png."""
    if out.suffix.lower() == ".png":
        return out.with_name(f"{out.stem}_overlay.png")
    return out.with_suffix(".png")


def check_inputs(model, paths: dict):
    """The --input modalities must be the model's inputs, each given once."""
    inputs = model.config.modalities
    bad = [m for m in paths if m not in inputs]
    if bad:
        raise ValueError(f"--input {bad[0]}: the model's inputs are {', '.join(inputs)}")
    missing = [m for m in inputs if m not in paths]
    if missing:
        raise ValueError(f"missing --input for {missing} (the model's inputs: "
                         f"{', '.join(inputs)})")


def open_inputs(model, paths: dict) -> dict:
    """{modality: scene.Raster} in the model's input order, band counts checked."""
    check_inputs(model, paths)
    rasters = open_scene({m: paths[m] for m in model.config.modalities})
    for m, x in rasters.items():
        channels = MODALITIES[m].channels
        if x.bands != channels:
            raise ValueError(f"{x.path}: expected {channels} band(s) of {m}, got {x.bands}")
    return rasters


def read_windows(rasters: dict, chunk: list, size: int, dev) -> dict:
    """{modality: standardized (n, C, size, size)}: the chunk's windows of each input; past the
    edge and where NaN 0 = the mean, as predict pads and fills."""
    out = {}
    for m, x in rasters.items():
        parts = []
        for r, c in chunk:
            h, w = min(size, x.height - r), min(size, x.width - c)
            v = x.read(r, r + h, c, c + w).astype(np.float32)
            padding = ((0, 0), (0, size - h), (0, size - w))
            parts.append(prepare(m, np.pad(v, padding, constant_values=np.nan)))
        out[m] = torch.stack(parts).to(dev)
    return out


def nodata_rows(rasters: dict, a: int, b: int) -> np.ndarray:
    """Rows [a, b) -> (b - a, W) True where every band of every input is NaN (no data), read
    in 1024 px blocks."""
    W = next(iter(rasters.values())).width
    empty = np.ones((b - a, W), bool)
    for x in rasters.values():
        for c in range(0, W, 1024):
            v = x.read(a, b, c, min(W, c + 1024))
            if v.dtype.kind == "f":
                empty[:, c:c + 1024] &= np.isnan(v).all(0)
            else:
                empty[:, c:c + 1024] = False
    return empty


class OpenRows:
    """Summed logits `acc` (K, n, Wp) and window counts `count` (n, Wp) of the rows
    base .. base + n that windows still cover."""

    def __init__(self, acc=None, count=None, base: int = 0):
        self.acc, self.count, self.base = acc, count, base

    def add(self, logits: torch.Tensor, chunk: list, size: int, Wp: int):
        """logits (n, K, size, size) of the windows at `chunk`'s corners."""
        if self.acc is None:
            self.acc = logits.new_zeros(logits.shape[1], 0, Wp)
            self.count = logits.new_zeros(0, Wp)
        for j, (r, c) in enumerate(chunk):
            top = r - self.base
            grow = top + size - self.acc.shape[1]
            if grow > 0:
                self.acc = torch.cat([self.acc, self.acc.new_zeros(self.acc.shape[0], grow, Wp)], 1)
                self.count = torch.cat([self.count, self.count.new_zeros(grow, Wp)])
            self.acc[:, top:top + size, c:c + size] += logits[j]
            self.count[top:top + size, c:c + size] += 1

    def close(self, done: int, H: int, W: int) -> np.ndarray:
        """The classes of rows base .. done (cut to the image, (h, W) uint8); they leave."""
        n = done - self.base
        mean = self.acc[:, :n] / self.count[:n]                       # (K, n, Wp)
        mask = mean.argmax(0)[:max(0, H - self.base), :W]
        self.acc, self.count, self.base = self.acc[:, n:], self.count[n:], done
        return mask.cpu().numpy().astype(np.uint8)

    def arrays(self, rng: torch.Generator) -> dict:
        return {"acc": self.acc.cpu().numpy(), "count": self.count.cpu().numpy(),
                "rng": rng.get_state().numpy()}


def resume_state(state, dev, rng: torch.Generator) -> tuple[int, OpenRows]:
    """(first chunk, open rows) of a saved Progress state, or of a fresh run (state None)."""
    if state is None:
        return 0, OpenRows()
    arrays, meta = state
    rng.set_state(torch.from_numpy(arrays["rng"]))
    acc = torch.from_numpy(arrays["acc"]).to(dev)
    count = torch.from_numpy(arrays["count"]).to(dev)
    return meta["chunk"], OpenRows(acc, count, meta["base"])


@torch.no_grad()
def predict_scene(model, paths: dict, out, batch: int = 8, seed: int = 0,
                  resume: bool = False) -> str:
    """`predict` over co-registered GeoTIFFs {modality: path} of any size in bounded memory:
    the same windows, batches and sampling, each window read from the files, logits summed over
    the open rows only, every finished band of rows written to the tiled class mask `out`
    (NODATA where every input band is NaN), with the inputs' georeferencing. Equals `predict`
    bit for bit; resume=True continues a killed run into an identical file."""
    t0, dev, size = time.time(), next(model.head.parameters()).device, model.config.tile
    rasters = open_inputs(model, paths)
    first = next(iter(rasters.values()))
    H, W = first.height, first.width
    Hp, Wp = max(H, size), max(W, size)   # small images padded to one window (sliding_inference)
    corners = [(r, c) for r in window_starts(Hp, size) for c in window_starts(Wp, size)]
    chunks = [corners[k:k + batch] for k in range(0, len(corners), batch)]
    inputs = {m: [str(p), Path(p).stat().st_size] for m, p in paths.items()}
    run = {"ckpt": model.config, "inputs": inputs, "batch": batch, "seed": seed}
    progress = Progress(f"{out}.progress.npz", run)
    rng = torch.Generator(dev).manual_seed(seed)
    state = progress.load() if resume else None
    geo = {**first.geo, 42113: str(NODATA)}
    writer = TiledWriter(out, 1, H, W, np.uint8, geo, resume=state is not None)
    k0, rows = resume_state(state, dev, rng)
    steps = tqdm(range(k0, len(chunks)), desc="windows", unit="batch", initial=k0,
                 total=len(chunks))
    for k in steps:
        x = read_windows(rasters, chunks[k], size, dev)
        rows.add(model(x, model.think(x, rng)), chunks[k], size, Wp)   # (n, K, size, size)
        # later windows start at or below this row
        done = chunks[k + 1][0][0] if k + 1 < len(chunks) else Hp
        if done <= rows.base:
            continue
        base = rows.base
        mask = rows.close(done, H, W)                                 # (h, W)
        mask[nodata_rows(rasters, base, base + len(mask))] = NODATA
        writer.write_rows(base, mask[None])
        writer.flush()
        progress.save(rows.arrays(rng), chunk=k + 1, base=rows.base)
    writer.finish()
    progress.done()
    scale = first.geo.get(33550)
    return summary(H, W, len(corners), time.time() - t0, scale[0] if scale else None)


def predict_outputs(args, paths: dict) -> tuple[Path, Path]:
    """(mask, overlay) paths, refused before any work where they would replace an input, each
    other, or an existing file without --overwrite (--resume continues its own mask)."""
    out = Path(args.out)
    if any(Path(p).resolve() == out.resolve() for p in paths.values()):
        raise ValueError(f"--out {out} is one of the --input files: the mask would replace it; "
                         f"choose another path")
    png = overlay_path(out)
    inputs = {f"--input {m}": p for m, p in paths.items()}
    distinct_outputs({"class mask": out, "PNG overlay": png, **inputs})
    output_file(out, "--out", overwrite=args.overwrite or args.resume)
    output_file(png, "--out (its PNG overlay)", overwrite=args.overwrite)
    return out, png


def class_shares(mask: Raster, num_classes: int) -> str:
    """The share of each class and of no data in a mask, read in 1024-row blocks."""
    share = np.zeros(256, np.int64)
    for r in range(0, mask.height, 1024):
        rows = mask.read(r, min(mask.height, r + 1024), 0, mask.width)
        share += np.bincount(rows.ravel(), minlength=256)
    n = mask.height * mask.width
    shares = [f"class {k} {100 * share[k] / n:.1f}%" for k in range(num_classes)]
    return " | ".join(shares) + f" | no data {100 * share[NODATA] / n:.1f}%"
