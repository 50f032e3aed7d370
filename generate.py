"""
Any-to-any and chained generation with a pretrained TerraMind (paper §3.3, §4.3, eq. 4; official:
terratorch .../terramind/model/generate.py; 4M: fourm/models/generate.py).

Consumes a TerraMind checkpoint (pretrain.py), the image tokenizers (fsq_tokenizer.py,
`tokenizer_<MOD>.safetensors`) and, for coords and captions, a WordPiece JSON (text_tokenizer.py).
Produces one GeoTIFF per generated image modality with the first input's georeferencing tags, a PNG
sheet of inputs and outputs and `sequences.txt` (coords, captions); `eval` produces paper Tables 3
and 4 and the geolocation error (generate_eval.py).

Targets are generated in the user's order, each one an encoder input of the next (real chaining):
  * images: MaskGIT (sample every masked token, keep the most confident) or ROAR (random order),
    cosine or linear token schedules, any number of steps, decoded tokens re-entering the encoder;
    temperature constant / linear / onex, top-k, top-p, classifier-free guidance;
  * coords, caption: autoregressive from [S_1];
  * decoding: tokenizers (`--diffusion-steps` DDIM steps; LULC by argmax) to physical units, coords
    to (lon, lat), captions to text.
Tiles larger than the model's (config.grid x 16 px) run in overlapping windows (paper §11.1,
windows.py) that fill one token grid, each conditioned on its neighbours' tokens, decoded in
tile-sized windows; `--scene` (generate_scene) reads those windows from the files and writes the
decoded rows as they are final, equal to the in-memory result.

Python: `generate(model, tokenizers, {"S2L2A": x}, ["LULC", "coords"])`, `generate_tokens(...)`,
`Sampling`.

    # CPU smoke run (smoke checkpoints from pretrain.py / fsq_tokenizer.py on the synthetic world)
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=data/synth/S2L2A/00005.tif --targets LULC,S1GRD,DEM,coords --out out/gen
    python generate.py eval --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --data data/synth --split test --n 64 --temperature 0 \\
        --sen1floods11 assets/sen1floods11 --out out/eval
    # image inputs as their tokens although the model has their pixel embedding (supplementary
    # Table 14); eval runs each pair both ways by default (--input-scale both)
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=data/synth/S2L2A/00005.tif --targets LULC --input-scale tokens \\
        --out out/gen_tokens
    # a whole Sentinel-2 tile in bounded memory (scene.py): tiled GeoTIFFs, --resume after a crash
    python generate.py --model ckpt/terramind.safetensors --tokenizers ckpt/ \\
        --input S2L2A=T32TMT_S2L2A.tif --targets LULC --scene --out out/T32TMT
    # one GPU: the same with --device cuda (and --batch-size 64 windows per forward pass)
There is no multi-GPU variant: generation is inference, one process per GPU over separate files.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import run_main, writable_folder
from diffusion_decoder import DECODE_STEPS, OFFICIAL_DECODE_STEPS
from entries import entry_kind
from generate_eval import run_eval
from generate_io import (Timer, check_decoders, claim_outputs, decode_sequence, image_outputs,
                         load_stack, pad_to_patches, parse_args, prepare_inputs, target_entry,
                         to_entries, write_outputs)
from modalities import MODALITIES, PATCH
from scene import (Progress, read_window, scene_inputs, scene_writers, summary,
                   write_scene)
from terramesh import read_input
from terramind import Encoded, TerraMind
from text_tokenizer import EOS_ID, PAD_ID, WordPieceTokenizer, official_added_tokens, sentinel_id
from windows import (WindowPlan, decode_rows, decode_starts, grid_state, known_tokens, new_canvas,
                     plan_windows, restore_grid, window_inputs)

# 4M sequence layout: input [S_1], target [S_1] ... [S_2]
S_1, S_2 = sentinel_id(1), sentinel_id(2)
SENTINELS = range(sentinel_id(0), sentinel_id(199) + 1)
_IDS = {t: i for i, (t, _) in enumerate(official_added_tokens())}
COORDS_LAYOUT = (                           # [S_1] lat lon [EOS] [S_2] (masking.py)
    range(_IDS["lat=-90.00"], _IDS["lat=90.00"] + 1),
    range(_IDS["lon=-180.00"], _IDS["lon=180.00"] + 1),
    range(EOS_ID, EOS_ID + 1),
    range(S_2, S_2 + 1),
)

# ------------------------------------------------------------------------------
# Schedules (4M fourm/utils/generation.py)


def cosine_schedule(steps: int, n: int) -> list[int]:
    """Tokens per step: few at the start and the end, many in the middle; the last step takes the
    rest."""
    s = [0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    out = [round(n * (a - b)) for a, b in zip(s[:-1], s[1:])]
    if sum(out) > n:
        # DEVIATION: few tokens, many steps (8 over 16): the official rounding overshoots
        # and the last step goes below 0; here the cumulative counts are rounded instead
        cumulative = [0] + [round(n * (1 - v)) for v in s[1:]] + [n]
        return np.diff(cumulative).tolist()
    return out + [n - sum(out)]


def linear_schedule(steps: int, n: int) -> list[int]:
    """Equal shares (floor of linspace differences), largest first, trailing zeros dropped
    (official)."""
    shares = np.diff(np.linspace(0, n, steps + 1, dtype=int)).tolist()
    return [k for k in sorted(shares, reverse=True) if k > 0]


def temperature_schedule(kind: str, t0: float, tokens: list[int]) -> list[float]:
    """'constant'; 'linear': t0 times the share of tokens still masked before the step (decays to
    ~0); 'onex:{min_t}:{power}': 1/x^power decay from t0 to min_t (4M). Clipped at 1e-9 like the
    official code."""
    n, done = sum(tokens), np.cumsum(tokens)
    if kind == "constant":
        return [t0] * len(tokens)
    if kind == "linear":
        masked = np.concatenate([[t0], t0 * (n - done[:-1]) / n])
        return np.clip(masked, 1e-9, None).tolist()
    if kind.startswith("onex:"):
        min_t, power = (float(v) for v in kind.split(":")[1:])
        y = 1 / np.linspace(1, 100, n) ** power
        y = (y - y.min()) / (y.max() - y.min())
        temps = [min_t + (t0 - min_t) * u * (1 - c / n) for u, c in zip(y, done)]
        return np.clip(temps, 1e-9, None).tolist()
    raise ValueError(f"temperature schedule must be constant, linear or onex:MIN:POWER, "
                     f"got {kind!r}")


@dataclass
class Sampling:
    """How one target is sampled. Sequences always decode autoregressively with `temperature`,
    top-k, top-p."""
    scheme: str = "roar"            # image targets: "roar" or "maskgit"
    steps: int = 1                  # decoding steps (official TerraMindGeneration: 1)
    schedule: str = "cosine"        # MaskGIT token schedule ("cosine"/"linear"); ROAR: linear (4M)
    temperature: float = 1.0        # 0 = argmax
    temp_schedule: str = "constant"  # constant, linear or onex:MIN:POWER
    top_k: float = 0                # int: keep k logits; float < 1: a share of V; 0: off
    top_p: float = 0.8              # nucleus; 0: off (official default 0.8)
    cfg: float = 1.0                # classifier-free guidance scale; 1: no guidance pass
    # DEVIATION: coords may only be lat, lon, [EOS], [S_2], so they always parse
    coords_layout: bool = True
    vocab: int = 0                  # sequences: ids >= vocab never sampled (text tokenizer size)

    def tokens_per_step(self, n: int) -> list[int]:
        if self.scheme not in ("roar", "maskgit") or self.steps < 1:
            raise ValueError(f"scheme must be roar or maskgit with steps >= 1, "
                             f"got {self.scheme!r}, {self.steps}")
        cosine = self.scheme == "maskgit" and self.schedule == "cosine"
        schedule = cosine_schedule if cosine else linear_schedule
        counts = schedule(self.steps, n)
        return [k for k in counts if k > 0]   # steps that would decode nothing are skipped


def limit_vocab(sampling, text_tokenizer):
    """The sampling with sequence ids limited to what the text tokenizer decodes
    (Sampling.vocab)."""
    n = text_tokenizer.vocab_size if text_tokenizer is not None else 0
    if isinstance(sampling, dict):
        return {t: replace(s, vocab=n) for t, s in sampling.items()}
    return replace(sampling or Sampling(), vocab=n)


# ------------------------------------------------------------------------------
# Sampling tokens


def filter_logits(logits: torch.Tensor, top_k: float = 0, top_p: float = 0.0) -> torch.Tensor:
    """(..., V) -> the same with filtered logits at -inf: top-k, then nucleus keeping the first
    token over top_p (official top_k_top_p_filtering, applied before the temperature)."""
    logits = logits.clone()
    V = logits.shape[-1]
    if top_k > 0:
        k = int(top_k * V) if isinstance(top_k, float) else int(top_k)
        kth = torch.topk(logits, min(k, V))[0][..., -1:]
        logits[logits < kth] = -math.inf
    if top_p > 0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = F.softmax(sorted_logits, -1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits[drop.scatter(-1, order, drop)] = -math.inf
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k=0, top_p=0.0, generator=None):
    """logits (B, K, V) -> token ids (B, K) and their probability (B, K). Temperature 0 is
    argmax."""
    bad = torch.isnan(logits) | (logits == math.inf)   # -inf is a mask (the coords layout)
    if bad.any():   # NaN weights or inputs: neither argmax nor multinomial means anything
        raise ValueError(f"the model gave {int(bad.sum())} non-finite logits: its weights or "
                         f"inputs hold NaN or inf; use a checkpoint from before the run diverged")
    if temperature < 1e-10:
        # DEVIATION: official confidence at T=0 is a constant 1 (MaskGIT order arbitrary)
        best = F.softmax(logits.float(), -1).max(-1)
        return best.indices, best.values
    probs = F.softmax(filter_logits(logits.float(), top_k, top_p) / temperature, -1)
    flat = torch.multinomial(probs.flatten(0, -2), 1, generator=generator)
    ids = flat.view(probs.shape[:-1])                                      # (B, K)
    return ids, probs.gather(-1, ids[..., None])[..., 0]


# ------------------------------------------------------------------------------
# Token-level generation: chained targets (paper eq. 4)


def _unconditional(state: dict, cond: list) -> dict:
    """The CFG unconditional inputs (4M): conditioning images removed, conditioning sequences
    emptied to [S_1]."""
    out = {}
    for e, t in state.items():
        if e not in cond:
            out[e] = t
        elif entry_kind(e) == "sequence":
            out[e] = torch.full((t.shape[0], 1), S_1, dtype=torch.long, device=t.device)
    return out


def _encode(model, inputs, visible, batch, timer) -> Encoded:
    if not inputs:   # nothing left (unconditional pass): cross-attention to an empty context
        z = model.mask_token.new_zeros(batch, 0, model.config.dim)
        return Encoded({}, {}, {}, z, z, None)
    with timer("encoder"):
        return model.encode(inputs, visible=visible)


def next_token_logits(model, enc: Encoded, target: str, prefix: torch.Tensor) -> torch.Tensor:
    """TerraMind.logits of a sequence target (causal decoder on `prefix` (B, K)) with the output
    head applied to the last position only -> (B, 1, V): the head over all K positions would
    dominate."""
    K = prefix.shape[1]
    emb = model.target_emb[target]
    y = emb(prefix) + (model.pos_seq[:K] + model.mod_emb[target])        # (B, K, D)
    causal = torch.ones(K, K, dtype=torch.bool, device=y.device).tril()
    y = model.forward_decoder(y, enc, causal)                             # (B, K, D)
    return F.linear(y[:, -1:], emb.weight)                                # (B, 1, V)


def _guided(model, enc, uncond, target, s: Sampling, timer, **kw) -> torch.Tensor:
    """Decoder logits, with classifier-free guidance when there is an unconditional pass (4M:
    l_uncond + scale * (l_cond - l_uncond))."""
    def logits_of(e):
        if "prefix" in kw:
            return next_token_logits(model, e, target, kw["prefix"])
        return model.logits(e, target, **kw)
    with timer("decoder"):
        logits = logits_of(enc)
        if uncond is None:
            return logits
        u = logits_of(uncond)
        return u + s.cfg * (logits - u)


def _image_target(model, state, cond, target, grid, s: Sampling, generator, timer,
                  known=None) -> torch.Tensor:
    """MaskGIT / ROAR decoding of one image target -> token ids (B, h, w). `known` (ids, mask)
    (B, h, w): tokens fixed beforehand (overlaps of neighbouring windows), encoder inputs from the
    first step."""
    B, (h, w) = next(iter(state.values())).shape[0], grid
    N, dev = h * w, model.mask_token.device
    ids = torch.zeros(B, N, dtype=torch.long, device=dev)
    done = torch.zeros(B, N, dtype=torch.bool, device=dev)
    if known is not None:
        kid, kmask = known[0].flatten(1), known[1].flatten(1)
    else:
        kid, kmask = ids, done.clone()
    counts = s.tokens_per_step(N)
    temps = temperature_schedule(s.temp_schedule, s.temperature, counts)
    feed = target in model.config.inputs     # decoded tokens re-enter through the encoder (4M)
    enc = uncond = None
    for n, temp in zip(counts, temps):
        if enc is None or feed:
            seen = torch.where(kmask, kid, ids).view(B, h, w)                # known or decoded
            extra, visible = {}, None
            if feed:
                extra, visible = {target: seen}, {target: done | kmask}
            enc = _encode(model, {**state, **extra}, visible, B, timer)
            if s.cfg != 1.0:
                blank = _unconditional(state, cond)
                uncond = _encode(model, {**blank, **extra}, visible, B, timer)
        masked = N - int(done[0].sum())
        todo = torch.argsort(done.to(torch.uint8), dim=1, stable=True)[:, :masked]   # (B, M)
        if s.scheme == "roar":   # n masked positions in random order, all kept
            order = torch.rand(todo.shape, generator=generator, device=dev).argsort(1)[:, :n]
            pos = todo.gather(1, order)                                       # (B, n)
            logits = _guided(model, enc, uncond, target, s, timer, positions=pos, grid=grid)
            tok, _ = sample(logits, temp, s.top_k, s.top_p, generator)
        else:                    # every masked position sampled, the n most confident kept
            logits = _guided(model, enc, uncond, target, s, timer, positions=todo, grid=grid)
            tok, conf = sample(logits, temp, s.top_k, s.top_p, generator)
            keep = conf.topk(n, dim=1).indices
            pos, tok = todo.gather(1, keep), tok.gather(1, keep)
        ids.scatter_(1, pos, tok)
        done.scatter_(1, pos, True)
    return torch.where(kmask, kid, ids).view(B, h, w)


def merge_span(ids: list[int]) -> list[int]:
    """The tokens the decoder wrote for the span [S_1] (official merge_span_masking of input
    [S_1])."""
    out, current = [], None
    for t in ids:
        if t in SENTINELS:
            current = t
        elif current == S_1:
            out.append(t)
    return out


def allowed_coords(logits: torch.Tensor, i: int) -> torch.Tensor:
    """The logits of coords token i with every id outside the i-th kind of COORDS_LAYOUT at
    -inf."""
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    allowed[COORDS_LAYOUT[i].start:COORDS_LAYOUT[i].stop] = True
    return logits.masked_fill(~allowed, -math.inf)


def _sequence_target(model, state, cond, target, s: Sampling, generator, timer) -> torch.Tensor:
    """Autoregressive decoding from [S_1] until every row wrote [S_2] -> ids (B, L),
    [PAD]-padded."""
    B, dev = next(iter(state.values())).shape[0], model.mask_token.device
    enc = _encode(model, state, None, B, timer)   # state holds the [S_1] prompt (generate_tokens)
    uncond = None
    if s.cfg != 1.0:
        uncond = _encode(model, _unconditional(state, cond), None, B, timer)
    out = torch.full((B, 1), S_1, dtype=torch.long, device=dev)
    for i in range(MODALITIES[target].max_length - 1):   # official: max_length - 1 target tokens
        logits = _guided(model, enc, uncond, target, s, timer, prefix=out)         # (B, 1, V)
        if 0 < s.vocab < logits.shape[-1]:   # a caption head larger than the tokenizer
            logits[..., s.vocab:] = -math.inf
        if target == "coords" and s.coords_layout:   # token i must be of the i-th kind
            logits = allowed_coords(logits, i)
        tok, _ = sample(logits, s.temperature, s.top_k, s.top_p, generator)
        out = torch.cat([out, tok], 1)
        if bool((out == S_2).any(1).all()):
            break
    rows = [merge_span(r) for r in out.tolist()]
    L = max(1, max(map(len, rows)))
    padded = [r + [PAD_ID] * (L - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=dev)


def token_grid(model, inputs: dict) -> tuple:
    """(h, w) of the first image input's token grid, the model's own grid without one."""
    for e, t in inputs.items():
        kind = entry_kind(e)
        if kind == "pixels":
            return t.shape[-2] // PATCH, t.shape[-1] // PATCH
        if kind == "tokens":
            return tuple(t.shape[-2:])
    return (model.config.grid,) * 2


@torch.no_grad()
def generate_tokens(model: TerraMind, inputs: dict, targets: list, sampling=None, generator=None,
                    grid=None, timer: Timer | None = None, known: dict | None = None) -> dict:
    """inputs {entry: tensor} as TerraMind.encode takes them; targets: token entries ("tok_LULC",
    "coords", ...) generated in this order, each one added to the inputs of the next (chained
    generation, eq. 4). `sampling`: one Sampling or {target: Sampling}; `known`: {image target:
    (ids, mask) (B, h, w)} tokens fixed beforehand. Returns {target: ids (B, h, w) or (B, L)}."""
    if not inputs:
        raise ValueError("generation needs at least one input")
    state, cond, out, timer = dict(inputs), list(inputs), {}, timer or Timer()
    B, dev = next(iter(inputs.values())).shape[0], model.mask_token.device
    for t in targets:   # official: every sequence target's [S_1] prompt is an input from the start
        if entry_kind(t) == "sequence" and t in model.config.inputs and t not in state:
            state[t] = torch.full((B, 1), S_1, dtype=torch.long, device=dev)
    if grid is None:
        grid = token_grid(model, inputs)
    for target in targets:
        s = sampling.get(target, Sampling()) if isinstance(sampling, dict) else sampling
        s = s or Sampling()
        if target in inputs:
            raise ValueError(f"{target} is both an input and a target")
        if entry_kind(target) == "sequence":
            out[target] = _sequence_target(model, state, cond, target, s, generator, timer)
        else:
            fixed = (known or {}).get(target)
            out[target] = _image_target(model, state, cond, target, grid, s, generator, timer,
                                        fixed)
        if target in model.config.inputs:
            # DEVIATION (official snapshot): the next target is conditioned on this one
            state[target] = out[target]
            cond.append(target)                # official cfg_grow_conditioning
    return out


# ------------------------------------------------------------------------------
# Large tiles: windows that share one token grid (paper §11.1; the plumbing is in windows.py)


def fill_token_grid(model, tokenizers, read, seqs: dict, targets: list, plan: WindowPlan,
                    canvas: dict, B: int, sampling, generator, text_tokenizer, timer,
                    start: int = 0, checkpoint=None, input_scale: str = "pixels") -> dict:
    """Generates `targets` over the chunks of `plan` from chunk `start` on. read(r, c) -> {image:
    standardized (B, C, th, tw)}; each window is conditioned on the tokens already in `canvas` and
    writes its image tokens there; checkpoint(k) runs after chunk k. Returns the sequence targets
    of the centre window, decoded."""
    tgt = [target_entry(t) for t in targets]
    grid, out = (plan.th // PATCH, plan.tw // PATCH), {}
    before = sum(map(len, plan.chunks[:start]))
    bar = tqdm(total=plan.windows, initial=before, desc="windows", unit="window",
               disable=len(plan.chunks) == 1, leave=False)
    for k in range(start, len(plan.chunks)):
        chunk = plan.chunks[k]
        inputs = window_inputs(read, seqs, chunk)
        entries = to_entries(model, tokenizers, inputs, timer, input_scale)
        known = known_tokens(canvas, plan, chunk)
        tokens = generate_tokens(model, entries, tgt, sampling, generator, grid, timer, known)
        for name, e in zip(targets, tgt):
            part = tokens[e].split(B)                                      # per window (B, ...)
            if MODALITIES[name].kind == "image":
                for (r, c), ids in zip(chunk, part):
                    canvas[e][0][plan.cell(r, c)] = ids
                    canvas[e][1][plan.cell(r, c)] = True
            elif plan.centre in chunk:
                ids = part[chunk.index(plan.centre)]
                out[name] = decode_sequence(name, ids, text_tokenizer)
        bar.update(len(chunk))
        if checkpoint is not None:
            checkpoint(k)
    bar.close()
    return out


@torch.no_grad()
def generate(model: TerraMind, tokenizers: dict, inputs: dict, targets: list, sampling=None,
             text_tokenizer: WordPieceTokenizer | None = None, diffusion_steps: int = 10,
             seed: int = 0, standardized: bool = False, batch_size: int = 16,
             timer: Timer | None = None, input_scale: str = "pixels") -> dict:
    """Any-to-any chained generation for notebooks and the command line.

    inputs {modality: value}: images (C, H, W) or (B, C, H, W) in physical units (standardized ones
    if `standardized`), LULC class maps (H, W) / (B, H, W), coords (lon, lat) or 'lat=.. lon=..',
    captions as text (lists of those for a batch). targets: modality names in chaining order
    ("LULC", "DEM", "coords"). Returns {modality: images (B, C, H, W) in physical units
    (standardized if `standardized`), LULC class maps (B, H, W) int64, coords [(lon, lat) | None],
    captions [str]}. Inputs larger than the model's tile run in overlapping windows that write one
    shared token grid (each window conditioned on the tokens its neighbours already wrote), decoded
    in tile-sized windows as generate_scene decodes them (decode_rows); sequences come from the
    centre window. input_scale "tokens": image inputs enter through their tokenizer even where the
    model has a pixel embedding (to_entries)."""
    dev, timer = model.mask_token.device, timer or Timer()
    tgt = [target_entry(t) for t in targets]
    sampling = limit_vocab(sampling, text_tokenizer)
    generator = torch.Generator(dev).manual_seed(seed)
    check_decoders(inputs, targets, tokenizers, text_tokenizer)
    images, seqs = prepare_inputs(inputs, text_tokenizer, standardized, dev)
    B = next(iter({**images, **seqs}.values())).shape[0]
    tile = model.config.grid * PATCH
    images, H, W = pad_to_patches(images, tile)
    Hp, Wp = H + -H % PATCH, W + -W % PATCH
    # the windows run every target up to the last image one; sequences alone: the centre window
    image_targets = [i + 1 for i, t in enumerate(targets) if MODALITIES[t].kind == "image"]
    split = max(image_targets, default=0)
    plan = plan_windows(Hp, Wp, tile, max(1, batch_size // B), centre_only=not split)
    if plan.windows == 1:
        split = len(targets)
    canvas = new_canvas(tgt, B, Hp, Wp, dev)

    def read(r, c):
        return {n: v[..., r:r + plan.th, c:c + plan.tw] for n, v in images.items()}
    out = fill_token_grid(model, tokenizers, read, seqs, targets[:split], plan, canvas, B, sampling,
                          generator, text_tokenizer, timer, input_scale=input_scale)
    if split < len(targets):   # trailing sequences: the centre window, its image tokens known
        entries = to_entries(model, tokenizers, {**read(*plan.centre), **seqs}, timer, input_scale)
        known = known_tokens(canvas, plan, [plan.centre])
        grid = (plan.th // PATCH, plan.tw // PATCH)
        tokens = generate_tokens(model, entries, tgt, sampling, generator, grid, timer, known)
        for name, e in zip(targets[split:], tgt[split:]):
            out[name] = decode_sequence(name, tokens[e], text_tokenizer)
    for name, e in zip(targets, tgt):   # tile-sized windows, as the scene path decodes
        if MODALITIES[name].kind != "image":
            continue
        rows = decode_rows(tokenizers[name], name, canvas[e][0], tile, diffusion_steps, seed,
                           batch_size, timer, standardized=standardized, generator=generator)
        out[name] = torch.cat([band for _, band in rows], -2)[..., :H, :W]
    timer.samples += B
    return {n: out[n] for n in targets}


# ------------------------------------------------------------------------------
# Whole scenes: the same windows, read from files and written row by row (scene.py)


def check_scene_targets(targets: list, tokenizers: dict):
    """A scene's targets are images, each with its tokenizer."""
    bad = [t for t in targets if MODALITIES[t].kind != "image"]
    if bad:
        raise ValueError(f"--scene generates image targets only, not {bad}; run coords / captions "
                         f"on a tile")
    missing = [t for t in targets if t not in tokenizers]
    if missing:
        raise ValueError(f"no tokenizer to decode {missing} (tokenizers: {sorted(tokenizers)})")


