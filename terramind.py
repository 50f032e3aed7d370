"""
TerraMind: the dual-scale any-to-any encoder-decoder (paper §3; 4M-style masked multimodal modelling).

The encoder reads pixel patches and discrete tokens of any modalities; the decoder predicts masked target
tokens of any token modality. Architecture, sizes and initialization follow the official implementation
(official: terratorch .../terramind/model/terramind.py, tm_utils.py); official `TerraMind_v1_<size>.pt`
weights load strictly.

Model inputs and targets are called *entries*, named from the modality table (terramesh.MODALITIES):
  * "S2L2A", "S2L1C", "S2RGB", "S1GRD", "S1RTC", "DEM": standardized pixels, float (B, C, H, W);
  * "tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI": FSQ token ids (B, h, w);
  * "caption", "coords": WordPiece token ids (B, L) (PAD = 0).
The pixel and token versions of one modality are different entries ("S2L2A" vs "tok_S2L2A"), everywhere:
encode, logits, masking budgets, batches. Only token entries can be targets.

Public API (`from terramind import TerraMind, TerraMindConfig`):
  * `TerraMind(TerraMindConfig.preset("tiny"))`, presets tiny/small/base/large (official) and smoke (CPU);
    `TerraMind.from_checkpoint(path)`, `model.save_checkpoint(path)`, `TerraMind.from_official(path, size)`.
  * `model(batch) -> (loss, {entry: loss})`: the pretraining loss (paper eq. 2) on a batch from masking.py:
    the data tensors per entry plus `input_mod`, `input_pos` (B, N_in) and `target_mod`, `target_pos`
    (B, N_tgt): slot n of sample b reads entry ENTRIES[mod[b, n]] at position pos[b, n] (raster index of
    the token grid, or index into the sequence layout), mod = -1 marks padding. `model(batch, sums=True)
    -> (loss, (2, T))` gives per-entry cross-entropy sums and counts instead, with no host sync.
    The step is static: every shape follows from the batch's shapes, never from the masks' contents (entries
    are embedded at every slot and kept by `torch.where`; pixel entries project all their patches, as the
    official code does), so `torch.compile(model, fullgraph=True)` traces it as one graph that serves every
    mask (pretrain.py --compile). Which output-head path runs where: on CPU in eager mode `heads_dense` gives
    each entry's head its own rows by boolean selection (exact work, host syncs are cheap there); compiled,
    and on GPU, `heads_static` runs fixed-size chunks of one entry each (more work, no sync).
  * `model.encode(inputs, layers=None, visible=None) -> Encoded`: fully visible inputs (or the positions
    where `visible[entry]` (B, N) is True). `Encoded.tokens[entry]` is the normed last layer (B, N, D),
    `Encoded.layers[i][entry]` the output of encoder block i (0-based; the last block normed, as the
    official backbone and PANGAEA take it), `Encoded.image(entry, layer)` (B, D, h, w) and
    `Encoded.merge("mean" | "concat", layer)` over the image entries (TiM / PANGAEA features).
  * `model.logits(inputs_or_encoded, target, positions=None, prefix=None, grid=None) -> (B, K, V)`:
    image target: logits at `positions` (B, K) of the (h, w) grid (default: every position, raster order),
    queries = mask token + position, attending to each other and to the encoder (official ROAR/MaskGIT
    step); sequence target: teacher forcing on `prefix` (B, K) ids with causal self-attention, logits[:, i]
    predicts token i + 1 (official autoregressive step). Pass an `Encoded` to reuse one encoder pass.
  * `flops_per_token(config, n_in, n_tgt)`: training FLOPs per token (for MFU); `ENTRIES`, `entry_kind`,
    `entry_modality`, `official_key` describe the entries.

Image positions: a fixed 2D sin-cos table built for `config.grid`; other grids bicubic-interpolate it, as
the official code does (a model trained on 64 px tiles uses grid=4, official weights use 14).
Linear layers and output heads are cpu_linear's: on CPU in fp32 their matrix products run on oneDNN where a
one-time micro-benchmark finds it faster than PyTorch's default.

    python terramind.py info --size tiny                                    # parameters, FLOPs per token
    python terramind.py info --size smoke --n-in 64 --n-tgt 64
    python terramind.py convert --official TerraMind_v1_base.pt --size base --out ckpt/terramind_base.safetensors
Training runs in pretrain.py (CPU smoke, one GPU, torchrun); this file only defines the model.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cli import positive_int, run_main
from cpu_linear import Linear, linear
from terramesh import MODALITIES, PATCH, expect_kind, load_safetensors, save_safetensors

# -----------------------------------------------------------------------------------------------------------
# Entries: what the model reads and predicts, derived from the modality table


def _entries():
    pixels = [m.name for m in MODALITIES.values() if m.pixel_key]
    tokens = ["tok_" + m.name for m in MODALITIES.values() if m.kind == "image" and m.token_key]
    return tuple(pixels + tokens + [m.name for m in MODALITIES.values() if m.kind == "sequence"])


ENTRIES = _entries()                          # fixed order; batch `*_mod` values index into it
ENTRY_INDEX = {e: i for i, e in enumerate(ENTRIES)}
PAD = 0                                       # WordPiece [PAD]; sequence positions holding it are not inputs
CHECKPOINT = "terramind.safetensors"         # the model file of a checkpoint folder (pretrain.py, release.py)
SEQ_POSITIONS = 512                           # official: 1D sin-cos table of 512 positions (tm_utils.py)
HEAD_CHUNK = 1024                             # rows per output-head chunk of TerraMind.heads_static


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a checkpoint folder -> the terramind.safetensors in it."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def entry_kind(entry: str) -> str:
    """'pixels', 'tokens' or 'sequence'; unknown names raise with the list of entries."""
    if entry not in ENTRY_INDEX:
        raise KeyError(f"unknown entry {entry!r}; entries are {', '.join(ENTRIES)}")
    if entry.startswith("tok_"):
        return "tokens"
    return "sequence" if MODALITIES[entry].kind == "sequence" else "pixels"


def entry_modality(entry: str):
    entry_kind(entry)
    return MODALITIES[entry.removeprefix("tok_")]


def official_key(entry: str) -> str:
    """The official state-dict / MODALITY_INFO key of an entry, e.g. 'tok_S2L2A' -> 'tok_sen2l2a@224'."""
    m = entry_modality(entry)
    return m.pixel_key if entry_kind(entry) == "pixels" else m.token_key


OFFICIAL_INPUTS = ("S2L2A", "S2L1C", "S2RGB", "S1GRD", "S1RTC", "DEM", "tok_S2L2A", "tok_S1GRD", "tok_S1RTC",
                   "tok_DEM", "tok_LULC", "tok_NDVI", "coords")    # the v1 checkpoints (assets/official/keys)
OFFICIAL_TARGETS = ("tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI", "coords")


@dataclass
class TerraMindConfig:
    dim: int = 192
    encoder_depth: int = 12
    decoder_depth: int = 4
    num_heads: int = 3
    mlp_hidden: int = 768
    swiglu: bool = False          # base/large: bias-free SwiGLU blocks; tiny/small: GELU MLP, biases everywhere
    inputs: tuple = OFFICIAL_INPUTS     # entries with an encoder embedding
    targets: tuple = OFFICIAL_TARGETS   # entries with a decoder embedding + output head
    grid: int = 14                # side of the image token grid the 2D position table is built for
    vocab: dict = field(default_factory=dict)  # vocabulary overrides {entry: size} (shrunken test models)

    def __post_init__(self):
        self.inputs, self.targets = tuple(self.inputs), tuple(self.targets)
        for e in self.inputs + self.targets:
            entry_kind(e)
        if bad := [e for e in self.targets if entry_kind(e) == "pixels"]:
            raise ValueError(f"pixel entries cannot be targets: {bad}")
        if self.dim % 4 or self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by 4 (2D sin-cos) and by num_heads")

    def vocab_size(self, entry: str) -> int:
        return self.vocab.get(entry, entry_modality(entry).vocab_size)

    @staticmethod
    def preset(size: str) -> "TerraMindConfig":
        if size not in PRESETS:
            raise KeyError(f"unknown size {size!r}; presets are {', '.join(PRESETS)}")
        return replace(PRESETS[size], vocab=dict(PRESETS[size].vocab))


PRESETS = {  # official sizes (terramind_register.py); smoke trains in seconds on a CPU on 64 px tiles (4 x 4 tokens)
    "tiny": TerraMindConfig(192, 12, 4, 3, 768),
    "small": TerraMindConfig(384, 12, 6, 6, 1536),
    "base": TerraMindConfig(768, 12, 12, 12, 2048, swiglu=True),
    "large": TerraMindConfig(1024, 24, 24, 16, 2730, swiglu=True),
    "smoke": TerraMindConfig(64, 2, 2, 2, 256, grid=4, inputs=ENTRIES,
                             targets=tuple(e for e in ENTRIES if entry_kind(e) != "pixels")),
}


def flops_per_token(config: TerraMindConfig, n_in: int = 256, n_tgt: int = 256) -> float:
    """Training FLOPs (forward + backward = 3 x forward matmuls) per input-or-target token of a pretraining
    sample with n_in input and n_tgt target slots. Counts the transformer, the context projection and the
    output heads (mean vocabulary of the targets); not the patch projections and table look-ups."""
    D, F_, L = config.dim, config.mlp_hidden, n_in + n_tgt
    mlp = (6 if config.swiglu else 4) * D * F_
    enc = config.encoder_depth * (n_in * (8 * D * D + mlp) + 4 * n_in * n_in * D)
    dec = config.decoder_depth * (n_tgt * (12 * D * D + mlp) + n_in * 4 * D * D
                                  + 4 * n_tgt * n_tgt * D + 4 * n_tgt * n_in * D)
    vocab = sum(config.vocab_size(e) for e in config.targets) / max(len(config.targets), 1)
    return 3 * (enc + dec + n_in * 2 * D * D + n_tgt * 2 * D * vocab) / L


# -----------------------------------------------------------------------------------------------------------
# Positions (official: MoCo-v3 sin-cos, .../model/tm_utils.py)

def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim): [sin(p w), cos(p w)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim), raster order: [sin(r w), cos(r w), sin(c w), cos(c w)] for row r, column c."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    a, b = r.reshape(-1, 1).float() * omega, c.reshape(-1, 1).float() * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)


def resize_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(g*g, D) -> (h*w, D) by bicubic interpolation (official interpolate_pos_encoding)."""
    g = math.isqrt(table.shape[0])
    if (g, g) == (h, w):
        return table
    grid = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)                          # (1, D, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)   # (1, D, h, w)
    return grid.permute(0, 2, 3, 1).reshape(h * w, -1)


