"""
TerraMind's image tokenizers: FSQ autoencoders that turn an image modality into a grid of discrete tokens
(one per 16x16 patch, 14x14 for a 224 px tile) and back (paper §3.1; official: terratorch .../terramind/tokenizer/).

`FSQ` (sigmoid-bounded like the released weights: 8-8-8-6-5 = 15360 codes, LULC 7-5-5-5-5 = 4375), a ViT
encoder, and a decoder: diffusion (`diffusion_decoder.DiffusionDecoder`) or, for LULC, a ViT giving class
logits. `ImageTokenizer`: `encode(x) -> (B, H/16, W/16)`, `decode(tokens, steps=10, generator=None)` in
standardized units (LULC: logits), `from_checkpoint`, `from_official`; `load_tokenizers(folder)`. Presets:
`official` (the released v1 architecture), `tiny` (64 px, minutes on a CPU), `smoke` (a minute on 2 cores).

It consumes a TerraMesh-layout folder (terramesh.py) and writes `<out>/tokenizer_<MOD>.safetensors` (weights,
the EMA weights with --ema, config in the metadata), `<out>/tokenizer_<MOD>.state.safetensors` (raw weights
and optimizer state for --resume), token shards, and reconstruction pictures with metrics (metrics.py).

Token shards: `<out>/<MOD>/shard_<k>.safetensors` (terramesh.save_safetensors, atomic), one per --shard-size
samples in sorted id order; tensor "tokens" int16 (n, h, w); metadata "ids" (row order), "modality",
"vocab_size", "tokenizer" (checksum of the tokenizer file). A re-run skips shards whose ids and tokenizer
match. `TokenShards(folder).get("S2L2A", "00042") -> LongTensor (h, w)` reads them back.

    # CPU smoke run (synthetic world, 64 px tiles)
    python terramesh.py synth --out data/synth --n 2000 --size 64
    python fsq_tokenizer.py train --modality S2L2A S1GRD DEM NDVI LULC --data data/synth --size smoke --out ckpt/
    python fsq_tokenizer.py tokenize --data data/synth --tokenizers ckpt/ --out tokens/
    python fsq_tokenizer.py reconstruct --modality S2L2A --data data/synth --tokenizers ckpt/ --out out/tok
    python fsq_tokenizer.py reconstruct --modality DEM --data data/synth --tokenizers ckpt/ --steps 1 2 5 10 25 50 \\
        --out out/tok_steps                                   # quality and time per image against DDIM steps
    # one GPU, official architecture and the paper's recipe (§8.1: 100 epochs, base lr 1e-4 x global batch / 256,
    # fp16 autocast for the diffusion tokenizers, EMA 0.9999, random crops); --steps / --lr / --ema override
    python fsq_tokenizer.py train --modality DEM --data /data/terramesh --size official --workers 8 --out ckpt/
    # several GPUs (DDP); --batch-size is per GPU (32 x 8 GPUs = the paper's global batch 256)
    torchrun --standalone --nproc_per_node=8 fsq_tokenizer.py train --modality DEM --data /data/terramesh \\
        --size official --workers 8 --out ckpt/
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

import terramesh
from cli import (TrainingDiverged, decay, distinct_outputs, nonnegative_float, nonnegative_int, output_file,
                 positive_float, positive_int, run_main, torch_device, writable_folder)
from diffusion_decoder import DiffusionDecoder
from metrics import codebook_usage, physical, reconstruction_metrics
from terramesh import TerraMeshDataset, expect_kind, load_safetensors, save_safetensors

DECODE_STEPS = 10            # DDIM steps of the diffusion decoders: the official notebooks and HF cards use 10
OFFICIAL_DECODE_STEPS = 50   # official: DiVAE.decode_quant and TerraMindGeneration default timesteps=50

# -----------------------------------------------------------------------------------------------------------
# Finite scalar quantization


class FSQ(nn.Module):
    """Per latent channel with L levels: n = round(sigmoid(z) * (L - 1)), straight-through gradient, code
    n / (L - 1) in [0, 1]; token index sum n_i * basis_i, first channel least significant
    (official: .../tokenizer/quantizers/quantize_finite_scalar.py).
    DEVIATION from the FSQ paper (tanh bound, offset for even L): the released weights use the sigmoid, which
    gives every L exactly L values without an offset. No parameters, no auxiliary loss."""

    def __init__(self, levels):
        super().__init__()
        self.vocab_size = math.prod(levels)
        levels = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        self.register_buffer("levels", levels.view(-1, 1, 1), persistent=False)      # (d, 1, 1)
        self.register_buffer("basis", basis.view(-1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) latent -> codes (B, d, h, w) in [0, 1], indices (B, h, w) int64."""
        scaled = torch.sigmoid(z) * (self.levels - 1)
        n = scaled + (scaled.round() - scaled).detach()                            # round, straight-through
        return n / (self.levels - 1), (n.detach().long() * self.basis).sum(1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, d, h, w)."""
        return (indices.long().unsqueeze(1) // self.basis) % self.levels / (self.levels - 1)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) codes on the grid -> (B, h, w)."""
        return ((codes * (self.levels - 1)).round().long() * self.basis).sum(1)


