"""
Official TerraMind v1 weights into terramind.TerraMind: the key mapping and its strict checks.

An official `TerraMind_v1_<size>.pt` state dict names its modalities by the official keys (terramind.
official_key), keeps per-modality position tables, a to_logits copy of every decoder table and zero LayerNorm
biases. Every one of its keys is either loaded into our parameter of the same meaning or checked against the
value it must have (tied heads equal their tables, shared modality embeddings equal, position tables equal the
sin-cos tables, biases zero); anything else is an error that names the key. Called through
`TerraMind.from_official(path_or_state_dict, size)`; `python terramind.py convert` writes the result as a
safetensors checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from terramind import ENTRIES, SEQ_POSITIONS, TerraMind, TerraMindConfig, entry_kind, official_key, sincos_1d, sincos_2d


def terramind_from_official(state, size) -> TerraMind:
    """Loads an official state dict (`TerraMind_v1_<size>.pt` path or dict) strictly: every key is loaded
    or checked (tied heads equal their tables, shared modality embeddings equal, position tables equal
    the sin-cos tables, LayerNorm biases zero). `size` is a preset name or a TerraMindConfig; the
    modalities come from the keys."""
    name = state if isinstance(state, str) else "state dict"
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)
    state, orig = dict(state), dict(state)
    config = TerraMindConfig.preset(size) if isinstance(size, str) else replace(size)
    by_key = {official_key(e): e for e in ENTRIES}
    side = {s: [k.split(".")[1] for k in state if k.startswith(s + "_embeddings.") and k.endswith(".mod_emb")]
            for s in ("encoder", "decoder")}
    if bad := [k for k in side["encoder"] + side["decoder"] if k not in by_key]:
        raise ValueError(f"{name}: modalities {bad} are not in terramesh.MODALITIES")
    side = {s: [by_key[k] for k in keys] for s, keys in side.items()}
    grids = [math.isqrt(v.shape[1]) for k, v in state.items() if k.endswith("@224.pos_emb")]
    config = replace(config, inputs=tuple(side["encoder"]), targets=tuple(side["decoder"]),
                     grid=grids[0] if grids else config.grid)
    meta = any(t.is_meta for t in state.values())  # shapes only (key-layout checks of full sizes)
    with torch.device("meta" if meta else "cpu"):
        model = TerraMind(config)
    ours = model.state_dict()
    loaded = {}

    def take(key, ours_key, check=None):
        if key not in state:
            raise KeyError(f"{name}: missing official key {key}")
        t = state.pop(key)
        if check is not None:  # a tied copy, a fixed table or a zero bias: must equal the expected values
            if t.shape != check.shape or not (meta or torch.allclose(t.float(), check.float(), atol=1e-5)):
                raise ValueError(f"{name}: {key} {tuple(t.shape)} does not equal the expected "
                                 f"{ours_key or 'values'} {tuple(check.shape)}")
            return
        want = ours[ours_key].shape
        if t.numel() != math.prod(want):
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, model expects {tuple(want)}")
        loaded[ours_key] = t.reshape(want)

    take("mask_token", "mask_token")
    for s, table in (("encoder", "input_emb"), ("decoder", "target_emb")):
        for e in side[s]:
            k = f"{s}_embeddings.{official_key(e)}"
            if s == "decoder" and e in side["encoder"]:  # official shares the modality embedding
                take(k + ".mod_emb", "shared mod_emb", check=orig[f"encoder_embeddings.{official_key(e)}.mod_emb"])
            else:
                take(k + ".mod_emb", f"mod_emb.{e}")
            pos = sincos_1d(SEQ_POSITIONS, config.dim) if entry_kind(e) == "sequence" else sincos_2d(
                config.grid, config.dim)
            take(k + ".pos_emb", "sin-cos table", check=pos[None])
            if entry_kind(e) == "pixels":
                take(k + ".proj.weight", f"patch_proj.{e}.weight")
            else:
                take(k + ".token_emb.weight", f"{table}.{e}.weight")
            if s == "decoder":
                take(k + ".to_logits.weight", "tied table", check=loaded[f"target_emb.{e}.weight"])
    for k in list(state):
        if k.endswith(".bias") and "norm" in k:  # LayerNorm(bias=False) stores zero buffers
            take(k, None, check=torch.zeros_like(state[k]))
        elif k in ours:
            take(k, k)
    if state:
        raise ValueError(f"{name}: unexpected official keys {sorted(state)[:8]}")
    if missing := sorted(set(ours) - set(loaded)):
        raise ValueError(f"{name}: no official weights for {missing[:8]}")
    model.load_state_dict(loaded, strict=True, assign=meta)
    return model
