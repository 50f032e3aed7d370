"""terramind.py at the full v1 tiny size (dim 192, 12 + 4 blocks, 224 px, the real vocabularies) against the
official implementation: the same weights, made from a seed on both sides (seeded_state below; the official
side is tests/fixtures/make_full_size_fixture.py, run with terratorch), give the official encoder output and
logits (tests/fixtures/full_size_official.safetensors holds only those outputs, not the 212 MB of weights)."""
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import load_safetensors
from conftest import assert_argmax_equals_official
from positions import SEQ_POSITIONS, sincos_1d, sincos_2d
from terramind import TerraMind

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "assets" / "official" / "keys" / "terramind_tiny_keys.txt"
FIXTURE = ROOT / "tests" / "fixtures" / "full_size_official.safetensors"
COND = ("S2L2A", "S1GRD", "tok_DEM")         # the encoder inputs of the stored outputs


def seeded(shape, name: str) -> torch.Tensor:
    """Uniform values in [-0.5, 0.5) from a hash of (name, index): 24-bit fractions, exact in float32, the
    same on every machine and torch version (no random number generator involved)."""
    i = np.arange(int(np.prod(shape)), dtype=np.uint64)
    salt = zlib.crc32(name.encode()) * 1442695040888963407 % 2 ** 64
    h = i * np.uint64(6364136223846793005) + np.uint64(salt)                  # wraps modulo 2^64
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    u = (h >> np.uint64(40)).astype(np.float64) / 2 ** 24 - 0.5
    return torch.from_numpy(u.astype(np.float32)).reshape(shape)


def seeded_state(shapes: dict, tables: dict) -> dict:
    """An official-format state dict {key: tensor} with the official constraints: position tables as given
    (`tables`), LayerNorm biases zero, to_logits tied to its token table, a decoder modality embedding equal
    to the encoder's; every other tensor 2^-4 x seeded (norm weights 1 + 2^-2 x seeded)."""
    state = {}
    for k, shape in shapes.items():
        if k.endswith("pos_emb"):
            state[k] = tables[k]
        elif "norm" in k and k.endswith(".bias"):
            state[k] = torch.zeros(shape)
        elif "norm" in k:
            state[k] = 1 + seeded(shape, k) / 4
        else:
            state[k] = seeded(shape, k) / 16
    for k in shapes:
        if k.endswith("to_logits.weight"):
            state[k] = state[k.replace("to_logits", "token_emb")]
        encoder_twin = k.replace("decoder_embeddings", "encoder_embeddings")
        if k.startswith("decoder_embeddings") and k.endswith("mod_emb") and encoder_twin in shapes:
            state[k] = state[encoder_twin]
    return state


def seeded_inputs() -> dict:
    """One 224 px sample: standardized S2L2A and S1GRD pixels, DEM tokens; coords [S_1] lat lon EOS."""
    tok = (seeded((1, 14, 14), "input.tok_DEM") + 0.5) * 15360
    return {"S2L2A": 4 * seeded((1, 12, 224, 224), "input.S2L2A"),
            "S1GRD": 4 * seeded((1, 2, 224, 224), "input.S1GRD"),
            "tok_DEM": tok.long().clamp(0, 15359),
            "coords_target": torch.tensor([[5, 4300, 5500, 3]])}


def read_shapes() -> dict:
    shapes = {}
    for line in KEYS.read_text().splitlines():
        k, shape = line.split("\t")
        shapes[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def our_tables(shapes: dict) -> dict:
    """Our sin-cos tables for the official pos_emb keys (official.py checks that they are the official ones)."""
    out = {}
    for k, shape in shapes.items():
        if k.endswith("pos_emb"):
            seq = shape[1] == SEQ_POSITIONS
            out[k] = (sincos_1d(SEQ_POSITIONS, shape[2]) if seq else sincos_2d(14, shape[2]))[None]
    return out


@pytest.mark.slow
def test_full_size_tiny_equals_official():
    shapes = read_shapes()
    model = TerraMind.from_official(seeded_state(shapes, our_tables(shapes)), "tiny").eval()
    assert sum(p.numel() for p in model.parameters()) > 50e6        # the v1 tiny size, not a shrunken copy
    expect, _ = load_safetensors(FIXTURE)
    x = seeded_inputs()
    cond = {e: x[e] for e in COND}
    with torch.no_grad():
        enc = model.encode(cond)
        lulc = model.logits(cond, "tok_LULC")                                       # (1, 196, 4375)
        prompt = {**cond, "coords": torch.full((1, 1), 5)}                        # [S_1], teacher forced
        coords = model.logits(prompt, "coords", prefix=x["coords_target"])
    for e in COND:
        a, b = enc.tokens[e], expect[f"encoder.{e}"]
        assert (a - b).norm() <= 1e-5 * b.norm(), e
    # one of the 196 positions lies 6.6e-6 from a tie (logits up to 1.24)
    assert_argmax_equals_official(lulc.argmax(-1), expect["argmax.tok_LULC"], expect["second.tok_LULC"],
                                  expect["gap.tok_LULC"], 1e-4, "tok_LULC")
    rows = expect["rows"]
    assert (lulc[0, rows] - expect["logits.tok_LULC"]).norm() <= 1e-5 * expect["logits.tok_LULC"].norm()
    assert (coords - expect["logits.coords"]).norm() <= 1e-5 * expect["logits.coords"].norm()
