"""
The heads that PANGAEA trains on a frozen encoder (PANGAEA, Marsocci et al. 2024:
pangaea/decoders/upernet.py and ltae.py): UPerNet on four ViT feature maps, and the two
temporal mappings of multi-temporal datasets (L-TAE, Linear(T, 1)).

Consumes per-patch features (B, D, h, w) (or (B, D, T, h, w) for the temporal mappings);
produces class logits (B, K, H, W). eval_pangaea.py (the protocol) and tim_finetune.py (TiM)
import them; nothing here runs on its own, so there are no CPU/GPU/torchrun commands.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def conv_bn_relu(cin, cout, k):   # official: the convs keep their biases before the norm
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


def _resize_like(x, like):
    return F.interpolate(x, like.shape[2:], mode="bilinear", align_corners=False)


class UPerNet(nn.Module):
    """PANGAEA's UPerNet (mmseg UPerHead) on four ViT feature maps: neck (Feature2Pyramid)
    rescaling them x4, x2, x1, x0.5; pyramid pooling (1, 2, 3, 6) on the coarsest; FPN top-down;
    fusion; Dropout2d; 1x1 classifier.
    DEVIATION: BatchNorm2d instead of SyncBatchNorm (we evaluate in one process)."""

    def __init__(self, dim, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()

        def up():
            return nn.ConvTranspose2d(dim, dim, 2, 2)
        x4 = nn.Sequential(up(), nn.BatchNorm2d(dim), nn.GELU(), up())
        self.neck = nn.ModuleList([x4, up(), nn.Identity(), nn.MaxPool2d(2)])
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1))
            for s in pool_scales)
        pooled = dim + len(pool_scales) * channels
        self.bottleneck = conv_bn_relu(pooled, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def pyramid_pooling(self, top):                          # (B, D, h/2, w/2) -> (B, C, ..)
        pooled = [_resize_like(pool(top), top) for pool in self.ppm]
        return self.bottleneck(torch.cat([top] + pooled, 1))

    def forward(self, features: list, size) -> torch.Tensor:
        """4 x (B, D, h, w) -> (B, K, *size)."""
        levels = [op(f) for op, f in zip(self.neck, features)]     # (B, D, 4h | 2h | h | h/2, ..)
        lateral = [conv(x) for conv, x in zip(self.lateral, levels)]
        lateral.append(self.pyramid_pooling(levels[3]))            # 4 x (B, C, ..)
        for i in (3, 2, 1):                                         # top-down pathway
            lateral[i - 1] = lateral[i - 1] + _resize_like(lateral[i], lateral[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, lateral)] + [lateral[3]]
        finest = outs[0]
        fused = [finest] + [_resize_like(o, finest) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(fused, 1))                # (B, C, 4h, 4w)
        logits = self.conv_seg(self.dropout(x))
        return F.interpolate(logits, size, mode="bilinear", align_corners=False)


class LTAE2d(nn.Module):
    """Lightweight Temporal Attention Encoder (Garnot & Landrieu 2020) per pixel with PANGAEA's
    settings: GroupNorm(16) in, 1x1 in-conv, a learned master query per head (16 heads, d_k 4),
    softmax over T at temperature sqrt(d_k), value channels split per head, MLP (Linear, BN,
    ReLU), dropout 0.2, GroupNorm(16) out, no positions."""

    def __init__(self, dim, heads=16, d_k=4, dropout=0.2):
        super().__init__()
        self.heads, self.d_k = heads, d_k
        self.in_norm = nn.GroupNorm(heads, dim)
        self.inconv = nn.Conv1d(dim, dim, 1)
        self.query = nn.Parameter(torch.randn(heads, d_k) * math.sqrt(2 / d_k))
        self.key = nn.Linear(dim, heads * d_k)
        nn.init.normal_(self.key.weight, std=math.sqrt(2 / d_k))
        self.attn_dropout = nn.Dropout(0.1)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.out_norm = nn.GroupNorm(heads, dim)

    def forward(self, x):
        """(B, D, T, h, w) -> (B, D, h, w); P = B * h * w pixels."""
        B, D, T, h, w = x.shape
        pixels = rearrange(x, "b d t h w -> (b h w) d t")
        v = self.inconv(self.in_norm(pixels)).transpose(1, 2)             # (P, T, D)
        k = self.key(v).view(-1, T, self.heads, self.d_k)                 # (P, T, heads, d_k)
        scores = (k * self.query).sum(-1) / math.sqrt(self.d_k)           # (P, T, heads)
        attn = self.attn_dropout(scores.softmax(1))
        values = v.view(-1, T, self.heads, D // self.heads)               # (P, T, heads, D/heads)
        out = torch.einsum("pth,pthc->phc", attn, values).reshape(-1, D)  # (P, D)
        out = self.out_norm(self.dropout(self.mlp(out)))
        return rearrange(out, "(b h w) d -> b d h w", b=B, h=h, w=w)


class TemporalLinear(nn.Linear):
    """PANGAEA's linear temporal mapping: nn.Linear(T, 1) over the time axis."""

    def __init__(self, frames):
        super().__init__(frames, 1)

    def forward(self, x):                                   # (B, D, T, h, w) -> (B, D, h, w)
        return super().forward(x.movedim(2, -1)).squeeze(-1)
