"""
How well an image tokenizer reconstructs: the `reconstruct` command of `fsq_tokenizer.py`.

It consumes a trained tokenizer (fsq_tokenizer.ImageTokenizer) and held-out tiles of a
TerraMesh-layout folder, tokenizes and decodes them at every DDIM step count and x0 bound asked
for (the same start noise for each), and produces:

  * a table on stdout: a row per decoding with its metrics (metrics.py: paper Table 10) and its
    time per image, next to the "predict the mean image" baseline;
  * `<out>/metrics_<MOD>.json`: the same figures, the codebook use, the whole sweep;
  * `<out>/<MOD>_<id>.png`: picture sheets, input | each reconstruction.

    python fsq_tokenizer.py reconstruct --modality S2L2A --data data/synth --tokenizers ckpt/ --out out/tok
    python fsq_tokenizer.py reconstruct --modality DEM --data data/synth --tokenizers ckpt/ \\
        --steps 1 2 5 10 25 50 --out out/tok_steps      # quality and time per image against DDIM steps
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import distinct_outputs, output_file
from diffusion_decoder import DECODE_STEPS, OFFICIAL_DECODE_STEPS
from geotiff import write_text
from metrics import codebook_usage, physical, reconstruction_metrics
from pictures import save_sheet
from render import render
from tokenizer_data import batches, dataset

UNITS = {"S2L2A": "reflectance", "S1GRD": "dB", "S1RTC": "dB", "DEM": "m", "NDVI": "NDVI"}


def decode_timed(tok, tokens, noise, steps: int, clip, batch_size: int,
                 device) -> tuple[torch.Tensor, float]:
    """Decodes `tokens` (B, h, w) from the start `noise` in batches
    -> (reconstructions, seconds per image)."""
    t0 = time.perf_counter()
    parts = []
    for t, z in zip(tokens.split(batch_size), noise.split(batch_size)):
        recon = tok.decode(t.to(device), steps, noise=z.to(device), clip=clip)
        parts.append(recon.cpu())                                   # .cpu() waits for the GPU
    return torch.cat(parts), (time.perf_counter() - t0) / len(tokens)


def mean_image(args, m: str, like: torch.Tensor) -> torch.Tensor:
    """The "predict the mean image" baseline: per-band mean of the training split
    (LULC: its majority class)."""
    train_ds = dataset(args.data, m, "train", size=None)
    first = range(min(512, len(train_ds)))
    train_x = torch.cat(list(batches(train_ds, m, 256, first)))
    if m == "LULC":
        majority = train_x.flatten().bincount(minlength=10).argmax()
        return F.one_hot(majority, 10).double().view(1, 10, 1, 1).expand(like.shape)
    return train_x.double().mean((0, 2, 3)).view(1, -1, 1, 1).expand(like.shape)


def check_outputs(args, m: str, ids: list[str]):
    """The metrics file and the picture sheets, refused before any work when they exist
    (unless --overwrite)."""
    out = Path(args.out)
    pictures = [out / f"{m}_{sid}.png" for sid in ids[:min(args.pictures, args.n)]]
    outputs = {"metrics": out / f"metrics_{m}.json"}
    for p in pictures:
        outputs[f"picture {p.name}"] = p
    distinct_outputs(outputs)
    for path in outputs.values():
        output_file(path, "--out", args.overwrite)


def decodings(m: str, steps: list[int], clips: list[float]) -> list[tuple]:
    """(DDIM steps, x0 bound) of each decoding to compare; LULC has one (its ViT decoder)."""
    if m == "LULC":
        return [(None, None)]
    return [(s, c) for s in steps for c in clips]


def decoding_name(m: str, steps, clip) -> str:
    if m == "LULC":
        return "ViT decoder"
    bound = f"clip {clip:g}" if clip else "unbounded"
    return f"{steps} steps, {bound}"


@torch.no_grad()
def reconstruct(args, tok):
    """Tokenize and decode samples at every --steps count and --clip bound: quality against steps
    and time per image (the DDIM sweep), next to the mean-image baseline; metrics JSON and
    picture sheets."""
    m, out = args.modality, Path(args.out)
    ds = dataset(args.data, m, args.split, size=None)
    check_outputs(args, m, ds.ids)                                 # before any work
    first = range(min(args.n, len(ds)))
    x = torch.cat(list(batches(ds, m, args.batch_size, first)))   # (B, C, H, W) / (B, H, W)
    parts = [tok.encode(b.to(args.device)).cpu() for b in x.split(args.batch_size)]
    tokens = torch.cat(parts)                                      # (B, h, w)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(x), tok.channels, *x.shape[-2:], generator=generator)
    runs = decodings(m, args.steps, args.clip)
    recons, seconds = {}, {}
    for steps, clip in runs:                               # the same start noise for every run
        name = decoding_name(m, steps, clip)
        recons[name], seconds[name] = decode_timed(tok, tokens, noise, steps, clip or None,
                                                   args.batch_size, args.device)
    data_range = None
    if m != "LULC":
        data_range = physical(m, x).amax((0, 2, 3)) - physical(m, x).amin((0, 2, 3))
    rows = {name: reconstruction_metrics(m, x, r, data_range) for name, r in recons.items()}
    baseline = mean_image(args, m, recons[name])
    rows["mean image"] = reconstruction_metrics(m, x, baseline, data_range)
    usage = codebook_usage(tokens, tok.vocab_size)
    report_reconstruction(args, m, len(x), usage, rows, seconds)
    write_metrics(out / f"metrics_{m}.json", m, len(x), usage, runs, rows, seconds)
    n_pictures = min(args.pictures, len(x))
    for k in range(n_pictures):
        write_sheet(out / f"{m}_{ds.ids[k]}.png", m, x[k], {n: r[k] for n, r in recons.items()})
    print(f"wrote {out}/metrics_{m}.json and {n_pictures} pictures")


def write_metrics(path: Path, m: str, n: int, usage: dict, runs: list, rows: dict,
                  seconds: dict):
    """metrics_<MOD>.json: the first step count's rows (by bound) and the baseline, the sweep."""
    names = [decoding_name(m, s, c) for s, c in runs]
    sweep = []
    for (s, c), name in zip(runs, names):
        sweep.append({"steps": s, "clip": c, "metrics": rows[name],
                      "seconds_per_image": seconds[name]})
    first = {}
    for (s, _), name in zip(runs, names):
        if s == runs[0][0]:
            first[name.split(", ")[-1]] = rows[name]              # "clip 1", "unbounded", ...
    report = {"modality": m, "n": n, "steps": runs[0][0], "codebook": usage,
              "metrics": {**first, "mean image": rows["mean image"]}, "sweep": sweep}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(report, indent=1))


