"""
TerraMind's image tokenizers: FSQ autoencoders that turn an image modality into a grid of
discrete tokens (one per 16x16 patch, 14x14 for a 224 px tile) and back
(paper §3.1; official: terratorch .../terramind/tokenizer/).

`FSQ` (sigmoid-bounded like the released weights: 8-8-8-6-5 = 15360 codes, LULC 7-5-5-5-5 =
4375), a ViT encoder, and a decoder: diffusion (`diffusion_decoder.DiffusionDecoder`) or, for
LULC, a ViT giving class logits. `ImageTokenizer`: `encode(x) -> (B, H/16, W/16)`,
`decode(tokens, steps=10, generator=None)` in standardized units (LULC: logits),
`from_checkpoint`, `from_official`; `load_tokenizers(folder)`. Presets: `official` (the
released v1 architecture), `tiny` (64 px, minutes on a CPU), `smoke` (a minute on 2 cores).

It consumes a TerraMesh-layout folder (terramesh.py; tiles, windows and crops:
tokenizer_data.py) and writes `<out>/tokenizer_<MOD>.safetensors` (weights, the EMA weights
with --ema, config in the metadata), `<out>/tokenizer_<MOD>.state.safetensors` (raw weights and
optimizer state for --resume), token shards (`tokenize`, format in token_shards.py), and
reconstruction pictures with metrics (`reconstruct`, tokenizer_eval.py). A file already in
--out is replaced only with --overwrite (train: or --resume, which continues its state).

    # CPU smoke run (synthetic world, 64 px tiles)
    python terramesh.py synth --out data/synth --n 2000 --size 64
    python fsq_tokenizer.py train --modality S2L2A S1GRD DEM NDVI LULC --data data/synth \\
        --size smoke --out ckpt/
    python fsq_tokenizer.py tokenize --data data/synth --tokenizers ckpt/ --out tokens/
    python fsq_tokenizer.py reconstruct --modality S2L2A --data data/synth --tokenizers ckpt/ \\
        --out out/tok
    python fsq_tokenizer.py reconstruct --modality DEM --data data/synth --tokenizers ckpt/ \\
        --steps 1 2 5 10 25 50 --out out/tok_steps   # quality and time per image against DDIM steps
    # one GPU, official architecture and the paper's recipe (§8.1: 100 epochs, base lr 1e-4 x
    # global batch / 256, fp16 autocast for the diffusion tokenizers, EMA 0.9999, random crops);
    # --steps / --lr / --ema override
    python fsq_tokenizer.py train --modality DEM --data /data/terramesh --size official \\
        --workers 8 --out ckpt/
    # several GPUs (DDP); --batch-size is per GPU (32 x 8 GPUs = the paper's global batch 256)
    torchrun --standalone --nproc_per_node=8 fsq_tokenizer.py train --modality DEM \\
        --data /data/terramesh --size official --workers 8 --out ckpt/
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import modalities
from checkpoints import expect_kind, load_safetensors, save_safetensors
from cli import (decay, nonnegative_float, nonnegative_int, output_file, positive_float,
                 positive_int, run_main, torch_device, writable_folder)
from diffusion_decoder import DECODE_STEPS, OFFICIAL_DECODE_STEPS, DiffusionDecoder
from modalities import LULC_CLASSES, TOKENIZED_IMAGES
from token_shards import read_header, write_token_shards
from tokenizer_data import crop_sizes, dataset
from tokenizer_eval import reconstruct
from tokenizer_training import (AUTOCAST, TRAIN_DEFAULTS, augment, backward, diverged,
                                log_line, lr_at, make_loader, make_optimizer, resume,
                                save_state, setup_distributed, start_ema, train_recipe,
                                train_state_path, update_ema, wrap_ddp)

# -----------------------------------------------------------------------------------------------
# Finite scalar quantization


class FSQ(nn.Module):
    """Per latent channel with L levels: n = round(sigmoid(z) * (L - 1)), straight-through
    gradient, code n / (L - 1) in [0, 1]; token index sum n_i * basis_i, first channel least
    significant (official: .../tokenizer/quantizers/quantize_finite_scalar.py).
    DEVIATION from the FSQ paper (tanh bound, offset for even L): the released weights use the
    sigmoid, which gives every L exactly L values without an offset. No parameters, no
    auxiliary loss."""

    def __init__(self, levels):
        super().__init__()
        self.vocab_size = math.prod(levels)
        levels = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        self.register_buffer("levels", levels.view(-1, 1, 1), persistent=False)   # (d, 1, 1)
        self.register_buffer("basis", basis.view(-1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) latent -> codes (B, d, h, w) in [0, 1], indices (B, h, w) int64."""
        scaled = torch.sigmoid(z) * (self.levels - 1)
        n = scaled + (scaled.round() - scaled).detach()         # round, straight-through
        indices = (n.detach().long() * self.basis).sum(1)
        return n / (self.levels - 1), indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, d, h, w)."""
        n = (indices.long().unsqueeze(1) // self.basis) % self.levels
        return n / (self.levels - 1)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) codes on the grid -> (B, h, w)."""
        n = (codes * (self.levels - 1)).round().long()
        return (n * self.basis).sum(1)


