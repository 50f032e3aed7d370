"""pretrain.py against outside facts: log(V) at initialization and the unigram (token-frequency) baseline after
training, the 4M schedule and weight-decay rules, one process with gradient accumulation against torchrun with
two gloo processes, an uninterrupted run against a SIGKILLed and resumed one, and damaged checkpoints."""
import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
import pretrain_data
import pretrain_log
import pretrain_recipe
import pretrain_state
from entries import ENTRY_INDEX, entry_kind
from masking import Masking
from modalities import MODALITIES
from terramind import TerraMind, TerraMindConfig
from text_tokenizer import WordPieceTokenizer
from token_shards import TokenShards

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--size", "smoke", "--batch-size", 4, "--total-batch-size", 8, "--lr", 2e-3, "--workers", 0,
         "--eval-every", 1000, "--eval-samples", 8, "--log-every", 1, "--device", "cpu"]   # 2 micro-batches of 4


def command(world, out, steps, *extra):
    return [sys.executable, "pretrain.py", "--data", world.data, "--tokens", world.tokens, "--text-tokenizer",
            world.text, "--out", out, "--steps", steps, *SHORT, *extra]


def losses(out) -> dict:
    return {r["step"]: r["loss"] for r in pretrain_log.read_log(Path(out) / "log.jsonl") if "loss" in r}


