"""Nothing silent, nothing lost: every stage refuses a bad flag, a bad file or the wrong kind of checkpoint
with one line that names it; a run whose loss becomes non-finite stops at that step and keeps the last good
checkpoint; no command overwrites a file it did not create; tokens follow their tiles. (A kill at each point
of a checkpoint save is tested in tests/test_pretrain.py.) Each expectation is the message a user reads."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import eval_pangaea
import fsq_tokenizer
import generate
import pretrain
import pretrain_log
import pretrain_state
import synthetic
import terramesh
import text_tokenizer
import tim_finetune
from fsq_tokenizer import ImageTokenizer, TokenizerConfig
from geotiff import read_tiff, write_geotiff
from terramind import TerraMind, TerraMindConfig
from token_shards import TokenShards

ROOT = Path(__file__).resolve().parents[1]


def user_error(main, argv, monkeypatch, capsys) -> str:
    """Runs a script's main() as its `__main__` does, with argv -> (exit status, what stderr says)."""
    monkeypatch.setattr(sys, "argv", [argv[0], *map(str, argv[1:])])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    said = capsys.readouterr().err
    assert exit_.value.code in (1, 2) and "Traceback" not in said, said
    return said


# -----------------------------------------------------------------------------------------------------------
# Bad flags: refused by argparse before any work, naming the flag

BAD_FLAGS = [
    (pretrain.main, ["pretrain.py", "--data", "d", "--steps", "0"], "--steps: 0 must be a positive integer"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--steps", "-5"], "--steps: -5 must be a positive integer"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--batch-size", "0"], "--batch-size: 0 must be a positive"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--log-every", "0"], "--log-every: 0 must be a positive"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--save-every", "0"], "--save-every: 0 must be a positive"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--lr", "nan"], "--lr: 'nan' is not a finite number"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--warmup", "1.5"], "--warmup: 1.5 must lie in [0, 1]"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--tile", "40"], "--tile: 40 is not a multiple of 16"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--workers", "-1"], "--workers: -1 must be 0 or more"),
    (fsq_tokenizer.main, ["fsq_tokenizer.py", "train", "--modality", "DEM", "--data", "d", "--out", "o",
                          "--steps", "0"], "--steps: 0 must be a positive integer"),
    (fsq_tokenizer.main, ["fsq_tokenizer.py", "train", "--modality", "DEM", "--data", "d", "--out", "o",
                          "--ema", "1"], "--ema: 1.0 must lie in [0, 1)"),
    (fsq_tokenizer.main, ["fsq_tokenizer.py", "tokenize", "--data", "d", "--out", "o", "--tokenizers", "t",
                          "--shard-size", "0"], "--shard-size: 0 must be a positive integer"),
    (generate.main, ["generate.py", "--model", "m", "--out", "o", "--input", "S2L2A=x.tif", "--targets", "DEM",
                     "--top-p", "2"], "--top-p: 2.0 must lie in [0, 1]"),
    (generate.main, ["generate.py", "--model", "m", "--out", "o", "--input", "S2L2A=x.tif", "--targets", "DEM",
                     "--temperature", "-1"], "--temperature: -1.0 must be 0 or more"),
    (tim_finetune.main, ["tim_finetune.py", "train", "--model", "m", "--data", "d", "--out", "o",
                         "--batch-size", "0"], "--batch-size: 0 must be a positive integer"),
    (tim_finetune.main, ["tim_finetune.py", "train", "--model", "m", "--data", "d", "--out", "o",
                         "--epochs", "0"], "--epochs: 0 must be a positive integer"),
    (eval_pangaea.main, ["eval_pangaea.py", "fewshot", "--root", "r", "--shots", "0"], "--shots: 0 must be"),
    (eval_pangaea.main, ["eval_pangaea.py", "fewshot", "--root", "r", "--modality", "S2"],
     "--modality: S2: expected modalities from S2L1C"),
    (tim_finetune.main, ["tim_finetune.py", "train", "--model", "m", "--data", "d", "--out", "o",
                         "--tim", "LULC,S2L1C"], "--tim: S2L1C: expected none or modalities from S2L2A"),
    (eval_pangaea.main, ["eval_pangaea.py", "seg", "--root", "r", "--dataset", "terramesh", "--crop", "100"],
     "--crop: 100 is not a multiple of 16"),
    (eval_pangaea.main, ["eval_pangaea.py", "seg", "--root", "r", "--dataset", "terramesh", "--layers", "3,x"],
     "--layers: '3,x': expected block indices"),
    (pretrain.main, ["pretrain.py", "--data", "d", "--device", "gpu0"], "--device: 'gpu0' is not a torch device"),
    (terramesh.main, ["terramesh.py", "synth", "--size", "0"], "--size: 0 must be a positive integer"),
    (terramesh.main, ["terramesh.py", "synth", "--size", "7"], "multiple of 16"),
    (terramesh.main, ["terramesh.py", "synth", "--n", "x"], "--n: 'x' is not an integer"),
    (text_tokenizer.main, ["text_tokenizer.py", "train", "--corpus", "c", "--out", "o", "--vocab-size", "0"],
     "--vocab-size: 0 must be a positive integer"),
]