# -----------------------------------------------------------------------------------------------
# ViT encoder and decoder (official: vit_b_enc / vit_b_dec, .../tokenizer/models/vit_models.py)

def sincos_table(n: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed (1, dim, n, n) position table, channels [sin(row), cos(row), sin(col), cos(col)]
    (MoCo v3)."""
    quarter = torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)
    omega = 1.0 / temperature ** quarter
    r = torch.arange(n, dtype=torch.float32)[:, None] * omega              # (n, D/4)
    r = torch.cat([r.sin(), r.cos()], 1)                                     # (n, D/2)
    rows = r[:, None].expand(n, n, -1)
    cols = r[None].expand(n, n, -1)
    table = torch.cat([rows, cols], -1)                                      # (n, n, D)
    return table.permute(2, 0, 1)[None].contiguous()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = rearrange(self.qkv(x), "b n (s h e) -> s b h n e", s=3, h=self.heads)
        q, k, v = qkv                                                     # (B, h, N, D/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6, GELU MLP x4."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linear(m: nn.Linear, qkv: bool = False):
    """Official ViT init: xavier-uniform (the qkv bound per q/k/v part), zero bias. The patch
    convolution keeps PyTorch's default init, as in the official code."""
    fan_out = m.weight.shape[0] // (3 if qkv else 1)
    bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
    nn.init.uniform_(m.weight, -bound, bound)
    nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Trunk of both: + interpolated sin-cos positions, blocks (no final norm), residual tanh
    post-MLP."""

    def __init__(self, dim: int, depth: int, heads: int, grid: int):
        super().__init__()
        # official: a frozen Parameter (1, D, n, n)
        self.register_buffer("pos_emb", sincos_table(grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.post_mlp = Mlp(dim, 4 * dim, act=nn.Tanh)                  # ViT-VQGAN
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                init_linear(m, qkv="qkv" in name)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h, w)."""
        h, w = x.shape[-2:]
        pos = F.interpolate(self.pos_emb, size=(h, w), mode="bicubic", align_corners=False)
        x = rearrange(x + pos, "b d h w -> b (h w) d")                    # (B, N, D)
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


# -----------------------------------------------------------------------------------------------
# The tokenizer

@dataclass
class TokenizerConfig:
    modality: str = "S2L2A"      # channels, FSQ levels and decoder from modalities.MODALITIES
    image_size: int = 256        # position tables built for it (official 256); inputs: x16
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
        if modalities.modality(modality).fsq_levels is None:
            raise ValueError(f"{modality} has no image tokenizer; "
                             f"those are {TOKENIZED_IMAGES}")
        return replace(PRESETS[size], modality=modality)


PRESETS = {
    # ViT-B + UNet 256 x (1,2,2,2)
    "official": TokenizerConfig(),
    "tiny": TokenizerConfig(image_size=64,
                            enc_dim=128, enc_depth=2, enc_heads=4,
                            dec_dim=128, dec_depth=2, dec_heads=4,
                            unet_channels=32, unet_mult=(1, 2, 2), unet_blocks=1,
                            unet_attn=(4,)),
    "smoke": TokenizerConfig(image_size=64,
                             enc_dim=64, enc_depth=1, enc_heads=2,
                             dec_dim=64, dec_depth=1, dec_heads=2,
                             unet_channels=32, unet_mult=(1, 2), unet_blocks=1,
                             unet_attn=()),
}


class ImageTokenizer(nn.Module):
    """Encoder -> 1x1 quant_proj -> FSQ -> decoder, with the parameter names of the official
    DiVAE / VQVAE."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        m, grid = modalities.modality(cfg.modality), cfg.image_size // 16
        self.cfg, self.modality = cfg, m.name
        # LULC: one-hot classes
        self.channels = len(LULC_CLASSES) if m.name == "LULC" else m.channels
        self.encoder = ViTEncoder(self.channels, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads,
                                  grid)
        self.quant_proj = nn.Conv2d(cfg.enc_dim, cfg.latent_dim, 1)
        self.quantize = FSQ(m.fsq_levels)
        if m.decoder == "diffusion":
            self.decoder = DiffusionDecoder(self.channels, cfg.latent_dim, cfg.unet_channels,
                                            cfg.unet_mult, cfg.unet_blocks, cfg.unet_attn)
        else:   # official VQVAE: post_quant_proj to the decoder width, then the ViT decoder
            self.decoder = ViTDecoder(self.channels, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads,
                                      grid)
            self.post_quant_proj = nn.Conv2d(cfg.latent_dim, cfg.dec_dim, 1)

    @property
    def vocab_size(self) -> int:
        return self.quantize.vocab_size

    def check_shape(self, x: torch.Tensor):
        """(B, C, H, W) with H, W multiples of 16."""
        whole = x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0
        if x.dim() != 4 or x.shape[1] != self.channels or not whole:
            raise ValueError(f"the {self.modality} tokenizer takes (B, {self.channels}, H, W) "
                             f"(LULC also (B, H, W) classes) with H, W multiples of 16, "
                             f"got {tuple(x.shape)}")

    def encode_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x standardized (B, C, H, W) or a LULC class map (B, H, W) -> codes (B, 5, H/16, W/16),
        token ids (B, H/16, W/16). LULC is one-hot encoded here, as inside the official
        encoder."""
        if self.modality == "LULC" and x.dim() == 3:
            if x.min() < 0 or x.max() >= self.channels:
                raise ValueError(f"LULC classes must lie in 0..{self.channels - 1}, "
                                 f"got {x.min()}..{x.max()}")
            x = F.one_hot(x.long(), self.channels).permute(0, 3, 1, 2)         # (B, 10, H, W)
        self.check_shape(x)
        z = self.quant_proj(self.encoder(x.float()))                          # (B, 5, h, w)
        return self.quantize(z)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x standardized (B, C, H, W) (LULC: (B, H, W) class map) -> token ids (B, H/16, W/16)
        int64."""
        return self.encode_codes(x)[1]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, steps: int = DECODE_STEPS, generator=None,
               noise=None, clip=1.0):
        """tokens (B, h, w) -> (B, C, 16 h, 16 w) standardized (LULC: class logits
        (B, 10, 16 h, 16 w)). Diffusion: `steps` DDIM steps from `noise` or
        torch.randn(generator=generator), every predicted x0 clipped to [-clip, clip]
        (official 1.0; None: unbounded). LULC ignores these arguments."""
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids lie in 0..{self.vocab_size - 1}, "
                             f"got {tokens.min()}..{tokens.max()}")
        codes = self.quantize.indices_to_codes(tokens)                        # (B, 5, h, w)
        if isinstance(self.decoder, ViTDecoder):
            return self.decoder(self.post_quant_proj(codes))
        size = (tokens.shape[-2] * 16, tokens.shape[-1] * 16)
        return self.decoder.sample(codes, size, steps, generator=generator, noise=noise,
                                   clip=clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch: x0-prediction MSE (diffusion) or cross-entropy over the
        classes (LULC)."""
        codes, _ = self.encode_codes(x)
        if isinstance(self.decoder, ViTDecoder):
            logits = self.decoder(self.post_quant_proj(codes))               # (B, 10, H, W)
            return F.cross_entropy(logits.float(), x.long())
        return self.decoder.loss(x.float(), codes)

    def save_checkpoint(self, path, **meta):
        meta = {"config": asdict(self.cfg), "kind": "tokenizer", **meta}
        save_safetensors(path, self.state_dict(), meta)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "ImageTokenizer":
        tensors, meta = load_safetensors(path)
        expect_kind(path, meta, "image tokenizer")
        config = {}
        for k, v in meta["config"].items():
            config[k] = tuple(v) if isinstance(v, list) else v          # JSON lists: tuples
        model = cls(TokenizerConfig(**config))
        load_state_strict(model, tensors, path)
        return model.to(device).eval()

    @classmethod
    def from_official(cls, path, modality: str, device="cpu") -> "ImageTokenizer":
        """Loads an official TerraMind_Tokenizer_<MOD>.pt state dict strictly: every key used,
        none missing."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(TokenizerConfig.preset("official", modality))
        load_state_strict(model, sd.get("model", sd), path)
        return model.to(device).eval()


def load_state_strict(model: ImageTokenizer, sd: dict, source):
    """load_state_dict(strict=True) with an error that names the file and the offending keys."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(sd))
    extra = sorted(set(sd) - set(ours))
    shared = set(ours) & set(sd)
    bad = sorted(k for k in shared if tuple(ours[k].shape) != tuple(sd[k].shape))
    if missing or extra or bad:
        raise ValueError(f"{source}: does not fit the {model.modality} tokenizer: "
                         f"missing {missing[:4]} ({len(missing)}), "
                         f"unexpected {extra[:4]} ({len(extra)}), wrong shape {bad[:4]}")
    model.load_state_dict(sd, strict=True)


def tokenizer_path(folder, modality: str) -> Path:
    return Path(folder) / f"tokenizer_{modality}.safetensors"


def load_tokenizers(folder, modalities=None, device="cpu") -> dict[str, ImageTokenizer]:
    """{modality: ImageTokenizer} for every tokenizer_<MOD>.safetensors in `folder`
    (or exactly `modalities`)."""
    found = [m for m in TOKENIZED_IMAGES if tokenizer_path(folder, m).exists()]
    names = modalities or found
    missing = [m for m in names if not tokenizer_path(folder, m).exists()]
    if missing or not names:
        raise FileNotFoundError(f"{folder}: no tokenizer_<MOD>.safetensors for "
                                f"{missing or 'any modality'}; "
                                f"train them with `python fsq_tokenizer.py train`")
    return {m: ImageTokenizer.from_checkpoint(tokenizer_path(folder, m), device) for m in names}


# -----------------------------------------------------------------------------------------------
# Training (paper §8.1; the recipe and the loop's pieces: tokenizer_training.py)

def check_train_outputs(args):
    """Before any training: the tokenizer and state files of every modality may be replaced only
    by --overwrite, or by --resume when the state is there to continue (a file this command did
    not write is never lost)."""
    for m in args.modality:
        resumable = args.resume and train_state_path(args.out, m).exists()
        for path in (tokenizer_path(args.out, m), train_state_path(args.out, m)):
            output_file(path, "--out", args.overwrite or resumable)


def export_tokenizer(path: Path, cfg, model, ema, step: int, decay: float):
    """The tokenizer file: the EMA weights when there are any, else the raw ones."""
    export = ImageTokenizer(cfg)
    export.load_state_dict(ema if ema is not None else model.state_dict())
    export.save_checkpoint(path, step=step, ema=decay)


def train(args, m: str):
    """Trains the tokenizer of modality m: the stage's loop (paper §8.1)."""
    ddp, rank, world, device = setup_distributed(args.device)
    batch = args.batch_size or TRAIN_DEFAULTS[args.size]["batch_size"]
    torch.manual_seed(args.seed + rank)
    cfg = TokenizerConfig.preset(args.size, m)
    ds = dataset(args.data, m, "train", size=None)
    plan = train_recipe(args, m, world, len(ds), batch, "cuda" in device)
    if len(ds) < batch * world:
        raise ValueError(f"{args.data}: {len(ds)} {m} training samples, "
                         f"fewer than one batch of {batch * world}")
    sampler, loader = make_loader(ds, batch, args, ddp)
    model = ImageTokenizer(cfg).to(device)
    opt = make_optimizer(model, plan.lr)
    ema = start_ema(model) if plan.ema else None
    state_path = train_state_path(args.out, m)
    step, ema = resume(args, state_path, model, opt, ema, device, plan.steps, rank)
    net = wrap_ddp(model, device) if ddp else model
    dtype = AUTOCAST[plan.dtype]
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    if rank == 0:
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{m} tokenizer, preset {args.size}: {millions:.2f}M parameters, {len(ds)} samples, "
              f"{device}\n  recipe: {plan.text}")
    sizes = crop_sizes(cfg.image_size)
    epoch = step * batch * world // len(ds)
    t_log, losses = time.time(), []
    log_every = max(1, min(100, plan.steps // 20))
    while step < plan.steps:
        if ddp:
            sampler.set_epoch(epoch)
        for sample in loader:
            x = augment(sample[m], sizes, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, plan.steps, plan.lr, warmup=plan.warmup)
            loss, norm = backward(net, model, opt, scaler, x, dtype, device)
            bad_norm = dtype != torch.float16 and not torch.isfinite(norm)   # fp16: the scaler's
            if not torch.isfinite(loss) or bad_norm:
                raise diverged(m, step + 1, loss.item(), norm.item(), sample["id"], args.data,
                               state_path)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                update_ema(ema, model, plan.ema)
            step += 1
            losses.append(loss.item())
            last = step == plan.steps
            if rank == 0 and (step % log_every == 0 or last):
                seconds = (time.time() - t_log) / len(losses)
                print(log_line(step, plan, np.mean(losses), seconds, batch * world), flush=True)
                t_log, losses = time.time(), []
            if rank == 0 and (step % args.save_every == 0 or last):
                save_state(state_path, model, opt, ema, step, cfg)
                # written after the state: resume is safe
                export_tokenizer(tokenizer_path(args.out, m), cfg, model, ema, step, plan.ema)
            if last:
                break
        epoch += 1
    if rank == 0:
        print(f"wrote {tokenizer_path(args.out, m)}")


# -----------------------------------------------------------------------------------------------
# Commands: train (above), tokenize, reconstruct (tokenizer_eval.py)

@torch.no_grad()
def tokenize(args):
    """Every tile of --data through its tokenizer into token shards (token_shards.py)."""
    tokenizers = load_tokenizers(args.tokenizers, args.modalities, args.device)
    for m, tok in tokenizers.items():
        ds = dataset(args.data, m, None, size=None)
        # the weights' checksum: shards of another tokenizer are encoded again
        fingerprint = read_header(tokenizer_path(args.tokenizers, m)).get("crc32")
        written, done = write_token_shards(tok, ds, m, args.out, args.shard_size,
                                           args.batch_size, args.device, fingerprint)
        print(f"{m}: {len(ds)} samples -> {Path(args.out) / m} "
              f"({written} shards written, {done} already done)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="TerraMesh-layout folder")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--device", type=torch_device,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    common.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per batch (training: per GPU)")
    common.add_argument("--seed", type=nonnegative_int, default=0, help="random seed")

    p = sub.add_parser("train", parents=[common],
                       help="train tokenizers, one modality after the other")
    p.add_argument("--modality", nargs="+", required=True, choices=TOKENIZED_IMAGES,
                   help="modalities")
    p.add_argument("--size", default="tiny", choices=list(PRESETS), help="architecture preset")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs over the modality's training samples "
                   "(default: official 100, paper §8.1; the small presets count --steps)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps instead of epochs (default: tiny 2000, smoke 400)")
    p.add_argument("--blr", type=positive_float, default=None,
                   help="base learning rate, lr = blr x global batch / 256 "
                   "(default: official 1e-4, paper §8.1)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate itself (default: tiny/smoke 5e-4)")
    p.add_argument("--ema", type=decay, default=None,
                   help="EMA decay of the exported weights, 0 = off "
                   "(default: official 0.9999, LULC 0.99 as the official code; tiny/smoke off)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast (default on GPU: official fp16 for the diffusion tokenizers "
                   "as paper §8.1, bf16 for LULC and the small presets)")
    p.add_argument("--workers", type=nonnegative_int, default=0,
                   help="data loader worker processes")
    p.add_argument("--save-every", type=positive_int, default=1000,
                   help="checkpoint interval in steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/tokenizer_<MOD>.state.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace tokenizer files already in --out")

    p = sub.add_parser("tokenize", parents=[common],
                       help="pre-tokenize a dataset into int16 shards")
    p.add_argument("--tokenizers", required=True,
                   help="folder with tokenizer_<MOD>.safetensors")
    p.add_argument("--modalities", nargs="+", default=None,
                   help="modalities to tokenize (default: all found)")
    p.add_argument("--shard-size", type=positive_int, default=1024,
                   help="samples per shard file")

    p = sub.add_parser("reconstruct", parents=[common],
                       help="input | reconstruction pictures and metrics")
    p.add_argument("--modality", required=True, choices=TOKENIZED_IMAGES,
                   help="image modality")
    p.add_argument("--tokenizers", required=True,
                   help="folder with tokenizer_<MOD>.safetensors")
    p.add_argument("--split", default="test",
                   help="split to evaluate (all samples when the folder has none)")
    p.add_argument("--n", type=positive_int, default=200, help="number of samples")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[DECODE_STEPS],
                   help="DDIM steps; several: a sweep, quality and time per image for each "
                   f"(ours {DECODE_STEPS}, official {OFFICIAL_DECODE_STEPS})")
    p.add_argument("--clip", type=nonnegative_float, nargs="+", default=[1.0],
                   help="x0 bounds to compare (0: unbounded)")
    p.add_argument("--pictures", type=nonnegative_int, default=4,
                   help="number of picture sheets")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the metrics and pictures already in --out")

    args = parser.parse_args()
    writable_folder(args.out)   # before any work
    if args.command == "train":
        check_train_outputs(args)
        for m in args.modality:
            train(args, m)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()   # why: Pretraining.finish in pretrain.py
            torch.distributed.destroy_process_group()
        return
    args.batch_size = args.batch_size or 32
    if args.command == "tokenize":
        tokenize(args)
    else:
        tok = load_tokenizers(args.tokenizers, [args.modality], args.device)[args.modality]
        reconstruct(args, tok)


if __name__ == "__main__":
    run_main(main)