def run(cmd, env=None):
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def world(token_shards, text_tokenizer, synth_world):
    return argparse.Namespace(data=synth_world, tokens=token_shards, text=text_tokenizer)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One process, gradient accumulation 2 (2 x 4 samples), 6 steps, a checkpoint every 2 steps."""
    return reference_run(world, tmp_path_factory.mktemp("reference"))


def reference_run(world, out):
    said = run(command(world, out, 6, "--save-every", 2), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "1 process(es) x 2 accumulation x 4 micro-batch" in said
    return out


@pytest.fixture(scope="module")
def published(shard_tokens, text_tokenizer, shard_world):
    """The synthetic world in the published TerraMesh layout (72 px tiles; tokens of the centred 64 px)."""
    return argparse.Namespace(data=shard_world, tokens=shard_tokens, text=text_tokenizer)


@pytest.fixture(scope="module")
def published_reference(published, tmp_path_factory):
    return reference_run(published, tmp_path_factory.mktemp("published_reference"))


LAYOUTS = ["geotiff", "shards"]


def layout_world(request, layout, reference=False):
    """The GeoTIFF world or the published-layout one (and its one-process reference run)."""
    names = ("world", "reference") if layout == "geotiff" else ("published", "published_reference")
    return request.getfixturevalue(names[1] if reference else names[0])


def dataset(world, shuffle=True, tile=64, shards=None, entries=None):
    text = WordPieceTokenizer.from_file(world.text)
    shards = shards or TokenShards(world.tokens)
    entries = entries or pretrain_data.available_entries(world.data, world.tokens, lambda *a: None)[0]
    targets = [e for e in entries if entry_kind(e) != "pixels"]
    masking = Masking(entries, targets, 64, 64, "mix", tile // 16)
    return pretrain_data.PretrainData(world.data, "train" if shuffle else "val", shards, text, masking, tile, 0, shuffle)


# -----------------------------------------------------------------------------------------------------------
# Schedule, batches, data stream


def test_lr_schedule_is_4m_warmup_then_half_cosine():
    lr, steps, warmup = 2e-4, 100, 10
    assert pretrain.lr_at(0, steps, warmup, lr) == 0.0
    assert pretrain.lr_at(5, steps, warmup, lr) == pytest.approx(lr / 2)
    assert pretrain.lr_at(10, steps, warmup, lr) == pytest.approx(lr)
    assert pretrain.lr_at(55, steps, warmup, lr) == pytest.approx(lr / 2)        # cos(pi / 2) = 0
    assert pretrain.lr_at(100, steps, warmup, lr) == pytest.approx(0.0, abs=1e-20)


def test_step_batches_do_not_depend_on_the_process_layout():
    def micro_batches(world, accum, micro, steps=3):
        per_step = {}
        for r in range(world):
            for k, b in enumerate(pretrain_data.StepBatches(0, steps, r, world, micro, accum)):
                per_step.setdefault(k // accum, []).append(tuple(b))
        return {s: sorted(v) for s, v in per_step.items()}
    one = micro_batches(1, 4, 2)
    assert micro_batches(2, 2, 2) == one == micro_batches(4, 1, 2)
    for s, batches in one.items():   # step s reads exactly positions [8 s, 8 s + 8), each once
        assert sorted(k for b in batches for k in b) == list(range(8 * s, 8 * s + 8))
    assert list(pretrain_data.StepBatches(2, 3, 0, 1, 2, 4))[0] == [16, 17]         # resuming at step 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_is_a_permutation_per_epoch_and_depends_only_on_the_position(layout, request):
    world = layout_world(request, layout)
    ds = dataset(world)
    n = len(ds)
    assert sorted(ds.order(0)) == list(range(n)) and sorted(ds.order(1)) == list(range(n))
    assert not np.array_equal(ds.order(0), ds.order(1))
    fresh = dataset(world)
    for k in (n + 3, 5, 0, n + 3):   # any order, any instance (= any worker or rank): the same masked sample
        a, b = ds[k], fresh[k]
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    assert not torch.equal(ds[5]["input_pos"], ds[6]["input_pos"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_crops_keep_pixels_and_tokens_aligned(layout, request):
    """64 px tiles cropped to 32 px: 2 x 2 of 4 x 4 tokens. Published layout: 72 px tiles whose 4 x 4 tokens
    cover the centred 64 px (4 px in, as 264 px TerraMesh tiles -> 256): pixel windows start 4 + 16 k."""
    world = layout_world(request, layout)
    ds, margin = dataset(world, tile=32), 4 if layout == "shards" else 0
    shards = TokenShards(world.tokens)
    windows = set()
    for k in range(12):
        i = int(ds.order(0)[k])
        raw, sid = ds.ds[i], ds.ds.ids[i]
        out = ds.sample(i, np.random.default_rng([0, 0, 0, k]))
        assert out["S2L2A"].shape == (12, 32, 32) and out["tok_S2L2A"].shape == (2, 2)
        side = raw["S2L2A"].shape[-1]
        assert side == 64 + 2 * margin
        top, left = next((t, l) for t in range(side - 31) for l in range(side - 31)
                         if torch.equal(raw["S2L2A"][:, t:t + 32, l:l + 32], out["S2L2A"]))
        assert (top - margin) % 16 == 0 and (left - margin) % 16 == 0
        row, col = (top - margin) // 16, (left - margin) // 16
        for m in ("S2L2A", "DEM", "LULC"):
            assert torch.equal(out["tok_" + m], shards.get(m, sid)[row:row + 2, col:col + 2])
        windows.add((top, left))
    assert len(windows) > 1


def test_missing_token_shards_leave_the_entry_out(world, tmp_path):
    for m in ("S2L2A", "DEM"):   # shards of two modalities only
        (tmp_path / m).symlink_to(world.tokens / m)
    said = []
    entries, shards = pretrain_data.available_entries(world.data, tmp_path, said.append)
    assert "tok_S2L2A" in entries and "tok_DEM" in entries and "tok_S1RTC" not in entries
    assert any("tok_S1RTC" in line and "budget 0" in line for line in said)
    item = dataset(argparse.Namespace(**{**vars(world), "tokens": tmp_path}), shards=shards, entries=entries)[0]
    assert "tok_S1RTC" not in item
    assert not (item["input_mod"] == ENTRY_INDEX["tok_S1RTC"]).any()              # no slot for the missing entry
    assert not (item["target_mod"] == ENTRY_INDEX["tok_S1RTC"]).any()


def test_weight_decay_exemptions_follow_4m():
    model = TerraMind(TerraMindConfig.preset("smoke"))
    decay, rest = pretrain.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] or names[id(p)].endswith(".bias") for p in rest["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"mask_token", "mod_emb.S2L2A", "input_emb.tok_DEM.weight", "encoder.0.attn.qkv.weight"} <= decayed


def test_resume_keeps_the_data_stream():
    saved = {k: None for k in pretrain_recipe.RUN_KEYS} | {"size": "smoke", "seed": 0, "steps": 10, "tile": 64}
    args = argparse.Namespace(**{k: None for k in pretrain_recipe.RUN_KEYS}, data=None)
    with pytest.raises(ValueError, match="--seed 1 differs from the checkpoint's 0"):
        pretrain_recipe.resolve(argparse.Namespace(**{**vars(args), "seed": 1}), 1, saved)
    run = pretrain_recipe.resolve(argparse.Namespace(**{**vars(args), "steps": 20, "text_tokenizer": "x.json"}), 1, saved)
    assert run.steps == 20 and run.seed == 0 and run.input_budget == 64


def test_saved_state_restores_model_moments_rng_and_position(tmp_path):
    """What --resume loads (save_state, load_state, then load_state_dict as train() does) equals what was
    saved: every weight, both AdamW moments and its step count, the RNG and the data position."""
    torch.manual_seed(0)
    config = replace(TerraMindConfig.preset("smoke"), grid=4)
    model = TerraMind(config)
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    generator_state = torch.get_rng_state()
    pretrain_state.save_state(tmp_path / pretrain_state.STATE, model, opt, {"step": 2, "position": 16, "run": {}})
    sd, osd, rng, meta = pretrain_state.load_state(tmp_path / pretrain_state.STATE)
    torch.manual_seed(1)
    again = TerraMind(config)
    again_opt = torch.optim.AdamW(pretrain.param_groups(again, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    again.load_state_dict(sd)
    again_opt.load_state_dict(osd)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    for p, q in zip(model.parameters(), again.parameters()):
        s, t = opt.state[p], again_opt.state[q]
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
        assert float(t["step"]) == 2 and s["exp_avg_sq"].abs().sum() > 0
    assert torch.equal(rng["rng.torch"], generator_state)
    assert (meta["step"], meta["position"]) == (2, 16)


def test_validation_table_has_table9_layout():
    config = TerraMindConfig.preset("smoke")
    table = pretrain_log.val_table({"tok_S2L2A": 1.5}, config, "smoke").splitlines()
    assert table[0].split() == [pretrain_data.short(e) for e in config.targets]
    assert table[1].split()[1] == "1.500" and table[1].split()[2] == "-"
    assert [float(x) for x in table[2].split()[3:]] == pytest.approx(
        [math.log(15360)] * 4 + [math.log(4375), math.log(15360), math.log(30000), math.log(30000)], abs=1e-3)


def test_bf16_autocast_step_runs():
    """The GPU default (bf16 autocast), checked with the CPU's autocast: one step, finite loss near log(V)."""
    config = replace(TerraMindConfig.preset("smoke"), grid=4)
    masking, g = Masking(config.inputs, config.targets, 64, 64, "all2all", 4), torch.Generator().manual_seed(0)
    samples = []
    for b in range(4):
        s = {e: torch.randn(MODALITIES[e].channels, 64, 64, generator=g) for e in config.inputs
             if entry_kind(e) == "pixels"}
        s.update({e: torch.randint(0, config.vocab_size(e), (4, 4), generator=g) for e in config.targets
                  if entry_kind(e) == "tokens"})
        samples.append(masking(s, np.random.default_rng(b)))
    model = TerraMind(config)
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-3)
    stats, norm = pretrain.train_step(model, model, opt, iter([torch.utils.data.default_collate(samples)]), 1, 1,
                                      torch.device("cpu"), torch.bfloat16, 1.0)
    assert math.isfinite(norm.item()) and stats[0].item() == pytest.approx(math.log(15360), abs=0.3)