# -----------------------------------------------------------------------------------------------------------
# ViT encoder and decoder (official: vit_b_enc / vit_b_dec, .../tokenizer/models/vit_models.py)

def sincos_table(n: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed (1, dim, n, n) position table, channels [sin(row), cos(row), sin(col), cos(col)] (MoCo v3)."""
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    r = torch.arange(n, dtype=torch.float32)[:, None] * omega                      # (n, D/4)
    r = torch.cat([r.sin(), r.cos()], 1)                                            # (n, D/2)
    table = torch.cat([r[:, None].expand(n, n, -1), r[None].expand(n, n, -1)], -1)   # (n, n, D)
    return table.permute(2, 0, 1)[None].contiguous()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (s h e) -> s b h n e", s=3, h=self.heads)   # (B, h, N, D/h)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)"))


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6, GELU MLP x4."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linear(m: nn.Linear, qkv: bool = False):
    """Official ViT init: xavier-uniform (the qkv bound per q/k/v part), zero bias. The patch convolution keeps
    PyTorch's default init, as in the official code."""
    bound = math.sqrt(6.0 / (m.weight.shape[0] // (3 if qkv else 1) + m.weight.shape[1]))
    nn.init.uniform_(m.weight, -bound, bound)
    nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Trunk of both: + interpolated sin-cos positions, blocks (no final norm), residual tanh post-MLP."""

    def __init__(self, dim: int, depth: int, heads: int, grid: int):
        super().__init__()
        self.register_buffer("pos_emb", sincos_table(grid, dim))   # official: frozen Parameter (1, D, n, n)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_mlp, self.post_mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim, act=nn.Tanh)  # ViT-VQGAN
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                init_linear(m, qkv="qkv" in name)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w)."""
        h, w = x.shape[-2:]
        pos = F.interpolate(self.pos_emb, size=(h, w), mode="bicubic", align_corners=False)
        x = rearrange(x + pos, "b d h w -> b (h w) d")                                # (B, N, D)
        for block in self.blocks:
            x = block(x)
        # official encoder: post-MLP in float32 with autocast off (DEVIATION: the decoder's too)
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() + self.post_mlp(self.norm_mlp(x.float()))
        return rearrange(x, "b (h w) d -> b d h w", h=h)


class ViTEncoder(ViT):
    def __init__(self, in_channels: int, dim: int, depth: int, heads: int, grid: int):
        super().__init__(dim, depth, heads, grid)
        self.proj = nn.Conv2d(in_channels, dim, 16, stride=16)

    def forward(self, x):
        """(B, C, H, W) -> (B, D, H/16, W/16)."""
        return self.trunk(self.proj(x))


class ViTDecoder(ViT):
    def __init__(self, out_channels: int, dim: int, depth: int, heads: int, grid: int):
        super().__init__(dim, depth, heads, grid)
        self.out_proj = nn.Linear(dim, out_channels * 16 * 16)
        init_linear(self.out_proj)

    def forward(self, x):
        """(B, D, h, w) -> (B, C, 16 h, 16 w)."""
        x = self.out_proj(rearrange(self.trunk(x), "b d h w -> b h w d"))
        return rearrange(x, "b h w (c p q) -> b c (h p) (w q)", p=16, q=16)


# -----------------------------------------------------------------------------------------------------------
# The tokenizer

@dataclass
class TokenizerConfig:
    modality: str = "S2L2A"      # channels, FSQ levels and decoder type come from terramesh.MODALITIES
    image_size: int = 256        # the position tables are built for it (official 256); inputs: multiples of 16
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 768           # ViT decoder (LULC)
    dec_depth: int = 12
    dec_heads: int = 12
    unet_channels: int = 256     # diffusion decoder
    unet_mult: tuple = (1, 2, 2, 2)
    unet_blocks: int = 3
    unet_attn: tuple = (4, 8)    # downsampling rates with self-attention
    latent_dim: int = 5

    @staticmethod
    def preset(size: str, modality: str) -> "TokenizerConfig":
        if size not in PRESETS:
            raise ValueError(f"unknown tokenizer size {size!r}; presets: {', '.join(PRESETS)}")
        if terramesh.modality(modality).fsq_levels is None:
            raise ValueError(f"{modality} has no image tokenizer; those are {terramesh.TOKENIZED_IMAGES}")
        return replace(PRESETS[size], modality=modality)


PRESETS = {
    "official": TokenizerConfig(),                                     # ViT-B + UNet 256 x (1,2,2,2)
    "tiny": TokenizerConfig(image_size=64, enc_dim=128, enc_depth=2, enc_heads=4, dec_dim=128, dec_depth=2,
                            dec_heads=4, unet_channels=32, unet_mult=(1, 2, 2), unet_blocks=1, unet_attn=(4,)),
    "smoke": TokenizerConfig(image_size=64, enc_dim=64, enc_depth=1, enc_heads=2, dec_dim=64, dec_depth=1,
                             dec_heads=2, unet_channels=32, unet_mult=(1, 2), unet_blocks=1, unet_attn=())}


class ImageTokenizer(nn.Module):
    """Encoder -> 1x1 quant_proj -> FSQ -> decoder, with the parameter names of the official DiVAE / VQVAE."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        m, grid = terramesh.modality(cfg.modality), cfg.image_size // 16
        self.cfg, self.modality = cfg, m.name
        self.channels = len(terramesh.LULC_CLASSES) if m.name == "LULC" else m.channels   # LULC: one-hot
        self.encoder = ViTEncoder(self.channels, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, grid)
        self.quant_proj = nn.Conv2d(cfg.enc_dim, cfg.latent_dim, 1)
        self.quantize = FSQ(m.fsq_levels)
        if m.decoder == "diffusion":
            self.decoder = DiffusionDecoder(self.channels, cfg.latent_dim, cfg.unet_channels, cfg.unet_mult,
                                            cfg.unet_blocks, cfg.unet_attn)
        else:   # official VQVAE: post_quant_proj to the decoder width, then the ViT decoder
            self.decoder = ViTDecoder(self.channels, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, grid)
            self.post_quant_proj = nn.Conv2d(cfg.latent_dim, cfg.dec_dim, 1)

    @property
    def vocab_size(self) -> int:
        return self.quantize.vocab_size

    def encode_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x standardized (B, C, H, W) or a LULC class map (B, H, W) -> codes (B, 5, H/16, W/16), token ids
        (B, H/16, W/16). LULC is one-hot encoded here, as inside the official encoder."""
        if self.modality == "LULC" and x.dim() == 3:
            if x.min() < 0 or x.max() >= self.channels:
                raise ValueError(f"LULC classes must lie in 0..{self.channels - 1}, got {x.min()}..{x.max()}")
            x = F.one_hot(x.long(), self.channels).permute(0, 3, 1, 2)                 # (B, 10, H, W)
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"the {self.modality} tokenizer takes (B, {self.channels}, H, W) (LULC also (B, H, W) "
                             f"classes) with H, W multiples of 16, got {tuple(x.shape)}")
        return self.quantize(self.quant_proj(self.encoder(x.float())))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x standardized (B, C, H, W) (LULC: (B, H, W) class map) -> token ids (B, H/16, W/16) int64."""
        return self.encode_codes(x)[1]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, steps: int = DECODE_STEPS, generator=None, noise=None, clip=1.0):
        """tokens (B, h, w) -> (B, C, 16 h, 16 w) standardized (LULC: class logits (B, 10, 16 h, 16 w)).
        Diffusion: `steps` DDIM steps from `noise` or torch.randn(generator=generator), every predicted x0
        clipped to [-clip, clip] (official 1.0; None: unbounded). LULC ignores these arguments."""
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids lie in 0..{self.vocab_size - 1}, got {tokens.min()}..{tokens.max()}")
        codes = self.quantize.indices_to_codes(tokens)                                 # (B, 5, h, w)
        if isinstance(self.decoder, ViTDecoder):
            return self.decoder(self.post_quant_proj(codes))
        size = (tokens.shape[-2] * 16, tokens.shape[-1] * 16)
        return self.decoder.sample(codes, size, steps, generator=generator, noise=noise, clip=clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch: x0-prediction MSE (diffusion) or cross-entropy over the classes (LULC)."""
        codes, _ = self.encode_codes(x)
        if isinstance(self.decoder, ViTDecoder):
            return F.cross_entropy(self.decoder(self.post_quant_proj(codes)).float(), x.long())
        return self.decoder.loss(x.float(), codes)

    def save_checkpoint(self, path, **meta):
        save_safetensors(path, self.state_dict(), {"config": asdict(self.cfg), "kind": "tokenizer", **meta})

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "ImageTokenizer":
        tensors, meta = load_safetensors(path)
        expect_kind(path, meta, "image tokenizer")
        model = cls(TokenizerConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in meta["config"].items()}))
        load_state_strict(model, tensors, path)
        return model.to(device).eval()

    @classmethod
    def from_official(cls, path, modality: str, device="cpu") -> "ImageTokenizer":
        """Loads an official TerraMind_Tokenizer_<MOD>.pt state dict strictly: every key used, none missing."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(TokenizerConfig.preset("official", modality))
        load_state_strict(model, sd.get("model", sd), path)
        return model.to(device).eval()


def load_state_strict(model: ImageTokenizer, sd: dict, source):
    """load_state_dict(strict=True) with an error that names the file and the offending keys."""
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    bad = sorted(k for k in set(ours) & set(sd) if tuple(ours[k].shape) != tuple(sd[k].shape))
    if missing or extra or bad:
        raise ValueError(f"{source}: does not fit the {model.modality} tokenizer: missing {missing[:4]} "
                         f"({len(missing)}), unexpected {extra[:4]} ({len(extra)}), wrong shape {bad[:4]}")
    model.load_state_dict(sd, strict=True)


def tokenizer_path(folder, modality: str) -> Path:
    return Path(folder) / f"tokenizer_{modality}.safetensors"


def load_tokenizers(folder, modalities=None, device="cpu") -> dict[str, ImageTokenizer]:
    """{modality: ImageTokenizer} for every tokenizer_<MOD>.safetensors in `folder` (or exactly `modalities`)."""
    names = modalities or [m for m in terramesh.TOKENIZED_IMAGES if tokenizer_path(folder, m).exists()]
    missing = [m for m in names if not tokenizer_path(folder, m).exists()]
    if missing or not names:
        raise FileNotFoundError(f"{folder}: no tokenizer_<MOD>.safetensors for {missing or 'any modality'}; "
                                f"train them with `python fsq_tokenizer.py train`")
    return {m: ImageTokenizer.from_checkpoint(tokenizer_path(folder, m), device) for m in names}


def read_header(path) -> dict:
    """The JSON metadata of a safetensors file without reading its tensors ({} when unreadable)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception:
        return {}


