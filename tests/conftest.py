"""Session fixtures shared by every stage's tests, so that CI builds the small synthetic pipeline once.

Each fixture runs the stage's own command (as a user would) into a session temporary folder, on demand:
a test file that asks for none of them pays nothing. Costs measured on the 2-core CI machine.

  synth_world      Path of a 300-sample synthetic TerraMesh world, 64 px tiles, seed 0, splits 240/30/30
                   (`synthetic.synthesize`).                                                         ~3 s
  text_tokenizer   Path of a WordPiece JSON trained on synth_world's captions (`WordPieceTokenizer.train`,
                   official ids for the special, sentinel and coordinate tokens; ~6800 ids).          <1 s
  tokenizers       Path of a folder with tokenizer_<MOD>.safetensors for the six tokenized modalities
                   (S2L2A S1GRD S1RTC DEM LULC NDVI), `fsq_tokenizer.py train --size smoke`,
                   TOKENIZER_STEPS steps of 16 tiles each: barely trained, but deterministic.         ~25 s
  token_shards     Path of the token shards of synth_world (`fsq_tokenizer.py tokenize`), 4x4 per tile. ~6 s
  pretrained       `Pretrained` (below): a smoke TerraMind pretrained by `pretrain.py` for PRETRAIN_STEPS
                   steps of 32 samples on the above; its validation losses lie below each modality's log(V)
                   and below the unigram (token-frequency) baseline (tests/test_pretrain.py).         ~60 s

Chained: pretrained needs token_shards and text_tokenizer, token_shards needs tokenizers, all need
synth_world. Together about 1.5-2 minutes.

Also one assertion shared by the parity tests: `assert_argmax_equals_official` (near-ties of float32 logits).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD_SIZE, WORLD_TILE = 300, 64
TOKENIZED = ("S2L2A", "S1GRD", "S1RTC", "DEM", "LULC", "NDVI")
TOKENIZER_STEPS = 60
PRETRAIN_STEPS = 150


def run_stage(*args, timeout=600) -> str:
    """Runs `python <args>` in the project root; a failure shows the command's output."""
    cmd = [sys.executable, *map(str, args)]
    # one thread: on a shared 2-core box, a second OpenMP thread that loses its core stalls every barrier
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory) -> Path:
    import synthetic
    root = tmp_path_factory.mktemp("world") / "synth"
    synthetic.synthesize(root, n=WORLD_SIZE, size=WORLD_TILE, seed=0)
    return root


@pytest.fixture(scope="session")
def text_tokenizer(synth_world) -> Path:
    from text_tokenizer import WordPieceTokenizer, read_corpus
    path = synth_world.parent / "wordpiece.json"
    WordPieceTokenizer.train(read_corpus([synth_world / "caption"]), vocab_size=30_000).save(path)
    return path


@pytest.fixture(scope="session")
def tokenizers(synth_world) -> Path:
    out = synth_world.parent / "tokenizers"
    run_stage("fsq_tokenizer.py", "train", "--modality", *TOKENIZED, "--data", synth_world, "--size", "smoke",
              "--steps", TOKENIZER_STEPS, "--batch-size", 16, "--out", out, "--device", "cpu")
    return out


@pytest.fixture(scope="session")
def token_shards(synth_world, tokenizers) -> Path:
    out = synth_world.parent / "tokens"
    run_stage("fsq_tokenizer.py", "tokenize", "--data", synth_world, "--tokenizers", tokenizers, "--out", out,
              "--device", "cpu")
    return out


@dataclass
class Pretrained:
    out: Path              # pretrain.py --out folder
    checkpoint: Path       # out / "terramind.safetensors": TerraMind.from_checkpoint(checkpoint)
    log: list              # log.jsonl rows: {"step", "loss", "losses", "lr", ...} and {"step", "val", "val_loss"}
    val: dict              # final validation loss per target entry (30 val samples), nats
    data: Path             # the world, token shards and text tokenizer it was trained on
    tokens: Path
    text_tokenizer: Path


@pytest.fixture(scope="session")
def pretrained(synth_world, token_shards, text_tokenizer) -> Pretrained:
    out = synth_world.parent / "pretrain"
    run_stage("pretrain.py", "--size", "smoke", "--data", synth_world, "--tokens", token_shards, "--text-tokenizer",
              text_tokenizer, "--steps", PRETRAIN_STEPS, "--batch-size", 32, "--lr", 2e-3, "--workers", 1,
              "--eval-every", PRETRAIN_STEPS, "--save-every", PRETRAIN_STEPS, "--log-every", 50, "--out", out,
              "--device", "cpu")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val"] for r in rows if "val" in r][-1]
    return Pretrained(out, out / "terramind.safetensors", rows, val, synth_world, token_shards, text_tokenizer)


SHARD_WORLD_SIZE, SHARD_WORLD_TILE = 120, 72   # 72 px = 64 + 8, as TerraMesh's 264 px = 256 + 8


@pytest.fixture(scope="session")
def shard_world(tmp_path_factory) -> Path:
    """Path of a synthetic world in the published TerraMesh layout (`synthetic.synthesize_shards`): 120 samples
    of 72 px in tar shards of zarr.zip, train 96 / val 24, S1RTC in majortom shards, S1GRD in ssl4eos12. ~3 s"""
    import synthetic
    root = tmp_path_factory.mktemp("shard_world") / "synth"
    synthetic.synthesize_shards(root, n=SHARD_WORLD_SIZE, size=SHARD_WORLD_TILE, seed=0, workers=1, shard_size=32)
    return root


@pytest.fixture(scope="session")
def shard_tokens(shard_world, tokenizers) -> Path:
    """Token shards of shard_world: the 4x4 grid of each tile's centred 64 px window."""
    out = shard_world.parent / "tokens"
    run_stage("fsq_tokenizer.py", "tokenize", "--data", shard_world, "--tokenizers", tokenizers, "--out", out,
              "--device", "cpu")
    return out


# comparing with the official implementation ----------------------------------------------------------------------
def assert_argmax_equals_official(mine, first, second, gap, tie_gap: float, what: str):
    """mine: our argmax; first, second, gap: the official argmax, runner-up and the logit gap between them, at
    every position. Our class must be the official one, or its runner-up where the gap is at most tie_gap: random
    weights put a few positions within float32 rounding of a tie, and another CPU may pick either class there."""
    mine, first, second, gap = (np.asarray(a) for a in (mine, first, second, gap))
    tied = gap <= tie_gap
    assert tied.mean() < 0.01, f"{what}: {tied.sum()} near-ties; too many for the check to mean anything"
    wrong = (mine != first) & ~(tied & (mine == second))
    assert not wrong.any(), f"{what}: {wrong.sum()} of {wrong.size} positions differ from the official argmax"
