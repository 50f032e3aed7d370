"""
Official TerraMind v1 weights into our TerraMind: the key mapping and its strict checks.

An official `TerraMind_v1_<size>.pt` state dict names its modalities by the official keys
(entries.official_key), keeps per-modality position tables, a to_logits copy of every decoder table
and zero LayerNorm biases. Every one of its keys is either loaded into our parameter of the same
meaning or checked against the value it must have (tied heads equal their tables, shared modality
embeddings equal, position tables equal the sin-cos tables, biases zero); anything else is an error
that names the key.

This file maps keys and builds no model (so it does not import terramind.py):
`TerraMind.from_official(path_or_state_dict, size)` calls `read_state`, `official_config` and
`official_weights`, and loads the result; `python terramind.py convert` writes it as a safetensors
checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from entries import ENTRIES, entry_kind, official_key
from positions import SEQ_POSITIONS, sincos_1d, sincos_2d


def read_state(state) -> tuple[str, dict]:
    """(name for messages, state dict) of an official `.pt` path or an official state dict."""
    name = state if isinstance(state, str) else "state dict"
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)
    return name, dict(state)


def is_meta(state: dict) -> bool:
    """Shapes only (meta tensors): the key-layout checks of full sizes."""
    return any(t.is_meta for t in state.values())


def official_sides(state: dict, name: str) -> dict:
    """{"encoder": [entry, ...], "decoder": [...]}: the modalities of each side, from the keys."""
    by_key = {official_key(e): e for e in ENTRIES}
    sides = {}
    for side in ("encoder", "decoder"):
        prefix = side + "_embeddings."
        found = []
        for k in state:
            if k.startswith(prefix) and k.endswith(".mod_emb"):
                found.append(k.split(".")[1])
        if bad := [k for k in found if k not in by_key]:
            raise ValueError(f"{name}: modalities {bad} are not in terramesh.MODALITIES")
        sides[side] = [by_key[k] for k in found]
    return sides


def official_config(state: dict, config, name: str):
    """`config` (a TerraMindConfig) with the inputs, targets and image grid the keys hold."""
    sides = official_sides(state, name)
    grids = []
    for k, v in state.items():
        if k.endswith("@224.pos_emb"):
            grids.append(math.isqrt(v.shape[1]))
    grid = grids[0] if grids else config.grid
    inputs, targets = tuple(sides["encoder"]), tuple(sides["decoder"])
    return replace(config, inputs=inputs, targets=targets, grid=grid)


class _Taker:
    """Takes official keys one by one: into our state dict, or checked against expected values."""

    def __init__(self, state: dict, ours: dict, name: str):
        self.state, self.orig, self.ours, self.name = dict(state), dict(state), ours, name
        self.meta = is_meta(state)
        self.loaded = {}

    def take(self, key, ours_key, check=None):
        if key not in self.state:
            raise KeyError(f"{self.name}: missing official key {key}")
        t = self.state.pop(key)
        if check is not None:  # a tied copy, a fixed table or a zero bias: must equal the expected values
            same = self.meta or torch.allclose(t.float(), check.float(), atol=1e-5)
            if t.shape != check.shape or not same:
                raise ValueError(f"{self.name}: {key} {tuple(t.shape)} does not equal the expected "
                                 f"{ours_key or 'values'} {tuple(check.shape)}")
            return
        want = self.ours[ours_key].shape
        if t.numel() != math.prod(want):
            raise ValueError(f"{self.name}: {key} has shape {tuple(t.shape)}, "
                             f"model expects {tuple(want)}")
        self.loaded[ours_key] = t.reshape(want)


def _take_embedding(taker: _Taker, side: str, e: str, config, shared: bool):
    """The keys of one modality's embedding on one side (encoder_embeddings.* / decoder_...)."""
    k = f"{side}_embeddings.{official_key(e)}"
    table = "input_emb" if side == "encoder" else "target_emb"
    if shared:  # official shares the modality embedding between encoder and decoder
        encoder_mod_emb = taker.orig[f"encoder_embeddings.{official_key(e)}.mod_emb"]
        taker.take(k + ".mod_emb", "shared mod_emb", check=encoder_mod_emb)
    else:
        taker.take(k + ".mod_emb", f"mod_emb.{e}")
    if entry_kind(e) == "sequence":
        pos = sincos_1d(SEQ_POSITIONS, config.dim)
    else:
        pos = sincos_2d(config.grid, config.dim)
    taker.take(k + ".pos_emb", "sin-cos table", check=pos[None])
    if entry_kind(e) == "pixels":
        taker.take(k + ".proj.weight", f"patch_proj.{e}.weight")
    else:
        taker.take(k + ".token_emb.weight", f"{table}.{e}.weight")
    if side == "decoder":
        tied = taker.loaded[f"target_emb.{e}.weight"]
        taker.take(k + ".to_logits.weight", "tied table", check=tied)


def official_weights(state: dict, config, ours: dict, name: str) -> dict:
    """Our state dict from an official one, every key loaded or checked. `config` is what
    official_config gave, `ours` the state dict of a TerraMind built from it."""
    taker = _Taker(state, ours, name)
    taker.take("mask_token", "mask_token")
    for e in config.inputs:
        _take_embedding(taker, "encoder", e, config, shared=False)
    for e in config.targets:
        _take_embedding(taker, "decoder", e, config, shared=e in config.inputs)
    for k in list(taker.state):
        if k.endswith(".bias") and "norm" in k:  # LayerNorm(bias=False) stores zero buffers
            taker.take(k, None, check=torch.zeros_like(taker.state[k]))
        elif k in ours:
            taker.take(k, k)
    if taker.state:
        raise ValueError(f"{name}: unexpected official keys {sorted(taker.state)[:8]}")
    if missing := sorted(set(ours) - set(taker.loaded)):
        raise ValueError(f"{name}: no official weights for {missing[:8]}")
    return taker.loaded