# -----------------------------------------------------------------------------------------------------------
# Training runs


def unigram_baseline(shards: TokenShards, world: Path, m: str) -> float:
    """Cross-entropy of the validation tokens under the training tokens' frequencies (add-1/2 smoothing)."""
    ids = {s: (world / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    train = torch.stack([shards.get(m, i) for i in ids["train"]]).flatten()
    val = torch.stack([shards.get(m, i) for i in ids["val"]]).flatten()
    counts = torch.bincount(train, minlength=max(int(train.max()), int(val.max())) + 1).double() + 0.5
    return float(-(counts / counts.sum())[val].log().mean())


def test_pretrained_starts_at_log_v_and_ends_below_the_unigram_baseline(pretrained):
    config = TerraMind.from_checkpoint(pretrained.checkpoint).config
    first = [r for r in pretrained.log if "val" in r][0]
    assert first["step"] == 0
    for e in config.targets:   # initialization: every modality's loss is log(V) (uniform predictions)
        assert first["val"][e] == pytest.approx(math.log(config.vocab_size(e)), abs=0.15), e
        assert pretrained.val[e] < math.log(config.vocab_size(e)) - 2.0, e
    # better than knowing how often each token occurs, i.e. learnt from the other modalities: on average by
    # 0.3 nats, and no worse on any (NDVI of a 60-step tokenizer uses ~1500 codes in 4800 tokens: near noise)
    shards = TokenShards(pretrained.tokens)
    gain = {m: unigram_baseline(shards, pretrained.data, m) - pretrained.val["tok_" + m] for m in shards.modalities}
    assert sum(gain.values()) / len(gain) > 0.3 and min(gain.values()) > -0.15, gain


def test_pretrained_outputs(pretrained):
    steps = [r["step"] for r in pretrained.log if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))
    for name in ("loss.png", "val.png"):
        assert (pretrained.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = TerraMind.from_checkpoint(pretrained.checkpoint)
    state = pretrain_state.load_state(pretrained.out / pretrain_state.STATE)
    assert model.config.grid == 4 and "caption" in model.config.targets
    assert all(torch.equal(v, state[0][k]) for k, v in model.state_dict().items())
    assert state[3]["step"] == steps[-1] and state[3]["position"] == 32 * steps[-1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torchrun_two_processes_equal_one_process_with_accumulation(layout, request, tmp_path):
    world, reference = layout_world(request, layout), layout_world(request, layout, reference=True)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + \
        command(world, out, 3)[1:]   # 2 processes x 1 micro-batch of 4
    said = run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "2 process(es) x 1 accumulation x 4 micro-batch" in said
    ref, ddp = losses(reference), losses(out)
    assert sorted(ddp) == [1, 2, 3]
    for s in ddp:
        assert abs(ddp[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, ddp[s], ref[s])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigkill_and_resume_gives_the_uninterrupted_losses(layout, request, tmp_path):
    world, reference = layout_world(request, layout), layout_world(request, layout, reference=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = list(map(str, command(world, tmp_path, 6, "--save-every", 2)))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and max(losses(tmp_path), default=0) < 3:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert max(losses(tmp_path)) < 6, "the run ended before it could be killed"
    saved = pretrain_state.load_state(tmp_path / pretrain_state.STATE)[3]["step"]
    said = run(cmd + ["--resume"], env=env)
    assert f"resumed at step {saved}: " in said                                  # not from step 0
    assert [int(s) for s in re.findall(r"^step (\d+)/6 \|", said, re.M)] == list(range(saved + 1, 7))
    assert losses(tmp_path) == losses(reference)


def test_damaged_checkpoints_are_refused_and_the_previous_one_loads(reference, tmp_path):
    for name in (pretrain_state.STATE, "pretrain_state.prev.safetensors", pretrain_state.MODEL):
        shutil.copy(reference / name, tmp_path / name)
    state, prev, model = tmp_path / pretrain_state.STATE, tmp_path / "pretrain_state.prev.safetensors", tmp_path / pretrain_state.MODEL
    assert pretrain_state.load_state(state)[3]["step"] == 6 and pretrain_state.load_state(prev)[3]["step"] == 4
    data = state.read_bytes()
    state.write_bytes(data[:len(data) // 2])                                    # truncated
    with pytest.raises(ValueError, match="truncated or corrupted.*resume from it with --resume"):
        pretrain_state.load_state(state)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF                                             # one flipped byte
    state.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        pretrain_state.load_state(state)
    assert pretrain_state.load_state(prev)[3]["step"] == 4
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TerraMind.from_checkpoint(model)


@pytest.mark.parametrize("point", [pytest.param("start", marks=pytest.mark.slow), "copying",
                                   pytest.param("rotated", marks=pytest.mark.slow), "written",
                                   pytest.param("replaced", marks=pytest.mark.slow)])   # CI: the two with temp files
def test_kill_at_any_point_of_a_save_resumes_to_the_uninterrupted_losses(world, reference, tmp_path, point):
    """SIGKILL at a named point of save_state at step 4 (pretrain_state.KILL_AT): before anything, halfway through
    copying the state to *.prev, after the rotation, after the new state's temporary file is written, after
    the rename. The folder keeps a complete state; the resumed run removes the temporary files, keeps the
    backup on its own inode and logs exactly the losses of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = list(map(str, command(world, tmp_path, 6, "--save-every", 2)))
    killed = subprocess.run(cmd, cwd=ROOT, env={**env, pretrain_state.KILL_AT: f"{point}@4"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = pretrain_state.load_state(tmp_path / pretrain_state.STATE)[3]["step"]
    assert saved == (4 if point == "replaced" else 2)
    left = pretrain_state.temp_files(tmp_path)
    assert bool(left) == (point in ("copying", "written")), left
    said = run(cmd + ["--resume"], env=env)
    assert all(f"removed {f}" in said for f in left)
    assert losses(tmp_path) == losses(reference)
    assert pretrain_state.temp_files(tmp_path) == []
    state, prev = tmp_path / pretrain_state.STATE, tmp_path / "pretrain_state.prev.safetensors"
    assert state.stat().st_ino != prev.stat().st_ino and prev.stat().st_nlink == 1
    assert pretrain_state.load_state(prev)[3]["step"] == 4


# -----------------------------------------------------------------------------------------------------------
# The paper's recipe as the default (paper §8.2, 4M), the ablation switches


def fresh_args(**given):
    return argparse.Namespace(**({k: None for k in pretrain_recipe.RUN_KEYS} | given), data=None)


def test_base_defaults_are_the_papers_recipe_on_any_number_of_processes():
    """paper §8.2: base rate 2e-4, 500B tokens; 4M: peak = blr x global batch / 256; one global batch (4096, our
    pick of the paper's 2K/4K/8K) on 1, 8 or 32 processes; warmup 10B tokens (4M)."""
    for world in (1, 8, 32):
        run = pretrain_recipe.resolve(fresh_args(size="base", tile=224), world, None)
        assert run.blr == 2e-4 and run.lr == pytest.approx(2e-4 * 4096 / 256)
        assert run.total_batch_size == 4096 and run.total_batch_size % (run.batch_size * world) == 0
        assert run.batch_size <= 64 and (run.input_budget, run.target_budget) == (256, 256)
        assert run.steps == math.ceil(500e9 / (4096 * 512))
        text = pretrain_recipe.recipe(run, world, math.ceil(run.warmup * run.steps))
        assert "base lr 2.0e-04 x 4096 / 256 = peak lr 3.2e-03" in text and "global batch 4096" in text
        assert "warmup 4769 steps (2%, 10B tokens)" in text and "(500B tokens)" in text, text
    large = pretrain_recipe.resolve(fresh_args(size="large", tile=224), 32, None)
    assert (large.batch_size, large.total_batch_size, large.lr) == (32, 4096, pytest.approx(3.2e-3))


def test_lr_flags_blr_scales_lr_does_not():
    run = pretrain_recipe.resolve(fresh_args(size="base", tile=224, blr=1e-4, total_batch_size=8192), 1, None)
    assert run.lr == pytest.approx(1e-4 * 8192 / 256) and run.batch_size == 64
    run = pretrain_recipe.resolve(fresh_args(size="base", tile=224, lr=5e-4, total_batch_size=8192), 1, None)
    assert run.lr == 5e-4 and run.blr is None
    assert "peak lr 5.0e-04 (--lr, not scaled)" in pretrain_recipe.recipe(run, 1, 1)
    with pytest.raises(ValueError, match="--lr and --blr both given"):
        pretrain_recipe.resolve(fresh_args(size="base", tile=224, lr=5e-4, blr=1e-4), 1, None)
    with pytest.raises(ValueError, match="not a multiple of --batch-size 48 x 2 processes"):
        pretrain_recipe.resolve(fresh_args(size="base", tile=224, batch_size=48), 2, None)
    with pytest.raises(ValueError, match="--total-batch-size 32 is not a multiple of --batch-size 10 x 3"):
        pretrain_recipe.resolve(fresh_args(size="smoke", tile=64), 3, None)     # 32 samples cannot split over 3
    assert pretrain_recipe.resolve(fresh_args(size="smoke", tile=64), 4, None).batch_size == 8


def test_pixel_inputs_and_alphas_flags():
    assert pretrain_recipe.pixel_entries("S2L2A") == ["S2L2A"] and pretrain_recipe.pixel_entries("none") == []
    assert pretrain_recipe.pixel_entries("all") == [e for e in ENTRY_INDEX if entry_kind(e) == "pixels"]
    with pytest.raises(ValueError, match="--pixel-inputs S2L2A,tok_DEM: tok_DEM not a pixel entry"):
        pretrain_recipe.pixel_entries("S2L2A,tok_DEM")
    with pytest.raises(ValueError, match="unknown entry 'S2'"):
        pretrain_recipe.resolve(fresh_args(size="smoke", tile=64, alphas="S2=1/*=1"), 1, None)


def test_default_global_batch_gives_the_same_losses_on_one_and_two_processes(world, tmp_path):
    """No --total-batch-size and no learning-rate flag: the smoke size's global batch 32 and its rate, reached by
    4 micro-batches of 8 on one process and 2 on each of two processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--data", world.data, "--tokens", world.tokens, "--text-tokenizer", world.text, "--steps", 2,
             "--size", "smoke", "--batch-size", 8, "--workers", 0, "--eval-every", 1000, "--eval-samples", 8,
             "--log-every", 1, "--device", "cpu"]
    said = run([sys.executable, "pretrain.py", *flags, "--out", tmp_path / "one"], env=env)
    assert "global batch 32 = 1 process(es) x 4 accumulation x 8 micro-batch" in said
    assert "base lr 1.6e-02 x 32 / 256 = peak lr 2.0e-03" in said
    said = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
                *flags, "--out", tmp_path / "two"], env=env)
    assert "global batch 32 = 2 process(es) x 2 accumulation x 8 micro-batch" in said
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2]
    for s in two:
        assert abs(two[s] - one[s]) <= 1e-5 * abs(one[s]), (s, two[s], one[s])


def test_b_single_disjoint_scales_and_custom_alphas_run(world, tmp_path):
    """TerraMind-B-single (paper §4.2): S-2 L2A the only pixel input, every modality a token input; disjoint
    scales report no token target under visible pixels; a command-line mixture is accepted."""
    said = run(command(world, tmp_path, 1, "--pixel-inputs", "S2L2A", "--scales", "disjoint", "--alphas",
                       "S2L2A=1000/*=0.5@1;all2allmix@3"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    config = TerraMind.from_checkpoint(tmp_path / pretrain_state.MODEL).config
    assert [e for e in config.inputs if entry_kind(e) == "pixels"] == ["S2L2A"]
    assert {e for e in config.inputs if entry_kind(e) != "pixels"} == set(config.targets)
    assert "S1GRD, S1RTC, DEM: not a pixel input (--pixel-inputs S2L2A)" in said
    assert "(first 64 samples): S2L2A 0%" in said and "scales disjoint" in said
