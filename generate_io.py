"""
What goes into generate.py and what comes out of it: user inputs turned into model entries, token
ids turned back into coords and text, the checkpoints a run loads, and the files a run writes.

None of this is the method (that is generate.py: sampling, schedules, chained generation); it is
the plumbing around it:

  * `Timer`: seconds per stage (encoder, decoder, diffusion) per sample, for the closing line;
  * `target_entry`, `to_entries`: modality names -> model entries, pixels or tokens (paper
    Table 14);
  * `prepare_inputs`, `pad_to_patches`: user inputs -> standardized tensors, padded to whole
    patches;
  * `decode_sequence`: coords / caption ids -> (lon, lat) / text;
  * `load_stack`, `claim_outputs`, `write_outputs`: the checkpoints, and the output files (never
    replaced without --overwrite).

generate.py imports it; it has no command of its own:

    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=data/synth/S2L2A/00005.tif --targets LULC,coords --out out/gen
"""
from __future__ import annotations

import argparse
import math
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import (distinct_outputs, fraction, nonnegative_float, nonnegative_int,
                 output_file, positive_int, torch_device)
from diffusion_decoder import DECODE_STEPS, OFFICIAL_DECODE_STEPS
from fsq_tokenizer import load_tokenizers
from geotiff import write_geotiff, write_text
from modalities import (MODALITIES, PATCH, format_coords, modality, parse_coords,
                        standardize)
from pictures import save_sheet
from render import render
from terramind import TerraMind, checkpoint_file
from text_tokenizer import EOS_ID, OFFICIAL_VOCAB, PAD_ID, WordPieceTokenizer
from token_shards import read_header


class Timer:
    """Seconds spent per stage (encoder passes, decoder steps, diffusion, ...) and the samples they
    served: `with timer("encoder"): ...`."""
    def __init__(self):
        self.seconds, self.calls, self.samples = {}, {}, 0

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def report(self) -> str:
        n = max(self.samples, 1)
        parts = []
        for stage, seconds in self.seconds.items():
            parts.append(f"{stage} {1e3 * seconds / n:.1f} ms/sample ({self.calls[stage]} calls)")
        return " | ".join(parts)


def target_entry(name: str) -> str:
    m = MODALITIES.get(name)
    if m is None or not m.token_key:
        names = [k for k, v in MODALITIES.items() if v.token_key]
        raise ValueError(f"cannot generate {name!r}; targets: {names}")
    return name if m.kind == "sequence" else "tok_" + name


def to_entries(model, tokenizers, inputs: dict, timer: Timer, scale: str = "pixels") -> dict:
    """{modality: standardized (B, C, H, W) | LULC (B, H, W) | ids (B, L)} -> model entries: pixels
    where the model has a patch embedding, else tokens from the image tokenizer; scale "tokens"
    (paper Table 14): tokens wherever the model and the tokenizers allow, pixels only where not."""
    out = {}
    for name, x in inputs.items():
        tokens_ok = "tok_" + name in model.config.inputs and name in tokenizers
        as_tokens = scale == "tokens" and tokens_ok
        pixels_ok = name in model.config.inputs and not as_tokens
        if MODALITIES[name].kind == "sequence" or pixels_ok:
            out[name] = x
        elif tokens_ok:
            with timer("tokenizer encoder"):
                out["tok_" + name] = tokenizers[name].encode(x)
        else:
            raise ValueError(f"input {name}: the model has no pixel embedding for it and there "
                             f"is no {name} tokenizer with a tok_{name} embedding")
    return out


def decode_sequence(name, ids, text_tokenizer) -> list:
    """(B, L) ids -> [(lon, lat), or None when malformed] for coords, [text] for captions."""
    if name == "coords":
        with warnings.catch_warnings(action="ignore"):   # malformed rows are NaN, here None
            coords = text_tokenizer.decode_coords_batch(ids).tolist()
        return [None if math.isnan(c[0]) else tuple(c) for c in coords]
    texts = []
    for r in ids.tolist():
        r = [t for t in r if t != PAD_ID]
        r = r[:r.index(EOS_ID)] if EOS_ID in r else r
        texts.append(text_tokenizer.decode(r, skip_special_tokens=True).strip())
    return texts


def sequence_ids(name: str, x, text_tokenizer, dev) -> torch.Tensor:
    """A coords or caption input (one, or a list for a batch) -> ids (B, L), [PAD]-padded."""
    rows = [x] if isinstance(x, (str, tuple)) else list(x)
    ids = []
    for r in rows:
        if name == "coords":
            lon_lat = parse_coords(r) if isinstance(r, str) else r
            ids.append(text_tokenizer.encode_coords(*lon_lat))
        else:
            ids.append(text_tokenizer.encode(r)[:modality(name).max_length - 1] + [EOS_ID])
    L = max(map(len, ids))
    return torch.tensor([r + [PAD_ID] * (L - len(r)) for r in ids], device=dev)