class TokenShards:
    """The token shards written by `tokenize` (format in the module docstring), in memory as int16."""

    def __init__(self, folder, modalities=None):
        self.folder, self.tokens, self.rows = Path(folder), {}, {}
        found = sorted(p.name for p in self.folder.iterdir() if p.is_dir()) if self.folder.is_dir() else []
        for m in modalities or found:
            files = sorted((self.folder / m).glob("shard_*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.folder / m}: no token shards (run `fsq_tokenizer.py tokenize`)")
            shards = [load_safetensors(f) for f in files]
            self.tokens[m] = torch.cat([t["tokens"] for t, _ in shards])                 # (n, h, w) int16
            self.rows[m] = {sid: i for i, sid in enumerate(sid for _, meta in shards for sid in meta["ids"])}
            if len(self.rows[m]) != len(self.tokens[m]):
                raise ValueError(f"{self.folder / m}: {len(self.tokens[m])} token rows, {len(self.rows[m])} ids")
        self.modalities = list(self.tokens)
        self.ids = sorted(set().union(*self.rows.values()))                 # samples with any tokenized modality

    def has(self, modality: str, sample_id: str) -> bool:
        return sample_id in self.rows.get(modality, {})

    def get(self, modality: str, sample_id: str) -> torch.Tensor:
        """-> LongTensor (h, w) of token ids."""
        if not self.has(modality, sample_id):
            raise KeyError(f"{self.folder}: no {modality} tokens for sample {sample_id!r}")
        return self.tokens[modality][self.rows[modality][sample_id]].long()


# -----------------------------------------------------------------------------------------------------------
# Commands: train, tokenize, reconstruct

# run settings per preset that flags override. official: paper §8.1 (100 epochs, base lr 1e-4 at global batch
# 256 scaled as 4M does, EMA, fp16 for the diffusion tokenizers, random crops) with the official code's EMA
# decays (tokenizer_register.py docstrings: 0.9999, LULC 0.99) and its one-epoch warmup; 32 per GPU x 8 GPUs
# is the paper's 256. tiny/smoke (ours): steps and an absolute lr (higher rates saturate the sigmoid of FSQ on
# the synthetic world: the codebook collapses to ~2^5 codes)
TRAIN_DEFAULTS = {"official": dict(epochs=100, batch_size=32, blr=1e-4, ema=0.9999),
                  "tiny": dict(steps=2000, batch_size=32, lr=5e-4, ema=0.0),
                  "smoke": dict(steps=400, batch_size=32, lr=5e-4, ema=0.0)}


def train_recipe(args, m: str, world: int, n: int, batch: int, cuda: bool) -> argparse.Namespace:
    """steps, peak lr, warmup steps, EMA decay and autocast dtype of one tokenizer's training, from the flags,
    else the preset: --epochs over the n samples (the official preset) or --steps; --lr as given or --blr x
    global batch / 256 (4M); warmup one epoch when training by epochs, else 5% of the steps."""
    preset = TRAIN_DEFAULTS[args.size]
    per_epoch = max(1, n // (batch * world))
    epochs = args.epochs or (None if args.steps else preset.get("epochs"))
    steps = epochs * per_epoch if epochs else args.steps or preset["steps"]
    blr = args.blr or (None if args.lr else preset.get("blr"))
    lr = blr * batch * world / 256 if blr else args.lr or preset["lr"]
    official_ema = 0.99 if m == "LULC" else preset["ema"]            # official: LULC's EMA decay is 0.99
    ema = args.ema if args.ema is not None else official_ema if preset["ema"] else 0.0
    diffusion = terramesh.MODALITIES[m].decoder == "diffusion"
    dtype = args.dtype or ("fp32" if not cuda else "fp16" if args.size == "official" and diffusion else "bf16")
    warmup = per_epoch if epochs else max(1, steps // 20)
    length = f"{epochs} epochs x {per_epoch} steps = {steps} steps" if epochs else f"{steps} steps"
    rate = f"base lr {blr:.1e} x {batch * world} / 256 = lr {lr:.2e}" if blr else f"lr {lr:.1e}"
    text = f"{length} of {batch} x {world}; {rate}, warmup {warmup} steps, EMA {ema or 'off'}, {dtype}"
    return argparse.Namespace(steps=steps, lr=lr, ema=ema, dtype=dtype, warmup=warmup, text=text)


def lr_at(step: int, steps: int, lr: float, warmup_lr: float = 1e-6, warmup: int | None = None) -> float:
    """Linear warmup from warmup_lr over `warmup` steps (default 5% of the steps; the official preset: one
    epoch, as the official code), then cosine to 0 (official: warmup_lr 1e-6, min_lr 0)."""
    warmup = warmup or max(1, steps // 20)
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def dataset(root, m: str, split: str | None, **kw) -> TerraMeshDataset:
    """The samples of `split` (all when the folder has no such split) that have modality m."""
    split = split if terramesh.has_split(root, split) else None
    ds = TerraMeshDataset(root, [m], split=split, **kw)
    ds.ids = [sid for k, sid in enumerate(ds.ids) if m in ds.available(k)]
    return ds


def crop_sizes(image_size: int) -> list[int]:
    """Training crop sides: multiples of 16 from 7/8 of the preset's image size up to it (paper §8.1: random
    crops of 224-256 px for the official 256)."""
    low = -(-image_size * 7 // 8 // terramesh.PATCH) * terramesh.PATCH
    return list(range(low, image_size + 1, terramesh.PATCH))


def random_crop(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) -> one random side of `sizes` (that fits) for the batch, a random window per
    tile (torch's global generator). Tiles that are already one allowed side pass unchanged."""
    H, W = x.shape[-2:]
    fits = [s for s in sizes if s <= min(H, W)]
    if not fits or (H == W and fits == [H]):
        return x
    s = fits[int(torch.randint(len(fits), ()))]
    tops = torch.randint(H - s + 1, (len(x),)).tolist()
    lefts = torch.randint(W - s + 1, (len(x),)).tolist()
    return torch.stack([t[..., a:a + s, b:b + s] for t, a, b in zip(x, tops, lefts)])


def token_window(x: torch.Tensor) -> torch.Tensor:
    """The centred window of whole patches that a tile's token grid covers (terramesh.token_window: 264 px
    TerraMesh tiles -> 256 px, 4 px in): tokenize encodes it, pretraining crops its windows inside it."""
    (top, h), (left, w) = terramesh.token_window(x.shape[-2]), terramesh.token_window(x.shape[-1])
    return x[..., top:top + h, left:left + w]


class WithIds(torch.utils.data.Dataset):
    """A TerraMeshDataset's samples with their ids, so that a batch that breaks training can be named."""

    def __init__(self, ds: TerraMeshDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "id": self.ds.ids[i]}


def diverged(m, step, loss, norm, ids, data, state_path: Path) -> TrainingDiverged:
    """The error of a step with a non-finite loss or gradient: nothing of it is applied or saved."""
    last = f"{state_path} (step {read_header(state_path).get('step')})" if state_path.exists() else "none yet"
    return TrainingDiverged(f"{m} tokenizer, step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: training "
                            f"stopped before this update; the batch's samples in {data}/{m}: {', '.join(ids)}; "
                            f"check them with `python terramesh.py stats`; last good checkpoint: {last}")


def train_state_path(folder, modality: str) -> Path:
    return Path(folder) / f"tokenizer_{modality}.state.safetensors"


def check_train_outputs(args):
    """Before any training: the tokenizer and state files of every modality may be replaced only by --overwrite,
    or by --resume when the state is there to continue (a file this command did not write is never lost)."""
    for m in args.modality:
        resumable = args.resume and train_state_path(args.out, m).exists()
        for path in (tokenizer_path(args.out, m), train_state_path(args.out, m)):
            output_file(path, "--out", args.overwrite or resumable)


def train(args, m: str):
    ddp, rank = int(os.environ.get("WORLD_SIZE", 1)) > 1, int(os.environ.get("RANK", 0))
    device = args.device
    if ddp:   # torchrun: one process per GPU (gloo between CPU processes)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    world = torch.distributed.get_world_size() if ddp else 1
    batch = args.batch_size or TRAIN_DEFAULTS[args.size]["batch_size"]
    torch.manual_seed(args.seed + rank)
    cfg = TokenizerConfig.preset(args.size, m)
    ds = dataset(args.data, m, "train", size=None)
    plan = train_recipe(args, m, world, len(ds), batch, "cuda" in device)
    steps, lr = plan.steps, plan.lr
    sizes = crop_sizes(cfg.image_size)
    if len(ds) < batch * world:
        raise ValueError(f"{args.data}: {len(ds)} {m} training samples, fewer than one batch of {batch * world}")
    sampler = (torch.utils.data.DistributedSampler(ds, seed=args.seed) if ddp else
               torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(args.seed)))
    loader = torch.utils.data.DataLoader(WithIds(ds), batch, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    model = ImageTokenizer(cfg).to(device)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]   # biases, norms
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8)                # official recipe
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if plan.ema else None
    state_path, step = train_state_path(args.out, m), 0
    if args.resume and state_path.exists():
        tensors, meta = load_safetensors(state_path, device)
        expect_kind(state_path, meta, "tokenizer state")
        tensors = {k: v.clone() for k, v in tensors.items()}   # off the file's memory map
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or ema
        state = opt.state_dict()
        state["state"] = {int(i): {k.split(".", 2)[2]: v.reshape(()) if k.endswith(".step") else v
                                   for k, v in tensors.items() if k.startswith(f"opt.{i}.")} for i in meta["opt"]}
        opt.load_state_dict(state)
        step = meta["step"]
        if step >= steps:
            raise ValueError(f"--steps {steps}: {state_path} is already at step {step}; give more steps to continue")
        if rank == 0:
            print(f"resumed {state_path} at step {step}")
    elif args.resume and rank == 0:
        print(f"--resume: no {state_path} yet; training {m} from step 0")
    net = nn.parallel.DistributedDataParallel(model, None if device == "cpu" else [device]) if ddp else model
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.dtype]
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    if rank == 0:
        print(f"{m} tokenizer, preset {args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters, {len(ds)} samples, {device}\n  recipe: {plan.text}")

    def save():
        opt_state = opt.state_dict()["state"]
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in (ema or {}).items()},
                   # 0-d tensors (AdamW's step) go as (1,): terramesh's checksum cannot view 0-d tensors
                   **{f"opt.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
                      for i, s in opt_state.items() for k, v in s.items()}}
        save_safetensors(state_path, tensors, {"step": step, "opt": list(opt_state), "config": asdict(cfg)})
        export = ImageTokenizer(cfg)                               # written after the state: resume is safe
        export.load_state_dict(ema if ema is not None else model.state_dict())
        export.save_checkpoint(tokenizer_path(args.out, m), step=step, ema=plan.ema)

    epoch, t_log, losses = step * batch * world // len(ds), time.time(), []
    log_every = max(1, min(100, steps // 20))
    while step < steps:
        if ddp:
            sampler.set_epoch(epoch)
        for sample in loader:
            x = random_crop(sample[m], sizes).to(device, non_blocking=True)              # paper §8.1
            flip = torch.rand(x.shape[0], device=device) < 0.5                       # official: hflip 0.5
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup=plan.warmup)
            with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = net(x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)           # official clip_grad 1.0
            if not torch.isfinite(loss) or (dtype != torch.float16 and not torch.isfinite(norm)):   # fp16: scaler
                raise diverged(m, step + 1, loss.item(), norm.item(), sample["id"], args.data, state_path)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        ema[k].lerp_(v, 1 - plan.ema) if v.is_floating_point() else ema[k].copy_(v)
            step += 1
            losses.append(loss.item())
            if rank == 0 and (step % log_every == 0 or step == steps):
                dt = (time.time() - t_log) / len(losses)
                print(f"step {step}/{steps} | loss {np.mean(losses):.4f} | "
                      f"lr {lr_at(step - 1, steps, lr, warmup=plan.warmup):.1e} | "
                      f"{dt * 1e3:.0f} ms | {batch * world / dt:.1f} img/s", flush=True)
                t_log, losses = time.time(), []
            if rank == 0 and (step % args.save_every == 0 or step == steps):
                save()
            if step == steps:
                break
        epoch += 1
    if rank == 0:
        print(f"wrote {tokenizer_path(args.out, m)}")


def batches(ds, m: str, batch_size: int, indices):
    """Stacked whole tiles (B, C, H, W) (LULC: (B, H, W)) of ds[indices]."""
    for i in range(0, len(indices), batch_size):
        items = [ds[j][m] for j in indices[i:i + batch_size]]
        if len({x.shape for x in items}) > 1:
            raise ValueError(f"{ds.root}: {m} tiles differ in size ({sorted({tuple(x.shape) for x in items})})")
        yield torch.stack(items)


def file_stamp(path) -> list | None:
    """[size, modification time in ns] of a sample's file: a tile changed since its shard was written is
    tokenized again (None for samples inside archives, whose shards are keyed by id and tokenizer only)."""
    if not isinstance(path, Path) or not path.is_file():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def check_shard_paths(paths: list[Path], m: str):
    """A file at a shard's path that is not a token shard of modality m (a user's file) is never replaced."""
    for path in paths:
        header = read_header(path)
        if path.exists() and (header.get("modality") != m or "ids" not in header):
            raise ValueError(f"{path}: is not a {m} token shard of `fsq_tokenizer.py tokenize`; move it away "
                             f"or choose another --out")


@torch.no_grad()
def tokenize(args):
    for m, tok in load_tokenizers(args.tokenizers, args.modalities, args.device).items():
        ds = dataset(args.data, m, None, size=None)
        starts = range(0, len(ds), args.shard_size)
        check_shard_paths([Path(args.out) / m / f"shard_{s // args.shard_size:05d}.safetensors" for s in starts], m)
        fp = read_header(tokenizer_path(args.tokenizers, m)).get("crc32")                # the weights' checksum
        done = written = 0
        for s in tqdm(range(0, len(ds), args.shard_size), desc=f"tokenize {m}", unit="shard"):
            path = Path(args.out) / m / f"shard_{s // args.shard_size:05d}.safetensors"
            ids = ds.ids[s:s + args.shard_size]
            stamps = [file_stamp(ds.files[m].get(sid)) for sid in ids]
            header = read_header(path)              # a shard is redone unless its ids, files and tokenizer match
            if header.get("ids") == ids and header.get("tokenizer") == fp and header.get("files") == stamps:
                done += 1
                continue
            tokens = torch.cat([tok.encode(token_window(x).to(args.device)).cpu()
                                for x in batches(ds, m, args.batch_size, range(s, s + len(ids)))])
            save_safetensors(path, {"tokens": tokens.to(torch.int16)},
                             {"ids": ids, "modality": m, "vocab_size": tok.vocab_size, "tokenizer": fp,
                              "files": stamps})
            written += 1
        print(f"{m}: {len(ds)} samples -> {Path(args.out) / m} ({written} shards written, {done} already done)")


def decode_timed(tok, tokens, noise, steps: int, clip, batch_size: int, device) -> tuple[torch.Tensor, float]:
    """Decodes `tokens` (B, h, w) from the start `noise` in batches -> (reconstructions, seconds per image)."""
    t0 = time.perf_counter()
    parts = [tok.decode(t.to(device), steps, noise=z.to(device), clip=clip).cpu()   # .cpu() waits for the GPU
             for t, z in zip(tokens.split(batch_size), noise.split(batch_size))]
    return torch.cat(parts), (time.perf_counter() - t0) / len(tokens)


def mean_image(args, m: str, like: torch.Tensor) -> torch.Tensor:
    """The "predict the mean image" baseline: per-band mean of the training split (LULC: its majority class)."""
    train_ds = dataset(args.data, m, "train", size=None)
    train_x = torch.cat(list(batches(train_ds, m, 256, range(min(512, len(train_ds))))))
    if m == "LULC":
        majority = train_x.flatten().bincount(minlength=10).argmax()
        return F.one_hot(majority, 10).double().view(1, 10, 1, 1).expand(like.shape)
    return train_x.double().mean((0, 2, 3)).view(1, -1, 1, 1).expand(like.shape)


@torch.no_grad()
def reconstruct(args):
    """Tokenize and decode samples at every --steps count and --clip bound: quality against steps and time per
    image (the DDIM sweep), next to the mean-image baseline; metrics JSON and picture sheets."""
    m, out = args.modality, Path(args.out)
    tok = load_tokenizers(args.tokenizers, [m], args.device)[m]
    ds = dataset(args.data, m, args.split, size=None)
    pictures = [out / f"{m}_{sid}.png" for sid in ds.ids[:min(args.pictures, args.n)]]
    outputs = {"metrics": out / f"metrics_{m}.json", **{f"picture {p.name}": p for p in pictures}}
    distinct_outputs(outputs)
    for path in outputs.values():                                  # before any work
        output_file(path, "--out", args.overwrite)
    x = torch.cat(list(batches(ds, m, args.batch_size, range(min(args.n, len(ds))))))   # (B, C, H, W) / (B, H, W)
    tokens = torch.cat([tok.encode(b.to(args.device)).cpu() for b in x.split(args.batch_size)])
    noise = torch.randn(len(x), tok.channels, *x.shape[-2:], generator=torch.Generator().manual_seed(args.seed))
    runs = [(None, None)] if m == "LULC" else [(s, c) for s in args.steps for c in args.clip]   # LULC: ViT decoder
    recons, seconds = {}, {}
    for steps, clip in runs:                                          # the same start noise for every run
        name = "ViT decoder" if m == "LULC" else f"{steps} steps, " + (f"clip {clip:g}" if clip else "unbounded")
        recons[name], seconds[name] = decode_timed(tok, tokens, noise, steps, clip or None, args.batch_size,
                                                   args.device)
    data_range = None if m == "LULC" else physical(m, x).amax((0, 2, 3)) - physical(m, x).amin((0, 2, 3))
    rows = {name: reconstruction_metrics(m, x, r, data_range) for name, r in recons.items()}
    rows["mean image"] = reconstruction_metrics(m, x, mean_image(args, m, recons[name]), data_range)
    usage = codebook_usage(tokens, tok.vocab_size)
    report_reconstruction(args, m, len(x), usage, rows, seconds)
    sweep = [{"steps": s, "clip": c, "metrics": rows[n], "seconds_per_image": seconds[n]}
             for (s, c), n in zip(runs, recons)]
    first = {n.split(", ")[-1]: rows[n] for (s, _), n in zip(runs, recons) if s == runs[0][0]}  # "clip 1", ...
    out.mkdir(parents=True, exist_ok=True)
    terramesh.write_text(out / f"metrics_{m}.json", json.dumps(
        {"modality": m, "n": len(x), "steps": runs[0][0], "codebook": usage,
         "metrics": {**first, "mean image": rows["mean image"]}, "sweep": sweep}, indent=1))
    for k in range(min(args.pictures, len(x))):
        panels = [(name, terramesh.render(m, r[k], standardized=True)) for name, r in recons.items()]
        terramesh.save_sheet(out / f"{m}_{ds.ids[k]}.png", [("input", terramesh.render(m, x[k], True))] + panels)
    print(f"wrote {out}/metrics_{m}.json and {min(args.pictures, len(x))} pictures")


def report_reconstruction(args, m: str, n: int, usage: dict, rows: dict, seconds: dict):
    """Prints one table: a row per decoding (steps, bound), its metrics and time per image."""
    units = {"S2L2A": "reflectance", "S1GRD": "dB", "S1RTC": "dB", "DEM": "m", "NDVI": "NDVI"}.get(m, "classes")
    print(f"{m} ({units}), {n} samples of {args.data} ({args.split}); codebook used {usage['used'] * 100:.2f}%, "
          f"perplexity {usage['perplexity']:.1f}")
    if m != "LULC":
        print(f"DDIM steps {' '.join(map(str, args.steps))} (default here {DECODE_STEPS}, as the official "
              f"notebooks; the official DiVAE.decode_tokens default is {OFFICIAL_DECODE_STEPS}); time on {args.device}")
    keys = list(next(iter(rows.values())))
    print("| decoding | " + " | ".join(keys) + " | ms/image |")
    for name, row in rows.items():
        ms = f"{1e3 * seconds[name]:.1f}" if name in seconds else "-"
        print(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + f" | {ms} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="TerraMesh-layout folder")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    common.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (training: per GPU)")
    common.add_argument("--seed", type=nonnegative_int, default=0, help="random seed")
    p = sub.add_parser("train", parents=[common], help="train tokenizers, one modality after the other")
    p.add_argument("--modality", nargs="+", required=True, choices=terramesh.TOKENIZED_IMAGES, help="modalities")
    p.add_argument("--size", default="tiny", choices=list(PRESETS), help="architecture preset")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs over the modality's training samples "
                   "(default: official 100, paper §8.1; the small presets count --steps)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps instead of epochs (default: tiny "
                   "2000, smoke 400)")
    p.add_argument("--blr", type=positive_float, default=None, help="base learning rate, lr = blr x global batch / 256 "
                   "(default: official 1e-4, paper §8.1)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate itself (default: tiny/smoke 5e-4)")
    p.add_argument("--ema", type=decay, default=None, help="EMA decay of the exported weights, 0 = off (default: "
                   "official 0.9999, LULC 0.99 as the official code; tiny/smoke off)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="autocast (default on GPU: "
                   "official fp16 for the diffusion tokenizers as paper §8.1, bf16 for LULC and the small presets)")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="data loader worker processes")
    p.add_argument("--save-every", type=positive_int, default=1000, help="checkpoint interval in steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/tokenizer_<MOD>.state.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace tokenizer files already in --out")
    p = sub.add_parser("tokenize", parents=[common], help="pre-tokenize a dataset into int16 shards")
    p.add_argument("--tokenizers", required=True, help="folder with tokenizer_<MOD>.safetensors")
    p.add_argument("--modalities", nargs="+", default=None, help="modalities to tokenize (default: all found)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="samples per shard file")
    p = sub.add_parser("reconstruct", parents=[common], help="input | reconstruction pictures and metrics")
    p.add_argument("--modality", required=True, choices=terramesh.TOKENIZED_IMAGES, help="image modality")
    p.add_argument("--tokenizers", required=True, help="folder with tokenizer_<MOD>.safetensors")
    p.add_argument("--split", default="test", help="split to evaluate (all samples when the folder has none)")
    p.add_argument("--n", type=positive_int, default=200, help="number of samples")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[DECODE_STEPS],
                   help="DDIM steps; several: a sweep, "
                   f"quality and time per image for each (ours {DECODE_STEPS}, official {OFFICIAL_DECODE_STEPS})")
    p.add_argument("--clip", type=nonnegative_float, nargs="+", default=[1.0],
                   help="x0 bounds to compare (0: unbounded)")
    p.add_argument("--pictures", type=nonnegative_int, default=4, help="number of picture sheets")
    p.add_argument("--overwrite", action="store_true", help="replace the metrics and pictures already in --out")
    args = parser.parse_args()
    writable_folder(args.out)   # before any work
    if args.command == "train":
        check_train_outputs(args)
        for m in args.modality:
            train(args, m)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        args.batch_size = args.batch_size or 32
        {"tokenize": tokenize, "reconstruct": reconstruct}[args.command](args)


if __name__ == "__main__":
    run_main(main)
