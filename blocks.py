"""
The transformer blocks of TerraMind: pre-norm encoder and decoder blocks, LayerNorm
without bias.

The names follow the official implementation (qkv / q / kv / proj / fc1-3, norm1 /
norm2 / query_norm / context_norm; terratorch .../terramind/model/terramind.py), so
official state dicts map onto ours key by key (official.py). tiny/small use GELU
MLPs with biases everywhere; base/large use bias-free SwiGLU blocks (official
GatedMlp). Linear layers are cpu_linear's (oneDNN on CPU where it measures faster).
Attention runs through `scaled_dot_product_attention`; masks are True = attend.
"""
import torch.nn.functional as F
from torch import nn

from cpu_linear import Linear


def layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6, bias=False)


class Attention(nn.Module):
    """Multi-head self-attention (qkv) or cross-attention (q from x, kv from context),
    through SDPA."""

    def __init__(self, dim, num_heads, bias, cross=False):
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        if cross:
            self.q = Linear(dim, dim, bias=bias)
            self.kv = Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim, bias=bias)

    def forward(self, x, context=None, mask=None):
        """x (B, N, D), context (B, M, D), mask True = attend -> (B, N, D)."""
        B, N, D = x.shape
        H = self.num_heads
        if self.cross:
            M = context.shape[1]
            q = self.q(x).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
            kv = self.kv(context).view(B, M, 2, H, D // H)  # (B, M, 2, H, D/H)
            k, v = kv.permute(2, 0, 3, 1, 4)                # 2 x (B, H, M, D/H)
        else:
            qkv = self.qkv(x).view(B, N, 3, H, D // H)      # (B, N, 3, H, D/H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)            # 3 x (B, H, N, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D/H)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc2(gelu(fc1 x)), or with swiglu the official GatedMlp fc2(silu(fc1 x) * fc3 x)."""

    def __init__(self, dim, hidden, swiglu):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = Linear(dim, hidden, bias=not swiglu)
        self.fc2 = Linear(hidden, dim, bias=not swiglu)
        if swiglu:
            self.fc3 = Linear(dim, hidden, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Encoder block: self-attention and MLP. `c` is a TerraMindConfig."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(c.dim), layer_norm(c.dim)
        self.attn = Attention(c.dim, c.num_heads, not c.swiglu)
        self.mlp = Mlp(c.dim, c.mlp_hidden, c.swiglu)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention among the queries, cross-attention to the encoder (separate
    query/context norms), MLP. `c` is a TerraMindConfig."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(c.dim), layer_norm(c.dim)
        self.query_norm, self.context_norm = layer_norm(c.dim), layer_norm(c.dim)
        self.self_attn = Attention(c.dim, c.num_heads, not c.swiglu)
        self.cross_attn = Attention(c.dim, c.num_heads, not c.swiglu, cross=True)
        self.mlp = Mlp(c.dim, c.mlp_hidden, c.swiglu)

    def forward(self, y, context, self_mask=None, cross_mask=None):
        y = y + self.self_attn(self.norm1(y), mask=self_mask)
        query, context = self.query_norm(y), self.context_norm(context)
        y = y + self.cross_attn(query, context, mask=cross_mask)
        return y + self.mlp(self.norm2(y))