@torch.no_grad()
def generate_scene(model: TerraMind, tokenizers: dict, paths: dict, targets: list, folder,
                   sampling=None, diffusion_steps: int = 10, seed: int = 0, batch_size: int = 16,
                   resume: bool = False, sequences: dict | None = None, text_tokenizer=None,
                   input_scale: str = "pixels") -> str:
    """Generation over a scene of any size in bounded memory (--scene). paths {modality: GeoTIFF},
    co-registered; image targets only. The scene's token grid is the one whole-scene array in
    memory: the windows of plan_windows read their pixels from the files as the waves reach them,
    then decode_rows decodes window row by window row into <folder>/<target>.tif (tiled, the
    inputs' georeferencing). Equals generate() on the same inputs. A checkpoint after each window
    row lets resume=True finish a killed run into identical files. Returns the summary line."""
    check_scene_targets(targets, tokenizers)
    t0, dev, timer, folder = time.perf_counter(), model.mask_token.device, Timer(), Path(folder)
    rasters = scene_inputs(paths)
    first = next(iter(rasters.values()))
    H, W, tile = first.height, first.width, model.config.grid * PATCH
    Hp, Wp = H + -H % PATCH, W + -W % PATCH   # reflected to whole patches, as generate() pads
    plan = plan_windows(Hp, Wp, tile, max(1, batch_size))
    tgt = [target_entry(t) for t in targets]
    generator = torch.Generator(dev).manual_seed(seed)
    canvas = new_canvas(tgt, 1, Hp, Wp, dev)
    _, seqs = prepare_inputs(sequences or {}, text_tokenizer, False, dev)
    inputs = {n: [str(p), Path(p).stat().st_size] for n, p in paths.items()}
    run = {"inputs": inputs, "targets": targets, "sampling": sampling,
           "diffusion_steps": diffusion_steps, "seed": seed, "batch_size": batch_size,
           "sequences": sequences, "input_scale": input_scale, "model": model.config}
    progress = Progress(folder / "scene.progress.npz", run)
    state = progress.load() if resume else None
    chunk, row, decode_total = 0, 0, len(decode_starts(Hp, tile))
    if state is not None:
        restore_grid(state[0], canvas, generator)
        chunk, row = state[1]["chunk"], state[1]["row"]
        print(f"resuming {folder}: {chunk}/{len(plan.chunks)} window chunks, "
              f"{row}/{decode_total} decoded rows")

    def checkpoint(k):   # after the chunk that ends a window row of its wave
        last = k + 1 == len(plan.chunks)
        if last or plan.chunks[k + 1][0][0] != plan.chunks[k][-1][0]:
            progress.save(grid_state(canvas, generator), chunk=k + 1, row=0)

    def read(r, c):
        return {n: read_window(x, n, r, c, plan.th, plan.tw, dev) for n, x in rasters.items()}
    fill_token_grid(model, tokenizers, read, seqs, targets, plan, canvas, 1, sampling, generator,
                    text_tokenizer, timer, chunk, checkpoint, input_scale)
    writers = scene_writers(folder, targets, H, W, first.geo, state is not None)
    decoders = {}
    for n, e in zip(targets, tgt):
        decoders[n] = decode_rows(tokenizers[n], n, canvas[e][0], tile, diffusion_steps, seed,
                                  batch_size, timer, row, generator=generator)

    def after_row(i):
        progress.save(grid_state(canvas, generator), chunk=len(plan.chunks), row=i + 1)
    write_scene(writers, decoders, H, W, range(row, decode_total), after_row)
    for w in writers.values():
        w.finish()
    progress.done()
    scale = first.geo.get(33550)
    seconds = time.perf_counter() - t0
    return summary(H, W, plan.windows, seconds, scale[0] if scale else None)


