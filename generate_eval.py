"""
What `python generate.py eval` measures and how it reports it: paper Table 3 (MAE, RMSE, SSIM, PSNR
in physical units), Table 4 (zero-shot water IoU of the generated LULC) and the geolocation error
in km.

This file holds no generation. It reads the evaluation sets (a TerraMesh-layout folder,
Sen1Floods11 chips), lists the input -> output pairs they and the tokenizers allow (`eval_jobs`),
scores the outputs generate.py produced for each pair against the ground truth (`EvalTables.add`),
draws one picture per pair and writes the tables as eval.md and eval.json. generate.py imports it:

    python generate.py eval --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --data data/synth --split test --n 64 --temperature 0 \\
        --sen1floods11 assets/sen1floods11 --out out/eval
    # one GPU: the same with --device cuda
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from generate_io import Timer, claim_outputs, load_stack
from geotiff import write_text
from metrics import haversine_km, reconstruction_metrics, water_iou
from modalities import LULC_CLASSES, WATER, parse_coords, whole_patches
from pangaea_datasets import read_sen1floods11
from pictures import save_sheet
from render import render
from shard_index import is_shard_root
from terramesh import TerraMeshDataset, has_folder

SEN1FLOODS11_PAIRS = "S1GRD:LULC,S2L1C:LULC,S1GRD+S2L1C:LULC,S2L1C:coords"
UNITS = ("Physical units: S2 reflectance (0-1), S1 dB, DEM m, NDVI; PSNR/SSIM range: the ground "
         "truth's.")


@dataclass
class EvalJob:
    """One input -> output pair on one set: `have` holds the samples with its inputs and truth."""
    title: str
    src: str          # input modalities joined by "+"
    dst: str
    scale: str        # "pixels" or "tokens" (paper Table 14)
    have: list

    @property
    def tag(self) -> str:
        return ", token inputs" if self.scale == "tokens" else ""

    @property
    def name(self) -> str:
        return f"{self.src} → {self.dst} ({self.title}{self.tag})"

    @property
    def inputs(self) -> list:
        return self.src.split("+")

    def sheet(self, folder: Path) -> Path | None:
        """The picture of the pair's first sample (none for coords)."""
        if self.dst == "coords":
            return None
        suffix = "_tokens" if self.tag else ""
        return folder / f"{self.title}_{self.src.replace('+', '_')}_to_{self.dst}{suffix}.png"


def markdown(header: list, rows: list) -> str:
    lines = []
    for row in [header, ["---"] * len(header), *rows]:
        lines.append("| " + " | ".join(map(str, row)) + " |\n")
    return "".join(lines)


def scaled_pairs(model, tokenizers, pairs: str, choice: str) -> list:
    """--pairs and --input-scale -> [(src, dst, scale)]: "both" adds a token-input run (paper Table
    14) to each pair with an input the model can take at either scale."""
    out = []
    for pair in pairs.split(","):
        src, dst = pair.split(":")
        either = [m for m in src.split("+")
                  if m in model.config.inputs and f"tok_{m}" in model.config.inputs and m in tokenizers]
        if choice != "both":
            scales = [choice]
        else:
            scales = ["pixels", "tokens"] if either else ["pixels"]
        out += [(src, dst, scale) for scale in scales]
    return out


def eval_sets(args) -> list:
    """[(title, samples, pairs, limit)]: --data (whole patches: TerraMesh's 264 px tiles -> the
    centred 256 px; up to --n samples per pair) and --sen1floods11 (whole 512 px chips, through
    the windowed generator; every chip)."""
    sets = []
    if args.data:
        root = Path(args.data)
        has_splits = (root / "splits").is_dir() or is_shard_root(root)
        split = args.split if has_splits else None                       # published: train/val
        labels = args.labels if has_folder(root, args.labels) else None
        ds = TerraMeshDataset(root, split=split, size=None, labels=labels)
        chosen = pair_samples(ds, args.pairs, labels, args.n)
        samples = [whole_patches(ds[i]) for i in tqdm(chosen, desc="read", leave=False)]
        sets.append((root.name, samples, args.pairs, args.n))
    if args.sen1floods11:
        chips = read_sen1floods11(args.sen1floods11, args.labels)
        sets.append(("Sen1Floods11", chips, SEN1FLOODS11_PAIRS, None))
    return sets


def has_pair(have, src: str, dst: str, labels) -> bool:
    """Whether a sample holding the modalities `have` serves the pair: its inputs and its truth
    (for LULC the water label will do)."""
    truth = dst in have or dst == "LULC" and labels in have
    return truth and all(m in have for m in src.split("+"))