@pytest.mark.parametrize("main, argv, says", BAD_FLAGS, ids=[" ".join(a[1][-2:]) for a in BAD_FLAGS])
def test_bad_flags_are_refused_naming_the_flag(main, argv, says, monkeypatch, capsys):
    said = user_error(main, argv, monkeypatch, capsys)
    assert says in said and argv[-2] in said and said.strip().splitlines()[-1].count("error") == 1, said


def test_a_worker_error_is_one_line():
    """A DataLoader worker re-raises its error with the worker's traceback in the text: the user sees the
    original message only."""
    def broken(i):
        raise ValueError("/data/S1GRD/00007.tif: 3 infinite values in S1GRD")
    loader = torch.utils.data.DataLoader(range(2), num_workers=1, collate_fn=broken)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)
    assert cli.one_line(caught.value) == "/data/S1GRD/00007.tif: 3 infinite values in S1GRD"


# -----------------------------------------------------------------------------------------------------------
# Non-finite and implausible inputs: refused (or warned about) naming the file


def world_with(tmp_path, modality, x, dtype) -> tuple:
    """A one-sample TerraMesh folder whose `modality` tile holds x (C, H, W) stored as dtype."""
    path = tmp_path / modality / "a.tif"
    path.parent.mkdir(parents=True)
    write_geotiff(path, np.asarray(x, dtype))
    return terramesh.TerraMeshDataset(tmp_path, size=None), path


def s1(value=-12.0):
    return np.full((2, 32, 32), value)


@pytest.mark.parametrize("modality, x, dtype, says", [
    ("S1GRD", np.where(np.arange(2048).reshape(2, 32, 32) == 5, -np.inf, s1()), np.float32,
     r"S1GRD/a\.tif: 1 infinite values in S1GRD"),
    ("DEM", np.where(np.arange(1024).reshape(1, 32, 32) < 3, np.nan, 100.0), np.float32,
     r"DEM/a\.tif: 3 NaN values in DEM; only Sentinel-1"),
    ("S2L2A", np.full((12, 32, 32), 0.12), np.float32, r"S2L2A/a\.tif: S2L2A values lie in 0.12..0.12, 0-1 floats"),
    ("S2RGB", np.full((3, 32, 32), 0.5), np.float32, r"S2RGB/a\.tif: .* multiply by 255"),
    ("LULC", np.full((1, 32, 32), 2.5), np.float32, r"LULC/a\.tif: LULC is stored as float32 with fractional"),
])
def test_meaningless_tiles_are_refused_naming_the_file(tmp_path, modality, x, dtype, says):
    ds, _ = world_with(tmp_path, modality, x, dtype)
    with pytest.raises(ValueError, match=says):
        ds[0]


@pytest.mark.parametrize("modality, x, dtype, says", [
    ("DEM", np.full((1, 32, 32), 20000.0), np.float32, r"DEM/a\.tif: DEM values 20000..20000 lie outside"),
    ("S1GRD", s1(300.0), np.float32, r"S1GRD/a\.tif: S1GRD values 300..300 lie outside"),
    ("NDVI", np.full((1, 32, 32), 5000.0), np.float32, r"NDVI/a\.tif: NDVI values 5000..5000 lie outside"),
    ("LULC", np.full((1, 32, 32), 2.0), np.float32, r"LULC/a\.tif: LULC stored as float32"),
])
def test_implausible_tiles_are_read_with_a_warning_naming_the_file(tmp_path, modality, x, dtype, says):
    ds, _ = world_with(tmp_path, modality, x, dtype)
    with pytest.warns(UserWarning, match=says):
        ds[0]