# ------------------------------------------------------------------------------
# Commands: generate (a tile or a scene) and eval


def run_scene(args, model, tokenizers, text, targets: list):
    """--scene: image inputs streamed from their files, outputs written window row by window
    row."""
    paths, sequences = {}, {}
    for item in args.input:
        name, _, value = item.partition("=")
        if MODALITIES.get(name) is not None and MODALITIES[name].kind == "sequence":
            sequences[name] = read_input(name, value)[0]
        else:
            paths[name] = value
    line = generate_scene(model, tokenizers, paths, targets, args.out, args.sampling,
                          args.diffusion_steps, args.seed, args.batch_size, args.resume, sequences,
                          text, args.input_scale)
    files = ", ".join(str(Path(args.out) / f"{t}.tif") for t in targets)
    print(f"generated {', '.join(targets)} -> {files}\n{line}")


def run_generate(args):
    if args.resume and not args.scene:
        raise ValueError("--resume continues a --scene run; add --scene")
    targets = [t for t in args.targets.split(",") if t]
    folder = Path(args.out)
    outputs = image_outputs(folder, targets)
    if not args.scene:
        outputs["sequences"] = folder / "sequences.txt"
        outputs["sheet"] = folder / "sheet.png"
    claim_outputs(outputs, args.overwrite)
    model, tokenizers, text = load_stack(args)
    if args.scene:
        return run_scene(args, model, tokenizers, text, targets)
    inputs, geo = {}, None
    for item in args.input:
        name, _, value = item.partition("=")
        inputs[name], g = read_input(name, value)
        geo = geo or g
    timer, t0 = Timer(), time.perf_counter()
    out = generate(model, tokenizers, inputs, targets, args.sampling, text, args.diffusion_steps,
                   args.seed, batch_size=args.batch_size, timer=timer, input_scale=args.input_scale)
    wall = time.perf_counter() - t0
    lines = write_outputs(folder, inputs, out, targets, geo)
    print(f"generated {', '.join(targets)} from {', '.join(inputs)} in {wall:.2f} s -> {folder}")
    print("\n".join(lines) + f"\ntime per sample: {timer.report()}")


def main():
    evaluate = len(sys.argv) > 1 and sys.argv[1] == "eval"
    args = parse_args(sys.argv[1:], __doc__.split("\n\n")[0].strip())
    writable_folder(args.out)   # before any work
    print(f"diffusion decoders: {args.diffusion_steps} DDIM steps (default here {DECODE_STEPS}, "
          f"as the official notebooks; the official TerraMindGeneration default is "
          f"{OFFICIAL_DECODE_STEPS}: --diffusion-steps)")
    k = args.top_k
    if k >= 1 or k == 0:   # an integer k, else a share < 1 of the vocabulary
        k = int(k)
    args.sampling = Sampling(args.scheme, args.steps, args.schedule, args.temperature,
                             args.temp_schedule, k, args.top_p, args.cfg)
    if evaluate:
        run_eval(args, generate)
    else:
        run_generate(args)


if __name__ == "__main__":
    run_main(main)