def pair_samples(ds, pairs: str, labels, n: int) -> list:
    """The indices of ds to read: for every pair, its first n samples that hold the pair. The
    first n samples alone can miss a pair: the published layout has S1GRD only in its
    ssl4eos12 shards and S1RTC only in the majortom ones."""
    wanted = [pair.split(":") for pair in pairs.split(",")]
    counts, chosen = [0] * len(wanted), []
    for i in range(len(ds)):
        if min(counts) >= n:
            break
        have = set(ds.available(i))
        if labels and ds.ids[i] in ds.files[labels]:
            have.add(labels)
        serves = [k for k, (src, dst) in enumerate(wanted)
                  if counts[k] < n and has_pair(have, src, dst, labels)]
        for k in serves:
            counts[k] += 1
        if serves:
            chosen.append(i)
    return chosen


def eval_jobs(args, model, tokenizers, text, sets) -> list:
    """The pairs of every set that its samples and the decoders allow, as EvalJobs in run order;
    a pair left out says why."""
    jobs = []
    for title, samples, pairs, limit in sets:
        for src, dst, scale in scaled_pairs(model, tokenizers, pairs, args.input_scale):
            job = EvalJob(title, src, dst, scale, [])
            for s in samples:
                if has_pair(s, src, dst, args.labels):
                    job.have.append(s)
            job.have = job.have[:limit]
            if dst not in tokenizers and not (dst == "coords" and text is not None):
                print(f"{job.name}: left out, nothing here decodes {dst}")
            elif not job.have:
                print(f"{job.name}: left out, no sample of {title} holds "
                      f"{', '.join(job.inputs)} and {dst}")
            else:
                jobs.append(job)
    return jobs


def pair_inputs(job: EvalJob, first: int, size: int) -> dict:
    """The inputs of samples first..first + size: coords as (lon, lat), images stacked (B, C, H,
    W)."""
    part = job.have[first:first + size]
    inputs = {}
    for m in job.inputs:
        if m == "coords":
            inputs[m] = [parse_coords(s[m]) for s in part]
        else:
            inputs[m] = torch.stack([s[m] for s in part])
    return inputs


def draw_pair(job: EvalJob, gen: list, labels: str, folder: Path):
    """The inputs, the generated output and the truths of the pair's first sample, side by side."""
    first = job.have[0]
    panels = [(m, render(m, first[m], True)) for m in job.inputs if m != "coords"]
    panels.append((f"gen {job.dst}", render(job.dst, gen[0], True)))
    for k in (job.dst, labels):
        if k in first:
            panels.append((f"true {k}", render(k, first[k], True)))
    folder.mkdir(parents=True, exist_ok=True)
    save_sheet(job.sheet(folder), panels)


