"""tim_finetune.py: the generator gets no gradient, generated tokens reach the encoder, chained TiM conditions
each modality on the ones before (eq. 5, checked against TerraMind.logits by hand), caching equals recomputing
under argmax, resuming equals an uninterrupted run, Sen1Floods11 (format and the real chip) end to end."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import synthetic
from checkpoints import load_safetensors
from geotiff import read_tiff, write_geotiff
from terramind import TerraMind, TerraMindConfig
from tim_finetune import TiMSegmenter, main, tim_tokens

REAL = Path(__file__).resolve().parents[1] / "assets" / "sen1floods11"
CHIP = "Spain_7370579"


@pytest.fixture(scope="module")
def random_terramind(tmp_path_factory):
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke"))
    path = tmp_path_factory.mktemp("tim") / "terramind.safetensors"
    model.save_checkpoint(path)
    return model, path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tim") / "world"
    synthetic.synthesize(root, n=20, size=64, seed=3)     # 16 train, 2 val, 2 test
    return root


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"S1GRD": torch.randn(b, 2, 64, 64, generator=g), "S2L1C": torch.randn(b, 13, 64, 64, generator=g)}


def segmenter(pretrained, tim=("LULC",), **kw):
    torch.manual_seed(1)
    return TiMSegmenter.from_pretrained(pretrained, modalities=("S1GRD", "S2L1C"), tim=tim, channels=16, tile=64,
                                        temperature=kw.pop("temperature", 0.0), **kw)


def test_generator_receives_no_gradient(random_terramind):
    model = segmenter(random_terramind[0], temperature=1.0)
    frozen = {k: v.clone() for k, v in model.generator.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), 1e-2)   # even handed every parameter, the generator must not move
    for _ in range(2):
        x = inputs()
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in model.generator.parameters())
        assert model.encoder.input_emb["tok_LULC"].weight.grad.abs().sum() > 0   # the token table learns
        opt.step()
    assert all(torch.equal(v, model.generator.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not model.generator.training and model.train().generator.training is False
    tokens = model.think(inputs())["tok_LULC"]
    assert tokens.dtype == torch.long and not tokens.requires_grad and tokens.shape == (3, 4, 4)


def test_generated_tokens_reach_the_encoder(random_terramind):
    model = segmenter(random_terramind[0]).eval()
    x = inputs()
    tokens = model.think(x)
    with torch.no_grad():
        a, again, default = model(x, tokens), model(x, {k: v.clone() for k, v in tokens.items()}), model(x)
        changed = {"tok_LULC": tokens["tok_LULC"].clone()}
        changed["tok_LULC"][1, 2, 3] = (changed["tok_LULC"][1, 2, 3] + 1) % 4375
        b = model(x, changed)
    assert torch.equal(a, again) and torch.equal(a, default)    # forward generates the same tokens (argmax)
    assert not torch.allclose(a[1], b[1])                       # one changed token changes the prediction
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # ... of its own sample only
    plain = segmenter(random_terramind[0], tim=())
    assert plain.generator is None and plain.think(x) == {}
    assert plain.head.bottleneck[0].in_channels == model.head.bottleneck[0].in_channels
    concat = segmenter(random_terramind[0], merge="concat")    # 2 inputs + 1 TiM modality, widths side by side
    assert concat.head.lateral[0][0].in_channels == 3 * 64


def test_chained_tim_conditions_each_modality_on_the_previous(random_terramind):
    model = segmenter(random_terramind[0], tim=("LULC", "NDVI"))
    g, x = model.generator, inputs(6, seed=4)
    out = model.think(x)
    with torch.no_grad():   # eq. 5 by hand with the model's own decoder: argmax over all positions at once
        lulc = g.logits(x, "tok_LULC", grid=(4, 4)).argmax(-1).view(6, 4, 4)
        ndvi = g.logits({**x, "tok_LULC": lulc}, "tok_NDVI", grid=(4, 4))
        alone = g.logits(x, "tok_NDVI", grid=(4, 4))
        other = g.logits({**x, "tok_LULC": lulc.roll(1, 0)}, "tok_NDVI", grid=(4, 4))   # another sample's LULC
    assert len(lulc.unique()) > 3 and len(ndvi.argmax(-1).unique()) > 3
    assert torch.equal(out["tok_LULC"], lulc)
    assert torch.equal(out["tok_NDVI"], ndvi.argmax(-1).view(6, 4, 4))
    assert not torch.equal(ndvi.argmax(-1), alone.argmax(-1))        # the generated LULC changes the NDVI tokens
    assert not torch.allclose(ndvi, other, atol=1e-3)                  # ... and which LULC it is, the logits
    seen, encode = [], g.encode   # stochastic sampling: the NDVI pass reads the LULC tokens just sampled
    g.encode = lambda inp, visible=None, **k: seen.append((dict(inp), visible or {})) or encode(inp, visible=visible, **k)
    sampled = segmenter(random_terramind[0], tim=("LULC", "NDVI"), temperature=1.0)
    sampled.generator = g
    out = sampled.think(x, torch.Generator().manual_seed(0))
    (first, v1), (second, v2) = seen   # one encoder pass per target (one decoding step each)
    assert not v1["tok_LULC"].any() and "tok_NDVI" not in first       # LULC: nothing of it visible yet
    assert torch.equal(second["tok_LULC"], out["tok_LULC"]) and "tok_LULC" not in v2   # NDVI sees all of it
    assert len(out["tok_LULC"].unique()) > 10


def test_cache_returns_what_recomputing_gives(random_terramind):
    for kw in ({}, {"steps": 2, "scheme": "maskgit"}):   # both deterministic settings
        model = segmenter(random_terramind[0], tim=("LULC", "NDVI"), **kw).eval()
        assert model.config.deterministic
        x, cache = inputs(6, seed=4), {}
        keys = [("train", i, 0, 0) for i in range(6)]
        first = tim_tokens(model, {k: v[:4] for k, v in x.items()}, keys[:4], cache)
        order = [5, 2, 0, 4, 1, 3]   # another batch composition: 2 new samples, 4 from the cache
        mixed = tim_tokens(model, {k: v[order] for k, v in x.items()}, [keys[i] for i in order], cache)
        fresh = model.think({k: v[order] for k, v in x.items()})
        assert len(cache) == 6 and len(fresh["tok_LULC"].unique()) > 3
        assert all(torch.equal(mixed[e], fresh[e]) for e in fresh)
        assert all(torch.equal(first[e], model.think({k: v[:4] for k, v in x.items()})[e]) for e in first)
    assert not segmenter(random_terramind[0], temperature=1.0).config.deterministic
    assert not segmenter(random_terramind[0], steps=2).config.deterministic       # ROAR: random order


def train(tmp, ckpt, data, name, *extra):
    out = tmp / name
    main(["train", "--model", str(ckpt), "--data", str(data), "--classes", "land,water", "--modalities",
          "S1GRD,S2L1C", "--channels", "16", "--lr", "1e-3", "--batch-size", "8", "--log-every", "100",
          "--out", str(out), "--device", "cpu", *map(str, extra)])
    tensors, _ = load_safetensors(out / "model.safetensors")
    return tensors, json.loads((out / "results.json").read_text())


def test_cached_training_equals_recomputed(random_terramind, world, tmp_path):
    args = ("--tim", "LULC", "--temperature", "0", "--epochs", "2", "--merge", "concat")
    a, ra = train(tmp_path, random_terramind[1], world, "recompute", *args)
    b, rb = train(tmp_path, random_terramind[1], world, "cached", *args, "--cache")
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="deterministic"):
        train(tmp_path, random_terramind[1], world, "bad", "--tim", "LULC", "--cache", "--epochs", "1")


def test_resume_equals_uninterrupted(random_terramind, world, tmp_path):
    args = ("--tim", "LULC", "--temperature", "1", "--seed", "5")   # stochastic TiM: its RNG must resume too
    a, ra = train(tmp_path, random_terramind[1], world, "straight", *args, "--epochs", "2")
    train(tmp_path, random_terramind[1], world, "resumed", *args, "--epochs", "1")
    b, rb = train(tmp_path, random_terramind[1], world, "resumed", *args, "--epochs", "2", "--resume")
    assert ra["test"] == rb["test"] and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(s) for s in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_sen1floods11_format_trains(random_terramind, tmp_path):
    """The v1.1 layout (split CSVs, HandLabeled/{S1Hand,S2Hand,LabelHand}) with the real chip in every split."""
    base = tmp_path / "sf11" / "v1.1"
    for folder, sub, suffix in (("S1Hand", "S1", "S1Hand"), ("S2Hand", "S2", "S2Hand"), ("LabelHand", "Labels", "LabelHand")):
        (base / "data/flood_events/HandLabeled" / folder).mkdir(parents=True)
        (base / "data/flood_events/HandLabeled" / folder / f"{CHIP}_{suffix}.tif").symlink_to(REAL / sub / f"{CHIP}_{suffix}.tif")
    (base / "splits/flood_handlabeled").mkdir(parents=True)
    for s in ("train", "valid", "test"):
        (base / f"splits/flood_handlabeled/flood_{s}_data.csv").write_text(f"{CHIP}_S1Hand.tif,{CHIP}_LabelHand.tif\n" * 2)
    w, r = train(tmp_path, random_terramind[1], tmp_path / "sf11", "sf11", "--dataset", "sen1floods11", "--tim", "LULC",
                 "--temperature", "0", "--cache", "--epochs", "1", "--batch-size", "2", "--crop", "256", "--freeze-encoder")
    pretrained = random_terramind[0].state_dict()   # frozen encoder: the trainable copy still equals the pretrained one
    assert all(torch.equal(w[k], pretrained[k[8:]]) for k in w if k.startswith("encoder."))
    assert r["classes"] == ["Not Water", "Water"] and r["water"] == 1
    assert np.isfinite(r["test"]["loss"]) and r["args"]["crop"] == 256
    label = read_tiff(REAL / "Labels" / f"{CHIP}_LabelHand.tif")[0]
    water = (label == 1).sum() / (label >= 0).sum()                       # 26.7% of the labelled pixels
    # one epoch already beats the better constant map (all land: mIoU 36.6%)
    assert r["test"]["miou"] > 100 * max(water, 1 - water) / 2 and r["test"]["miou"] == pytest.approx(
        sum(r["test"]["iou"]) / 2)


def test_predict_real_chip(pretrained, tmp_path):
    """A TiM model fine-tuned from the pretrained smoke TerraMind, then `predict` on the 512 px Sen1Floods11 chip
    (S1 channel-first float32 dB with a NaN hole, S2 13-band L1C) in 64 px sliding windows."""
    _, r = train(tmp_path, pretrained.checkpoint, pretrained.data, "chip", "--tim", "LULC", "--temperature", "0",
                 "--cache", "--epochs", "1")
    s1, tags = read_tiff(REAL / "S1" / f"{CHIP}_S1Hand.tif")
    s2, _ = read_tiff(REAL / "S2" / f"{CHIP}_S2Hand.tif")
    s1, s2 = s1.copy(), s2.astype(np.float32)
    s1[:, 100:140, 200:260] = np.nan                 # S1 no data only: fed as the mean, still predicted
    s1[:, :32, :48], s2[:, :32, :48] = np.nan, np.nan   # every input no data: the mask's no-data value
    write_geotiff(tmp_path / "s1.tif", s1, tags)
    write_geotiff(tmp_path / "s2.tif", s2, tags)
    out = tmp_path / "pred" / "mask.tif"
    main(["predict", "--ckpt", str(tmp_path / "chip" / "model.safetensors"), "--input", f"S1GRD={tmp_path / 's1.tif'}",
          "--input", f"S2L1C={tmp_path / 's2.tif'}", "--out", str(out), "--device", "cpu"])
    mask, geo = read_tiff(out)
    assert mask.shape == (512, 512) and mask.dtype == np.uint8
    assert (mask[:32, :48] == 255).all() and set(np.unique(mask[32:])) <= {0, 1}
    assert all(geo[k] == v for k, v in tags.items() if k != 42113) and geo[42113] == "255"
    assert out.with_suffix(".png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="missing --input"):
        main(["predict", "--ckpt", str(tmp_path / "chip" / "model.safetensors"), "--input",
              f"S1GRD={tmp_path / 's1.tif'}", "--out", str(out), "--device", "cpu"])


def test_predict_never_overwrites_a_mask_or_overlay(tmp_path):
    torch.manual_seed(0)
    model = TiMSegmenter.from_pretrained(TerraMind(TerraMindConfig.preset("smoke")), modalities=("S1GRD",), tim=(),
                                         channels=8, tile=32)
    model.save_checkpoint(tmp_path / "model.safetensors")
    image = tmp_path / "s1.tif"
    write_geotiff(image, np.random.default_rng(0).normal(-12, 3, (2, 40, 40)).astype(np.float32))
    out = tmp_path / "pred" / "mask.png"      # a .png mask: the overlay goes to mask_overlay.png

    def predict(*extra):
        main(["predict", "--ckpt", str(tmp_path / "model.safetensors"), "--input", f"S1GRD={image}",
              "--out", str(out), "--device", "cpu", *extra])
    predict()
    overlay = out.with_name("mask_overlay.png")
    assert read_tiff(out)[0].shape == (40, 40) and overlay.read_bytes()[:4] == b"\x89PNG"
    out.write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"mask\.png: the file exists; pass --overwrite"):
        predict()
    assert out.read_bytes() == b"mine"
    out.unlink()
    overlay.write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"--out \(its PNG overlay\) .*mask_overlay\.png: the file exists"):
        predict()
    assert overlay.read_bytes() == b"mine" and not out.exists()     # refused before the mask was written
    predict("--overwrite")
    assert read_tiff(out)[0].shape == (40, 40) and overlay.read_bytes()[:4] == b"\x89PNG"


def test_train_on_the_published_layout(random_terramind, shard_world, tmp_path):
    """A shard root with its label folder, as the GeoTIFF layout; without a test/ split, val/ stands in and
    the run says so."""
    w, r = train(tmp_path, random_terramind[1], shard_world, "shards", "--modalities", "S2L1C", "--tim", "LULC",
                 "--temperature", "0", "--cache", "--epochs", "1", "--crop", "64")
    assert r["dataset"] == "synth/label_water" and r["classes"] == ["land", "water"]
    assert np.isfinite(r["test"]["loss"]) and r["test"]["miou"] == pytest.approx(sum(r["test"]["iou"]) / 2)
    partial = tmp_path / "no_test"
    for split in ("train", "val"):
        shutil.copytree(shard_world / split, partial / split)
    from tim_data import readers
    args = SimpleNamespace(dataset="terramesh", data=partial, classes="land,water", labels="label_water",
                           modalities=("S2L1C",))
    rs = readers(args)
    assert list(rs["test"].data.ids) == list(rs["val"].data.ids) and rs["test"].classes == ("land", "water")


@pytest.mark.parametrize("argv", [
    ["train", "--model", "missing.safetensors", "--data", "missing", "--out"],
    ["predict", "--ckpt", "missing.safetensors", "--input", "S1GRD=missing.tif", "--out"]])
def test_out_is_checked_before_any_work(tmp_path, argv):
    """An --out that cannot be written is named before the model or any data is read (train) and before any
    window is predicted (predict: only the checkpoint is read first, to know the inputs)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if argv[0] == "predict":
        model = TiMSegmenter.from_pretrained(TerraMind(TerraMindConfig.preset("smoke")), modalities=("S1GRD",),
                                             tim=(), channels=8, tile=32)
        model.save_checkpoint(tmp_path / "model.safetensors")
        argv = [a.replace("missing.safetensors", str(tmp_path / "model.safetensors")) for a in argv]
    with pytest.raises(ValueError, match="cannot write there"):
        main([*argv, str(blocker / "out" / "mask.tif"), "--device", "cpu"])