def test_s1_nan_stays_counted_no_data_and_plausible_tiles_read_silently(tmp_path, recwarn):
    ds, _ = world_with(tmp_path, "S1GRD", np.where(np.arange(2048).reshape(2, 32, 32) < 4, np.nan, s1()),
                       np.float32)
    assert torch.isfinite(ds[0]["S1GRD"]).all() and ds.nan_replaced == {"S1GRD": 4}
    real = terramesh.TerraMeshDataset(ROOT / "assets" / "terramesh", size=None)
    recwarn.clear()
    for i in range(len(real)):
        real[i]
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_generation_inputs_and_captions_name_the_file(tmp_path):
    path = tmp_path / "s1.tif"
    write_geotiff(path, np.where(np.arange(2048).reshape(2, 32, 32) == 0, np.inf, s1()).astype(np.float32))
    with pytest.raises(ValueError, match=r"s1\.tif: 1 infinite values in S1GRD"):
        terramesh.read_input("S1GRD", str(path))
    caption = tmp_path / "caption" / "a.txt"
    caption.parent.mkdir()
    caption.write_bytes("caf\xe9 and fields".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption/a\.txt: not UTF-8 text"):
        terramesh.TerraMeshDataset(tmp_path)[0]
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8 text"):
        terramesh.read_input("caption", str(caption))


# -----------------------------------------------------------------------------------------------------------
# Non-finite losses and weights: training stops at that step, the last good checkpoint stays


def test_pretraining_that_diverges_stops_at_the_step_and_keeps_the_last_good_state(
        synth_world, token_shards, text_tokenizer, tmp_path):
    cmd = [sys.executable, "pretrain.py", "--data", synth_world, "--tokens", token_shards, "--text-tokenizer",
           text_tokenizer, "--out", tmp_path, "--steps", 6, "--size", "smoke", "--batch-size", 4, "--total-batch-size",
           4, "--workers", 0, "--eval-samples", 4, "--save-every", 1, "--lr", 1e30, "--warmup", 0, "--clip-grad", 0,
           "--device", "cpu"]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    found = re.match(r"error: step (\d+): loss \S+, gradient norm \S+: training stopped before saving; the step's "
                     r"samples in \S+: (.*); check them .* last good checkpoint: (\S+) \(step (\d+)\)", lines[0])
    assert found, lines[0]
    step, ids, last = int(found[1]), found[2].split(", "), int(found[4])
    train_ids = (synth_world / "splits" / "train.txt").read_text().split()
    assert len(ids) == 4 and set(ids) <= set(train_ids)
    state = pretrain_state.load_state(tmp_path / pretrain_state.STATE)       # finite weights (NaN ones would be refused)
    assert state[3]["step"] == last == step - 1 and "wrote" not in p.stdout
    assert max(r["step"] for r in pretrain_log.read_log(tmp_path / "log.jsonl") if "loss" in r) == step - 1


def diverging_run(world, tokens, text, out, deferred: str):
    """8 steps at lr 1e30 after one step of warmup at lr 0, a checkpoint every 2 steps, a log line every 4,
    validation only at the end; the finiteness check per step ("0") or deferred as on CUDA ("1")."""
    cmd = [sys.executable, "pretrain.py", "--data", world, "--tokens", tokens, "--text-tokenizer", text,
           "--out", out, "--steps", 8, "--size", "smoke", "--batch-size", 4, "--total-batch-size", 4,
           "--workers", 0, "--eval-samples", 4, "--eval-every", 100, "--save-every", 2, "--log-every", 4,
           "--lr", 1e30, "--warmup", 0.25, "--clip-grad", 0, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", pretrain_log.DEFERRED: deferred}
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_the_deferred_finiteness_check_names_the_same_step_samples_and_checkpoint(
        synth_world, token_shards, text_tokenizer, tmp_path):
    """On CUDA the check waits for the next log, validation or save step (no host sync per step); forced here
    on CPU, it stops with the per-step check's message (the first non-finite step, its samples, the last good
    checkpoint), and leaves the same log rows and state."""
    said, rows, states = {}, {}, {}
    for mode in ("0", "1"):
        out = tmp_path / mode
        p = diverging_run(synth_world, token_shards, text_tokenizer, out, mode)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        said[mode] = p.stderr.replace(str(out), "OUT")
        rows[mode] = pretrain_log.read_log(out / "log.jsonl")
        states[mode] = pretrain_state.load_state(out / pretrain_state.STATE)[3]["step"]
    assert said["0"] == said["1"], said
    assert rows["0"] == rows["1"] and states["0"] == states["1"]
    step = int(re.match(r"error: step (\d+):", said["1"])[1])
    assert step % 2 and step % 4, f"step {step} is a check step of the deferred mode: nothing was deferred"
    assert max(r["step"] for r in rows["1"] if "loss" in r) == step - 1 and states["1"] == step - 1


def test_step_log_defers_the_check_and_names_the_first_non_finite_step(tmp_path):
    """StepLog alone: steps 3 and 4 non-finite. Deferred, nothing is raised until flush(), which names step 3 and
    writes the rows of steps 1 and 2 only; per step, step 3 raises as it is added."""
    targets = ["tok_DEM", "caption"]
    stats = [torch.tensor([2.0, 1.0, 3.0, 4.0, 0.0], dtype=torch.float64) for _ in range(5)]
    stats[2][0], stats[3][0] = float("nan"), float("inf")
    norm = torch.tensor(0.5)

    def named(step, loss, norm):
        return cli.TrainingDiverged(f"step {step}: loss {loss}")

    for deferred in (True, False):
        path = tmp_path / f"log{deferred}.jsonl"
        log = pretrain_log.StepLog(path, targets, deferred, scale=2, diverged=named, write=True)
        with pytest.raises(cli.TrainingDiverged, match="^step 3: loss nan$"):
            for step in range(1, 6):
                log.add(step, 1e-3, stats[step - 1], norm)
                assert deferred or step < 3
            log.flush()
        assert not deferred or step == 5
        rows = pretrain_log.read_log(path)
        assert [r["step"] for r in rows] == [1, 2]
        assert rows[0] == {"step": 1, "loss": 1.0, "losses": {"tok_DEM": 0.25}, "lr": 1e-3, "grad_norm": 0.5}


def test_tokenizer_training_that_diverges_stops_and_names_the_batch(synth_world, tmp_path):
    cmd = [sys.executable, "fsq_tokenizer.py", "train", "--modality", "DEM", "--data", synth_world, "--size",
           "smoke", "--steps", 20, "--batch-size", 4, "--lr", 1e30, "--save-every", 1, "--out", tmp_path,
           "--device", "cpu"]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    found = re.search(r"error: DEM tokenizer, step (\d+): .* the batch's samples in \S+/DEM: (.*); check them .*"
                      r"last good checkpoint: (.*)$", p.stderr.strip())
    assert p.returncode == 1 and found and "Traceback" not in p.stderr, p.stderr[-2000:]
    step, ids = int(found[1]), found[2].split(", ")
    assert len(ids) == 4 and all((synth_world / "DEM" / f"{i}.tif").exists() for i in ids)
    if step > 1:   # the states before it are finite and loadable
        assert f"(step {step - 1})" in found[3]
        ImageTokenizer.from_checkpoint(tmp_path / "tokenizer_DEM.safetensors")


def test_tim_never_saves_a_diverged_model_as_best(tmp_path):
    world = tmp_path / "world"
    synthetic.synthesize(world, n=20, size=64, seed=3)
    torch.manual_seed(0)
    TerraMind(TerraMindConfig.preset("smoke")).save_checkpoint(tmp_path / "terramind.safetensors")
    with pytest.raises(cli.TrainingDiverged, match=r"epoch 1, step \d+: loss nan: training stopped; the batch's"):
        tim_finetune.main(["train", "--model", str(tmp_path / "terramind.safetensors"), "--data", str(world),
                           "--classes", "land,water", "--modalities", "S1GRD", "--tim", "none", "--channels", "8",
                           "--lr", "1e30", "--batch-size", "4", "--epochs", "2", "--out", str(tmp_path / "tim"),
                           "--device", "cpu"])
    assert not (tmp_path / "tim" / "model.safetensors").exists()


def test_nan_weights_are_refused_on_load_and_nan_logits_never_reach_multinomial(tmp_path):
    model = TerraMind(TerraMindConfig.preset("smoke"))
    with torch.no_grad():
        model.mask_token.fill_(float("nan"))
    model.save_checkpoint(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors: 1 tensors hold NaN or inf \(e\.g\. mask_token\)"):
        TerraMind.from_checkpoint(tmp_path / "nan.safetensors")
    logits = torch.zeros(1, 3, 10)
    logits[0, 1, 4] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="1 non-finite logits"):
            generate.sample(logits, temperature, top_p=0.8)


# -----------------------------------------------------------------------------------------------------------
# The wrong kind of checkpoint: the error names the kind given and the kind expected


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    TerraMind(TerraMindConfig.preset("smoke")).save_checkpoint(folder / "terramind.safetensors")
    ImageTokenizer(TokenizerConfig.preset("smoke", "DEM")).save_checkpoint(folder / "tokenizer_DEM.safetensors")
    return folder


@pytest.mark.parametrize("given, load, says", [
    ("tokenizer_DEM", lambda p: TerraMind.from_checkpoint(p),
     "is an image tokenizer (fsq_tokenizer.py train's tokenizer_<MOD>.safetensors); expected a TerraMind model"),
    ("terramind", lambda p: pretrain_state.load_state(p), "is a TerraMind model (pretrain.py's terramind.safetensors "
                                                    "or terramind.py convert's output); expected a pretrain state"),
    ("terramind", lambda p: ImageTokenizer.from_checkpoint(p), "is a TerraMind model .*; expected an image tokenizer"),
    ("terramind", lambda p: tim_finetune.TiMSegmenter.from_checkpoint(p), "is a TerraMind model .*; expected a TiM "
                                                                          "model"),
])
def test_the_wrong_kind_of_checkpoint_is_named(checkpoints, given, load, says):
    with pytest.raises(ValueError, match=re.escape(says) if "*" not in says else says):
        load(checkpoints / f"{given}.safetensors")


def test_a_tokenizer_as_model_is_one_line_in_generate(checkpoints, monkeypatch, capsys, tmp_path):
    said = user_error(generate.main, ["generate.py", "--model", checkpoints / "tokenizer_DEM.safetensors",
                                      "--tokenizers", checkpoints, "--input", "DEM=x.tif", "--targets", "LULC",
                                      "--out", tmp_path, "--device", "cpu"], monkeypatch, capsys)
    assert said.count("\n") == 1 and "expected a TerraMind model" in said, said


# -----------------------------------------------------------------------------------------------------------
# Outputs: never overwritten, never lost; tokens follow their tiles


def test_synth_refuses_a_non_empty_folder_and_overwrite_leaves_no_old_tile(tmp_path, monkeypatch, capsys):
    synthetic.synthesize(tmp_path, n=4, size=32, seed=0, workers=1)
    (tmp_path / "notes.txt").write_text("mine")
    said = user_error(terramesh.main, ["terramesh.py", "synth", "--out", tmp_path, "--n", 2, "--size", 16,
                                       "--workers", 1], monkeypatch, capsys)
    assert f"--out {tmp_path}: the folder is not empty" in said and "--overwrite" in said
    monkeypatch.setattr(sys, "argv", ["terramesh.py", "synth", "--out", str(tmp_path), "--n", "2", "--size", "16",
                                      "--workers", "1", "--overwrite"])
    terramesh.main()
    assert sorted(p.name for p in (tmp_path / "DEM").iterdir()) == ["00000.tif", "00001.tif"]
    assert read_tiff(tmp_path / "DEM" / "00000.tif")[0].shape[:2] == (16, 16)
    assert (tmp_path / "notes.txt").read_text() == "mine"                        # not the command's file


def test_seg_checks_out_before_training(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    said = user_error(eval_pangaea.main, ["eval_pangaea.py", "seg", "--root", tmp_path, "--dataset", "terramesh",
                                          "--out", blocker / "run", "--device", "cpu"], monkeypatch, capsys)
    assert f"--out {blocker / 'run'}: cannot write there" in said, said


def test_predict_never_writes_over_an_input(tmp_path):
    image = tmp_path / "s1.tif"
    write_geotiff(image, s1().astype(np.float32))
    before = image.read_bytes()
    model = tim_finetune.TiMSegmenter.from_pretrained(TerraMind(TerraMindConfig.preset("smoke")),
                                                      modalities=("S1GRD",), tim=(), channels=8, tile=32)
    model.save_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="is one of the --input files"):
        tim_finetune.main(["predict", "--ckpt", str(tmp_path / "model.safetensors"), "--input", f"S1GRD={image}",
                           "--out", str(image), "--device", "cpu"])
    assert image.read_bytes() == before


def test_tokenize_encodes_a_changed_tile_again(tokenizers, tmp_path):
    data, out = tmp_path / "world", tmp_path / "tokens"
    synthetic.synthesize(data, n=6, size=64, seed=1, workers=1)
    cmd = [sys.executable, "fsq_tokenizer.py", "tokenize", "--data", data, "--tokenizers", tokenizers,
           "--modalities", "DEM", "--out", out, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, env=env)
    assert "(1 shards written, 0 already done)" in first.stdout, first.stderr[-2000:]
    before = TokenShards(out).get("DEM", "00003")
    tile = data / "DEM" / "00003.tif"
    x, geo = read_tiff(tile)
    write_geotiff(tile, (x[::-1] + 500).astype(x.dtype), geo)      # fixed: another tile, same size
    stat = tile.stat()
    os.utime(tile, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))           # coarse clocks: a later mtime
    again = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, env=env)
    assert "(1 shards written, 0 already done)" in again.stdout, again.stdout + again.stderr[-2000:]
    after = TokenShards(out).get("DEM", "00003")
    assert not torch.equal(before, after)
    same = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, env=env)
    assert "(0 shards written, 1 already done)" in same.stdout