def write_sheet(path: Path, m: str, x: torch.Tensor, recons: dict):
    """A picture sheet: the input, then each reconstruction."""
    panels = [("input", render(m, x, True))]
    for name, r in recons.items():
        panels.append((name, render(m, r, standardized=True)))
    save_sheet(path, panels)


def report_reconstruction(args, m: str, n: int, usage: dict, rows: dict, seconds: dict):
    """Prints one table: a row per decoding (steps, bound), its metrics and time per image."""
    print(f"{m} ({UNITS.get(m, 'classes')}), {n} samples of {args.data} ({args.split}); "
          f"codebook used {usage['used'] * 100:.2f}%, perplexity {usage['perplexity']:.1f}")
    if m != "LULC":
        print(f"DDIM steps {' '.join(map(str, args.steps))} (default here {DECODE_STEPS}, "
              f"as the official notebooks; the official DiVAE.decode_tokens default is "
              f"{OFFICIAL_DECODE_STEPS}); time on {args.device}")
    keys = list(next(iter(rows.values())))
    print("| decoding | " + " | ".join(keys) + " | ms/image |")
    for name, row in rows.items():
        ms = f"{1e3 * seconds[name]:.1f}" if name in seconds else "-"
        cells = " | ".join(f"{row[k]:.4g}" for k in keys)
        print(f"| {name} | {cells} | {ms} |")
