"""
Any-to-any and chained generation with a pretrained TerraMind (paper §3.3, §4.3, eq. 4; official:
terratorch .../terramind/model/generate.py; 4M: fourm/models/generate.py).

Consumes a TerraMind checkpoint (pretrain.py), the image tokenizers (fsq_tokenizer.py, `tokenizer_<MOD>.
safetensors`) and, for coords and captions, a WordPiece JSON (text_tokenizer.py). Produces one GeoTIFF per
generated image modality with the first input's georeferencing tags, a PNG sheet of inputs and outputs and
`sequences.txt` (coords, captions); `eval` produces paper Table 3 (MAE, RMSE, SSIM, PSNR in physical units),
Table 4 (zero-shot water IoU of the generated LULC) and the geolocation error in km.

Targets are generated in the user's order, each one an encoder input of the next (real chaining):
  * images: MaskGIT (sample every masked token, keep the most confident) or ROAR (random order), cosine or
    linear token schedules, any number of steps, decoded tokens re-entering the encoder; temperature constant
    / linear / onex, top-k, top-p, classifier-free guidance. coords, caption: autoregressive from [S_1];
  * decoding: tokenizers (`--diffusion-steps` DDIM steps; LULC by argmax) to physical units, coords to (lon,
    lat), captions to text. Tiles larger than the model's (config.grid x 16 px) run in overlapping windows
    (paper §11.1) that fill one token grid, each conditioned on its neighbours' tokens, decoded in tile-sized
    windows; `--scene` (generate_scene) reads those windows from the files and writes the decoded rows as they
    are final, equal to the in-memory result.

Python: `generate(model, tokenizers, {"S2L2A": x}, ["LULC", "coords"])`, `generate_tokens(...)`, `Sampling`.

    # CPU smoke run (smoke checkpoints from pretrain.py / fsq_tokenizer.py on the synthetic world)
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ --input S2L2A=data/synth/S2L2A/00005.tif \\
        --targets LULC,S1GRD,DEM,coords --out out/gen
    python generate.py eval --model ckpt/terramind.safetensors --tokenizers ckpt/ --data data/synth --split test \\
        --n 64 --temperature 0 --sen1floods11 assets/sen1floods11 --out out/eval
    # image inputs as their tokens although the model has their pixel embedding (supplementary Table 14);
    # eval runs each pair both ways by default (--input-scale both)
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ --input S2L2A=data/synth/S2L2A/00005.tif \\
        --targets LULC --input-scale tokens --out out/gen_tokens
    # a whole Sentinel-2 tile in bounded memory (scene.py): tiled GeoTIFF outputs, --resume after a crash
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ --input S2L2A=T32TMT_S2L2A.tif \\
        --targets LULC --scene --out out/T32TMT
    # one GPU: the same with --device cuda (and --batch-size 64 windows per forward pass)
There is no multi-GPU variant: generation is inference, one process per GPU over separate files.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (distinct_outputs, fraction, nonnegative_float, nonnegative_int, output_file, positive_int, run_main,
                 torch_device, writable_folder)
from fsq_tokenizer import DECODE_STEPS, OFFICIAL_DECODE_STEPS, load_tokenizers, read_header
from metrics import haversine_km, reconstruction_metrics, water_iou
from pangaea_datasets import read_sen1floods11
from scene import Progress, Raster, TiledWriter, open_scene, summary
from terramesh import (LULC_CLASSES, MODALITIES, PATCH, WATER, TerraMeshDataset, destandardize, format_coords,
                       is_shard_root, modality, parse_coords, read_input, render, save_sheet, standardize,
                       whole_patches, write_geotiff, write_text)
from terramind import Encoded, TerraMind, checkpoint_file, entry_kind
from text_tokenizer import EOS_ID, OFFICIAL_VOCAB, PAD_ID, WordPieceTokenizer, official_added_tokens, sentinel_id

S_1, S_2 = sentinel_id(1), sentinel_id(2)   # 4M sequence layout: input [S_1], target [S_1] ... [S_2]
SENTINELS = range(sentinel_id(0), sentinel_id(199) + 1)
_IDS = {t: i for i, (t, _) in enumerate(official_added_tokens())}
COORDS_LAYOUT = (range(_IDS["lat=-90.00"], _IDS["lat=90.00"] + 1), range(_IDS["lon=-180.00"], _IDS["lon=180.00"] + 1),
                 range(EOS_ID, EOS_ID + 1), range(S_2, S_2 + 1))   # [S_1] lat lon [EOS] [S_2] (masking.py)

# -----------------------------------------------------------------------------------------------------------
# Schedules (4M fourm/utils/generation.py)


def cosine_schedule(steps: int, n: int) -> list[int]:
    """Tokens per step: few at the start and the end, many in the middle; the last step takes the rest."""
    s = [0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    out = [round(n * (a - b)) for a, b in zip(s[:-1], s[1:])]
    if sum(out) > n:   # DEVIATION: few tokens, many steps (8 over 16): the official rounding overshoots, the last
        return np.diff([0] + [round(n * (1 - v)) for v in s[1:]] + [n]).tolist()   # step < 0; cumulative here
    return out + [n - sum(out)]


def linear_schedule(steps: int, n: int) -> list[int]:
    """Equal shares (floor of linspace differences), largest first, trailing zeros dropped (official)."""
    return [k for k in sorted(np.diff(np.linspace(0, n, steps + 1, dtype=int)).tolist(), reverse=True) if k > 0]


def temperature_schedule(kind: str, t0: float, tokens: list[int]) -> list[float]:
    """'constant'; 'linear': t0 times the share of tokens still masked before the step (decays to ~0);
    'onex:{min_t}:{power}': 1/x^power decay from t0 to min_t (4M). Clipped at 1e-9 like the official code."""
    n, done = sum(tokens), np.cumsum(tokens)
    if kind == "constant":
        return [t0] * len(tokens)
    if kind == "linear":
        return np.clip(np.concatenate([[t0], t0 * (n - done[:-1]) / n]), 1e-9, None).tolist()
    if kind.startswith("onex:"):
        min_t, power = (float(v) for v in kind.split(":")[1:])
        y = 1 / np.linspace(1, 100, n) ** power
        y = (y - y.min()) / (y.max() - y.min())
        return np.clip([min_t + (t0 - min_t) * u * (1 - c / n) for u, c in zip(y, done)], 1e-9, None).tolist()
    raise ValueError(f"temperature schedule must be constant, linear or onex:MIN:POWER, got {kind!r}")


@dataclass
class Sampling:
    """How one target is sampled. Sequences always decode autoregressively with `temperature`, top-k, top-p."""
    scheme: str = "roar"            # image targets: "roar" or "maskgit"
    steps: int = 1                  # decoding steps (official TerraMindGeneration: 1)
    schedule: str = "cosine"        # MaskGIT token schedule ("cosine"/"linear"); ROAR is always linear (4M)
    temperature: float = 1.0        # 0 = argmax
    temp_schedule: str = "constant"  # constant, linear or onex:MIN:POWER
    top_k: float = 0                # int: keep k logits; float < 1: a share of the vocabulary; 0: off
    top_p: float = 0.8              # nucleus; 0: off (official default 0.8)
    cfg: float = 1.0                # classifier-free guidance scale; 1: no guidance pass
    coords_layout: bool = True      # DEVIATION: coords may only be lat, lon, [EOS], [S_2], so they always parse
    vocab: int = 0                  # sequences: ids >= vocab are never sampled (the text tokenizer's size; 0: all)

    def tokens_per_step(self, n: int) -> list[int]:
        if self.scheme not in ("roar", "maskgit") or self.steps < 1:
            raise ValueError(f"scheme must be roar or maskgit with steps >= 1, got {self.scheme!r}, {self.steps}")
        counts = (cosine_schedule if self.scheme == "maskgit" and self.schedule == "cosine" else linear_schedule)(
            self.steps, n)
        return [k for k in counts if k > 0]   # steps that would decode nothing are skipped


# -----------------------------------------------------------------------------------------------------------
# Sampling tokens


def filter_logits(logits: torch.Tensor, top_k: float = 0, top_p: float = 0.0) -> torch.Tensor:
    """(..., V) -> the same with filtered logits at -inf: top-k, then nucleus keeping the first token over
    top_p (official top_k_top_p_filtering, applied before the temperature)."""
    logits = logits.clone()
    if top_k > 0:
        k = min(int(top_k * logits.shape[-1]) if isinstance(top_k, float) else int(top_k), logits.shape[-1])
        logits[logits < torch.topk(logits, k)[0][..., -1:]] = -math.inf
    if top_p > 0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = F.softmax(sorted_logits, -1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits[drop.scatter(-1, order, drop)] = -math.inf
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k=0, top_p=0.0, generator=None):
    """logits (B, K, V) -> token ids (B, K) and their probability (B, K). Temperature 0 is argmax."""
    bad = torch.isnan(logits) | (logits == math.inf)   # -inf is a mask (the coords layout), not a fault
    if bad.any():   # NaN weights or inputs: neither argmax nor multinomial means anything
        raise ValueError(f"the model gave {int(bad.sum())} non-finite logits: its weights or "
                         f"inputs hold NaN or inf; use a checkpoint from before the run diverged")
    if temperature < 1e-10:   # DEVIATION: official confidence at T=0 is a constant 1 (MaskGIT order arbitrary)
        best = F.softmax(logits.float(), -1).max(-1)
        return best.indices, best.values
    probs = F.softmax(filter_logits(logits.float(), top_k, top_p) / temperature, -1)
    ids = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])
    return ids, probs.gather(-1, ids[..., None])[..., 0]


class Timer:
    """Seconds spent per stage (encoder passes, decoder steps, diffusion, ...) and the samples they served:
    `with timer("encoder"): ...`."""
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
        return " | ".join(f"{k} {1e3 * v / n:.1f} ms/sample ({self.calls[k]} calls)" for k, v in self.seconds.items())


# -----------------------------------------------------------------------------------------------------------
# Token-level generation: chained targets (paper eq. 4)


def _unconditional(state: dict, cond: list) -> dict:
    """The CFG unconditional inputs (4M): conditioning images removed, conditioning sequences emptied to [S_1]."""
    return {e: torch.full((t.shape[0], 1), S_1, dtype=torch.long, device=t.device) if e in cond else t
            for e, t in state.items() if e not in cond or entry_kind(e) == "sequence"}


def _encode(model, inputs, visible, batch, timer) -> Encoded:
    if not inputs:   # nothing left (unconditional pass): the decoder cross-attends to an empty context
        z = model.mask_token.new_zeros(batch, 0, model.config.dim)
        return Encoded({}, {}, {}, z, z, None)
    with timer("encoder"):
        return model.encode(inputs, visible=visible)


def next_token_logits(model, enc: Encoded, target: str, prefix: torch.Tensor) -> torch.Tensor:
    """TerraMind.logits of a sequence target (causal decoder on `prefix` (B, K)) with the output head applied
    to the last position only -> (B, 1, V): the head over all K positions would dominate the step."""
    K = prefix.shape[1]
    y = model.target_emb[target](prefix) + (model.pos_seq[:K] + model.mod_emb[target])             # (B, K, D)
    y = model.forward_decoder(y, enc, torch.ones(K, K, dtype=torch.bool, device=y.device).tril())
    return F.linear(y[:, -1:], model.target_emb[target].weight)                                     # (B, 1, V)


def _guided(model, enc, uncond, target, s: Sampling, timer, **kw) -> torch.Tensor:
    """Decoder logits, with classifier-free guidance when there is an unconditional pass (4M:
    l_uncond + scale * (l_cond - l_uncond))."""
    f = (lambda e: next_token_logits(model, e, target, kw["prefix"])) if "prefix" in kw else \
        (lambda e: model.logits(e, target, **kw))
    with timer("decoder"):
        logits, u = f(enc), None if uncond is None else f(uncond)
        return logits if u is None else u + s.cfg * (logits - u)


def _image_target(model, state, cond, target, grid, s: Sampling, generator, timer, known=None) -> torch.Tensor:
    """MaskGIT / ROAR decoding of one image target -> token ids (B, h, w). `known` (ids, mask) (B, h, w): tokens
    fixed beforehand (overlaps of neighbouring windows), encoder inputs from the first step."""
    B, (h, w) = next(iter(state.values())).shape[0], grid
    N, dev = h * w, model.mask_token.device
    ids = torch.zeros(B, N, dtype=torch.long, device=dev)
    done = torch.zeros(B, N, dtype=torch.bool, device=dev)
    kid, kmask = (known[0].flatten(1), known[1].flatten(1)) if known is not None else (ids, done.clone())
    counts = s.tokens_per_step(N)
    feed = target in model.config.inputs     # decoded tokens re-enter through the encoder (4M)
    enc = uncond = None
    for n, temp in zip(counts, temperature_schedule(s.temp_schedule, s.temperature, counts)):
        if enc is None or feed:
            seen = torch.where(kmask, kid, ids).view(B, h, w)                          # known or decoded
            extra = ({target: seen}, {target: done | kmask}) if feed else ({}, None)
            enc = _encode(model, {**state, **extra[0]}, extra[1], B, timer)
            if s.cfg != 1.0:
                uncond = _encode(model, {**_unconditional(state, cond), **extra[0]}, extra[1], B, timer)
        todo = torch.argsort(done.to(torch.uint8), dim=1, stable=True)[:, :N - int(done[0].sum())]  # (B, M)
        if s.scheme == "roar":   # n masked positions in random order, all kept
            order = torch.rand(todo.shape, generator=generator, device=dev).argsort(1)[:, :n]
            pos = todo.gather(1, order)                                                 # (B, n)
            tok, _ = sample(_guided(model, enc, uncond, target, s, timer, positions=pos, grid=grid),
                            temp, s.top_k, s.top_p, generator)
        else:                    # every masked position sampled, the n most confident kept
            tok, conf = sample(_guided(model, enc, uncond, target, s, timer, positions=todo, grid=grid),
                               temp, s.top_k, s.top_p, generator)
            keep = conf.topk(n, dim=1).indices
            pos, tok = todo.gather(1, keep), tok.gather(1, keep)
        ids.scatter_(1, pos, tok)
        done.scatter_(1, pos, True)
    return torch.where(kmask, kid, ids).view(B, h, w)


def merge_span(ids: list[int]) -> list[int]:
    """The tokens the decoder wrote for the span [S_1] (official merge_span_masking of input [S_1])."""
    out, current = [], None
    for t in ids:
        current = t if t in SENTINELS else current
        out += [t] if current == S_1 and t not in SENTINELS else []
    return out


def _sequence_target(model, state, cond, target, s: Sampling, generator, timer) -> torch.Tensor:
    """Autoregressive decoding from [S_1] until every row wrote [S_2] -> ids (B, L), [PAD]-padded."""
    B, dev = next(iter(state.values())).shape[0], model.mask_token.device
    enc = _encode(model, state, None, B, timer)   # state holds the [S_1] prompt (see generate_tokens)
    uncond = _encode(model, _unconditional(state, cond), None, B, timer) if s.cfg != 1.0 else None
    out = torch.full((B, 1), S_1, dtype=torch.long, device=dev)
    for i in range(MODALITIES[target].max_length - 1):   # official: the target holds max_length - 1 tokens
        logits = _guided(model, enc, uncond, target, s, timer, prefix=out)                  # (B, 1, V)
        if 0 < s.vocab < logits.shape[-1]:   # a caption head larger than the tokenizer: ids it cannot decode
            logits[..., s.vocab:] = -math.inf
        if target == "coords" and s.coords_layout:     # token i must be of the i-th kind of the layout
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=dev)
            allowed[COORDS_LAYOUT[i].start:COORDS_LAYOUT[i].stop] = True
            logits = logits.masked_fill(~allowed, -math.inf)
        tok, _ = sample(logits, s.temperature, s.top_k, s.top_p, generator)
        out = torch.cat([out, tok], 1)
        if bool((out == S_2).any(1).all()):
            break
    rows = [merge_span(r) for r in out.tolist()]
    L = max(1, max(map(len, rows)))
    return torch.tensor([r + [PAD_ID] * (L - len(r)) for r in rows], dtype=torch.long, device=dev)


@torch.no_grad()
def generate_tokens(model: TerraMind, inputs: dict, targets: list, sampling: Sampling | dict | None = None,
                    generator=None, grid=None, timer: Timer | None = None, known: dict | None = None) -> dict:
    """inputs {entry: tensor} as TerraMind.encode takes them; targets: token entries ("tok_LULC", "coords",
    ...) generated in this order, each one added to the inputs of the next (chained generation, eq. 4).
    `sampling`: one Sampling or {target: Sampling}; `known`: {image target: (ids, mask) (B, h, w)} tokens
    fixed beforehand. Returns {target: ids (B, h, w) or (B, L)}."""
    if not inputs:
        raise ValueError("generation needs at least one input")
    state, cond, out, timer = dict(inputs), list(inputs), {}, timer or Timer()
    B, dev = next(iter(inputs.values())).shape[0], model.mask_token.device
    for t in targets:   # official: every sequence target's [S_1] prompt is an encoder input from the start
        if entry_kind(t) == "sequence" and t in model.config.inputs and t not in state:
            state[t] = torch.full((B, 1), S_1, dtype=torch.long, device=dev)
    if grid is None:
        e, t = next(((e, t) for e, t in inputs.items() if entry_kind(e) != "sequence"), (None, None))
        grid = (model.config.grid,) * 2 if e is None else \
            (t.shape[-2] // PATCH, t.shape[-1] // PATCH) if entry_kind(e) == "pixels" else tuple(t.shape[-2:])
    for target in targets:
        s = (sampling.get(target, Sampling()) if isinstance(sampling, dict) else sampling) or Sampling()
        if target in inputs:
            raise ValueError(f"{target} is both an input and a target")
        if entry_kind(target) == "sequence":
            out[target] = _sequence_target(model, state, cond, target, s, generator, timer)
        else:
            out[target] = _image_target(model, state, cond, target, grid, s, generator, timer,
                                        (known or {}).get(target))
        if target in model.config.inputs:   # DEVIATION (official snapshot): the next target is conditioned on it
            state[target] = out[target]
            cond.append(target)                # official cfg_grow_conditioning
    return out


# -----------------------------------------------------------------------------------------------------------
# Modalities <-> entries, decoding, large tiles


def target_entry(name: str) -> str:
    if (m := MODALITIES.get(name)) is None or not m.token_key:
        raise ValueError(f"cannot generate {name!r}; targets: {[k for k, v in MODALITIES.items() if v.token_key]}")
    return name if m.kind == "sequence" else "tok_" + name


def to_entries(model, tokenizers, inputs: dict, timer: Timer, scale: str = "pixels") -> dict:
    """{modality: standardized (B, C, H, W) | LULC (B, H, W) | ids (B, L)} -> model entries: pixels where the
    model has a patch embedding, else tokens from the image tokenizer; scale "tokens" (paper Table 14):
    tokens wherever the model and the tokenizers allow, pixels only where they do not."""
    out = {}
    for name, x in inputs.items():
        as_tokens = scale == "tokens" and "tok_" + name in model.config.inputs and name in tokenizers
        if MODALITIES[name].kind == "sequence" or name in model.config.inputs and not as_tokens:   # pixels
            out[name] = x
        elif "tok_" + name in model.config.inputs and name in tokenizers:
            with timer("tokenizer encoder"):
                out["tok_" + name] = tokenizers[name].encode(x)
        else:
            raise ValueError(f"input {name}: the model has no pixel embedding for it and there is no "
                             f"{name} tokenizer with a tok_{name} embedding")
    return out


def limit_vocab(sampling, text_tokenizer):
    """The sampling with sequence ids limited to what the text tokenizer decodes (Sampling.vocab)."""
    n = text_tokenizer.vocab_size if text_tokenizer is not None else 0
    if isinstance(sampling, dict):
        return {t: replace(s, vocab=n) for t, s in sampling.items()}
    return replace(sampling or Sampling(), vocab=n)


def decode_sequence(name, ids, text_tokenizer) -> list:
    """(B, L) ids -> [(lon, lat), or None when malformed] for coords, [text] for captions."""
    if name == "coords":
        with warnings.catch_warnings(action="ignore"):   # malformed rows are NaN, here None
            return [None if math.isnan(c[0]) else tuple(c) for c in text_tokenizer.decode_coords_batch(ids).tolist()]
    rows = [[t for t in r if t != PAD_ID] for r in ids.tolist()]
    return [text_tokenizer.decode(r[:r.index(EOS_ID)] if EOS_ID in r else r, skip_special_tokens=True).strip()
            for r in rows]


def window_starts(size: int, tile: int) -> list[int]:
    """Window offsets covering [0, size) with tile-wide windows at a 3/4-tile stride rounded to whole patches
    (official notebook: crop 256, stride 192), so the token grids of overlapping windows line up."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, max(PATCH, tile * 3 // 4 // PATCH * PATCH)))
    return starts + [size - tile] if starts[-1] != size - tile else starts


