"""
The summary table of a run_cpu.sh / run_gpu.sh run: one line per headline
number of each stage, next to the trivial baseline it has to beat.

Consumes the output folder of run_cpu.sh (every stage's own result files:
tokenizers_eval/metrics_<MOD>.json, pretrain/log.jsonl, generate/eval/eval.json,
tim/*/results.json, pangaea/*/results.json, times.tsv) and writes
<out>/summary.md (the table, printed too) and <out>/summary.json (the same rows,
for tests/test_pipeline.py).

    python summary.py runs/cpu
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from geotiff import write_text
from terramind import TerraMindConfig
from token_shards import read_header


def row(stage: str, metric: str, value, baseline=None, higher_is_better=True,
        baseline_name="") -> dict:
    """One summary line; `beats` says whether value is on the good side of the
    baseline (None: no baseline)."""
    beats = None
    if baseline is not None and value is not None:
        beats = value > baseline if higher_is_better else value < baseline
    return {"stage": stage, "metric": metric, "value": value, "baseline": baseline,
            "baseline_name": baseline_name, "beats": beats}


def tokenizer_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "tokenizers_eval").glob("metrics_*.json")):
        r = json.loads(path.read_text())
        m, metrics, used = r["modality"], r["metrics"], 100 * r["codebook"]["used"]
        codes = f"({used:.0f}% of codes used)"
        if m == "LULC":
            rows.append(row("tokenizer", f"LULC pixel accuracy % {codes}",
                            100 * metrics["ViT decoder"]["acc"],
                            100 * metrics["mean image"]["acc"],
                            baseline_name="majority class"))
        else:
            rows.append(row("tokenizer", f"{m} RMSE {codes}", metrics["clip 1"]["RMSE"],
                            metrics["mean image"]["RMSE"], higher_is_better=False,
                            baseline_name="mean image"))
    return rows


def pretrain_rows(out: Path) -> list[dict]:
    path = out / "pretrain" / "terramind.safetensors"
    if not path.is_file():
        raise FileNotFoundError(2, "no checkpoint", str(path))
    config = TerraMindConfig(**read_header(path)["config"])
    log = (out / "pretrain" / "log.jsonl").read_text().splitlines()
    lines = [json.loads(s) for s in log]
    step, val = [(r["step"], r["val"]) for r in lines if "val" in r][-1]
    rows = []
    for e, loss in val.items():
        rows.append(row("pretrain", f"val loss {e} (step {step}, nats)", loss,
                        math.log(config.vocab_size(e)), higher_is_better=False,
                        baseline_name="log V"))
    return rows


def generation_rows(out: Path) -> list[dict]:
    rows = []
    for r in json.loads((out / "generate" / "eval" / "eval.json").read_text()):
        if "RMSE" in r:
            rows.append(row("generate", f"{r['pair']} RMSE", r["RMSE"],
                            r["mean_image_RMSE"], False, "mean image"))
        elif "acc" in r:
            rows.append(row("generate", f"{r['pair']} pixel accuracy %", 100 * r["acc"],
                            100 * r["majority_acc"], baseline_name="majority class"))
        elif "water_iou" in r:
            rows.append(row("generate", f"zero-shot water IoU % from {r['pair']}",
                            r["water_iou"], r["all_water_iou"], baseline_name="all water"))
        elif "median_km" in r:
            parsed = f"({r['parsed']}/{r['n']} parsed)"
            rows.append(row("generate", f"{r['pair']} median error km {parsed}",
                            r["median_km"]))
    return rows


def finetune_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "tim").glob("*/results.json")):
        r = json.loads(path.read_text())
        thinking = " + gen. " + "+".join(r["tim"]) if r["tim"] else " (plain)"
        name = "+".join(r["modalities"]) + thinking
        water = r["test"]["iou"][r["water"]]
        rows.append(row("TiM", f"{name}: water IoU %", water, 0.0, baseline_name="all land"))
        rows.append(row("TiM", f"{name}: mIoU %", r["test"]["miou"], 50.0,
                        baseline_name="any constant"))
    for path in sorted((out / "pangaea").glob("*/results.json")):
        r = json.loads(path.read_text())
        if "miou" in r:
            rows.append(row("PANGAEA", f"{r['dataset']} mIoU % (frozen encoder)", r["miou"],
                            50.0, baseline_name="any constant"))
        if "accuracy" in r:
            task = f"{r['shots']}-shot {r['ways']}-way accuracy % ({r['runs']} runs)"
            rows.append(row("few-shot", task, r["accuracy"], r["chance"],
                            baseline_name="chance"))
    return rows


def stage_times(out: Path) -> list[tuple[str, float]]:
    path, times, before = out / "times.tsv", [], 0.0
    for line in path.read_text().splitlines() if path.exists() else []:
        name, t = line.split("\t")
        times.append((name, float(t) - before))
        before = float(t)
    return times


def markdown(rows: list[dict], times: list[tuple[str, float]]) -> str:
    def fmt(x):
        return "–" if x is None else f"{x:.4g}"
    lines = ["| Stage | Metric | Value | Trivial baseline | Beats it |",
             "|---|---|---|---|---|"]
    for r in rows:
        base = "–"
        if r["baseline"] is not None:
            base = f"{fmt(r['baseline'])} ({r['baseline_name']})"
        mark = {True: "yes", False: "**no**", None: "–"}[r["beats"]]
        lines.append(f"| {r['stage']} | {r['metric']} | {fmt(r['value'])} | {base} | {mark} |")
    if times:
        names = " | ".join(n for n, _ in times)
        seconds = " | ".join(f"{t:.0f}" for _, t in times)
        total = sum(t for _, t in times)
        lines += ["", f"| Stage | {names} | total |",
                  "|---" * (len(times) + 2) + "|",
                  f"| wall s | {seconds} | {total:.0f} |"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("out", help="output folder of run_cpu.sh / run_gpu.sh")
    out = Path(p.parse_args().out)
    rows, missing = [], []
    for part in (tokenizer_rows, pretrain_rows, generation_rows, finetune_rows):
        try:
            rows += part(out)
        except FileNotFoundError as e:   # a stage that did not run: say so, summarize the rest
            stage = part.__name__.removesuffix("_rows")
            missing.append(f"{stage}: {e.filename} missing")
    text = markdown(rows, stage_times(out)) + "".join(f"\nnot run: {m}" for m in missing)
    print(text)
    write_text(out / "summary.md", text)
    write_text(out / "summary.json", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