def prepare_inputs(inputs: dict, text_tokenizer, standardized: bool, dev) -> tuple[dict, dict]:
    """User inputs -> ({image: standardized (B, C, H, W) | LULC (B, H, W)}, {sequence: ids (B,
    L)})."""
    images, seqs = {}, {}
    for name, x in inputs.items():
        if modality(name).kind == "sequence":
            seqs[name] = sequence_ids(name, x, text_tokenizer, dev)
            continue
        x = torch.as_tensor(x, device=dev)
        if x.dim() == (2 if name == "LULC" else 3):
            x = x[None]
        if name == "LULC":
            images[name] = x.long()
        else:
            images[name] = x.float() if standardized else standardize(name, x.float())
    return images, seqs


def check_decoders(inputs: dict, targets: list, tokenizers: dict, text_tokenizer):
    """Every target can be decoded, and sequences have a text tokenizer."""
    names = [*targets, *inputs]
    if text_tokenizer is None and any(modality(t).kind == "sequence" for t in names):
        raise ValueError("coords / caption inputs or targets need a text tokenizer "
                         "(--text-tokenizer)")
    missing = [t for t in targets if MODALITIES[t].kind == "image" and t not in tokenizers]
    if missing:
        raise ValueError(f"no tokenizer to decode {missing} (tokenizers: {sorted(tokenizers)})")


def pad_to_patches(images: dict, tile: int) -> tuple[dict, int, int]:
    """Images of one size (H, W) (the tile without images) -> reflect-padded to whole patches, H,
    W."""
    H, W = next(iter(images.values())).shape[-2:] if images else (tile, tile)
    if any(v.shape[-2:] != (H, W) for v in images.values()):
        sizes = {k: tuple(v.shape[-2:]) for k, v in images.items()}
        raise ValueError(f"image inputs differ in size: {sizes}")
    pad = (0, -W % PATCH, 0, -H % PATCH)   # cropped again at the end
    padded = {}
    for k, v in images.items():
        if k == "LULC":   # classes: padded as floats, kept as classes
            padded[k] = F.pad(v[:, None].float(), pad, mode="reflect")[:, 0].to(v.dtype)
        else:
            padded[k] = F.pad(v, pad, mode="reflect")
    return padded, H, W


def load_stack(args):
    """Model, tokenizers and the WordPiece vocabulary (--text-tokenizer, else the one the
    checkpoint was pretrained with, else the official v1 one)."""
    path = checkpoint_file(args.model)      # a file, or a checkpoint folder (release.py convert)
    model = TerraMind.from_checkpoint(path, args.device).eval()
    pretrained_with = read_header(path).get("run", {}).get("text_tokenizer")
    text = args.text_tokenizer or pretrained_with or OFFICIAL_VOCAB
    if not Path(text).exists():
        warnings.warn(f"text tokenizer {text} not found: no coords / captions "
                      f"(pass --text-tokenizer)")
    text = WordPieceTokenizer.from_file(text) if Path(text).exists() else None
    tokenizers = load_tokenizers(args.tokenizers or path.parent, device=args.device)
    return model, tokenizers, text


def claim_outputs(paths: dict, overwrite: bool) -> None:
    """Before any work: two outputs on one path are refused, and so is a file already there unless
    --overwrite (`paths`: what -> path)."""
    distinct_outputs(paths)
    for path in paths.values():
        output_file(path, "--out", overwrite)


def image_outputs(folder: Path, targets: list) -> dict:
    """The GeoTIFF of every image target: {"<target> GeoTIFF (target i)":
    <folder>/<target>.tif}."""
    outputs = {}
    for i, name in enumerate(targets):
        if name in MODALITIES and MODALITIES[name].kind == "image":
            outputs[f"{name} GeoTIFF (target {i + 1})"] = folder / f"{name}.tif"
    return outputs


