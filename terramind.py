"""
TerraMind: the dual-scale any-to-any encoder-decoder (paper §3; 4M-style masked
multimodal modelling).

The encoder reads pixel patches and discrete tokens of any modalities; the
decoder predicts masked target tokens of any token modality. Architecture, sizes
and initialization follow the official implementation (official: terratorch
.../terramind/model/terramind.py, tm_utils.py); official
`TerraMind_v1_<size>.pt` weights load strictly (the key mapping lives in
official.py).

Model inputs and targets are called *entries* (entries.py): pixel entries
("S2L2A", ...: float (B, C, H, W)), token entries ("tok_S2L2A", ...: FSQ ids (B,
h, w)) and sequences ("caption", "coords": WordPiece ids (B, L), PAD = 0). Only
token entries can be targets. The transformer blocks live in blocks.py, the
sin-cos position tables in positions.py.

Public API (`from terramind import TerraMind, TerraMindConfig`):
  * `TerraMind(TerraMindConfig.preset("tiny"))`, presets tiny/small/base/large
    (official) and smoke (CPU); `TerraMind.from_checkpoint(path)`,
    `model.save_checkpoint(path)`, `TerraMind.from_official(path, size)`.
  * `model(batch) -> (loss, {entry: loss})`: the pretraining loss (paper eq. 2)
    on a batch from masking.py: the data tensors per entry plus `input_mod`,
    `input_pos` (B, N_in) and `target_mod`, `target_pos` (B, N_tgt). Slot n of
    sample b reads entry ENTRIES[mod[b, n]] at position pos[b, n] (raster index
    of the token grid, or index into the sequence layout); mod = -1 marks
    padding. `model(batch, sums=True) -> (loss, (2, T))` gives per-entry
    cross-entropy sums and counts instead, with no host sync.
  * The step is static: every shape follows from the batch's shapes, never from
    the masks' contents. Entries are embedded at every slot and kept by
    `torch.where`; pixel entries project all their patches, as the official code
    does. So `torch.compile(model, fullgraph=True)` traces one graph that serves
    every mask (pretrain.py --compile).
  * Which output-head path runs where: on CPU in eager mode `heads_dense` gives
    each entry's head its own rows by boolean selection (exact work, host syncs
    are cheap there); compiled, and on GPU, `heads_static` runs fixed-size
    chunks of one entry each (more work, no sync).
  * `model.encode(inputs, layers=None, visible=None) -> Encoded`: fully visible
    inputs (or the positions where `visible[entry]` (B, N) is True).
    `Encoded.tokens[entry]` is the normed last layer (B, N, D),
    `Encoded.layers[i][entry]` the output of encoder block i (0-based; the last
    block normed, as the official backbone and PANGAEA take it),
    `Encoded.image(entry, layer)` (B, D, h, w) and `Encoded.merge("mean" |
    "concat", layer)` over the image entries (TiM / PANGAEA features).
  * `model.logits(inputs_or_encoded, target, positions=None, prefix=None,
    grid=None)` -> (B, K, V). Image target: logits at `positions` (B, K) of the
    (h, w) grid (default: every position, raster order); queries = mask token +
    position, attending to each other and to the encoder (official ROAR/MaskGIT
    step). Sequence target: teacher forcing on `prefix` (B, K) ids with causal
    self-attention; logits[:, i] predicts token i + 1 (official autoregressive
    step). Pass an `Encoded` to reuse one encoder pass.
  * `flops_per_token(config, n_in, n_tgt)`: training FLOPs per token (for MFU).

Image positions: a fixed 2D sin-cos table built for `config.grid`; other grids
bicubic-interpolate it, as the official code does (a model trained on 64 px
tiles uses grid=4, official weights 14). Linear layers and output heads are
cpu_linear's: on CPU in fp32 their matrix products run on oneDNN where a
one-time micro-benchmark finds it faster than PyTorch's default.

    python terramind.py info --size tiny                 # parameters, FLOPs per token
    python terramind.py info --size smoke --n-in 64 --n-tgt 64
    python terramind.py convert --official TerraMind_v1_base.pt --size base \
        --out ckpt/terramind_base.safetensors
Training runs in pretrain.py (CPU smoke, one GPU, torchrun); this file only
defines the model.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import heads
import official
from blocks import Block, DecoderBlock, layer_norm
from checkpoints import expect_kind, load_safetensors, save_safetensors
from cli import positive_int, run_main
from cpu_linear import Linear, linear
from entries import (ENTRIES, ENTRY_INDEX, OFFICIAL_INPUTS, OFFICIAL_TARGETS, PAD,
                     entry_kind, entry_modality)
from modalities import PATCH
from positions import SEQ_POSITIONS, resize_positions, sincos_1d, sincos_2d

# ------------------------------------------------------------------------------------------------
# Configuration

CHECKPOINT = "terramind.safetensors"   # the model file of a checkpoint folder


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a checkpoint folder -> the terramind.safetensors in
    it."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


@dataclass
class TerraMindConfig:
    dim: int = 192
    encoder_depth: int = 12
    decoder_depth: int = 4
    num_heads: int = 3
    mlp_hidden: int = 768
    # base/large: bias-free SwiGLU blocks; tiny/small: GELU MLP, biases everywhere
    swiglu: bool = False
    inputs: tuple = OFFICIAL_INPUTS     # entries with an encoder embedding
    targets: tuple = OFFICIAL_TARGETS   # entries with a decoder embedding + output head
    grid: int = 14      # side of the image token grid the 2D position table is built for
    # vocabulary overrides {entry: size} (shrunken test models)
    vocab: dict = field(default_factory=dict)

    def __post_init__(self):
        self.inputs, self.targets = tuple(self.inputs), tuple(self.targets)
        for e in self.inputs + self.targets:
            entry_kind(e)
        if bad := [e for e in self.targets if entry_kind(e) == "pixels"]:
            raise ValueError(f"pixel entries cannot be targets: {bad}")
        if self.dim % 4 or self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by 4 (2D sin-cos) "
                             f"and by num_heads")

    def vocab_size(self, entry: str) -> int:
        return self.vocab.get(entry, entry_modality(entry).vocab_size)

    @staticmethod
    def preset(size: str) -> "TerraMindConfig":
        if size not in PRESETS:
            raise KeyError(f"unknown size {size!r}; presets are {', '.join(PRESETS)}")
        return replace(PRESETS[size], vocab=dict(PRESETS[size].vocab))


# official sizes (terramind_register.py); smoke trains in seconds on a CPU on 64 px tiles
# (4 x 4 tokens)
PRESETS = {
    "tiny": TerraMindConfig(192, 12, 4, 3, 768),
    "small": TerraMindConfig(384, 12, 6, 6, 1536),
    "base": TerraMindConfig(768, 12, 12, 12, 2048, swiglu=True),
    "large": TerraMindConfig(1024, 24, 24, 16, 2730, swiglu=True),
    "smoke": TerraMindConfig(64, 2, 2, 2, 256, grid=4, inputs=ENTRIES,
                             targets=tuple(e for e in ENTRIES if entry_kind(e) != "pixels")),
}


def flops_per_token(config: TerraMindConfig, n_in: int = 256, n_tgt: int = 256) -> float:
    """Training FLOPs (forward + backward = 3 x forward matmuls) per
    input-or-target token of a pretraining sample with n_in input and n_tgt
    target slots. Counts the transformer, the context projection and the output
    heads (mean vocabulary of the targets); not the patch projections and table
    look-ups."""
    D, F_, L = config.dim, config.mlp_hidden, n_in + n_tgt
    mlp = (6 if config.swiglu else 4) * D * F_
    enc = config.encoder_depth * (n_in * (8 * D * D + mlp) + 4 * n_in * n_in * D)
    dec = config.decoder_depth * (n_tgt * (12 * D * D + mlp) + n_in * 4 * D * D
                                  + 4 * n_tgt * n_tgt * D + 4 * n_tgt * n_in * D)
    vocabs = [config.vocab_size(e) for e in config.targets]
    vocab = sum(vocabs) / max(len(config.targets), 1)
    return 3 * (enc + dec + n_in * 2 * D * D + n_tgt * 2 * D * vocab) / L


# ------------------------------------------------------------------------------------------------
# Encoder output

@dataclass
class Encoded:
    """One encoder pass. `tokens`/`layers` hold (B, N_e, D) per entry (zeros where
    an input was not visible); `context`, `emb`, `pad` are the dense encoder
    sequence the decoder attends to."""
    tokens: dict
    layers: dict
    grids: dict                  # image entry -> (h, w)
    context: torch.Tensor        # (B, M, D) normed encoder output
    emb: torch.Tensor            # (B, M, D) position + modality embeddings of the slots
    pad: torch.Tensor | None     # (B, M) True where a slot is padding, or None

    def image(self, entry: str, layer: int | None = None) -> torch.Tensor:
        """Features of an image entry as a map (B, D, h, w); `layer` None = normed
        last layer."""
        x = self.tokens[entry] if layer is None else self.layers[layer][entry]
        h, w = self.grids[entry]
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def merge(self, method: str = "mean", layer: int | None = None) -> torch.Tensor:
        """All image entries merged per patch (official TerraMindViT merge_method):
        mean -> (B, D, h, w), concat -> (B, D * n_images, h, w). Sequence
        entries are dropped, as officially."""
        maps = [self.image(e, layer) for e in self.grids]
        if method == "mean":
            return torch.stack(maps).mean(0)
        if method == "concat":
            return torch.cat(maps, dim=1)
        raise ValueError(f"merge method must be 'mean' or 'concat', got {method!r}")


# ------------------------------------------------------------------------------------------------
# The model

class TerraMind(nn.Module):
    def __init__(self, config: TerraMindConfig):
        super().__init__()
        self.config = c = config
        D = c.dim
        pix = [e for e in c.inputs if entry_kind(e) == "pixels"]
        # bias-free: modality identity comes from mod_emb (official)
        self.patch_proj = nn.ModuleDict({
            e: Linear(entry_modality(e).channels * PATCH * PATCH, D, bias=False) for e in pix})
        tokens = [e for e in c.inputs if e not in pix]
        self.input_emb = nn.ModuleDict({e: self._table(e) for e in tokens})
        # tied to the output heads
        self.target_emb = nn.ModuleDict({e: self._table(e) for e in c.targets})
        # shared by encoder and decoder
        entries = dict.fromkeys(c.inputs + c.targets)
        self.mod_emb = nn.ParameterDict({e: nn.Parameter(torch.zeros(D)) for e in entries})
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.encoder = nn.ModuleList(Block(c) for _ in range(c.encoder_depth))
        self.encoder_norm = layer_norm(D)
        self.decoder_proj_context = Linear(D, D)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_depth))
        self.decoder_norm = layer_norm(D)
        self._register_tables()
        self.static_heads = None   # None: see uses_static_heads; True/False forces one path
        self.init_weights()

    def _register_tables(self):
        """Fixed tables (buffers, not in the state dict): positions, entry kinds,
        head padding."""
        c, D = self.config, self.config.dim
        T = len(c.targets)
        self.register_buffer("pos_image", sincos_2d(c.grid, D), persistent=False)  # (grid^2, D)
        self.register_buffer("pos_seq", sincos_1d(SEQ_POSITIONS, D), persistent=False)  # (512, D)
        is_seq = [entry_kind(e) == "sequence" for e in ENTRIES]
        # index -1 = padding
        self.register_buffer("entry_is_seq", torch.tensor(is_seq + [False]), persistent=False)
        number = [c.targets.index(e) if e in c.targets else T for e in ENTRIES]
        # target number of each entry; -1 (padding) -> T
        self.register_buffer("target_number", torch.tensor(number + [T]), persistent=False)
        vocab = [c.vocab_size(e) for e in c.targets]
        sizes = torch.tensor(vocab, dtype=torch.long)[:, None]  # (T, 1)
        outside = torch.arange(max(vocab, default=1))[None] >= sizes  # (T, V)
        bias = torch.zeros(outside.shape).masked_fill(outside, float("-inf"))
        # (T, V) -inf past each vocabulary
        self.register_buffer("head_bias", bias, persistent=False)

    def _table(self, e):  # official: sequence tables have padding_idx 0
        padding = PAD if entry_kind(e) == "sequence" else None
        return nn.Embedding(self.config.vocab_size(e), self.config.dim, padding_idx=padding)

    def init_weights(self):
        """Official MAE-style init (.../model/terramind.py): xavier-uniform Linear
        (q, k, v and k, v fans taken apart), zero biases, N(0, 0.02) embeddings,
        mask token and modality embeddings."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / (m.weight.shape[0] / parts + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for e, m in self.target_emb.items():
            # official: the tied to_logits Linear is initialized after its table, so it wins
            # (xavier-uniform)
            nn.init.xavier_uniform_(m.weight)
        for p in [self.mask_token, *self.mod_emb.values()]:
            nn.init.normal_(p, std=0.02)

    # ---- embeddings of the slots (fixed shapes) ----------------------------------------------

    def image_positions(self, h: int, w: int) -> torch.Tensor:
        return resize_positions(self.pos_image, h, w)     # (h*w, D)

    def embed_inputs(self, data: dict, mod: torch.Tensor, pos: torch.Tensor):
        """Encoder slots -> content x and position+modality emb, both (B, N, D);
        padding slots stay 0. Fixed shapes: every input entry in `data` is
        looked up at every slot and kept where mod names it."""
        B, N = mod.shape
        x = self.mask_token.new_zeros(B, N, self.config.dim)
        emb = torch.zeros_like(x)
        for e in self.config.inputs:
            if e not in data:
                continue
            sel = (mod == ENTRY_INDEX[e])[..., None]      # (B, N, 1)
            content, pe = self._embed_input(e, data[e], pos, sel[..., 0])
            x = torch.where(sel, content.to(x.dtype), x)  # bf16 under autocast
            emb = torch.where(sel, pe + self.mod_emb[e], emb)
        return x, emb

    def _embed_input(self, e: str, t: torch.Tensor, pos: torch.Tensor, sel: torch.Tensor):
        """Content and position embedding (B, N, D) of entry e at every slot, as if
        every slot held e."""
        kind = entry_kind(e)
        if kind == "pixels":
            return self._embed_patches(e, t, pos)
        if kind == "tokens":
            p = pos.clamp(0, t[0].numel() - 1)            # (B, N)
            content = self.input_emb[e](t.flatten(1).gather(1, p))
            return content, self.image_positions(*t.shape[-2:])[p]
        # sequence: position = rank among the visible tokens of this sequence (official cumsum)
        p = pos.clamp(0, t.shape[1] - 1)
        rank = (sel.cumsum(1) - 1).clamp(min=0)           # (B, N)
        return self.input_emb[e](t.gather(1, p)), self.pos_seq[rank]

    def _embed_patches(self, e: str, t: torch.Tensor, pos: torch.Tensor):
        """Pixel entry e: project every 16x16 patch (features in row, col, channel
        order), then gather the slots."""
        B, C, H, W = t.shape
        h, w = H // PATCH, W // PATCH
        p = pos.clamp(0, h * w - 1)                       # (B, N)
        patches = t.reshape(B, C, h, PATCH, w, PATCH)
        patches = patches.permute(0, 2, 4, 3, 5, 1)       # (B, h, w, P, P, C)
        proj = self.patch_proj[e](patches.reshape(B, h * w, -1))  # (B, h*w, D)
        index = p[..., None].expand(-1, -1, proj.shape[-1])  # (B, N, D)
        content = proj.gather(1, index)                   # (B, N, D)
        return content, self.image_positions(h, w)[p]

    def embed_targets(self, data: dict, mod: torch.Tensor, pos: torch.Tensor):
        """Decoder slots -> queries (B, N, D) and target ids (B, N). Image targets:
        mask token + position; sequences: teacher forcing, the query reads token
        pos and predicts token pos + 1 (official). Fixed shapes, as
        embed_inputs."""
        B, N = mod.shape
        y = self.mask_token.new_zeros(B, N, self.config.dim)
        ids = torch.zeros(B, N, dtype=torch.long, device=mod.device)
        for e in self.config.targets:
            if e not in data:
                continue
            sel = mod == ENTRY_INDEX[e]                   # (B, N)
            t = data[e]
            emb = self.mod_emb[e]
            if entry_kind(e) == "tokens":
                p = pos.clamp(0, t[0].numel() - 1)
                target = t.flatten(1).gather(1, p)
                query = self.mask_token + (self.image_positions(*t.shape[-2:])[p] + emb)
            else:
                p = pos.clamp(0, t.shape[1] - 2)
                rank = (sel.cumsum(1) - 1).clamp(min=0)   # (B, N)
                target = t.gather(1, p + 1)
                query = self.target_emb[e](t.gather(1, p)) + (self.pos_seq[rank] + emb)
            ids = torch.where(sel, target, ids)
            y = torch.where(sel[..., None], query, y)
        return y, ids

    # ---- transformer -------------------------------------------------------------------------

    def forward_encoder(self, x, pad=None, layers=()):
        """x (B, N, D) -> normed output (B, N, D) and {block i: output}; pad (B, N)
        True = padding slot."""
        mask = None if pad is None else ~pad[:, None, None, :]  # (B, 1, 1, N)
        out = {}
        for i, blk in enumerate(self.encoder):
            x = blk(x, mask)
            if i in layers:
                out[i] = x
        x = self.encoder_norm(x)
        last = len(self.encoder) - 1
        if last in layers:  # official backbone: the last output is the normed one
            out[last] = x
        return x, out

    def forward_decoder(self, y, enc: Encoded, self_mask=None):
        """Queries y (B, K, D) -> decoder output (B, K, D); context = proj(encoder)
        + encoder emb (official)."""
        context = self.decoder_proj_context(enc.context) + enc.emb  # (B, M, D)
        cross_mask = None
        if enc.pad is not None:
            cross_mask = ~enc.pad[:, None, None, :]       # (B, 1, 1, M)
        for blk in self.decoder:
            y = blk(y, context, self_mask, cross_mask)
        return self.decoder_norm(y)

    def forward(self, batch: dict, sums: bool = False):
        """Pretraining step on a masking.py batch -> (loss, {entry:
        cross-entropy}): the loss is the mean over the target entries that have
        targets of their mean cross-entropy (paper eq. 2); entries without
        targets are left out of the dict (listing them is one host sync).
        sums=True returns (loss, (2, T)) instead: per target entry
        (config.targets order) the cross-entropy sum and the target count, every
        shape fixed by the batch's shapes alone, no host sync: the form the
        compiled step uses."""
        in_mod, in_pos = batch["input_mod"], batch["input_pos"]  # (B, N_in)
        tg_mod, tg_pos = batch["target_mod"], batch["target_pos"]  # (B, N_tgt)
        static = self.uses_static_heads(in_mod)
        if not static:  # cheap on CPU; the static path has nothing to sync on
            self._check_slots(in_mod, self.config.inputs, "input")
            self._check_slots(tg_mod, self.config.targets, "target")
        x, emb = self.embed_inputs(batch, in_mod, in_pos)  # (B, N_in, D)
        pad = in_mod < 0                                  # (B, N_in)
        if not static and not bool(pad.any()):
            pad = None   # CPU eager: SDPA without a mask is faster
        context, _ = self.forward_encoder(x + emb, pad)
        y, ids = self.embed_targets(batch, tg_mod, tg_pos)  # (B, N_tgt, D)
        enc = Encoded({}, {}, {}, context, emb, pad)
        y = self.forward_decoder(y, enc, self.decoder_self_mask(tg_mod))
        head_losses = self.heads_static if static else self.heads_dense
        ce, count = head_losses(y, ids, tg_mod)           # (T,), (T,)
        present = count > 0
        # absent entries: ce = 0, not counted
        loss = (ce / count.clamp(min=1)).sum() / present.sum()
        if sums:
            return loss, torch.stack([ce, count.to(ce.dtype)])  # (2, T)
        counts = count.tolist()
        if not any(counts):
            raise ValueError("batch has no target slots (all target_mod are -1)")
        losses = {}
        for j, (e, n) in enumerate(zip(self.config.targets, counts)):
            if n:
                losses[e] = ce[j] / n
        return loss, losses

    def decoder_self_mask(self, mod: torch.Tensor) -> torch.Tensor:
        """(B, 1, N, N) True = attend: within one entry only (official sep mask),
        causal for sequences."""
        same = mod[:, :, None] == mod[:, None, :]         # (B, N, N)
        later = torch.ones_like(same[0]).triu(1)          # (N, N) j > i
        causal = self.entry_is_seq[mod][:, :, None] & later  # (B, N, N)
        return (same & ~causal)[:, None]

    # ---- output heads --------------------------------------------------------------------------

    def uses_static_heads(self, x: torch.Tensor) -> bool:
        """`static_heads` when set, else: dense heads in CPU eager mode, static
        ones everywhere else."""
        if self.static_heads is not None:
            return self.static_heads
        return not x.is_cpu or torch.compiler.is_compiling()

    def heads_dense(self, y, ids, mod):
        """Cross-entropy sum and target count per target entry, (T,) each, by
        boolean selection: the CPU eager path (heads.dense_losses)."""
        return heads.dense_losses(self, y, ids, mod)

    def heads_static(self, y, ids, mod):
        """heads_dense with fixed shapes, in chunks of one entry each: compiled,
        and on GPU (heads.static_losses)."""
        return heads.static_losses(self, y, ids, mod)

    def entry_parameters(self) -> list:
        """The parameters of single entries (patch projections, token tables and
        heads, modality embeddings) and the mask token: the only ones that a
        batch without some entry leaves without a gradient."""
        return [*self.patch_proj.parameters(), *self.input_emb.parameters(),
                *self.target_emb.parameters(), *self.mod_emb.parameters(), self.mask_token]

    def compile_blocks(self, **options) -> "TerraMind":
        """torch.compile every encoder and decoder block in place. The blocks see
        fixed (B, N, D) shapes and have no data-dependent branches, so each
        compiles into one graph; the embeddings and losses around them stay
        eager. State-dict keys are unchanged. The step before issue 20;
        bench/pretrain_gpu.py --modes blocks compares it (pretrain.py --compile
        now compiles the whole model)."""
        for blk in [*self.encoder, *self.decoder]:
            blk.compile(**options)
        return self

    def _check_slots(self, mod, allowed, side):
        names = dict(enumerate(ENTRIES))
        used = set(mod.unique().tolist()) - {-1}
        if bad := [names.get(i, i) for i in used if names.get(i) not in allowed]:
            raise ValueError(f"batch has {side} slots of {bad}, which this model has no {side} "
                             f"embedding for (config.{side}s = {list(allowed)})")

    # ---- inference primitives ------------------------------------------------------------------

    def encode(self, inputs: dict, layers=None, visible: dict | None = None) -> Encoded:
        """inputs {entry: pixels (B, C, H, W) | token ids (B, h, w) | sequence ids
        (B, L)}; visible {entry: bool (B, N)} restricts an entry to some
        positions (default: all; sequences: ids != PAD)."""
        if not inputs:
            raise ValueError("encode needs at least one input")
        if bad := [i for i in (layers or ()) if not 0 <= i < len(self.encoder)]:
            raise ValueError(f"layers {bad} out of range for a {len(self.encoder)}-block encoder")
        mod, pos, vis, grids = self._encoder_slots(inputs, visible or {})  # (B, sum N_e)
        pad = None
        if not bool(vis.all()):
            # visible tokens first, in order (official stable sort), padded to the longest
            longest = int(vis.sum(1).max())
            order = torch.argsort((~vis).to(torch.uint8), dim=1, stable=True)[:, :longest]
            mod, pos, vis = mod.gather(1, order), pos.gather(1, order), vis.gather(1, order)
            mod = mod.masked_fill(~vis, -1)
            pad = ~vis if not bool(vis.all()) else None
        x, emb = self.embed_inputs(inputs, mod, pos)
        context, outs = self.forward_encoder(x + emb, pad, set(layers or ()))

        def per_entry(z):  # dense slots -> {entry: (B, N_e, D)}, zeros where not visible
            out = {}
            for e, t in inputs.items():
                n = math.prod(grids[e]) if e in grids else t.shape[1]
                full = z.new_zeros(z.shape[0], n, z.shape[2])
                b, k = (mod == ENTRY_INDEX[e]).nonzero(as_tuple=True)
                full[b, pos[b, k]] = z[b, k]
                out[e] = full
            return out
        layer_maps = {i: per_entry(z) for i, z in outs.items()}
        return Encoded(per_entry(context), layer_maps, grids, context, emb, pad)

    def _encoder_slots(self, inputs: dict, visible: dict):
        """Every position of every input as a slot: mod, pos, visible (B, sum N_e),
        and the (h, w) grid of each image entry."""
        mods, poss, vis, grids = [], [], [], {}
        for e, t in inputs.items():
            if e not in self.config.inputs:
                raise KeyError(f"model has no encoder embedding for {e!r}; "
                               f"inputs: {list(self.config.inputs)}")
            kind = entry_kind(e)
            self._check_input(e, t)
            if kind == "tokens":
                grids[e] = tuple(t.shape[-2:])
            elif kind == "pixels":
                grids[e] = (t.shape[2] // PATCH, t.shape[3] // PATCH)
            n = math.prod(grids[e]) if kind != "sequence" else t.shape[1]
            v = visible.get(e)
            if v is None and kind == "sequence":
                v = t != PAD
            if v is None:
                v = torch.ones(t.shape[0], n, dtype=torch.bool, device=t.device)
            vis.append(v.reshape(t.shape[0], n).to(torch.bool))
            mods.append(torch.full_like(vis[-1], ENTRY_INDEX[e], dtype=torch.long))
            poss.append(torch.arange(n, device=t.device).expand_as(vis[-1]))
        return torch.cat(mods, 1), torch.cat(poss, 1), torch.cat(vis, 1), grids

    def _check_input(self, e, t):
        kind, m = entry_kind(e), entry_modality(e)
        if kind == "pixels":
            bad_size = t.shape[2] % PATCH or t.shape[3] % PATCH
            if t.ndim != 4 or t.shape[1] != m.channels or bad_size:
                raise ValueError(f"{e}: expected standardized pixels (B, {m.channels}, H, W) with "
                                 f"H, W multiples of {PATCH}, got {tuple(t.shape)}")
            return
        if t.dtype.is_floating_point or t.ndim != (3 if kind == "tokens" else 2):
            shape = "(B, h, w)" if kind == "tokens" else "(B, L)"
            raise ValueError(f"{e}: expected integer token ids of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
        vocab = self.config.vocab_size(e)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{e}: token ids must lie in [0, {vocab}), got "
                             f"[{int(t.min())}, {int(t.max())}]")

    def logits(self, inputs, target: str, positions=None, prefix=None, grid=None):
        """Decoder logits (B, K, V) of `target` given `inputs` (a dict for
        `encode`, or an `Encoded`). Image target: K = positions (B, K) of the
        (h, w) grid (default every position; the grid comes from `grid`, else
        from the image inputs, else config.grid). Sequence target: `prefix` (B,
        K) ids, causal; logits[:, i] is the distribution of token i + 1."""
        if target not in self.config.targets:
            raise KeyError(f"model has no decoder embedding for {target!r}; "
                           f"targets: {list(self.config.targets)}")
        enc = inputs if isinstance(inputs, Encoded) else self.encode(inputs)
        B = enc.context.shape[0]
        emb = self.mod_emb[target]
        if entry_kind(target) == "tokens":
            default = (self.config.grid, self.config.grid)
            h, w = grid or next(iter(enc.grids.values()), default)
            if positions is None:
                positions = torch.arange(h * w, device=enc.context.device).expand(B, -1)
            pe = self.image_positions(h, w)[positions]    # (B, K, D)
            y = self.mask_token + (pe + emb)
            self_mask = None  # the queried positions see each other (official ROAR / MaskGIT)
        else:
            if prefix is None:
                raise ValueError(f"{target} is a sequence: pass prefix ids (B, K), "
                                 f"e.g. [[S_1]] to start")
            K = prefix.shape[1]
            y = self.target_emb[target](prefix) + (self.pos_seq[:K] + emb)
            self_mask = torch.ones(K, K, dtype=torch.bool, device=y.device).tril()  # causal
        y = self.forward_decoder(y, enc, self_mask)
        return linear(y, self.target_emb[target].weight)  # (B, K, V)

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path, **meta):
        save_safetensors(path, self.state_dict(), {"config": asdict(self.config), **meta})

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "TerraMind":
        """`path`: a checkpoint file or a checkpoint folder (its
        terramind.safetensors)."""
        path = checkpoint_file(path)
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "TerraMind model")
        model = cls(TerraMindConfig(**meta["config"])).to(device)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a TerraMind checkpoint of this config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model

    @classmethod
    def from_official(cls, state, size) -> "TerraMind":
        """Loads an official state dict (`TerraMind_v1_<size>.pt` path or dict)
        strictly, every key loaded or checked (official.py). `size` is a preset
        name or a TerraMindConfig; the modalities come from the keys."""
        name, state = official.read_state(state)
        config = TerraMindConfig.preset(size) if isinstance(size, str) else replace(size)
        config = official.official_config(state, config, name)
        meta = official.is_meta(state)
        with torch.device("meta" if meta else "cpu"):
            model = cls(config)
        loaded = official.official_weights(state, config, model.state_dict(), name)
        model.load_state_dict(loaded, strict=True, assign=meta)
        return model


