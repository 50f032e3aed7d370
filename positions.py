"""
Position tables of TerraMind (official: MoCo-v3 sin-cos, terratorch
.../terramind/model/tm_utils.py).

Image tokens take a fixed 2D sin-cos table built for the model's grid; other grids
bicubic-interpolate it, as the official code does (a model trained on 64 px tiles
uses grid 4, official weights use 14). Sequence tokens take a 1D table of
SEQ_POSITIONS positions. Used by terramind.py (the model) and official.py (official
checkpoints store the tables, which must equal these).
"""
import math

import torch
import torch.nn.functional as F

SEQ_POSITIONS = 512   # official: a 1D sin-cos table of 512 positions


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim): [sin(p w), cos(p w)], w_k = 10000^(-k / (dim/2))."""
    k = torch.arange(dim // 2, dtype=torch.float32)
    omega = 1.0 / 10000.0 ** (k / (dim // 2))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * omega[None]  # (n, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim), raster order: [sin(r w), cos(r w), sin(c w), cos(c w)] for
    row r, column c."""
    k = torch.arange(dim // 4, dtype=torch.float32)
    omega = 1.0 / 10000.0 ** (k / (dim // 4))
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    a = r.reshape(-1, 1).float() * omega                    # (grid^2, dim/4)
    b = c.reshape(-1, 1).float() * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)


def resize_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(g*g, D) -> (h*w, D) by bicubic interpolation (official
    interpolate_pos_encoding)."""
    g = math.isqrt(table.shape[0])
    if (g, g) == (h, w):
        return table
    grid = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)   # (1, D, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
    return grid.permute(0, 2, 3, 1).reshape(h * w, -1)