# -----------------------------------------------------------------------------------------------------------
# Blocks (pre-norm; LayerNorm without bias; official names qkv/q/kv/proj/fc1-3 so state dicts map 1:1)

def layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6, bias=False)


class Attention(nn.Module):
    """Multi-head self-attention (qkv) or cross-attention (q from x, kv from context), through SDPA."""

    def __init__(self, dim, num_heads, bias, cross=False):
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        if cross:
            self.q, self.kv = Linear(dim, dim, bias=bias), Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim, bias=bias)

    def forward(self, x, context=None, mask=None):  # x (B, N, D), context (B, M, D), mask True = attend
        B, N, D = x.shape
        H = self.num_heads
        if self.cross:
            q = self.q(x).view(B, N, H, D // H).transpose(1, 2)                       # (B, H, N, D/H)
            k, v = self.kv(context).view(B, context.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, M, D/H)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)    # 3 x (B, H, N, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                  # (B, H, N, D/H)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, swiglu):
        super().__init__()
        self.swiglu = swiglu
        self.fc1, self.fc2 = Linear(dim, hidden, bias=not swiglu), Linear(hidden, dim, bias=not swiglu)
        if swiglu:  # official GatedMlp: fc2(silu(fc1 x) * fc3 x)
            self.fc3 = Linear(dim, hidden, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: TerraMindConfig):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(c.dim), layer_norm(c.dim)
        self.attn = Attention(c.dim, c.num_heads, not c.swiglu)
        self.mlp = Mlp(c.dim, c.mlp_hidden, c.swiglu)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention among the queries, cross-attention to the encoder (separate query/context norms), MLP."""

    def __init__(self, c: TerraMindConfig):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(c.dim), layer_norm(c.dim)
        self.query_norm, self.context_norm = layer_norm(c.dim), layer_norm(c.dim)
        self.self_attn = Attention(c.dim, c.num_heads, not c.swiglu)
        self.cross_attn = Attention(c.dim, c.num_heads, not c.swiglu, cross=True)
        self.mlp = Mlp(c.dim, c.mlp_hidden, c.swiglu)

    def forward(self, y, context, self_mask=None, cross_mask=None):
        y = y + self.self_attn(self.norm1(y), mask=self_mask)
        y = y + self.cross_attn(self.query_norm(y), self.context_norm(context), mask=cross_mask)
        return y + self.mlp(self.norm2(y))


# -----------------------------------------------------------------------------------------------------------
# Encoder output

@dataclass
class Encoded:
    """One encoder pass. `tokens`/`layers` hold (B, N_e, D) per entry (zeros where an input was not visible);
    `context`, `emb`, `pad` are the dense encoder sequence the decoder attends to."""
    tokens: dict
    layers: dict
    grids: dict                  # image entry -> (h, w)
    context: torch.Tensor        # (B, M, D) normed encoder output
    emb: torch.Tensor            # (B, M, D) position + modality embeddings of the encoder slots
    pad: torch.Tensor | None     # (B, M) True where a slot is padding, or None

    def image(self, entry: str, layer: int | None = None) -> torch.Tensor:
        """Features of an image entry as a map (B, D, h, w); `layer` None = normed last layer."""
        x = self.tokens[entry] if layer is None else self.layers[layer][entry]
        h, w = self.grids[entry]
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def merge(self, method: str = "mean", layer: int | None = None) -> torch.Tensor:
        """All image entries merged per patch (official TerraMindViT merge_method): mean -> (B, D, h, w),
        concat -> (B, D * n_images, h, w). Sequence entries are dropped, as officially."""
        maps = [self.image(e, layer) for e in self.grids]
        if method == "mean":
            return torch.stack(maps).mean(0)
        if method == "concat":
            return torch.cat(maps, dim=1)
        raise ValueError(f"merge method must be 'mean' or 'concat', got {method!r}")


# -----------------------------------------------------------------------------------------------------------
# The model

class TerraMind(nn.Module):
    def __init__(self, config: TerraMindConfig):
        super().__init__()
        self.config = c = config
        D = c.dim
        pix = [e for e in c.inputs if entry_kind(e) == "pixels"]
        self.patch_proj = nn.ModuleDict({  # bias-free: modality identity comes from mod_emb (official)
            e: Linear(entry_modality(e).channels * PATCH * PATCH, D, bias=False) for e in pix})
        self.input_emb = nn.ModuleDict({e: self._table(e) for e in c.inputs if e not in pix})
        self.target_emb = nn.ModuleDict({e: self._table(e) for e in c.targets})   # tied to the output heads
        self.mod_emb = nn.ParameterDict({e: nn.Parameter(torch.zeros(D))         # shared encoder/decoder
                                         for e in dict.fromkeys(c.inputs + c.targets)})
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.encoder = nn.ModuleList(Block(c) for _ in range(c.encoder_depth))
        self.encoder_norm = layer_norm(D)
        self.decoder_proj_context = Linear(D, D)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_depth))
        self.decoder_norm = layer_norm(D)
        self.register_buffer("pos_image", sincos_2d(c.grid, D), persistent=False)   # (grid^2, D)
        self.register_buffer("pos_seq", sincos_1d(SEQ_POSITIONS, D), persistent=False)  # (512, D)
        is_seq = torch.tensor([entry_kind(e) == "sequence" for e in ENTRIES] + [False])
        self.register_buffer("entry_is_seq", is_seq, persistent=False)  # index -1 = padding
        number = [c.targets.index(e) if e in c.targets else len(c.targets) for e in ENTRIES]
        self.register_buffer("target_number", torch.tensor(number + [len(c.targets)]), persistent=False)  # -1 -> T
        vocab = [c.vocab_size(e) for e in c.targets]
        outside = torch.arange(max(vocab, default=1))[None] >= torch.tensor(vocab, dtype=torch.long)[:, None]
        bias = torch.zeros(outside.shape).masked_fill(outside, float("-inf"))
        self.register_buffer("head_bias", bias, persistent=False)          # (T, V) -inf past each vocabulary
        self.static_heads = None   # None: see uses_static_heads; True/False forces one path (tests)
        self.init_weights()

    def _table(self, e):  # official: sequence tables have padding_idx 0
        return nn.Embedding(self.config.vocab_size(e), self.config.dim,
                            padding_idx=PAD if entry_kind(e) == "sequence" else None)

    def init_weights(self):
        """Official MAE-style init (.../model/terramind.py): xavier-uniform Linear (q, k, v and k, v fans taken apart),
        zero biases, N(0, 0.02) embeddings, mask token and modality embeddings."""
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
            # official: the tied to_logits Linear is initialized after its table, so it wins (xavier-uniform)
            nn.init.xavier_uniform_(m.weight)
        for p in [self.mask_token, *self.mod_emb.values()]:
            nn.init.normal_(p, std=0.02)

    # ---- embeddings of the slots (fixed shapes) --------------------------------------------------------------

    def image_positions(self, h: int, w: int) -> torch.Tensor:
        return resize_positions(self.pos_image, h, w)                                # (h*w, D)

    def embed_inputs(self, data: dict, mod: torch.Tensor, pos: torch.Tensor):
        """Encoder slots -> content x and position+modality emb, both (B, N, D); padding slots stay 0.
        Fixed shapes: every input entry in `data` is looked up at every slot and kept where mod names it."""
        B, N = mod.shape
        x = self.mask_token.new_zeros(B, N, self.config.dim)
        emb = torch.zeros_like(x)
        for e in self.config.inputs:
            if e not in data:
                continue
            sel = (mod == ENTRY_INDEX[e])[..., None]                                  # (B, N, 1)
            content, pe = self._embed_input(e, data[e], pos, sel[..., 0])
            x = torch.where(sel, content.to(x.dtype), x)                             # bf16 under autocast
            emb = torch.where(sel, pe + self.mod_emb[e], emb)
        return x, emb

    def _embed_input(self, e: str, t: torch.Tensor, pos: torch.Tensor, sel: torch.Tensor):
        """Content and position embedding (B, N, D) of entry e at every slot, as if every slot held e."""
        kind = entry_kind(e)
        if kind == "pixels":  # project every 16x16 patch, features (row, col, channel), then gather the slots
            B, C, H, W = t.shape
            h, w = H // PATCH, W // PATCH
            p = pos.clamp(0, h * w - 1)                                              # (B, N)
            patches = t.reshape(B, C, h, PATCH, w, PATCH).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
            proj = self.patch_proj[e](patches.reshape(B, h * w, -1))                 # (B, h*w, D)
            content = proj.gather(1, p[..., None].expand(-1, -1, proj.shape[-1]))   # (B, N, D)
            return content, self.image_positions(h, w)[p]
        if kind == "tokens":
            p = pos.clamp(0, t[0].numel() - 1)
            return self.input_emb[e](t.flatten(1).gather(1, p)), self.image_positions(*t.shape[-2:])[p]
        # sequence: position = rank among the visible tokens of this sequence (official cumsum)
        p = pos.clamp(0, t.shape[1] - 1)
        rank = (sel.cumsum(1) - 1).clamp(min=0)                                      # (B, N)
        return self.input_emb[e](t.gather(1, p)), self.pos_seq[rank]

    def embed_targets(self, data: dict, mod: torch.Tensor, pos: torch.Tensor):
        """Decoder slots -> queries (B, N, D) and target ids (B, N). Image targets: mask token + position;
        sequences: teacher forcing, the query reads token pos and predicts token pos + 1 (official).
        Fixed shapes, as embed_inputs."""
        B, N = mod.shape
        y = self.mask_token.new_zeros(B, N, self.config.dim)
        ids = torch.zeros(B, N, dtype=torch.long, device=mod.device)
        for e in self.config.targets:
            if e not in data:
                continue
            sel = mod == ENTRY_INDEX[e]                                              # (B, N)
            t = data[e]
            if entry_kind(e) == "tokens":
                p = pos.clamp(0, t[0].numel() - 1)
                target = t.flatten(1).gather(1, p)
                query = self.mask_token + (self.image_positions(*t.shape[-2:])[p] + self.mod_emb[e])
            else:
                p = pos.clamp(0, t.shape[1] - 2)
                rank = (sel.cumsum(1) - 1).clamp(min=0)                              # (B, N)
                target = t.gather(1, p + 1)
                query = self.target_emb[e](t.gather(1, p)) + (self.pos_seq[rank] + self.mod_emb[e])
            ids = torch.where(sel, target, ids)
            y = torch.where(sel[..., None], query, y)
        return y, ids

    # ---- transformer ---------------------------------------------------------------------------------------

    def forward_encoder(self, x, pad=None, layers=()):
        """x (B, N, D) -> normed output (B, N, D) and {block i: output}; pad (B, N) True = padding slot."""
        mask = None if pad is None else ~pad[:, None, None, :]                        # (B, 1, 1, N)
        out = {}
        for i, blk in enumerate(self.encoder):
            x = blk(x, mask)
            if i in layers:
                out[i] = x
        x = self.encoder_norm(x)
        if len(self.encoder) - 1 in layers:  # official backbone: the last output is the normed one
            out[len(self.encoder) - 1] = x
        return x, out

    def forward_decoder(self, y, enc: Encoded, self_mask=None):
        """Queries y (B, K, D) -> decoder output (B, K, D); context = proj(encoder) + encoder emb (official)."""
        context = self.decoder_proj_context(enc.context) + enc.emb                   # (B, M, D)
        cross_mask = None if enc.pad is None else ~enc.pad[:, None, None, :]          # (B, 1, 1, M)
        for blk in self.decoder:
            y = blk(y, context, self_mask, cross_mask)
        return self.decoder_norm(y)

    def forward(self, batch: dict, sums: bool = False):
        """Pretraining step on a masking.py batch -> (loss, {entry: cross-entropy}): the loss is the mean over
        the target entries that have targets of their mean cross-entropy (paper eq. 2); entries without
        targets are left out of the dict (listing them is one host sync). sums=True returns (loss, (2, T))
        instead: per target entry (config.targets order) the cross-entropy sum and the target count, every
        shape fixed by the batch's shapes alone, no host sync: the form the compiled step uses."""
        in_mod, in_pos = batch["input_mod"], batch["input_pos"]                      # (B, N_in)
        tg_mod, tg_pos = batch["target_mod"], batch["target_pos"]                    # (B, N_tgt)
        static = self.uses_static_heads(in_mod)
        if not static:  # cheap on CPU; the static path has nothing to sync on
            self._check_slots(in_mod, self.config.inputs, "input")
            self._check_slots(tg_mod, self.config.targets, "target")
        x, emb = self.embed_inputs(batch, in_mod, in_pos)                            # (B, N_in, D)
        pad = in_mod < 0                                                             # (B, N_in)
        if not static and not bool(pad.any()):
            pad = None   # CPU eager: SDPA without a mask is faster
        context, _ = self.forward_encoder(x + emb, pad)
        y, ids = self.embed_targets(batch, tg_mod, tg_pos)                           # (B, N_tgt, D), (B, N_tgt)
        y = self.forward_decoder(y, Encoded({}, {}, {}, context, emb, pad), self.decoder_self_mask(tg_mod))
        heads = self.heads_static if static else self.heads_dense
        ce, count = heads(y, ids, tg_mod)                                            # (T,), (T,)
        present = count > 0
        loss = (ce / count.clamp(min=1)).sum() / present.sum()   # absent entries: ce = 0, not counted
        if sums:
            return loss, torch.stack([ce, count.to(ce.dtype)])                      # (2, T)
        counts = count.tolist()
        if not any(counts):
            raise ValueError("batch has no target slots (all target_mod are -1)")
        return loss, {e: ce[j] / n for j, (e, n) in enumerate(zip(self.config.targets, counts)) if n}

    def decoder_self_mask(self, mod: torch.Tensor) -> torch.Tensor:
        """(B, 1, N, N) True = attend: within one entry only (official sep mask), causal for sequences."""
        same = mod[:, :, None] == mod[:, None, :]                                    # (B, N, N)
        later = torch.ones_like(same[0]).triu(1)                                     # (N, N) j > i
        return (same & ~(self.entry_is_seq[mod][:, :, None] & later))[:, None]

    def uses_static_heads(self, x: torch.Tensor) -> bool:
        """`static_heads` when set, else: dense heads in CPU eager mode, static ones everywhere else."""
        if self.static_heads is not None:
            return self.static_heads
        return not x.is_cpu or torch.compiler.is_compiling()

    def heads_dense(self, y, ids, mod):
        """Cross-entropy sum and target count per target entry (T,): each entry's head on its own rows, picked
        by boolean selection (shapes follow the masks; host syncs). Exact work: the CPU eager path."""
        ce, count = [], []
        for e in self.config.targets:
            sel = mod == ENTRY_INDEX[e]                                              # (B, N)
            count.append(sel.sum())
            if not bool(count[-1]):   # no head call: the entry's table stays without gradient
                ce.append(torch.zeros((), device=y.device))
                continue
            logits = linear(y[sel], self.target_emb[e].weight)                       # (K, V_e)
            ce.append(F.cross_entropy(logits, ids[sel], reduction="sum"))
        return torch.stack(ce), torch.stack(count)

    def heads_static(self, y, ids, mod):
        """heads_dense with fixed shapes. The R = B * N target rows are dispatched, entry by entry, into K chunks
        of `chunk` rows that each hold a single entry (K = R // chunk + T covers any split of R rows over T
        entries); chunk k goes through its entry's head, padded to the largest vocabulary V (padded logits
        -inf). Extra work over dense: the empty chunk rows and the vocabulary padding."""
        T, D = len(self.config.targets), y.shape[-1]
        g = self.target_number[mod].flatten()                                        # (R,) T = padding slot
        R = g.shape[0]
        chunk = max(16, min(HEAD_CHUNK, R // (4 * T)))
        K = R // chunk + T
        one_hot = g[:, None] == torch.arange(T, device=g.device)                    # (R, T)
        count = one_hot.sum(0)                                                       # (T,)
        entry = g.clamp(max=T - 1)                                                   # (R,) padding: any entry
        rank = (one_hot.cumsum(0) - 1).gather(1, entry[:, None])[:, 0]              # (R,) row's rank in its entry
        n_chunks = (count + chunk - 1) // chunk                                      # (T,)
        first = n_chunks.cumsum(0) - n_chunks                                        # (T,) first chunk per entry
        dest = torch.where(g < T, first[entry] * chunk + rank, K * chunk)           # (R,) padding -> spare row
        rows = torch.arange(R, device=g.device)
        src = torch.full((K * chunk + 1,), R, device=g.device).scatter(0, dest, rows)[:-1]  # (K*chunk,) R = empty
        y_rows = torch.cat([y.reshape(R, D), y.new_zeros(1, D)])[src]               # (K*chunk, D)
        id_rows = torch.cat([ids.flatten(), ids.new_zeros(1)])[src]                 # (K*chunk,)
        chunk_entry = (torch.arange(K, device=g.device)[:, None] >= n_chunks.cumsum(0)).sum(1).clamp(max=T - 1)
        weights = self.stacked_heads(y)[chunk_entry]                                 # (K, V, D)
        outside = self.head_bias[chunk_entry][:, None]                               # (K, 1, V) -inf past V_e
        logits = torch.baddbmm(outside, y_rows.view(K, chunk, D), weights.transpose(1, 2))  # (K, chunk, V)
        ce = F.cross_entropy(logits.flatten(0, 1), id_rows, reduction="none")      # (K*chunk,)
        ce = (ce * (src < R)).view(K, chunk).sum(1)                                  # (K,) empty rows count 0
        return torch.zeros(T, device=y.device).index_add(0, chunk_entry, ce), count

    def stacked_heads(self, like: torch.Tensor) -> torch.Tensor:
        """The output heads (T, V, D), zero rows past each vocabulary; in the autocast dtype when autocast is on
        (cast before the per-chunk gather, which then moves half the bytes)."""
        V = self.head_bias.shape[1]
        heads = [self.target_emb[e].weight for e in self.config.targets]
        stacked = torch.stack([F.pad(w, (0, 0, 0, V - w.shape[0])) for w in heads])  # (T, V, D)
        if torch.is_autocast_enabled(like.device.type):
            return stacked.to(torch.get_autocast_dtype(like.device.type))
        return stacked

    def entry_parameters(self) -> list:
        """The parameters of single entries (patch projections, token tables and heads, modality embeddings)
        and the mask token: the only ones that a batch without some entry leaves without a gradient."""
        return [*self.patch_proj.parameters(), *self.input_emb.parameters(), *self.target_emb.parameters(),
                *self.mod_emb.parameters(), self.mask_token]

    def compile_blocks(self, **options) -> "TerraMind":
        """torch.compile every encoder and decoder block in place. The blocks see fixed (B, N, D) shapes and
        have no data-dependent branches, so each compiles into one graph; the embeddings and losses around them
        stay eager. State-dict keys are unchanged. The step before issue 20; bench/pretrain_gpu.py --modes blocks
        compares it (pretrain.py --compile now compiles the whole model)."""
        for blk in [*self.encoder, *self.decoder]:
            blk.compile(**options)
        return self

    def _check_slots(self, mod, allowed, side):
        names = dict(enumerate(ENTRIES))
        if bad := [names.get(i, i) for i in set(mod.unique().tolist()) - {-1} if names.get(i) not in allowed]:
            raise ValueError(f"batch has {side} slots of {bad}, which this model has no {side} embedding for "
                             f"(config.{side}s = {list(allowed)})")

    # ---- inference primitives -------------------------------------------------------------------------------

    def encode(self, inputs: dict, layers=None, visible: dict | None = None) -> Encoded:
        """inputs {entry: pixels (B, C, H, W) | token ids (B, h, w) | sequence ids (B, L)}; visible {entry:
        bool (B, N)} restricts an entry to some positions (default: all; sequences: ids != PAD)."""
        if not inputs:
            raise ValueError("encode needs at least one input")
        if bad := [i for i in (layers or ()) if not 0 <= i < len(self.encoder)]:
            raise ValueError(f"layers {bad} out of range for a {len(self.encoder)}-block encoder")
        mods, poss, vis, grids = [], [], [], {}
        for e, t in inputs.items():
            if e not in self.config.inputs:
                raise KeyError(f"model has no encoder embedding for {e!r}; inputs: {list(self.config.inputs)}")
            kind = entry_kind(e)
            self._check_input(e, t)
            if kind != "sequence":  # (h, w) token grid
                grids[e] = tuple(t.shape[-2:]) if kind == "tokens" else (t.shape[2] // PATCH, t.shape[3] // PATCH)
            n = math.prod(grids[e]) if kind != "sequence" else t.shape[1]
            v = (visible or {}).get(e)
            v = (t != PAD) if v is None and kind == "sequence" else v
            vis.append(torch.ones(t.shape[0], n, dtype=torch.bool, device=t.device) if v is None
                       else v.reshape(t.shape[0], n).to(torch.bool))
            mods.append(torch.full_like(vis[-1], ENTRY_INDEX[e], dtype=torch.long))
            poss.append(torch.arange(n, device=t.device).expand_as(vis[-1]))
        mod, pos, vis = torch.cat(mods, 1), torch.cat(poss, 1), torch.cat(vis, 1)   # (B, sum N_e)
        pad = None
        if not bool(vis.all()):  # visible tokens first, in order (official stable sort), padded to the longest
            order = torch.argsort((~vis).to(torch.uint8), dim=1, stable=True)[:, :int(vis.sum(1).max())]
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
        return Encoded(per_entry(context), {i: per_entry(z) for i, z in outs.items()}, grids, context, emb, pad)

    def _check_input(self, e, t):
        kind, m = entry_kind(e), entry_modality(e)
        if kind == "pixels":
            if t.ndim != 4 or t.shape[1] != m.channels or t.shape[2] % PATCH or t.shape[3] % PATCH:
                raise ValueError(f"{e}: expected standardized pixels (B, {m.channels}, H, W) with H, W multiples "
                                 f"of {PATCH}, got {tuple(t.shape)}")
            return
        if t.dtype.is_floating_point or t.ndim != (3 if kind == "tokens" else 2):
            raise ValueError(f"{e}: expected integer token ids of shape {'(B, h, w)' if kind == 'tokens' else '(B, L)'}"
                             f", got {t.dtype} {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size(e)):
            raise ValueError(f"{e}: token ids must lie in [0, {self.config.vocab_size(e)}), got "
                             f"[{int(t.min())}, {int(t.max())}]")

    def logits(self, inputs, target: str, positions=None, prefix=None, grid=None) -> torch.Tensor:
        """Decoder logits (B, K, V) of `target` given `inputs` (a dict for `encode`, or an `Encoded`).
        Image target: K = positions (B, K) of the (h, w) grid (default every position; the grid comes from
        `grid`, else from the image inputs, else config.grid). Sequence target: `prefix` (B, K) ids, causal;
        logits[:, i] is the distribution of token i + 1."""
        if target not in self.config.targets:
            raise KeyError(f"model has no decoder embedding for {target!r}; targets: {list(self.config.targets)}")
        enc = inputs if isinstance(inputs, Encoded) else self.encode(inputs)
        B = enc.context.shape[0]
        if entry_kind(target) == "tokens":
            h, w = grid or next(iter(enc.grids.values()), (self.config.grid, self.config.grid))
            if positions is None:
                positions = torch.arange(h * w, device=enc.context.device).expand(B, -1)
            pe = self.image_positions(h, w)[positions]                               # (B, K, D)
            y = self.mask_token + (pe + self.mod_emb[target])
            self_mask = None  # the queried positions see each other (official ROAR / MaskGIT step)
        else:
            if prefix is None:
                raise ValueError(f"{target} is a sequence: pass prefix ids (B, K), e.g. [[S_1]] to start")
            K = prefix.shape[1]
            y = self.target_emb[target](prefix) + (self.pos_seq[:K] + self.mod_emb[target])
            self_mask = torch.ones(K, K, dtype=torch.bool, device=y.device).tril()   # causal
        y = self.forward_decoder(y, enc, self_mask)
        return linear(y, self.target_emb[target].weight)                             # (B, K, V)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, path, **meta):
        save_safetensors(path, self.state_dict(), {"config": asdict(self.config), **meta})

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "TerraMind":
        """`path`: a checkpoint file or a checkpoint folder (its terramind.safetensors)."""
        path = checkpoint_file(path)
        tensors, meta = load_safetensors(path, device)
        expect_kind(path, meta, "TerraMind model")
        model = cls(TerraMindConfig(**meta["config"])).to(device)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a TerraMind checkpoint of this config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        return model

    @classmethod
    def from_official(cls, state, size) -> "TerraMind":
        """Loads an official state dict (`TerraMind_v1_<size>.pt` path or dict) strictly, every key loaded or
        checked (official.py). `size` is a preset name or a TerraMindConfig; the modalities come from the keys."""
        from official import terramind_from_official   # official.py builds on this file
        return terramind_from_official(state, size)


# -----------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="parameter count and training FLOPs per token of a preset")
    info.add_argument("--size", default="tiny", help="preset: " + ", ".join(PRESETS))
    info.add_argument("--n-in", type=positive_int, default=256, help="input tokens per sample (for the FLOP count)")
    info.add_argument("--n-tgt", type=positive_int, default=256, help="target tokens per sample (for the FLOP count)")
    conv = sub.add_parser("convert", help="official TerraMind_v1_<size>.pt -> our safetensors checkpoint")
    conv.add_argument("--official", required=True, help="path of the official state dict (.pt)")
    conv.add_argument("--size", required=True, help="preset the official file belongs to (tiny/small/base/large)")
    conv.add_argument("--out", required=True, help="output .safetensors path")
    args = p.parse_args()
    if args.cmd == "info":
        with torch.device("meta"):
            model = TerraMind(TerraMindConfig.preset(args.size))
        n = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
        flops = flops_per_token(model.config, args.n_in, args.n_tgt)
        print(f"{args.size}: {n:,} parameters | {flops / 1e6:.1f} MFLOP per token (training, {args.n_in} input + "
              f"{args.n_tgt} target tokens)")
    else:
        model = TerraMind.from_official(args.official, args.size)
        model.save_checkpoint(args.out, source=args.official)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