def _prepare(inputs: dict, text_tokenizer, standardized: bool, dev) -> tuple[dict, dict]:
    """User inputs -> ({image: standardized (B, C, H, W) | LULC (B, H, W)}, {sequence: ids (B, L), [PAD]-padded})."""
    images, seqs = {}, {}
    for name, x in inputs.items():
        if (m := modality(name)).kind == "sequence":
            rows = [x] if isinstance(x, (str, tuple)) else list(x)
            ids = [text_tokenizer.encode_coords(*(parse_coords(r) if isinstance(r, str) else r)) if name == "coords"
                   else text_tokenizer.encode(r)[:m.max_length - 1] + [EOS_ID] for r in rows]
            seqs[name] = torch.tensor([r + [PAD_ID] * (max(map(len, ids)) - len(r)) for r in ids], device=dev)
        else:
            x = torch.as_tensor(x, device=dev)
            x = x[None] if x.dim() == (2 if name == "LULC" else 3) else x
            images[name] = x.long() if name == "LULC" else x.float() if standardized else standardize(name, x.float())
    return images, seqs


@dataclass
class WindowPlan:
    """The windows over a padded (Hp, Wp) image (paper §11.1): tile-sized at a 3/4-tile stride, grouped in waves
    that do not overlap (later waves are conditioned on the tokens of earlier ones), each wave cut into chunks
    that run as one batch. rows, cols: the window offsets along each axis."""
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
        return slice(None), slice(r // PATCH, (r + self.th) // PATCH), slice(c // PATCH, (c + self.tw) // PATCH)


def plan_windows(Hp: int, Wp: int, tile: int, per: int, centre_only: bool = False) -> WindowPlan:
    """The WindowPlan of a (Hp, Wp) image, `per` windows a chunk; `centre_only`: the centre window alone."""
    th, tw = min(tile, Hp), min(tile, Wp)
    rows, cols = window_starts(Hp, tile), window_starts(Wp, tile)
    wins = [(r, c) for r in rows for c in cols]
    centre = min(wins, key=lambda rc: (2 * rc[0] + th - Hp) ** 2 + (2 * rc[1] + tw - Wp) ** 2)
    waves = []
    for win in [centre] if centre_only else wins:
        wave = next((v for v in waves if all(abs(win[0] - r) >= th or abs(win[1] - c) >= tw for r, c in v)), None)
        if wave is None:
            waves.append([win])
        else:
            wave.append(win)
    chunks = [wave[k:k + per] for wave in waves for k in range(0, len(wave), per)]
    return WindowPlan(rows, cols, th, tw, chunks, centre)


def new_canvas(entries: list, B: int, Hp: int, Wp: int, dev) -> dict:
    """{token entry: (ids, known)} (B, Hp/16, Wp/16): the one token grid all windows share."""
    shape = (B, Hp // PATCH, Wp // PATCH)
    return {e: (torch.zeros(shape, dtype=torch.long, device=dev), torch.zeros(shape, dtype=torch.bool, device=dev))
            for e in entries if entry_kind(e) == "tokens"}


def fill_token_grid(model, tokenizers, read, seqs: dict, targets: list, plan: WindowPlan, canvas: dict, B: int,
                    sampling, generator, text_tokenizer, timer, start: int = 0, checkpoint=None,
                    input_scale: str = "pixels") -> dict:
    """Generates `targets` over the chunks of `plan` from chunk `start` on. read(r, c) -> {image: standardized
    (B, C, th, tw)}; each window is conditioned on the tokens already in `canvas` and writes its image tokens
    there; checkpoint(k) runs after chunk k. Returns the sequence targets of the centre window, decoded."""
    tgt, grid, out = [target_entry(t) for t in targets], (plan.th // PATCH, plan.tw // PATCH), {}
    bar = tqdm(total=plan.windows, initial=sum(map(len, plan.chunks[:start])), desc="windows", unit="window",
               disable=len(plan.chunks) == 1, leave=False)
    for k in range(start, len(plan.chunks)):
        chunk = plan.chunks[k]
        crops = [read(r, c) for r, c in chunk]
        crop = {n: torch.cat([x[n] for x in crops]) for n in crops[0]}
        entries = to_entries(model, tokenizers, {**crop, **{n: v.repeat(len(chunk), 1) for n, v in seqs.items()}},
                             timer, input_scale)
        known = {e: [torch.cat([t[plan.cell(r, c)] for r, c in chunk]) for t in canvas[e]] for e in canvas}
        tokens = generate_tokens(model, entries, tgt, sampling, generator, grid, timer, known)
        for name, e in zip(targets, tgt):
            part = [tokens[e][i * B:(i + 1) * B] for i in range(len(chunk))]   # per window (B, ...)
            if MODALITIES[name].kind == "sequence" and plan.centre in chunk:
                out[name] = decode_sequence(name, part[chunk.index(plan.centre)], text_tokenizer)
            for i, (r, c) in enumerate(chunk if MODALITIES[name].kind == "image" else []):
                canvas[e][0][plan.cell(r, c)], canvas[e][1][plan.cell(r, c)] = part[i], True
        bar.update(len(chunk))
        if checkpoint is not None:
            checkpoint(k)
    bar.close()
    return out


def window_noise(seed: int, name: str, r: int, c: int, shape: tuple) -> torch.Tensor:
    """The diffusion start noise (B, C, h, w) of the window at pixel (r, c): each 16 px patch of the scene draws
    its own from a generator seeded by (seed, modality, patch row, patch column), so overlapping windows start
    from the same noise where they overlap, and a window's noise does not depend on what ran before it."""
    B, C, h, w = shape
    m, rows = list(MODALITIES).index(name), []
    for i in range(r // PATCH, (r + h) // PATCH):
        rngs = [np.random.default_rng([seed, m, i, j]) for j in range(c // PATCH, (c + w) // PATCH)]
        rows.append(np.concatenate([g.standard_normal((B, C, PATCH, PATCH), np.float32) for g in rngs], -1))
    return torch.from_numpy(np.concatenate(rows, -2))                                # (B, C, h, w)


def decode_starts(size: int, tile: int) -> list[int]:
    """Offsets of the decoding windows along one axis: tile-wide at a half-tile stride on the patch grid, the
    last one flush with the end, so every pixel away from the image border lies in two windows."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, max(PATCH, tile // 2 // PATCH * PATCH)))
    return starts + [size - tile] if starts[-1] != size - tile else starts


def ramp(n: int) -> torch.Tensor:
    """(n,) blending weights across a window: distance to its nearer edge (0.5 at the edge pixels)."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 0.5, n - i - 0.5)


def decoded(name: str, x: torch.Tensor, standardized: bool = False) -> torch.Tensor:
    """Tokenizer output (B, C, H, W) -> LULC classes (B, H, W) (argmax), else physical units (or standardized)."""
    return x.argmax(1) if name == "LULC" else x if standardized else destandardize(name, x)


def decode_window_row(tokenizer, name: str, ids: torch.Tensor, r: int, th: int, cols: list, tw: int, steps: int,
                      seed: int, per: int, timer: Timer) -> torch.Tensor:
    """The windows of one decoding row at pixel row r, decoded and blended with `ramp` weights -> weighted sum
    (B, C, th, Wp) and weights (th, Wp)."""
    B, C, Wp = ids.shape[0], tokenizer.channels, ids.shape[-1] * PATCH
    total, weights = ids.new_zeros(B, C, th, Wp, dtype=torch.float32), ids.new_zeros(th, Wp, dtype=torch.float32)
    w = (ramp(th)[:, None] * ramp(tw)[None, :]).to(ids.device)                       # (th, tw)
    for k in range(0, len(cols), per):
        chunk = cols[k:k + per]
        cells = torch.cat([ids[:, r // PATCH:(r + th) // PATCH, c // PATCH:(c + tw) // PATCH] for c in chunk])
        noise = None if MODALITIES[name].decoder != "diffusion" else \
            torch.cat([window_noise(seed, name, r, c, (B, C, th, tw)) for c in chunk])
        with timer("diffusion" if noise is not None else f"{name} decoder"):
            x = tokenizer.decode(cells, steps=steps, noise=noise).float()            # (n B, C, th, tw)
        for part, c in zip(x.split(B), chunk):
            total[..., c:c + tw] += part * w
            weights[:, c:c + tw] += w
    return total, weights


def decode_rows(tokenizer, name: str, ids: torch.Tensor, tile: int, steps: int, seed: int, batch_size: int,
                timer: Timer, first_row: int = 0, standardized: bool = False, generator=None):
    """Token grid (B, Hp/16, Wp/16) -> yields (a, `decoded` rows a..b (B, [C,] b - a, Wp)) once per decoding row
    from `first_row` on, each band final. Every window is decoded alone at the model's tile size, as in training,
    from the shared noise of its patches (window_noise); overlapping windows are averaged with `ramp` weights.
    DEVIATION (paper §11.1: a plain average of windows at the generation stride): half-tile stride and weights
    that fall to the window edges, so no window border shows (measured, tests/test_scene.py). The rows of earlier
    windows that reach into `first_row` are decoded again, so a resumed run needs no saved pixels."""
    Hp, Wp, per = ids.shape[-2] * PATCH, ids.shape[-1] * PATCH, max(1, batch_size // ids.shape[0])
    th, tw = min(tile, Hp), min(tile, Wp)
    rows, cols = decode_starts(Hp, tile), decode_starts(Wp, tile)
    if len(rows) == len(cols) == 1:   # one tile: the one window is the grid, decoded as the official code does
        with timer("diffusion" if MODALITIES[name].decoder == "diffusion" else f"{name} decoder"):
            x = tokenizer.decode(ids, steps=steps, generator=generator)
        yield 0, decoded(name, x, standardized)
        return
    base = rows[first_row] if first_row < len(rows) else Hp   # first row not yet final
    total = ids.new_zeros(ids.shape[0], tokenizer.channels, 0, Wp, dtype=torch.float32)   # (B, C, rows, Wp)
    weights = ids.new_zeros(0, Wp, dtype=torch.float32)
    for i, r in enumerate(rows):
        if i < first_row and r + th <= base:
            continue
        part, w = decode_window_row(tokenizer, name, ids, r, th, cols, tw, steps, seed, per, timer)
        lo = max(base - r, 0)   # rows above `base` are final already
        if (grow := r + th - base - total.shape[-2]) > 0:
            total = torch.cat([total, total.new_zeros(*total.shape[:2], grow, Wp)], -2)
            weights = torch.cat([weights, weights.new_zeros(grow, Wp)])
        total[..., r + lo - base:r + th - base, :] += part[..., lo:, :]
        weights[r + lo - base:r + th - base] += w[lo:]
        if i < first_row:
            continue
        done = rows[i + 1] if i + 1 < len(rows) else Hp       # later windows start at or below this row
        yield base, decoded(name, total[..., :done - base, :] / weights[:done - base], standardized)
        total, weights, base = total[..., done - base:, :], weights[done - base:], done


@torch.no_grad()
def generate(model: TerraMind, tokenizers: dict, inputs: dict, targets: list, sampling=None,
             text_tokenizer: WordPieceTokenizer | None = None, diffusion_steps: int = 10, seed: int = 0,
             standardized: bool = False, batch_size: int = 16, timer: Timer | None = None,
             input_scale: str = "pixels") -> dict:
    """Any-to-any chained generation for notebooks and the command line.

    inputs {modality: value}: images (C, H, W) or (B, C, H, W) in physical units (standardized ones if
    `standardized`), LULC class maps (H, W) / (B, H, W), coords (lon, lat) or 'lat=.. lon=..', captions as
    text (lists of those for a batch). targets: modality names in chaining order ("LULC", "DEM", "coords").
    Returns {modality: images (B, C, H, W) in physical units (standardized if `standardized`), LULC class maps
    (B, H, W) int64, coords [(lon, lat) | None], captions [str]}. Inputs larger than the model's tile run in
    overlapping windows that write one shared token grid (each window conditioned on the tokens its neighbours
    already wrote), decoded in tile-sized windows as generate_scene decodes them (decode_rows); sequences
    come from the centre window. input_scale "tokens": image inputs enter through their
    tokenizer even where the model has a pixel embedding (to_entries)."""
    dev, tgt, timer = model.mask_token.device, [target_entry(t) for t in targets], timer or Timer()
    sampling = limit_vocab(sampling, text_tokenizer)
    generator = torch.Generator(dev).manual_seed(seed)
    if text_tokenizer is None and any(modality(t).kind == "sequence" for t in [*targets, *inputs]):
        raise ValueError("coords / caption inputs or targets need a text tokenizer (--text-tokenizer)")
    if missing := [t for t in targets if MODALITIES[t].kind == "image" and t not in tokenizers]:
        raise ValueError(f"no tokenizer to decode {missing} (tokenizers: {sorted(tokenizers)})")
    images, seqs = _prepare(inputs, text_tokenizer, standardized, dev)
    B, tile = next(iter({**images, **seqs}.values())).shape[0], model.config.grid * PATCH
    H, W = next(iter(images.values())).shape[-2:] if images else (tile, tile)
    if any(v.shape[-2:] != (H, W) for v in images.values()):
        raise ValueError(f"image inputs differ in size: { {k: tuple(v.shape[-2:]) for k, v in images.items()} }")
    Hp, Wp = H + -H % PATCH, W + -W % PATCH   # reflect-padded to whole patches, cropped again at the end
    images = {k: F.pad(v[:, None].float(), (0, Wp - W, 0, Hp - H), mode="reflect")[:, 0].to(v.dtype) if k == "LULC"
              else F.pad(v, (0, Wp - W, 0, Hp - H), mode="reflect") for k, v in images.items()}
    split = max((i + 1 for i, t in enumerate(targets) if MODALITIES[t].kind == "image"), default=0)
    plan = plan_windows(Hp, Wp, tile, max(1, batch_size // B), centre_only=not split)   # sequences only: centre
    split = len(targets) if plan.windows == 1 else split   # trailing sequences: the centre window's chain only
    canvas = new_canvas(tgt, B, Hp, Wp, dev)

    def read(r, c):
        return {n: v[..., r:r + plan.th, c:c + plan.tw] for n, v in images.items()}
    out = fill_token_grid(model, tokenizers, read, seqs, targets[:split], plan, canvas, B, sampling, generator,
                          text_tokenizer, timer, input_scale=input_scale)
    if split < len(targets):   # the centre window again, its image tokens all known from the shared grid
        entries = to_entries(model, tokenizers, {**read(*plan.centre), **seqs}, timer, input_scale)
        tokens = generate_tokens(model, entries, tgt,
                                 sampling, generator, (plan.th // PATCH, plan.tw // PATCH), timer,
                                 {e: [t[plan.cell(*plan.centre)] for t in canvas[e]] for e in canvas})
        out.update({n: decode_sequence(n, tokens[e], text_tokenizer) for n, e in zip(targets[split:], tgt[split:])})
    for name, e in zip(targets, tgt):   # tile-sized windows, as the scene path decodes (decode_rows)
        if MODALITIES[name].kind != "image":
            continue
        rows = decode_rows(tokenizers[name], name, canvas[e][0], tile, diffusion_steps, seed, batch_size, timer,
                           standardized=standardized, generator=generator)
        out[name] = torch.cat([band for _, band in rows], -2)[..., :H, :W]
    timer.samples += B
    return {n: out[n] for n in targets}


def read_window(raster: Raster, name: str, r: int, c: int, h: int, w: int, dev) -> torch.Tensor:
    """A scene input's window -> standardized (1, C, h, w) (LULC: classes (1, h, w)), reflected past the bottom /
    right edge as generate() pads, NaN (no data) as the band mean as read_input does."""
    x = raster.read_reflected(r, r + h, c, c + w)
    if name == "LULC":
        return torch.from_numpy(x[0].astype(np.int64))[None].to(dev)
    x = x.astype(np.float32)
    x = np.where(np.isnan(x), np.asarray(MODALITIES[name].mean, np.float32)[:, None, None], x)
    return standardize(name, torch.from_numpy(x)[None].to(dev))


def _scene_inputs(paths: dict) -> dict:
    """{modality: GeoTIFF} -> co-registered Rasters with the modality's band count."""
    rasters = open_scene(paths)
    for name, r in rasters.items():
        want = 1 if name == "LULC" else MODALITIES[name].channels
        if MODALITIES[name].kind != "image" or r.bands != want:
            raise ValueError(f"--input {name}={r.path}: expected an image of {want} band(s), got {r.bands}")
    return rasters


def grid_state(canvas: dict, generator: torch.Generator) -> dict:
    """The resume state of a scene's token generation: the token grid and the sampling generator, as arrays."""
    arrays = {f"{e}.ids": ids.cpu().numpy() for e, (ids, _) in canvas.items()}
    arrays.update({f"{e}.known": known.cpu().numpy() for e, (_, known) in canvas.items()})
    return {**arrays, "generator": generator.get_state().numpy()}


def restore_grid(arrays: dict, canvas: dict, generator: torch.Generator):
    for e, (ids, known) in canvas.items():
        ids.copy_(torch.from_numpy(arrays[f"{e}.ids"]))
        known.copy_(torch.from_numpy(arrays[f"{e}.known"]))
    generator.set_state(torch.from_numpy(arrays["generator"]))


def write_scene(writers: dict, decoders: dict, H: int, W: int, rows: range, after_row):
    """Each window row of every target decoded (decode_rows) and written; after_row(i) once row i is on disk."""
    for i in tqdm(rows, desc="decode", unit="row", initial=rows.start, total=rows.stop):
        for name, decoder in decoders.items():
            a, band = next(decoder)
            band = band[0, ..., :max(0, H - a), :W]                                     # ([C,] h, W)
            writers[name].write_rows(a, band.reshape(-1, *band.shape[-2:]).cpu().numpy())
            writers[name].flush()
        after_row(i)


@torch.no_grad()
def generate_scene(model: TerraMind, tokenizers: dict, paths: dict, targets: list, folder, sampling=None,
                   diffusion_steps: int = 10, seed: int = 0, batch_size: int = 16, resume: bool = False,
                   sequences: dict | None = None, text_tokenizer=None, input_scale: str = "pixels") -> str:
    """Generation over a scene of any size in bounded memory (--scene). paths {modality: GeoTIFF}, co-registered;
    image targets only. The scene's token grid is the one whole-scene array in memory: the windows of
    plan_windows read their pixels from the files as the waves reach them, then decode_rows decodes window row
    by window row into <folder>/<target>.tif (tiled, the inputs' georeferencing). Equals generate() on
    the same inputs. A checkpoint after each window row lets resume=True finish a killed
    run into identical files. Returns the summary line."""
    if bad := [t for t in targets if MODALITIES[t].kind != "image"]:
        raise ValueError(f"--scene generates image targets only, not {bad}; run coords / captions on a tile")
    if missing := [t for t in targets if t not in tokenizers]:
        raise ValueError(f"no tokenizer to decode {missing} (tokenizers: {sorted(tokenizers)})")
    t0, dev, timer, folder = time.perf_counter(), model.mask_token.device, Timer(), Path(folder)
    rasters = _scene_inputs(paths)
    first = next(iter(rasters.values()))
    H, W, tile = first.height, first.width, model.config.grid * PATCH
    Hp, Wp = H + -H % PATCH, W + -W % PATCH   # reflected to whole patches, as generate() pads
    plan = plan_windows(Hp, Wp, tile, max(1, batch_size))
    tgt, generator = [target_entry(t) for t in targets], torch.Generator(dev).manual_seed(seed)
    canvas, (_, seqs) = new_canvas(tgt, 1, Hp, Wp, dev), _prepare(sequences or {}, text_tokenizer, False, dev)
    run = {"inputs": {n: [str(p), Path(p).stat().st_size] for n, p in paths.items()}, "targets": targets,
           "sampling": sampling, "diffusion_steps": diffusion_steps, "seed": seed, "batch_size": batch_size,
           "sequences": sequences, "input_scale": input_scale, "model": model.config}
    progress = Progress(folder / "scene.progress.npz", run)
    state, chunk, row = progress.load() if resume else None, 0, 0
    if state is not None:
        restore_grid(state[0], canvas, generator)
        chunk, row = state[1]["chunk"], state[1]["row"]
        print(f"resuming {folder}: {chunk}/{len(plan.chunks)} window chunks, {row}/{len(decode_starts(Hp, tile))} "
              f"decoded rows")

    def checkpoint(k):   # after the chunk that ends a window row of its wave
        if k + 1 == len(plan.chunks) or plan.chunks[k + 1][0][0] != plan.chunks[k][-1][0]:
            progress.save(grid_state(canvas, generator), chunk=k + 1, row=0)

    def read(r, c):
        return {n: read_window(x, n, r, c, plan.th, plan.tw, dev) for n, x in rasters.items()}
    fill_token_grid(model, tokenizers, read, seqs, targets, plan, canvas, 1, sampling, generator, text_tokenizer,
                    timer, chunk, checkpoint, input_scale)
    writers = {n: TiledWriter(folder / f"{n}.tif", 1 if n == "LULC" else MODALITIES[n].channels, H, W,
                              np.uint8 if n == "LULC" else np.float32, first.geo, resume=state is not None)
               for n in targets}
    decoders = {n: decode_rows(tokenizers[n], n, canvas[e][0], tile, diffusion_steps, seed, batch_size, timer, row,
                               generator=generator) for n, e in zip(targets, tgt)}
    write_scene(writers, decoders, H, W, range(row, len(decode_starts(Hp, tile))),
                lambda i: progress.save(grid_state(canvas, generator), chunk=len(plan.chunks), row=i + 1))
    for w in writers.values():
        w.finish()
    progress.done()
    scale = first.geo.get(33550)
    return summary(H, W, plan.windows, time.perf_counter() - t0, scale[0] if scale else None)


# -----------------------------------------------------------------------------------------------------------
# Zero-shot tasks, evaluation (paper Tables 3 and 4) and files


def load_stack(args):
    """Model, tokenizers and the WordPiece vocabulary (--text-tokenizer, else the one the checkpoint was
    pretrained with, else the official v1 one)."""
    path = checkpoint_file(args.model)                     # a file, or a checkpoint folder (release.py convert)
    model = TerraMind.from_checkpoint(path, args.device).eval()
    text = args.text_tokenizer or read_header(path).get("run", {}).get("text_tokenizer") or OFFICIAL_VOCAB
    if not Path(text).exists():
        warnings.warn(f"text tokenizer {text} not found: no coords / captions (pass --text-tokenizer)")
    text = WordPieceTokenizer.from_file(text) if Path(text).exists() else None
    return model, load_tokenizers(args.tokenizers or path.parent, device=args.device), text


def markdown(header: list, rows: list) -> str:
    return "".join("| " + " | ".join(map(str, r)) + " |\n" for r in [header, ["---"] * len(header), *rows])


def claim_outputs(paths: dict, overwrite: bool) -> None:
    """Before any work: two outputs on one path are refused, and so is a file already there unless
    --overwrite (`paths`: what -> path)."""
    distinct_outputs(paths)
    for path in paths.values():
        output_file(path, "--out", overwrite)


def image_outputs(folder: Path, targets: list) -> dict:
    """The GeoTIFF of every image target: {"<target> GeoTIFF": <folder>/<target>.tif}."""
    outputs = {}
    for i, name in enumerate(targets):
        if name in MODALITIES and MODALITIES[name].kind == "image":
            outputs[f"{name} GeoTIFF (target {i + 1})"] = folder / f"{name}.tif"
    return outputs


def run_scene(args, model, tokenizers, text):
    """--scene: image inputs streamed from their files, outputs written window row by window row."""
    paths, sequences = {}, {}
    for item in args.input:
        name, _, value = item.partition("=")
        if MODALITIES.get(name) is not None and MODALITIES[name].kind == "sequence":
            sequences[name] = read_input(name, value)[0]
        else:
            paths[name] = value
    targets = [t for t in args.targets.split(",") if t]
    line = generate_scene(model, tokenizers, paths, targets, args.out, args.sampling, args.diffusion_steps,
                          args.seed, args.batch_size, args.resume, sequences, text, args.input_scale)
    print(f"generated {', '.join(targets)} -> {', '.join(str(Path(args.out) / f'{t}.tif') for t in targets)}\n{line}")


def run_generate(args):
    if args.resume and not args.scene:
        raise ValueError("--resume continues a --scene run; add --scene")
    targets = [t for t in args.targets.split(",") if t]
    outputs = image_outputs(Path(args.out), targets)
    if not args.scene:
        outputs.update({"sequences": Path(args.out) / "sequences.txt", "sheet": Path(args.out) / "sheet.png"})
    claim_outputs(outputs, args.overwrite)
    model, tokenizers, text = load_stack(args)
    if args.scene:
        return run_scene(args, model, tokenizers, text)
    inputs, geo = {}, None
    for item in args.input:
        name, _, value = item.partition("=")
        inputs[name], g = read_input(name, value)
        geo = geo or g
    targets, timer, t0, folder = [t for t in args.targets.split(",") if t], Timer(), time.perf_counter(), Path(args.out)
    out = generate(model, tokenizers, inputs, targets, args.sampling, text, args.diffusion_steps,
                   args.seed, batch_size=args.batch_size, timer=timer, input_scale=args.input_scale)
    wall = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    panels = [(n, render(n, x)) for n, x in inputs.items() if MODALITIES[n].kind == "image"]
    lines = [f"input {n}: {format_coords(*x) if n == 'coords' else x}" for n, x in inputs.items()
             if MODALITIES[n].kind == "sequence"]
    for name in targets:
        x = out[name][0]
        if MODALITIES[name].kind == "sequence":
            lines.append(f"{name}: " + (format_coords(*x) if name == "coords" and x else str(x)))
            continue
        write_geotiff(folder / f"{name}.tif", x.cpu().numpy().astype(np.uint8 if name == "LULC" else np.float32), geo)
        panels.append((f"gen {name}", render(name, x)))
    write_text(folder / "sequences.txt", "\n".join(lines) + "\n")
    width = max(40, 17 * len(panels) - 2)   # characters that fit under the panels (128 px + 8 px each, 8 px font)
    save_sheet(folder / "sheet.png", panels, lines=[s for ln in lines for s in textwrap.wrap(ln, width)])
    print(f"generated {', '.join(targets)} from {', '.join(inputs)} in {wall:.2f} s -> {folder}")
    print("\n".join(lines) + f"\ntime per sample: {timer.report()}")


def scaled_pairs(model, tokenizers, pairs: str, choice: str) -> list:
    """--pairs and --input-scale -> [(src, dst, scale)]: "both" adds a token-input run (paper Table 14) to each
    pair with an input the model can take at either scale."""
    out = []
    for pair in pairs.split(","):
        src, dst = pair.split(":")
        either = [m for m in src.split("+") if m in model.config.inputs and f"tok_{m}" in model.config.inputs
                  and m in tokenizers]
        scales = [choice] if choice != "both" else ["pixels", "tokens"] if either else ["pixels"]
        out += [(src, dst, scale) for scale in scales]
    return out


def run_eval(args):
    claim_outputs({"report": Path(args.out) / "eval.md", "records": Path(args.out) / "eval.json"}, args.overwrite)
    model, tokenizers, text = load_stack(args)
    timer, out_dir, sets = Timer(), Path(args.out), []
    if args.data:
        root = Path(args.data)
        split = args.split if (root / "splits").is_dir() or is_shard_root(root) else None   # published: train/val
        ds = TerraMeshDataset(root, split=split, size=None,
                              labels=args.labels if (root / args.labels).is_dir() else None)
        n = min(args.n, len(ds))      # whole patches: TerraMesh's 264 px tiles -> the centred 256 px
        sets.append((root.name, [whole_patches(ds[i]) for i in tqdm(range(n), desc="read", leave=False)],
                     args.pairs))
    if args.sen1floods11:   # whole 512 px chips through the windowed generator
        sets.append(("Sen1Floods11", read_sen1floods11(args.sen1floods11, args.labels),
                     "S1GRD:LULC,S2L1C:LULC,S1GRD+S2L1C:LULC,S2L1C:coords"))
    table3, lulc, water, geo, records = [], [], [], [], []   # records: the same numbers, for eval.json
    for title, samples, pairs in sets:
        for src, dst, scale in scaled_pairs(model, tokenizers, pairs, args.input_scale):
            tag = ", token inputs" if scale == "tokens" else ""
            have = [s for s in samples if all(m in s for m in src.split("+")) and (
                dst in s or dst == "LULC" and args.labels in s)]
            if not have or (dst not in tokenizers and (dst != "coords" or text is None)):
                continue
            sheet = out_dir / f"{title}_{src.replace('+', '_')}_to_{dst}{'_tokens' if tag else ''}.png"
            if dst != "coords":   # before its samples are generated
                output_file(sheet, "--out", args.overwrite)
            gen = []
            for k in tqdm(range(0, len(have), args.batch_size), desc=f"{src}:{dst}{tag}", leave=False):
                inp = {m: [parse_coords(s[m]) for s in have[k:k + args.batch_size]] if m == "coords" else
                       torch.stack([s[m] for s in have[k:k + args.batch_size]]) for m in src.split("+")}
                out = generate(model, tokenizers, inp, [dst], args.sampling, text, args.diffusion_steps,
                               args.seed, standardized=True, batch_size=args.batch_size, timer=timer,
                               input_scale=scale)[dst]
                gen += out if dst == "coords" else list(out)
            name = f"{src} → {dst} ({title}{tag})"
            if dst == "coords":
                km = [haversine_km(g, parse_coords(s[dst])) for g, s in zip(gen, have) if g is not None]
                geo.append([name, f"{len(km)}/{len(have)}", *(f"{f(km):.0f}" if km else "-"
                                                              for f in (np.mean, np.median))])
                records.append({"pair": name, "parsed": len(km), "n": len(have),
                                "median_km": float(np.median(km)) if km else None})
                continue
            panels = [(m, render(m, have[0][m], True)) for m in src.split("+") if m != "coords"]
            panels += [(f"gen {dst}", render(dst, gen[0], True))] + [(f"true {k}", render(k, have[0][k], True))
                                                                    for k in (dst, args.labels) if k in have[0]]
            out_dir.mkdir(parents=True, exist_ok=True)
            save_sheet(sheet, panels)   # the first sample
            gen, truth = torch.stack(gen), [s.get(dst) for s in have]
            if dst == "LULC":
                if all(t is not None for t in truth):
                    truth = torch.stack(truth)
                    m = reconstruction_metrics("LULC", truth, F.one_hot(gen, len(LULC_CLASSES)).permute(0, 3, 1, 2))
                    majority = (truth == torch.bincount(truth.flatten()).argmax()).double().mean()
                    lulc.append([name, f"{m['acc']:.3f}", f"{m['mIoU']:.3f}", f"{majority:.3f}"])
                    records.append({"pair": name, "acc": m["acc"], "mIoU": m["mIoU"], "majority_acc": float(majority)})
                label = torch.stack([s[args.labels] if args.labels in s else (s["LULC"] == WATER).long() for s in have])
                i, u = water_iou(gen, label)
                water.append([Path(args.model).name, f"{src} ({title}{tag})", "zero-shot",
                              f"{100 * i / u:.1f}" if u else "- (no water)"])
                records.append({"pair": f"{src} ({title}{tag})", "water_iou": 100 * i / u if u else None,   # baseline:
                                "all_water_iou": 100 * float((label == 1).sum() / (label >= 0).sum())})   # all water
            else:
                truth = torch.stack(truth)
                m = reconstruction_metrics(dst, truth, gen)
                # trivial baseline: every pixel the set's per-band mean
                base = reconstruction_metrics(dst, truth, truth.mean((0, 2, 3), keepdim=True).expand_as(truth))
                table3.append([name, *(f"{m[k]:.4g}" for k in ("MAE", "RMSE", "SSIM", "PSNR")), f"{base['RMSE']:.4g}"])
                records.append({"pair": name, **{k: float(m[k]) for k in ("MAE", "RMSE", "SSIM", "PSNR")},
                                "mean_image_RMSE": float(base["RMSE"])})
    s = args.sampling
    report = (f"## Generation (paper Table 3 layout): {', '.join(f'{t} {len(x)} samples' for t, x, _ in sets)}; "
              f"{s.scheme} {s.steps} step(s), T {s.temperature}, {args.diffusion_steps} diffusion steps\n\n"
              + markdown(["Input → Output", "MAE", "RMSE", "SSIM", "PSNR", "mean-image RMSE"], table3)
              + "\nPhysical units: S2 reflectance (0-1), S1 dB, DEM m, NDVI; PSNR/SSIM range: the ground truth's.\n\n"
              + markdown(["Input → LULC", "pixel acc", "mIoU", "majority-class acc"], lulc)
              + "\n## Zero-shot water mapping (paper Table 4 layout)\n\n"
              + markdown(["Model", "Input", "Type", "IoU water"], water)
              + "\n## Geolocation\n\n" + markdown(["Input → coords", "parsed", "mean km", "median km"], geo)
              + f"\nTime per sample ({args.device}): {timer.report()}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "eval.md", report)
    write_text(out_dir / "eval.json", json.dumps(records, indent=1))
    print(report)


def main():
    evaluate = len(sys.argv) > 1 and sys.argv[1] == "eval"
    parser = argparse.ArgumentParser(prog="generate.py eval" if evaluate else None,
                                     description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--model", required=True, help="TerraMind checkpoint (pretrain.py), or a checkpoint folder "
                        "with terramind.safetensors (release.py convert)")
    parser.add_argument("--tokenizers", default=None, help="folder with tokenizer_<MOD>.safetensors (default: the "
                        "folder of --model)")
    parser.add_argument("--text-tokenizer", default=None, help="WordPiece JSON for coords / captions (default: the "
                        "one the checkpoint was pretrained with, else the official v1 vocabulary)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scheme", default="roar", choices=["roar", "maskgit"], help="image decoding scheme")
    parser.add_argument("--steps", type=positive_int, default=1, help="decoding steps per image target (official: 1)")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "linear"], help="MaskGIT token schedule")
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0, help="sampling temperature (0: argmax)")
    parser.add_argument("--temp-schedule", default="constant", help="constant, linear or onex:MIN:POWER")
    parser.add_argument("--top-k", type=nonnegative_float, default=0,
                        help="top-k filter (integer k, or a share < 1; 0: off)")
    parser.add_argument("--top-p", type=fraction, default=0.8, help="nucleus filter (0: off)")
    parser.add_argument("--cfg", type=nonnegative_float, default=1.0, help="classifier-free guidance scale (1: off)")
    parser.add_argument("--diffusion-steps", type=positive_int, default=DECODE_STEPS,
                        help=f"DDIM steps of the tokenizer decoders (ours {DECODE_STEPS}; the official "
                        f"TerraMindGeneration {OFFICIAL_DECODE_STEPS})")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="windows x samples per forward pass")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the torch.Generator behind all sampling")
    parser.add_argument("--overwrite", action="store_true", help="replace output files already in --out")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    if evaluate:
        parser.add_argument("--data", default=None, help="TerraMesh-layout folder with ground truth")
        parser.add_argument("--split", default="test", help="split (all samples when the folder has none)")
        parser.add_argument("--n", type=positive_int, default=64, help="number of samples")
        parser.add_argument("--pairs", default="S2L2A:S1GRD,S2L2A:S1RTC,S2L2A:DEM,S2L2A:NDVI,S2L2A:LULC,S1GRD:S2L2A,"
                            "S1RTC:S2L2A,S1GRD:DEM,S1GRD:NDVI,S1GRD:LULC,S2L2A:coords",
                            help="input(+input):output pairs; pairs the data or tokenizers lack are skipped")
        parser.add_argument("--labels", default="label_water", help="water label folder (else: LULC water)")
        parser.add_argument("--sen1floods11", default=None, help="Sen1Floods11 folder (S1/, S2/, Labels/): water IoU")
        parser.add_argument("--input-scale", default="both", choices=["pixels", "tokens", "both"], help="image inputs "
                            "as pixels, as tokens (paper Table 14), or both where the model takes either (default)")
    else:
        parser.add_argument("--input", action="append", required=True, help="MOD=path (or coords/caption text)")
        parser.add_argument("--targets", required=True, help="comma-separated modalities, generated in order")
        parser.add_argument("--input-scale", default="pixels", choices=["pixels", "tokens"], help="image inputs as "
                            "pixels where the model has a patch embedding (default), or through their tokenizer "
                            "wherever the model has their token embedding (paper Table 14)")
        parser.add_argument("--scene", action="store_true", help="a scene of any size in bounded memory: inputs "
                            "read and outputs written (tiled GeoTIFFs) window by window, image targets only")
        parser.add_argument("--resume", action="store_true", help="--scene: continue a killed run in --out")
    args = parser.parse_args(sys.argv[2:] if evaluate else sys.argv[1:])
    writable_folder(args.out)   # before any work
    print(f"diffusion decoders: {args.diffusion_steps} DDIM steps (default here {DECODE_STEPS}, as the official "
          f"notebooks; the official TerraMindGeneration default is {OFFICIAL_DECODE_STEPS}: --diffusion-steps)")
    k = int(args.top_k) if args.top_k >= 1 or args.top_k == 0 else args.top_k   # an int k, or a share < 1
    args.sampling = Sampling(args.scheme, args.steps, args.schedule, args.temperature, args.temp_schedule, k,
                             args.top_p, args.cfg)
    (run_eval if evaluate else run_generate)(args)


if __name__ == "__main__":
    run_main(main)