@dataclass
class EvalTables:
    """The rows of the report's tables, and the same numbers as records for eval.json."""
    model: str
    labels: str
    table3: list = field(default_factory=list)
    lulc: list = field(default_factory=list)
    water: list = field(default_factory=list)
    geo: list = field(default_factory=list)
    records: list = field(default_factory=list)

    def add(self, job: EvalJob, gen: list):
        if job.dst == "coords":
            return self.add_coords(job, gen)
        gen = torch.stack(gen)
        if job.dst == "LULC":
            return self.add_lulc(job, gen)
        self.add_image(job, gen)

    def add_coords(self, job: EvalJob, gen: list):
        km = []
        for g, s in zip(gen, job.have):
            if g is not None:
                km.append(haversine_km(g, parse_coords(s[job.dst])))
        stats = [f"{f(km):.0f}" if km else "-" for f in (np.mean, np.median)]
        self.geo.append([job.name, f"{len(km)}/{len(job.have)}", *stats])
        median = float(np.median(km)) if km else None
        self.records.append({"pair": job.name, "parsed": len(km), "n": len(job.have),
                             "median_km": median})

    def add_lulc(self, job: EvalJob, gen: torch.Tensor):
        truth = [s.get("LULC") for s in job.have]
        if all(t is not None for t in truth):
            truth = torch.stack(truth)
            onehot = F.one_hot(gen, len(LULC_CLASSES)).permute(0, 3, 1, 2)
            m = reconstruction_metrics("LULC", truth, onehot)
            majority_class = torch.bincount(truth.flatten()).argmax()
            majority = (truth == majority_class).double().mean()
            self.lulc.append([job.name, f"{m['acc']:.3f}", f"{m['mIoU']:.3f}", f"{majority:.3f}"])
            self.records.append({"pair": job.name, "n": len(job.have), "acc": m["acc"],
                                 "mIoU": m["mIoU"], "majority_acc": float(majority)})
        self.add_water(job, gen)

    def add_water(self, job: EvalJob, gen: torch.Tensor):
        """Zero-shot water IoU of a generated LULC (paper Table 4), against the water labels where
        the samples have them, else the LULC water class."""
        label = []
        for s in job.have:
            label.append(s[self.labels] if self.labels in s else (s["LULC"] == WATER).long())
        label = torch.stack(label)
        i, u = water_iou(gen, label)
        where = f"{job.src} ({job.title}{job.tag})"
        iou = f"{100 * i / u:.1f}" if u else "- (no water)"
        self.water.append([Path(self.model).name, where, "zero-shot", iou])
        all_water = 100 * float((label == 1).sum() / (label >= 0).sum())   # baseline: all water
        self.records.append({"pair": where, "n": len(job.have),
                             "water_iou": 100 * i / u if u else None, "all_water_iou": all_water})

    def add_image(self, job: EvalJob, gen: torch.Tensor):
        truth = torch.stack([s[job.dst] for s in job.have])
        m = reconstruction_metrics(job.dst, truth, gen)
        # trivial baseline: every pixel the set's per-band mean
        mean_image = truth.mean((0, 2, 3), keepdim=True).expand_as(truth)
        base = reconstruction_metrics(job.dst, truth, mean_image)
        scores = [f"{m[k]:.4g}" for k in ("MAE", "RMSE", "SSIM", "PSNR")]
        self.table3.append([job.name, *scores, f"{base['RMSE']:.4g}"])
        values = {k: float(m[k]) for k in ("MAE", "RMSE", "SSIM", "PSNR")}
        self.records.append({"pair": job.name, "n": len(job.have), **values,
                             "mean_image_RMSE": float(base["RMSE"])})

    def report(self, title: str, timing: str) -> str:
        """eval.md: the tables in the paper's layouts."""
        parts = [
            f"## Generation (paper Table 3 layout): {title}\n\n",
            markdown(["Input → Output", "MAE", "RMSE", "SSIM", "PSNR", "mean-image RMSE"], self.table3),
            f"\n{UNITS}\n\n",
            markdown(["Input → LULC", "pixel acc", "mIoU", "majority-class acc"], self.lulc),
            "\n## Zero-shot water mapping (paper Table 4 layout)\n\n",
            markdown(["Model", "Input", "Type", "IoU water"], self.water),
            "\n## Geolocation\n\n",
            markdown(["Input → coords", "parsed", "mean km", "median km"], self.geo),
            f"\n{timing}\n",
        ]
        return "".join(parts)

    def write(self, folder: Path, report: str):
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "eval.md", report)
        write_text(folder / "eval.json", json.dumps(self.records, indent=1))


def generate_pair(args, generate, model, tokenizers, text, job: EvalJob, timer) -> list:
    """The outputs of one eval pair for all its samples, in batches of --batch-size, by `generate`:
    [image | (lon, lat) | None]."""
    gen = []
    batches = range(0, len(job.have), args.batch_size)
    for first in tqdm(batches, desc=f"{job.src}:{job.dst}{job.tag}", leave=False):
        inputs = pair_inputs(job, first, args.batch_size)
        out = generate(model, tokenizers, inputs, [job.dst], args.sampling, text,
                       args.diffusion_steps, args.seed, standardized=True,
                       batch_size=args.batch_size, timer=timer, input_scale=job.scale)[job.dst]
        gen += out if job.dst == "coords" else list(out)
    return gen


def run_eval(args, generate):
    """generate.py eval: every pair of every set generated by `generate` (generate.generate, passed in
    as this file sits below generate.py in the import graph) and scored."""
    folder = Path(args.out)
    claim_outputs({"report": folder / "eval.md", "records": folder / "eval.json"}, args.overwrite)
    model, tokenizers, text = load_stack(args)
    sets = eval_sets(args)
    jobs = eval_jobs(args, model, tokenizers, text, sets)
    sheets = {f"picture of {job.name}": job.sheet(folder) for job in jobs if job.sheet(folder)}
    claim_outputs(sheets, args.overwrite)
    timer, tables = Timer(), EvalTables(args.model, args.labels)
    for job in jobs:
        gen = generate_pair(args, generate, model, tokenizers, text, job, timer)
        if job.dst != "coords":
            draw_pair(job, gen, args.labels, folder)   # the first sample
        tables.add(job, gen)
    s = args.sampling
    counts = []
    for name, samples, _, limit in sets:
        per_pair = f" (up to {limit} per pair)" if limit else ""
        counts.append(f"{name} {len(samples)} samples{per_pair}")
    title = (f"{', '.join(counts)}; {s.scheme} {s.steps} step(s), T {s.temperature}, "
             f"{args.diffusion_steps} diffusion steps")
    report = tables.report(title, f"Time per sample ({args.device}): {timer.report()}")
    tables.write(folder, report)
    print(report)