# ------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="parameter count and training FLOPs per token of a preset")
    info.add_argument("--size", default="tiny", help="preset: " + ", ".join(PRESETS))
    info.add_argument("--n-in", type=positive_int, default=256,
                      help="input tokens per sample (for the FLOP count)")
    info.add_argument("--n-tgt", type=positive_int, default=256,
                      help="target tokens per sample (for the FLOP count)")
    conv = sub.add_parser("convert",
                          help="official TerraMind_v1_<size>.pt -> our safetensors checkpoint")
    conv.add_argument("--official", required=True, help="path of the official state dict (.pt)")
    conv.add_argument("--size", required=True,
                      help="preset the official file belongs to (tiny/small/base/large)")
    conv.add_argument("--out", required=True, help="output .safetensors path")
    args = p.parse_args()
    if args.cmd == "info":
        with torch.device("meta"):
            model = TerraMind(TerraMindConfig.preset(args.size))
        n = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
        flops = flops_per_token(model.config, args.n_in, args.n_tgt)
        print(f"{args.size}: {n:,} parameters | {flops / 1e6:.1f} MFLOP per token "
              f"(training, {args.n_in} input + {args.n_tgt} target tokens)")
    else:
        model = TerraMind.from_official(args.official, args.size)
        model.save_checkpoint(args.out, source=args.official)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
