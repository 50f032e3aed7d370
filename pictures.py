"""
Pictures without an image library: a PNG encoder (zlib), a 3x5 pixel font,
labelled sheets of panels and line plots (loss curves). Every stage that draws
imports from here; `render.render` turns a modality into RGB. Nothing here
knows about modalities.

    from pictures import save_png, save_sheet, plot_curves
    save_sheet("sheet.png", [("S2L2A", rgb), ("LULC", rgb2)], lines=["lat=1.00 lon=2.00"])
    plot_curves("loss.png", {"train": (steps, losses)}, title="loss", hlines={"log V": 9.64})
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

# line colours for plots, readable on white
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14),
          (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
          (188, 189, 34), (23, 190, 207)]


def save_png(path, rgb: np.ndarray):
    """Writes uint8 (H, W, 3) or (H, W) as PNG: signature, IHDR, zlib-compressed
    IDAT, IEND (RFC 2083). Atomic: written to a temporary file, then renamed."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    color = 2 if rgb.ndim == 3 else 0
    filter_bytes = np.zeros((h, 1), np.uint8)                     # filter 0 per row
    rows = np.concatenate([filter_bytes, rgb.reshape(h, -1)], 1)

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, path)


# a 3x5 pixel font: each glyph is five rows of three bits
_FONT = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:/=()%_,+|<> ", """
010101111101101 110101110101110 011100100100011 110101101101110 111100110100111 111100110100100
011100101101011 101101111101101 111010010010111 001001001101010 101101110101101 100100100100111
101111111101101 110101101101101 010101101101010 110101110100100 010101101110011 110101110101101
011100010001110 111010010010010 101101101101111 101101101101010 101101111111101 101101010101101
101101010010010 111001010100111 111101101101111 010110010010111 110001010100111 110001010001110
101101111001001 111100110001110 011100111101111 111001010010010 111101111101111 111101111001110
000000111000000 000000000000010 000010000010000 001001010100100 000111000111000 001010010010001
100010010010100 101001010100101 000000000000111 000000000010100 000010111010000 010010010010010
001010100010001 100010001010100 000000000000000""".split()))


def draw_text(img, text, y, x, scale=2, color=(0, 0, 0)):
    """Draws `text` (upper-cased) into img (H, W, 3) with its top-left corner at (y, x)."""
    for ch in str(text).upper():
        glyph = np.array([int(b) for b in _FONT.get(ch, _FONT[" "])], bool).reshape(5, 3)
        glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        h, w = img.shape[0] - y, img.shape[1] - x
        if h <= 0 or w <= 0:
            return
        if y >= 0 and x >= 0:
            img[y:y + 5 * scale, x:x + 3 * scale][glyph[:h, :w]] = color
        x += 4 * scale


def ramp(t, stops):
    """Colour ramp: t (any shape) -> (..., 3) float by linear interpolation
    between (position, rgb) stops."""
    pos = np.array([s[0] for s in stops], np.float32)
    cols = np.array([s[1] for s in stops], np.float32)
    return np.stack([np.interp(t, pos, cols[:, c]) for c in range(3)], -1)


def save_sheet(path, panels: list, columns: int | None = None, lines: list | None = None,
               min_size=128, max_size=None):
    """Lays (title, rgb) panels out in a grid with their titles above them,
    optional text lines below, and writes a PNG. Small panels are enlarged
    (nearest) to at least `min_size` pixels, large ones subsampled to at most
    `max_size`."""
    if max_size:
        panels = [(t, subsample(p, max_size)) for t, p in panels]
    columns = columns or len(panels)
    size = max(max(p.shape[0], p.shape[1]) for _, p in panels)
    zoom = max(1, -(-min(min_size, max_size or min_size) // size))
    cell, pad, title = size * zoom, 8, 16
    rows = -(-len(panels) // columns)
    text_h = 14 * len(lines or [])
    height = rows * (cell + title + pad) + pad + text_h
    width = columns * (cell + pad) + pad
    img = np.full((height, width, 3), 255, np.uint8)
    for k, (name, rgb) in enumerate(panels):
        r, c = divmod(k, columns)
        y, x = pad + r * (cell + title + pad), pad + c * (cell + pad)
        draw_text(img, name, y, x)
        big = np.asarray(rgb).repeat(zoom, 0).repeat(zoom, 1)
        img[y + title:y + title + big.shape[0], x:x + big.shape[1]] = big
    for k, line in enumerate(lines or []):
        draw_text(img, line, img.shape[0] - text_h + 14 * k, pad)
    save_png(path, img)


def subsample(panel: np.ndarray, max_size: int) -> np.ndarray:
    """Every k-th pixel, so that neither side is over `max_size`."""
    step_y = -(-panel.shape[0] // max_size)
    step_x = -(-panel.shape[1] // max_size)
    return panel[::step_y, ::step_x]


def plot_curves(path, series: dict, title="", xlabel="step", hlines: dict | None = None,
                log_y=False, size=(360, 640)):
    """Line plot of {name: (xs, ys)} with dashed horizontal reference lines
    {name: y}, a legend, and min/max tick labels, as a PNG. `log_y` plots
    log10(y)."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 70, w - 150, 24, h - 30
    f = (lambda v: np.log10(np.maximum(np.asarray(v, np.float64), 1e-12))) if log_y else \
        (lambda v: np.asarray(v, np.float64))
    xs = np.concatenate([np.asarray(x, np.float64) for x, _ in series.values()])
    ys = np.concatenate([f(y) for _, y in series.values()] + [f(list((hlines or {}).values()))])
    ys = ys[np.isfinite(ys)]
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    px = lambda x: left + (np.asarray(x, np.float64) - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - (f(y) - y0) / (y1 - y0) * (bottom - top)
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = 0                # axes
    lines = list(series.items()) + [(name, (None, y)) for name, y in (hlines or {}).items()]
    for k, (name, (x, y)) in enumerate(lines):
        color = COLORS[k % len(COLORS)]
        if x is None:
            yy = int(round(float(py([y])[0])))
            if top <= yy <= bottom:
                for dash in range(3):                                 # 3 px on, 3 off
                    img[yy, left + dash:right:6] = color
        else:
            cx, cy = px(x), py(y)
            for a in range(len(cx) - 1):             # dense samples along segments
                n = int(max(abs(cx[a + 1] - cx[a]), abs(cy[a + 1] - cy[a]))) + 2
                sx = np.linspace(cx[a], cx[a + 1], n).round().astype(int)
                sy = np.linspace(cy[a], cy[a + 1], n).round().astype(int)
                ok = (sy >= top) & (sy <= bottom) & np.isfinite(sy)
                img[sy[ok], sx[ok]] = color
                img[np.minimum(sy[ok] + 1, bottom), sx[ok]] = color
        draw_text(img, name, top + 16 * k, right + 12, color=color)
    lab = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    draw_text(img, lab(y1), top, 4)
    draw_text(img, lab(y0), bottom - 10, 4)
    draw_text(img, f"{x0:.0f}", bottom + 8, left)
    draw_text(img, f"{x1:.0f} {xlabel}", bottom + 8, right - 60)
    draw_text(img, title, 4, left)
    save_png(path, img)
