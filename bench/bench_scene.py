"""
Benchmark: whole scenes in bounded memory. Peak resident memory and time of `generate.py --scene` (and of
`tim_finetune.py predict` with --tim-predict) on square S2L2A scenes of growing size, at the smoke size.

The scenes tile the two real TerraMesh S2L2A sites of assets/ in a checkerboard (written window row by window
row, so making an 8192 px scene needs no 8192 px array either), 10 m pixels. The models are random-weight
smoke models (the compute of a trained one); every size runs in a fresh process, which reports its own peak
RSS (ru_maxrss) in its summary line. Run it under the shared CPU lock:

    flock /tmp/cpu.lock python bench/bench_scene.py --sizes 1024 4096 8192
    flock /tmp/cpu.lock python bench/bench_scene.py --sizes 1024 4096 --targets LULC,S1GRD --tim-predict

Prints one table row per run: size, km², windows, seconds (the scene run itself, and the whole process with
imports and model loading), s/km² of the run, peak RSS MB and its ratio to the first size.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import terramesh  # noqa: E402
from fsq_tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_path  # noqa: E402
from scene import TiledWriter  # noqa: E402
from terramind import TerraMind, TerraMindConfig  # noqa: E402
from tim_finetune import TiMSegmenter  # noqa: E402

SITES = ("637U_59R_1_3", "38D_378R_2_3")


def make_scene(path: Path, size: int):
    """A size x size S2L2A GeoTIFF (tiled, int16): the two real sites in a checkerboard, the first one's tags."""
    tiles = [np.moveaxis(terramesh.read_tiff(ROOT / "assets" / "terramesh" / "S2L2A" / f"{s}.tif")[0], -1, 0)
             for s in SITES]
    geo = terramesh.read_tiff(ROOT / "assets" / "terramesh" / "S2L2A" / f"{SITES[0]}.tif")[1]
    writer = TiledWriter(path, 12, size, size, np.int16, geo)
    for i in range(-(-size // 224)):   # one row of sites at a time
        row = np.concatenate([tiles[(i + j) % 2] for j in range(-(-size // 224))], -1)[:, :, :size]
        writer.write_rows(224 * i, row[:, :min(224, size - 224 * i)])
    writer.finish()


def make_models(folder: Path, targets: list):
    """Random smoke checkpoints: TerraMind, the targets' tokenizers and a TiM segmenter on S2L2A."""
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke"))
    model.save_checkpoint(folder / "terramind.safetensors")
    for m in targets:
        ImageTokenizer(TokenizerConfig.preset("smoke", m)).save_checkpoint(tokenizer_path(folder, m))
    TiMSegmenter.from_pretrained(model, modalities=("S2L2A",), tim=("LULC",), tile=64,
                                 channels=64).save_checkpoint(folder / "tim.safetensors")


def run(cmd: list) -> tuple[float, str]:
    """Seconds and the summary line of one scene run in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0, next(s for s in p.stdout.splitlines() if s.startswith("scene "))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="scene sides, px")
    p.add_argument("--targets", default="LULC", help="generated modalities (image targets)")
    p.add_argument("--diffusion-steps", type=int, default=10, help="DDIM steps of diffusion targets")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--tim-predict", action="store_true", help="also time tim_finetune.py predict on each scene")
    p.add_argument("--work", default="runs/bench_scene", help="folder for models, scenes and outputs")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    make_models(work, args.targets.split(","))
    print(f"CPU threads {os.environ.get('OMP_NUM_THREADS', '2')} | targets {args.targets} | smoke size\n")
    print("| run | scene px | km² | windows | s (run) | s (process) | s/km² (run) | peak RSS MB | RSS / first |\n"
          "|---|---|---|---|---|---|---|---|---|")
    first = {}
    for size in args.sizes:
        scene = work / f"scene_{size}.tif"
        if not scene.exists():
            make_scene(scene, size)
        runs = {"generate": ["generate.py", "--model", work / "terramind.safetensors", "--tokenizers", work,
                             "--input", f"S2L2A={scene}", "--targets", args.targets, "--scene", "--device", "cpu",
                             "--diffusion-steps", args.diffusion_steps, "--batch-size", args.batch_size,
                             "--out", work / f"gen_{size}", "--overwrite"]}   # a rerun replaces its outputs
        if args.tim_predict:
            runs["predict"] = ["tim_finetune.py", "predict", "--ckpt", work / "tim.safetensors", "--input",
                               f"S2L2A={scene}", "--batch-size", args.batch_size, "--device", "cpu",
                               "--out", work / f"mask_{size}.tif"]
        for name, cmd in runs.items():
            seconds, line = run([str(c) for c in cmd])
            km2, windows = size * size * 1e-4, int(re.search(r"(\d+) windows", line)[1])
            inside = float(re.search(r"\| ([\d.]+) s \|", line)[1])   # the run itself: no imports, no model load
            rss = float(re.search(r"peak RSS (\d+) MB", line)[1])
            first.setdefault(name, rss)
            print(f"| {name} | {size} | {km2:.0f} | {windows} | {inside:.0f} | {seconds:.0f} | {inside / km2:.3f} | "
                  f"{rss:.0f} | {rss / first[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
