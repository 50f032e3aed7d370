"""
Reports of the downstream evaluations: the paper's Table 6 layout (PANGAEA: mIoU per dataset,
average mIoU and average rank), its Table 8 layout (TiM: water IoU and mIoU over seeds), the
input | target | prediction picture of a split's first sample, and results.json written
atomically.

eval_pangaea.py and tim_finetune.py write them; nothing here runs on its own, so there are no
CPU/GPU/torchrun commands.
"""
from __future__ import annotations

import json

import numpy as np

from geotiff import write_text
from modalities import LULC_COLORS, MODALITIES
from pictures import save_sheet
from render import render


TABLE6 = {"hlsburnscars": "HLS Burns", "mados": "MADOS", "pastis": "PASTIS",
          "sen1floods11": "Sen1Fl11", "fivebillionpixels": "FBP", "dynamicen": "DEN",
          "croptypemapping": "CTM-SS", "spacenet7": "SN7", "ai4smallfarms": "AI4Farms"}


def average_ranks(results: dict, cols: list) -> dict:
    """{model: mean rank (1 = best mIoU) over the columns it has}."""
    ranks = {m: [] for m in results}
    for d in cols:
        scored = sorted((-r[d], m) for m, r in results.items() if d in r)
        for k, (_, m) in enumerate(scored):
            ranks[m].append(k + 1)
    return {m: np.mean(r) for m, r in ranks.items()}


def table6(results: dict) -> str:
    """{model: {dataset: test mIoU}} -> markdown in the paper's column order (other datasets
    after), with the average mIoU over each model's datasets and the average rank among the
    models per column."""
    others = sorted({d for r in results.values() for d in r} - set(TABLE6))
    cols = list(TABLE6) + others
    ranks = average_ranks(results, cols)
    names = " | ".join(TABLE6.get(d, d) for d in cols)
    lines = [f"| Model | {names} | Avg. mIoU | Avg. Rank |", "|---" * (len(cols) + 3) + "|"]
    for m, r in results.items():
        cells = " | ".join(f"{r[d]:.2f}" if d in r else "–" for d in cols)
        lines.append(f"| {m} | {cells} | {np.mean(list(r.values())):.2f} | {ranks[m]:.2f} |")
    return "\n".join(lines)


def class_palette(k: int) -> np.ndarray:
    """(k, 3) uint8: dark / blue for two classes, else the LULC colours, then seeded random."""
    if k <= 2:
        return np.array([(40, 40, 40), (65, 155, 223)], np.uint8)
    extra = np.random.default_rng(0).integers(0, 255, (max(k - 9, 0), 3), dtype=np.uint8)
    return np.concatenate([LULC_COLORS[1:], extra])


def picture(reader, image: dict) -> np.ndarray:
    """(H, W, 3) uint8 of a sample: true colour with a 2-98 % stretch where the reader has B4,
    B3, B2, else the modality's rendering (S1 false colour, DEM, ...)."""
    rgb = ("B4", "B3", "B2")
    bands = reader.bands.items()
    src, codes = next(((m, c) for m, c in bands if set(rgb) <= set(c)), next(iter(bands)))
    if not set(rgb) <= set(codes):
        return render(src if src in MODALITIES else "S1GRD", image[src][:, 0])
    x = image[src][[codes.index(c) for c in rgb], 0]
    lo, hi = np.percentile(x, [2, 98])
    stretched = np.clip((x - lo) / (hi - lo + 1e-6), 0, 1) * 255
    return stretched.astype(np.uint8).transpose(1, 2, 0)


def save_prediction(path, reader, pred, target):
    """input | target | prediction (ignored pixels white) for the first sample of a split."""
    k = len(reader.classes)
    pal = class_palette(k)

    def paint(y):
        colours = pal[np.clip(y, 0, k - 1)]
        return np.where((y >= 0)[..., None], colours, 255).astype(np.uint8)
    y = target.numpy()
    shown = np.where(y == reader.ignore_index, -1, pred.numpy())
    panels = [("input", picture(reader, reader[0][0])), ("target", paint(y)),
              ("prediction", paint(shown))]
    save_sheet(path, panels, max_size=256)


def write_json(path, obj):
    """Writes obj as JSON atomically (a temporary file, then a rename); tim_finetune.py uses it
    too."""
    write_text(path, json.dumps(obj, indent=1))


# -----------------------------------------------------------------------------------------------
# TiM (paper Table 8): mean ± std over seeds

def label(modalities, tim) -> str:
    names = {"S1GRD": "S-1", "S1RTC": "S-1 RTC", "S2L1C": "S-2", "S2L2A": "S-2", "S2RGB": "RGB"}
    return " + ".join([names.get(m, m) for m in modalities] + [f"gen. {m}" for m in tim])


def mean_std(values) -> str:
    spread = np.std(values, ddof=1) if len(values) > 1 else 0
    return f"{np.mean(values):.2f} ± {spread:.2f}"


def table8(results: list) -> str:
    """results.json dicts -> paper Table 8 layout, mean ± std over seeds (test split, %)."""
    groups = {}
    for r in results:   # runs differing only in the seed form one row
        tim = ""
        if r["tim"]:
            tim = (f"TiM ({r['merge']}, T {r['args']['temperature']}, "
                   f"{r['args']['tim_steps']} step)")
        groups.setdefault((tim, label(r["modalities"], r["tim"])), []).append(r)
    lines = ["| Model | Input | IoU water | mIoU | seeds |", "|---|---|---|---|---|"]
    for (tim, name), rs in sorted(groups.items()):
        iou = [r["test"]["iou"][r["water"]] for r in rs]
        miou = [r["test"]["miou"] for r in rs]
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| TerraMind {tim} | {name} | {mean_std(iou)} | {mean_std(miou)} | "
                     f"{seeds} |")
    return "\n".join(lines)
