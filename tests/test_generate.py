"""generate.py: parity with the official sampler (random-weight fixtures), schedules and filters against the
official functions, and behaviour on a model trained on the synthetic world."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import torch

import generate_eval
from checkpoints import load_safetensors
from generate import (Sampling, cosine_schedule, filter_logits, generate_tokens,
                      linear_schedule, merge_span, temperature_schedule)
from metrics import haversine_km, water_iou
from terramind import TerraMind, TerraMindConfig
from windows import window_starts

FIX = Path(__file__).resolve().parent / "fixtures"
ARGMAX = Sampling(steps=1, temperature=0.0)
OFFICIAL = Sampling(steps=1, temperature=0.0, coords_layout=False)   # upstream decodes coords freely


def official_outputs() -> tuple[dict, dict]:
    """The official sampler's outputs (tests/fixtures/generate_make_official.py). Read without
    checkpoints.load_safetensors' divergence check: filtered logits are -inf by design."""
    with safetensors.safe_open(str(FIX / "generate_official.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


@pytest.fixture(scope="module")
def official():
    expect, meta = official_outputs()
    batch, _ = load_safetensors(FIX / "terramind" / "batch.safetensors")
    data = {e: batch[f"inputs.{e}"] if f"inputs.{e}" in batch else batch[f"batch.{e}"].float()
            for e in meta["image_inputs"]}
    models = {}
    for name in ("gelu224", "swiglu64"):
        t, m = load_safetensors(FIX / "terramind" / f"official_{name}.safetensors")
        state = {k[6:]: v.float() for k, v in t.items() if k.startswith("state.")}
        models[name] = TerraMind.from_official(state, TerraMindConfig(**m["config"])).eval()
    return expect, meta, data, models


@pytest.mark.parametrize("variant", ["gelu224", "swiglu64"])
def test_official_parity_argmax_single_step(official, variant):
    expect, meta, data, models = official
    model = models[variant]
    for target in meta["image_targets"]:
        for scheme in ("roar", "maskgit"):
            out = generate_tokens(model, data, [target], Sampling(scheme, 1, temperature=0.0))[target]
            assert torch.equal(out.flatten(1), expect[f"{variant}.{scheme}.{target}"].long()), (scheme, target)
    for target, inputs in (("coords", ("S2L2A", "tok_DEM")), ("caption", ("S2L2A", "S1GRD"))):
        out = generate_tokens(model, {e: data[e] for e in inputs}, [target], OFFICIAL)[target]
        ref = expect[f"{variant}.ar.{target}"].long()
        assert torch.equal(out[:, :ref.shape[1]], ref) and not out[:, ref.shape[1]:].any(), target
    x = {e: data[e] for e in ("S2L2A", "S1GRD")}
    chain = generate_tokens(model, x, ["tok_LULC", "tok_NDVI", "coords"], OFFICIAL)   # the sampler chains too
    for target, out in chain.items():
        ref = expect[f"{variant}.chain.{target}"].long()
        assert torch.equal(out.flatten(1)[:, :ref.shape[1]], ref), target


def test_schedules_and_filters_match_official():
    expect, meta = official_outputs()
    for s, n in meta["schedule_cases"]:
        lin = linear_schedule(s, n)
        assert cosine_schedule(s, n) == expect[f"schedule.cosine.{s}.{n}"].tolist()
        assert lin == expect[f"schedule.linear.{s}.{n}"].tolist()
        assert torch.allclose(torch.tensor(temperature_schedule("linear", 2.0, lin), dtype=torch.float64),
                              expect[f"temp.linear.{s}.{n}"])
        assert torch.allclose(torch.tensor(temperature_schedule("onex:0.5:0.5", 6.0, lin), dtype=torch.float64),
                              expect[f"temp.onex.{s}.{n}"])
    assert cosine_schedule(8, 196) == [7, 21, 32, 38, 38, 32, 21, 7]       # 4M fourm/utils/generation.py
    assert cosine_schedule(8, 16) == [1, 1, 3, 3, 3, 3, 1, 1]              # official: [1, 2, 3, 3, 3, 3, 2, -1]
    assert Sampling("maskgit", 25).tokens_per_step(16) == [k for k in cosine_schedule(25, 16) if k]
    for k, p in meta["filters"]:
        assert torch.equal(filter_logits(expect["filter.logits"], k, p), expect[f"filter.k{k}.p{p}"])


def test_small_pure_functions():
    assert merge_span([5, 4707, 5164, 3, 6, 999]) == [4707, 5164, 3]     # [S_1] span up to the next sentinel
    assert merge_span([5, 7, 999, 5, 4707]) == [4707]                      # [S_3] (id 7) opens another span
    assert window_starts(512, 64)[-1] == 448 and window_starts(64, 64) == [0]
    assert window_starts(224, 224) == [0] and window_starts(512, 224) == [0, 160, 288]   # strides of whole patches
    assert abs(haversine_km((0, 0), (1, 0)) - 111.19) < 0.01                # one degree on the equator
    assert abs(haversine_km((8.54, 47.37), (2.35, 48.86)) - 487.5) < 2      # Zurich - Paris
    lulc, label = torch.tensor([[1, 1, 2, 1]]), torch.tensor([[1, 0, 1, -1]])
    assert water_iou(lulc, label) == (1, 3)


# ---- a model trained on the synthetic world (tests/conftest.py session fixtures) --------------------------

@pytest.fixture(scope="module")
def stack(pretrained, tokenizers):
    from fsq_tokenizer import load_tokenizers
    from terramesh import TerraMeshDataset
    from text_tokenizer import WordPieceTokenizer
    model = TerraMind.from_checkpoint(pretrained.checkpoint).eval()
    test = TerraMeshDataset(pretrained.data, split="test", size=None)
    return model, load_tokenizers(tokenizers), WordPieceTokenizer.from_file(pretrained.text_tokenizer), test


def batch_of(ds, names, n=None):
    samples = [ds[i] for i in range(len(ds))[:n]]
    return {m: torch.stack([s[m] for s in samples]) for m in names}


def test_s2l2a_to_lulc_beats_majority_class(stack):
    from generate import generate
    model, toks, text, test = stack
    data = batch_of(test, ["S2L2A", "LULC"])
    lulc = generate(model, toks, {"S2L2A": data["S2L2A"]}, ["LULC"], ARGMAX, standardized=True)["LULC"]
    majority = torch.bincount(data["LULC"].flatten()).argmax()
    acc, baseline = (lulc == data["LULC"]).float().mean(), (data["LULC"] == majority).float().mean()
    assert lulc.shape == data["LULC"].shape and acc > baseline, (acc, baseline)


def test_chaining_is_real(stack, monkeypatch):
    model, toks, text, test = stack
    x = {"S2L2A": batch_of(test, ["S2L2A"], 8)["S2L2A"]}
    seen, logits = {}, model.logits
    monkeypatch.setattr(model, "logits", lambda enc, target, **kw: seen.setdefault(target, logits(enc, target, **kw)))
    chain = generate_tokens(model, x, ["tok_LULC", "tok_NDVI"], Sampling("maskgit", 1))
    monkeypatch.undo()
    water = toks["LULC"].encode(torch.full((8, 64, 64), 1))          # open water instead of the generated LULC
    with torch.no_grad():
        given, alone, flooded = (model.logits(inp, "tok_NDVI") for inp in
                                 ({**x, "tok_LULC": chain["tok_LULC"]}, x, {**x, "tok_LULC": water}))
    assert torch.allclose(seen["tok_NDVI"], given, atol=1e-5)        # NDVI was conditioned on the generated LULC,
    assert not torch.allclose(seen["tok_NDVI"], alone, atol=1e-3)    # not on the inputs alone (official snapshot)
    assert not torch.allclose(given, flooded, atol=1e-3)             # and another LULC changes it


@pytest.mark.parametrize("scheme,schedule,steps", [("roar", "linear", 5), ("maskgit", "cosine", 8),
                                                   ("maskgit", "linear", 5)])
def test_multistep_decodes_every_token_once(stack, scheme, schedule, steps, monkeypatch):
    model, toks, text, test = stack
    x = {"S2L2A": batch_of(test, ["S2L2A"], 4)["S2L2A"]}
    queried, logits = [], model.logits
    monkeypatch.setattr(model, "logits", lambda enc, target, **kw: queried.append(kw["positions"])
                        or logits(enc, target, **kw))
    s = Sampling(scheme, steps, schedule, temperature=2.0, temp_schedule="onex:0.5:0.5", top_k=40, top_p=0.9)
    g = torch.Generator().manual_seed(0)
    out = generate_tokens(model, x, ["tok_DEM"], s, g)["tok_DEM"]
    counts = (cosine_schedule if schedule == "cosine" and scheme == "maskgit" else linear_schedule)(steps, 16)
    queries = [16 - sum(counts[:k]) for k in range(steps)] if scheme == "maskgit" else counts   # all masked / new
    assert [q.shape[1] for q in queried] == queries
    if scheme == "roar":   # ROAR queries disjoint positions that cover the grid
        assert torch.equal(torch.cat(queried, 1).sort(1).values, torch.arange(16).expand(4, 16))
    assert out.shape == (4, 4, 4) and 0 <= out.min() and out.max() < toks["DEM"].vocab_size
    state = torch.get_rng_state()
    same = generate_tokens(model, x, ["tok_DEM"], s, torch.Generator().manual_seed(0))["tok_DEM"]
    assert torch.equal(out, same) and torch.equal(state, torch.get_rng_state())   # no global reseeding
    guided = generate_tokens(model, x, ["tok_DEM"], Sampling(scheme, steps, schedule, 0.0, cfg=3.0))["tok_DEM"]
    plain = generate_tokens(model, x, ["tok_DEM"], Sampling(scheme, steps, schedule, 0.0))["tok_DEM"]
    assert not torch.equal(guided, plain)                              # guidance changes the argmax


def test_maskgit_first_step_keeps_the_most_confident_argmax(stack):
    model, toks, text, test = stack
    x = {"S2L2A": batch_of(test, ["S2L2A"], 4)["S2L2A"]}
    probs = model.logits(model.encode(x), "tok_LULC").softmax(-1)        # (B, 16, V), all positions masked
    conf, best = probs.max(-1)
    first = conf.topk(cosine_schedule(4, 16)[0], dim=1).indices
    out = generate_tokens(model, x, ["tok_LULC"], Sampling("maskgit", 4, temperature=0.0))["tok_LULC"].flatten(1)
    assert torch.equal(out.gather(1, first), best.gather(1, first))


def test_coords_and_captions_parse(stack):
    from generate import generate
    model, toks, text, test = stack
    x = batch_of(test, ["S2L2A"], 8)["S2L2A"]
    s = Sampling(temperature=1.0, top_p=0.9)
    out = generate(model, toks, {"S2L2A": x}, ["coords", "caption"], s, text, standardized=True)
    assert all(c is not None and -180 <= c[0] <= 180 and -90 <= c[1] <= 90 for c in out["coords"])
    assert all(float(v * 4).is_integer() for c in out["coords"] for v in c)   # the 0.25 degree grid
    ids = generate_tokens(model, {"S2L2A": x}, ["coords"], s, torch.Generator().manual_seed(0))["coords"]
    assert ids.shape == (8, 3) and (ids[:, 2] == 3).all()                     # lat lon [EOS]
    assert [text.decode_coords(r) for r in ids] == out["coords"]              # the same seed, the same draws
    guided = generate_tokens(model, {"S2L2A": x}, ["coords"], Sampling(temperature=0.0, cfg=3.0))["coords"]
    assert guided.shape == (8, 3) and (guided[:, 2] == 3).all()              # sequence CFG (broken upstream)
    words = [c.split() for c in out["caption"]]
    assert all(isinstance(c, str) and "[" not in c for c in out["caption"]) and sum(map(len, words)) >= 8


def test_non_square_input_keeps_its_orientation(stack):
    from generate import generate
    model, toks, text, test = stack
    x = torch.cat([test[0]["S2L2A"], test[0]["S2L2A"].flip(-1)], -1)      # (12, 64, 128): two windows side by side
    out = generate(model, toks, {"S2L2A": x}, ["LULC", "DEM"], ARGMAX, diffusion_steps=1, standardized=True)
    assert out["LULC"].shape == (1, 64, 128) and out["DEM"].shape == (1, 1, 64, 128)   # upstream: transposed
    alone = generate(model, toks, {"S2L2A": x[..., :64]}, ["LULC"], ARGMAX, standardized=True)["LULC"]
    assert (out["LULC"][..., :40] == alone[..., :40]).float().mean() > 0.9   # the left window is the left half


def test_512_tile_is_seamless(stack):
    from generate import generate
    from synthetic import synth_sample
    model, toks, text, test = stack
    s2 = torch.from_numpy(synth_sample(7, 0, size=512)["S2L2A"]).permute(2, 0, 1).float()   # physical units

    def seams(x, edges):   # column-to-column change at window borders / at other token borders, both directions
        inner = [c for c in range(16, 512, 16) if c not in edges]
        return [float(j[[e - 1 for e in edges]].mean() / j[[c - 1 for c in inner]].mean())
                for j in ((x[:, 1:] - x[:, :-1]).abs().mean(0), (x[1:] - x[:-1]).abs().mean(1))]
    out = generate(model, toks, {"S2L2A": s2}, ["LULC", "DEM"], ARGMAX, diffusion_steps=2, batch_size=128)
    assert out["DEM"].shape == (1, 1, 512, 512) and out["LULC"].shape == (1, 512, 512)
    edges = sorted({c + d for c in window_starts(512, 64) for d in (0, 64)} - {0, 512})
    assert max(seams(out["DEM"][0, 0], edges)) < 1.5
    tiles = s2.unfold(1, 64, 64).unfold(2, 64, 64).permute(1, 2, 0, 3, 4).reshape(64, 12, 64, 64)   # 8 x 8 tiles
    alone = generate(model, toks, {"S2L2A": tiles}, ["DEM"], ARGMAX, diffusion_steps=2, batch_size=128)["DEM"]
    alone = alone.reshape(8, 8, 64, 64).permute(0, 2, 1, 3).reshape(512, 512)   # tiles generated apart: seams
    assert max(seams(alone, list(range(64, 512, 64)))) > 2


def test_command_line_geotiffs_sheet_and_eval(stack, pretrained, tokenizers, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from geotiff import read_tiff, write_geotiff
    from modalities import parse_coords
    model, toks, text, test = stack
    tags = {33550: (10.0, 10.0, 0.0), 33922: (0.0, 0.0, 0.0, 549892.5, 6344077.5, 0.0),
            34737: "WGS 84 / UTM zone 32N|WGS 84|"}                       # pixel size, tie point, CRS citation
    tile = tmp_path / "tile.tif"
    write_geotiff(tile, test[0]["S2L2A"].numpy() * 2000 + 2000, tags)
    root = Path(__file__).resolve().parents[1]
    common = ["--model", pretrained.checkpoint, "--tokenizers", tokenizers, "--text-tokenizer",
              pretrained.text_tokenizer, "--diffusion-steps", "2", "--device", "cpu"]
    def run(*a):
        return subprocess.run([sys.executable, "generate.py", *map(str, a), *map(str, common)], cwd=root,
                              capture_output=True, text=True, timeout=300)
    p = run("--input", f"S2L2A={tile}", "--targets", "LULC,DEM,coords", "--out", tmp_path / "gen", "--temperature", "0")
    assert p.returncode == 0, p.stderr[-2000:]
    for name, shape in (("LULC", (64, 64)), ("DEM", (64, 64))):
        x, geo = read_tiff(tmp_path / "gen" / f"{name}.tif")
        assert x.shape == shape and geo[33922] == tags[33922] and geo[33550] == tags[33550]
    assert (tmp_path / "gen" / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = (tmp_path / "gen" / "sequences.txt").read_text().splitlines()[0]
    assert line.startswith("coords: ") and parse_coords(line.removeprefix("coords: "))
    p = run("eval", "--data", pretrained.data, "--n", "4", "--pairs", "S2L2A:DEM,S2L2A:LULC,S2L2A:coords",
            "--out", tmp_path / "eval")
    assert p.returncode == 0, p.stderr[-2000:]
    report = (tmp_path / "eval" / "eval.md").read_text()
    row = next(r for r in report.splitlines() if r.startswith("| S2L2A → DEM ("))
    mae, rmse, ssim, psnr = map(float, row.strip("|").split("|")[1:5])   # further columns: baselines
    assert 0 < mae <= rmse and -1 <= ssim <= 1 and np.isfinite(psnr)
    assert "| S2L2A → LULC (" in report and "| zero-shot |" in report
    assert next(r for r in report.splitlines() if r.startswith("| S2L2A → coords (")).split("|")[2].strip() == "4/4"


def test_captions_never_sample_ids_the_text_tokenizer_cannot_decode():
    """A caption head of 30000 ids with a ~6400-id WordPiece vocabulary: the ids beyond it are masked, so an
    untrained model's captions decode (unmasked, almost every row draws such an id)."""
    from dataclasses import replace

    from generate import generate
    from text_tokenizer import WordPieceTokenizer
    small = WordPieceTokenizer.train(["a river crosses green fields", "dry hills above a lake"] * 5, vocab_size=30_000)
    assert small.vocab_size < 7000
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke")).eval()
    x = torch.randn(16, 12, 64, 64)
    free = Sampling(temperature=1.0, top_p=0.0)
    ids = generate_tokens(model, {"S2L2A": x}, ["caption"], free, torch.Generator().manual_seed(0))["caption"]
    assert (ids >= small.vocab_size).any(1).float().mean() > 0.9                  # what the mask prevents
    ids = generate_tokens(model, {"S2L2A": x}, ["caption"], replace(free, vocab=small.vocab_size),
                          torch.Generator().manual_seed(0))["caption"]
    assert ids.max() < small.vocab_size
    out = generate(model, {}, {"S2L2A": x}, ["caption"], free, small, standardized=True)["caption"]
    assert len(out) == 16 and all(isinstance(c, str) for c in out)


def test_tokenized_inputs_enter_through_the_tokenizer():
    """--input-scale tokens (paper Table 14): S-2 L2A enters as its FSQ tokens although the model has its pixel
    embedding, and generation from it equals generation from the tokenizer's ids; `eval` runs a pair at both
    scales only where the model and the tokenizers allow both (random-init smoke model and tokenizers)."""
    from fsq_tokenizer import ImageTokenizer, TokenizerConfig
    from generate import generate
    from generate_eval import scaled_pairs
    from generate_io import Timer, to_entries
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke")).eval()
    toks = {m: ImageTokenizer(TokenizerConfig.preset("smoke", m)).eval() for m in ("S2L2A", "LULC")}
    x = torch.randn(4, 12, 64, 64)
    entries = to_entries(model, toks, {"S2L2A": x}, Timer(), "tokens")
    assert list(entries) == ["tok_S2L2A"] and torch.equal(entries["tok_S2L2A"], toks["S2L2A"].encode(x))
    assert list(to_entries(model, toks, {"S2L2A": x}, Timer())) == ["S2L2A"]
    lulc = generate(model, toks, {"S2L2A": x}, ["LULC"], ARGMAX, standardized=True, input_scale="tokens")["LULC"]
    ids = generate_tokens(model, entries, ["tok_LULC"], ARGMAX)["tok_LULC"]
    assert torch.equal(lulc, toks["LULC"].decode(ids).argmax(1))
    pixels = generate(model, toks, {"S2L2A": x}, ["LULC"], ARGMAX, standardized=True)["LULC"]
    assert not torch.equal(pixels, lulc)                                       # the scale changes the input
    assert scaled_pairs(model, toks, "S2L2A:LULC,S1GRD:LULC,S2L1C:LULC", "both") == [
        ("S2L2A", "LULC", "pixels"), ("S2L2A", "LULC", "tokens"), ("S1GRD", "LULC", "pixels"),
        ("S2L1C", "LULC", "pixels")]                                           # no S1GRD / S2L1C tokenizer here
    assert scaled_pairs(model, toks, "S2L2A:LULC", "pixels") == [("S2L2A", "LULC", "pixels")]


def test_outputs_are_never_overwritten_without_the_flag(tmp_path, monkeypatch, capsys):
    """Issue 19: an output file already in --out is refused before any work (its bytes untouched) unless
    --overwrite; two outputs of one command on one path are refused; --scene likewise."""
    import sys
    import warnings

    import numpy as np

    import cli
    import generate
    from fsq_tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_path
    from geotiff import read_tiff, write_geotiff
    torch.manual_seed(0)
    TerraMind(TerraMindConfig.preset("smoke")).save_checkpoint(tmp_path / "terramind.safetensors")
    ImageTokenizer(TokenizerConfig.preset("smoke", "LULC")).save_checkpoint(tokenizer_path(tmp_path, "LULC"))
    write_geotiff(tmp_path / "s2.tif", np.full((12, 64, 64), 1500, np.float32), {33550: (10.0, 10.0, 0.0)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "LULC.tif").write_bytes(b"an earlier result")

    def run(*flags, targets="LULC"):
        argv = ["generate.py", "--model", tmp_path / "terramind.safetensors", "--input", f"S2L2A={tmp_path / 's2.tif'}",
                "--targets", targets, "--out", out, "--device", "cpu", "--text-tokenizer", tmp_path / "none.json", *flags]
        monkeypatch.setattr(sys, "argv", list(map(str, argv)))
        with warnings.catch_warnings(action="ignore"):   # no text tokenizer: no coords / captions
            try:
                cli.run_main(generate.main)
            except SystemExit as e:
                return e.code, capsys.readouterr().err
        return 0, capsys.readouterr().err
    for flags in ([], ["--scene"]):
        code, said = run(*flags)
        assert code == 1 and f"--out {out / 'LULC.tif'}: the file exists; pass --overwrite" in said, said
        assert (out / "LULC.tif").read_bytes() == b"an earlier result"
    code, said = run("--overwrite", targets="LULC,LULC")
    assert code == 1 and "both the LULC GeoTIFF (target 1) and the LULC GeoTIFF (target 2)" in said, said
    assert run("--overwrite")[0] == 0
    assert read_tiff(out / "LULC.tif")[0].shape == (64, 64)


class PublishedSplit:
    """The index of a published-layout split as generate_eval sees it: the majortom-like samples
    (S1RTC, no S1GRD) come first, the ssl4eos12-like ones (S1GRD) after; one water label."""
    ids = [f"k{i}" for i in range(10)]
    files = {"label_water": {"k8"}}

    def __len__(self):
        return len(self.ids)

    def available(self, i):
        return ["S2L2A", "S1RTC"] if i < 6 else ["S2L2A", "S1GRD"]


def test_eval_reads_the_first_n_samples_of_every_pair():
    """The first n samples alone held no S1GRD: its pairs were dropped without a word."""
    chosen = generate_eval.pair_samples(PublishedSplit(), "S2L2A:S1RTC,S2L2A:S1GRD,S1GRD:LULC",
                                        "label_water", 2)
    assert chosen == [0, 1, 6, 7, 8]   # S1RTC pair 0, 1; S1GRD pair 6, 7; LULC truth: the label of 8


def test_eval_says_which_pairs_it_leaves_out_and_keeps_n_per_pair(capsys):
    model = SimpleNamespace(config=SimpleNamespace(inputs=[]))
    args = SimpleNamespace(input_scale="pixels", labels="label_water")
    samples = [{"S2L2A": 0, "S1GRD": 0}] * 3
    sets = [("synth", samples, "S2L2A:S1GRD,S2L2A:DEM,S1RTC:S1GRD", 2)]
    jobs = generate_eval.eval_jobs(args, model, {"S1GRD": None}, None, sets)
    assert [(j.src, j.dst, len(j.have)) for j in jobs] == [("S2L2A", "S1GRD", 2)]
    said = capsys.readouterr().out
    assert "S2L2A → DEM (synth): left out, nothing here decodes DEM" in said
    assert "S1RTC → S1GRD (synth): left out, no sample of synth holds S1RTC and S1GRD" in said
