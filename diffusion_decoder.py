"""
The diffusion decoder of TerraMind's image tokenizers: a patched UNet that turns FSQ codes back
into pixels.

The S2L2A, S1GRD, S1RTC, DEM and NDVI tokenizers decode by diffusion (paper §3.1, DiVAE;
official: terratorch .../terramind/tokenizer/vqvae.py, models/unet/unet.py):

  * `DiffusionDecoder`, an ADM-style UNet run on 4x4 pixel patches. The noisy image
    (B, C, H, W) becomes (B, C*16, H/4, W/4); the FSQ codes (B, 5, H/16, W/16),
    nearest-upsampled to that grid, are concatenated to it. ResBlocks with GroupNorm(32) and
    SiLU, an additive time embedding (sinusoidal, then an MLP), single-head self-attention at
    the configured downsampling rates and in the middle block, zero-initialised output layers.
    Parameter names match the official `decoder.*` keys, so official weights load as they are.
  * the noise schedule: 1000 steps, linear betas 1e-4..0.02 rescaled to zero terminal SNR;
    the network predicts x0 ("sample" prediction).
  * `DiffusionDecoder.loss`: DDPM training, MSE between predicted and clean x0 at a uniform
    random step.
  * `DiffusionDecoder.sample`: DDIM (eta 0) on "trailing" timesteps for any number of steps,
    each predicted x0 clipped to [-clip, clip] in standardized units (clip=1.0 as the official
    weights expect).

This file has no command line and holds no modality knowledge; `fsq_tokenizer.py` builds the
decoder from the modality table and trains it
(`python fsq_tokenizer.py train --modality S2L2A ...`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# DDIM steps of the diffusion decoders: the official notebooks and HF cards use 10
DECODE_STEPS = 10
# official: DiVAE.decode_quant and TerraMindGeneration default timesteps=50
OFFICIAL_DECODE_STEPS = 50


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features, cosines first (official: ADM order
    [cos, sin])."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * steps)
    args = t[:, None].float() * freqs[None]                                  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # (B, dim)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)   # official: GroupNorm32, 32 groups, eps 1e-5


def zero_init(module: nn.Module) -> nn.Module:
    """Zero-initialised layer: each block starts as the identity, the network output as 0
    (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding (added, no scale-shift), GroupNorm-SiLU-conv,
    + skip."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # index 2 is the official dropout (p=0), a placeholder so that the key is out_layers.3
        out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Identity(),
                                        out_conv)
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)                                    # (B, C', H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]           # official: no scale-shift norm
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (official: num_heads=1,
    legacy order, 1x1 Conv1d projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)                                       # (B, C, N)
        qkv = self.qkv(self.norm(x)).transpose(1, 2)                     # (B, N, 3C)
        q, k, v = qkv.chunk(3, dim=-1)                                   # 3 x (B, N, C)
        h = F.scaled_dot_product_attention(q, k, v)                      # (B, N, C), 1/sqrt(C)
        return (x + self.proj_out(h.transpose(1, 2))).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # official: conv_resample=True
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the time embedding."""

    def forward(self, x, emb):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


def make_schedule(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02) -> torch.Tensor:
    """alphas_cumprod (T,) of linear betas rescaled to zero terminal SNR (Lin et al. 2023,
    Algorithm 1; official: enforce_zero_terminal_snr). Computed in float32 like the official
    scheduler."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # shift so that the last step is 0, keep the first
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])   # back to betas, as the official code does
    return torch.cumprod(alphas, dim=0)              # ab[999] = 0: pure noise at the last step


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM "trailing" spacing (Lin et al. 2023, Table 2): [999, 899, ..., 99] for 10 steps.
    DEVIATION: the official code steps by T // steps, which gives steps + 1 uneven steps when
    steps does not divide T (e.g. 3 -> [999, 666, 333, 0]); we step by T / steps and round,
    always exactly `steps` steps. Both agree whenever steps divides T (10, 50, ...)."""
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in 1..{T}, got {steps}")
    return [round(T - i * T / steps) - 1 for i in range(steps)]


class DiffusionDecoder(nn.Module):
    """Patched UNet conditioned on FSQ codes by concatenation (official: PatchedUNetCondCat,
    `unet_patched`).

    The official decoder: model_channels 256, channel_mult (1, 2, 2, 2), 3 ResBlocks per level,
    attention at downsampling rates (4, 8) (14x14 and 7x7 grids for 224 px input), patch
    size 4."""

    def __init__(self, in_channels: int, cond_channels: int = 5, model_channels: int = 256,
                 channel_mult=(1, 2, 2, 2), num_res_blocks: int = 3,
                 attention_resolutions=(4, 8), patch_size: int = 4,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.model_channels = model_channels

        ch = model_channels * channel_mult[0]
        unet_out = in_channels * patch_size ** 2
        unet_in = unet_out + cond_channels
        first = nn.Conv2d(unet_in, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([EmbedSequential(first)])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, model_channels * mult, emb_dim)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, ch, emb_dim), AttentionBlock(ch),
                                            ResBlock(ch, ch, emb_dim))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [ResBlock(ch + skip, model_channels * mult, emb_dim)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        out_conv = zero_init(nn.Conv2d(ch, unet_out, 3, padding=1))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), out_conv)
        schedule = make_schedule(num_train_timesteps)
        self.register_buffer("alphas_cumprod", schedule, persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """Predicts x0. x_t (B, C, H, W) noisy image, t (B,) or one timestep,
        cond (B, 5, H/16, W/16) FSQ codes -> (B, C, H, W)."""
        B, C, H, W = x_t.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the decoder patch "
                             f"size {p}")
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))     # (B, 4 D)
        h = rearrange(x_t, "b c (h p) (w q) -> b (c p q) h w", p=p, q=p)      # (B, C*16, H/4, W/4)
        cond = F.interpolate(cond.to(h.dtype), size=h.shape[-2:], mode="nearest")
        h = torch.cat([h, cond], dim=1)                                       # (B, C*16+5, H/4, W/4)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.out(h)                                                       # (B, C*16, H/4, W/4)
        return rearrange(h, "b (c p q) h w -> b c (h p) (w q)", p=p, q=p)     # (B, C, H, W)

    def add_noise(self, x0, noise, t):
        """Forward process q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t (B,)."""
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """DDPM training loss with x0 prediction (official: prediction_type "sample", loss
        "mse"): a uniform random step per sample, MSE between the predicted and the clean image
        (standardized)."""
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.add_noise(x0, torch.randn_like(x0), t)
        return F.mse_loss(self(x_t, t, cond).float(), x0.float())

    def ddim_step(self, x_t, x0, t: int, t_prev: int, clip: float | None) -> torch.Tensor:
        """One deterministic DDIM step (eta 0) from t to t_prev (t_prev < 0: to the clean
        image). As in the official scheduler the noise estimate comes from the unclipped x0."""
        ab_t = self.alphas_cumprod[t]
        if t_prev >= 0:
            ab_prev = self.alphas_cumprod[t_prev]
        else:
            ab_prev = torch.ones_like(ab_t)                    # official: set_alpha_to_one
        eps = (x_t - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
        if clip is not None:
            # official: dynamic thresholding with sample_max_value 1.0, a plain clip to [-1, 1]
            x0 = x0.clamp(-clip, clip)
        return ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, image_size: tuple[int, int], steps: int = DECODE_STEPS,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               clip: float | None = 1.0) -> torch.Tensor:
        """DDIM sampling: cond (B, 5, h, w) codes -> (B, C, H, W) standardized image.
        The start noise is `noise` if given, else drawn like the official pipeline:
        torch.randn((B, C, H, W), generator=generator) (on the generator's device, CPU by
        default), so equally seeded generators give equal images. `clip` bounds every
        predicted x0 to [-clip, clip] standard deviations (None: no bound)."""
        shape = (cond.shape[0], self.in_channels, *image_size)
        if noise is None:
            device = generator.device if generator is not None else "cpu"
            noise = torch.randn(shape, generator=generator, device=device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise.to(cond.device, torch.float32)
        ts = trailing_timesteps(steps, self.num_train_timesteps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x0 = self(x, t, cond).float()            # official: the scheduler step runs in fp32
            x = self.ddim_step(x, x0, t, t_prev, clip)
        return x