def write_outputs(folder: Path, inputs: dict, out: dict, targets: list, geo) -> list:
    """The GeoTIFFs of the image targets, sequences.txt and sheet.png -> the lines of
    sequences.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    panels, lines = [], []
    for n, x in inputs.items():
        if MODALITIES[n].kind == "image":
            panels.append((n, render(n, x)))
        else:
            lines.append(f"input {n}: {format_coords(*x) if n == 'coords' else x}")
    for name in targets:
        x = out[name][0]
        if MODALITIES[name].kind == "sequence":
            text = format_coords(*x) if name == "coords" and x else str(x)
            lines.append(f"{name}: {text}")
            continue
        dtype = np.uint8 if name == "LULC" else np.float32
        write_geotiff(folder / f"{name}.tif", x.cpu().numpy().astype(dtype), geo)
        panels.append((f"gen {name}", render(name, x)))
    write_text(folder / "sequences.txt", "\n".join(lines) + "\n")
    # characters that fit under the panels (128 px + 8 px each, 8 px font)
    width = max(40, 17 * len(panels) - 2)
    wrapped = [part for line in lines for part in textwrap.wrap(line, width)]
    save_sheet(folder / "sheet.png", panels, lines=wrapped)
    return lines


# ------------------------------------------------------------------------------
# Flags


def add_eval_flags(parser):
    parser.add_argument("--data", default=None, help="TerraMesh-layout folder with ground truth")
    parser.add_argument("--split", default="test",
                        help="split (all samples when the folder has none)")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples")
    pairs = ("S2L2A:S1GRD,S2L2A:S1RTC,S2L2A:DEM,S2L2A:NDVI,S2L2A:LULC,S1GRD:S2L2A,S1RTC:S2L2A,"
             "S1GRD:DEM,S1GRD:NDVI,S1GRD:LULC,S2L2A:coords")
    parser.add_argument("--pairs", default=pairs, help="input(+input):output pairs; pairs the "
                        "data or tokenizers lack are skipped")
    parser.add_argument("--labels", default="label_water",
                        help="water label folder (else: LULC water)")
    parser.add_argument("--sen1floods11", default=None,
                        help="Sen1Floods11 folder (S1/, S2/, Labels/): water IoU")
    parser.add_argument("--input-scale", default="both", choices=["pixels", "tokens", "both"],
                        help="image inputs as pixels, as tokens (paper Table 14), or both "
                        "where the model takes either (default)")


def add_generate_flags(parser):
    parser.add_argument("--input", action="append", required=True,
                        help="MOD=path (or coords/caption text)")
    parser.add_argument("--targets", required=True,
                        help="comma-separated modalities, generated in order")
    parser.add_argument("--input-scale", default="pixels", choices=["pixels", "tokens"],
                        help="image inputs as pixels where the model has a patch embedding "
                        "(default), or through their tokenizer wherever the model has their "
                        "token embedding (paper Table 14)")
    parser.add_argument("--scene", action="store_true",
                        help="a scene of any size in bounded memory: inputs read and outputs "
                        "written (tiled GeoTIFFs) window by window, image targets only")
    parser.add_argument("--resume", action="store_true",
                        help="--scene: continue a killed run in --out")


def parse_args(argv: list, description: str):
    """generate.py's flags: the sampling flags, then `eval`'s or a plain run's."""
    evaluate = bool(argv) and argv[0] == "eval"
    parser = argparse.ArgumentParser(prog="generate.py eval" if evaluate else None,
                                     description=description)
    parser.add_argument("--model", required=True, help="TerraMind checkpoint (pretrain.py), or a "
                        "checkpoint folder with terramind.safetensors (release.py convert)")
    parser.add_argument("--tokenizers", default=None, help="folder with "
                        "tokenizer_<MOD>.safetensors (default: the folder of --model)")
    parser.add_argument("--text-tokenizer", default=None, help="WordPiece JSON for coords / "
                        "captions (default: the one the checkpoint was pretrained with, else the "
                        "official v1 vocabulary)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scheme", default="roar", choices=["roar", "maskgit"],
                        help="image decoding scheme")
    parser.add_argument("--steps", type=positive_int, default=1,
                        help="decoding steps per image target (official: 1)")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "linear"],
                        help="MaskGIT token schedule")
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0,
                        help="sampling temperature (0: argmax)")
    parser.add_argument("--temp-schedule", default="constant",
                        help="constant, linear or onex:MIN:POWER")
    parser.add_argument("--top-k", type=nonnegative_float, default=0,
                        help="top-k filter (integer k, or a share < 1; 0: off)")
    parser.add_argument("--top-p", type=fraction, default=0.8, help="nucleus filter (0: off)")
    parser.add_argument("--cfg", type=nonnegative_float, default=1.0,
                        help="classifier-free guidance scale (1: off)")
    parser.add_argument("--diffusion-steps", type=positive_int, default=DECODE_STEPS,
                        help=f"DDIM steps of the tokenizer decoders (ours {DECODE_STEPS}; the "
                        f"official TerraMindGeneration {OFFICIAL_DECODE_STEPS})")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="windows x samples per forward pass")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the torch.Generator behind all sampling")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files already in --out")
    parser.add_argument("--device", type=torch_device, help="torch device",
                        default="cuda" if torch.cuda.is_available() else "cpu")
    if evaluate:
        add_eval_flags(parser)
    else:
        add_generate_flags(parser)
    return parser.parse_args(argv[1:] if evaluate else argv)
