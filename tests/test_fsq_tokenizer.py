"""fsq_tokenizer.py against analytic FSQ facts, the official key lists and parameter counts (official),
the official DiVAE / VQVAE outputs (shrunken fixtures), and end-to-end runs of its commands."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import synthetic
import terramesh
from fsq_tokenizer import (FSQ, ImageTokenizer, TokenizerConfig, load_state_strict,
                           load_tokenizers, sincos_table)
from metrics import codebook_usage, reconstruction_metrics, ssim
from token_shards import TokenShards
from test_diffusion_decoder import load_fixture, official_state, rel

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = ROOT / "assets" / "official" / "keys"
REAL = ROOT / "assets" / "terramesh"


def fixture_tokenizer(name):
    tensors, cfg = load_fixture(name)
    cfg = TokenizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    model = ImageTokenizer(cfg)
    load_state_strict(model, official_state(tensors), name)
    return model.eval(), tensors


# FSQ ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels,basis", [((8, 8, 8, 6, 5), [1, 8, 64, 512, 3072]),
                                          ((7, 5, 5, 5, 5), [1, 7, 35, 175, 875])])
def test_fsq_is_a_bijection(levels, basis):
    fsq = FSQ(levels)
    V = fsq.vocab_size
    assert V == torch.tensor(levels).prod() and fsq.basis.flatten().tolist() == basis
    ids = torch.arange(V).view(1, V, 1)
    codes = fsq.indices_to_codes(ids)                                  # (1, 5, V, 1)
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    assert len({tuple(c) for c in codes[0, :, :, 0].T.tolist()}) == V   # all codes distinct
    # the latent that sits in the middle of each code's bin quantizes back to it
    z = torch.logit(codes.clamp(1e-3, 1 - 1e-3))
    assert torch.equal(fsq(z)[1], ids)
    assert fsq(z)[1].dtype == torch.int64


def test_fsq_levels_and_straight_through_gradient():
    fsq = FSQ((8, 8, 8, 6, 5))
    z = torch.linspace(-12, 12, 20001).view(1, 1, -1, 1).expand(1, 5, -1, 1).clone().requires_grad_()
    codes, _ = fsq(z)
    for i, L in enumerate((8, 8, 8, 6, 5)):
        values = codes[0, i].unique()
        assert len(values) == L and torch.allclose(values, torch.arange(L) / (L - 1))   # exactly L values in [0, 1]
    codes.sum().backward()
    s = torch.sigmoid(z.detach())
    assert torch.allclose(z.grad, s * (1 - s), atol=1e-7)          # d round(.)/dx = 1: only the sigmoid remains


# official architecture -------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality,keys,n_params", [
    ("S2L2A", "s2l2a", 289_290_693), ("S1GRD", "s1grd", 286_587_173), ("S1RTC", "s1grd", 286_587_173),
    ("DEM", "dem", 286_316_821), ("NDVI", "dem", 286_316_821), ("LULC", "lulc", 183_894_021)])
def test_official_preset_matches_official_keys_and_sizes(modality, keys, n_params):
    path = SPEC_KEYS / f"terramind_v1_tokenizer_{keys}_keys.txt"
    expected = {}
    for line in path.read_text().splitlines():
        k, shape = line.split("\t")
        expected[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):
        model = ImageTokenizer(TokenizerConfig.preset("official", modality))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    # the official counts take parameters including the frozen position tables (our buffers)
    assert sum(v.numel() for k, v in model.state_dict().items()) == n_params


def test_sincos_table_equals_official():
    """Ours and the official table, each within float32 error of the float64 closed form. The angle
    a = i / 10000^(j/q) carries a relative error of at most (ln 10000 + 3) u (the exponent's rounding, scaled
    by ln 10000, then pow, division and product; u = 2^-24), and sin/cos add one rounding: |error| <=
    (ln 10000 + 3) u |a| + 2 u."""
    tensors, cfg = load_fixture("s2l2a")
    n, dim = cfg["image_size"] // 16, cfg["enc_dim"]
    q = dim // 4
    angle = torch.arange(n, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(q, dtype=torch.float64) / q)
    rows = torch.cat([angle.sin(), angle.cos()], 1)                                       # (n, D/2)
    exact = torch.cat([rows[:, None].expand(n, n, -1), rows[None].expand(n, n, -1)], -1).permute(2, 0, 1)[None]
    a = torch.cat([angle, angle], 1)
    a = torch.cat([a[:, None].expand(n, n, -1), a[None].expand(n, n, -1)], -1).permute(2, 0, 1)[None]
    bound = (math.log(10000) + 3) * 2.0 ** -24 * a + 2 * 2.0 ** -24
    for table in (sincos_table(n, dim), tensors["f.encoder.pos_emb"]):
        assert table.shape == exact.shape and ((table.double() - exact).abs() <= bound).all()


# parity on the same weights and inputs ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s2l2a", "dem", "lulc"])
def test_encode_gives_official_tokens(name):
    model, t = fixture_tokenizer(name)
    x = t["x"].float() if name != "lulc" else t["x"].long()          # LULC: class map, one-hot inside
    codes, tokens = model.encode_codes(x)
    assert torch.equal(tokens, t["tokens"]) and torch.equal(model.encode(x), t["tokens"])
    assert torch.equal(codes, t["quant"])


def test_lulc_logits_match_official():
    model, t = fixture_tokenizer("lulc")
    logits = model.decode(t["tokens"])
    assert logits.shape == (2, 10, 64, 64) and rel(logits, t["logits"]) <= 1e-5


def test_decode_tokens_matches_official_ten_step_decode():
    model, t = fixture_tokenizer("s2l2a")
    out = model.decode(t["tokens"], steps=10, generator=torch.Generator().manual_seed(1234))
    assert rel(out, t["decoded"]) <= 1e-4


def test_strict_loading_names_missing_and_extra_keys():
    model, t = fixture_tokenizer("dem")
    sd = official_state(t)
    sd.pop("quant_proj.bias")
    with pytest.raises(ValueError, match="missing.*quant_proj.bias"):
        load_state_strict(model, sd, "x.pt")
    sd = official_state(t)
    sd["loss.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*loss.weight"):
        load_state_strict(model, sd, "x.pt")


def test_bad_inputs_are_refused():
    model, _ = fixture_tokenizer("lulc")
    with pytest.raises(ValueError, match="classes"):
        model.encode(torch.full((1, 64, 64), 10))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 10, 40, 40))
    with pytest.raises(ValueError, match="token ids"):
        model.decode(torch.full((1, 2, 2), 4375))


# training, checkpoints, shards, metrics -------------------------------------------------------------------
def test_tiny_tokenizers_overfit_one_batch():
    torch.manual_seed(0)
    for modality in ("LULC", "DEM"):
        model = ImageTokenizer(TokenizerConfig.preset("tiny", modality))
        if modality == "LULC":
            x = torch.randint(1, 10, (4, 4, 4)).repeat_interleave(16, 1).repeat_interleave(16, 2)  # blocky classes
        else:
            x = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 64, 64) * 8, 9, 1, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4 if modality == "LULC" else 2e-3)
        losses = []
        for _ in range(100 if modality == "LULC" else 80):
            loss = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        if modality == "LULC":
            assert first > 1.5 and last < 0.1, (first, last)          # starts near log(10) = 2.30
        else:
            assert last < 0.25 * first, (first, last)


def test_checkpoint_round_trip(tmp_path):
    model, t = fixture_tokenizer("dem")
    model.save_checkpoint(tmp_path / "tokenizer_DEM.safetensors")
    back = load_tokenizers(tmp_path)["DEM"]
    assert back.cfg == model.cfg and torch.equal(back.encode(t["x"].float()), t["tokens"])
    (tmp_path / "tokenizer_DEM.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="tokenizer_DEM"):
        ImageTokenizer.from_checkpoint(tmp_path / "tokenizer_DEM.safetensors")


def test_metrics_facts():
    x = torch.randn(2, 1, 32, 32)
    perfect = reconstruction_metrics("DEM", x, x)
    assert perfect["MAE"] == 0 and perfect["SSIM"] == pytest.approx(1.0)
    m = reconstruction_metrics("DEM", x, x + 0.1, data_range=torch.tensor([951.272]))
    assert m["MAE"] == pytest.approx(95.1272, rel=1e-6) and m["RMSE"] == pytest.approx(95.1272, rel=1e-6)
    assert m["PSNR"] == pytest.approx(20.0, abs=1e-6)                 # range / RMSE = 10
    flat = torch.zeros_like(x).double()                                 # no structure: SSIM near 0
    assert 0 <= float(ssim(x.double(), flat, torch.tensor([1.0])).mean()) < 0.01
    assert codebook_usage(torch.arange(100), 400) == pytest.approx({"used": 0.25, "perplexity": 100.0})
    logits = torch.tensor([[[[0, 0]], [[5, 0]], [[0, 5]]]])          # predicts classes [1, 2]
    assert reconstruction_metrics("LULC", torch.tensor([[[1, 1]]]), logits) == {"acc": 0.5, "mIoU": 0.25}


def run(*args):
    cmd = [sys.executable, str(ROOT / "fsq_tokenizer.py"), *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_train_tokenize_reconstruct_commands(tmp_path):
    data, ckpt, tokens = tmp_path / "synth", tmp_path / "ckpt", tmp_path / "tokens"
    synthetic.synthesize(data, n=12, size=64, seed=0, workers=1)
    out = run("train", "--modality", "LULC", "--data", data, "--size", "smoke", "--steps", 3, "--batch-size", 4,
              "--save-every", 2, "--out", ckpt)
    assert "step 3/3" in out and (ckpt / "tokenizer_LULC.safetensors").exists()
    out = run("train", "--modality", "LULC", "--data", data, "--size", "smoke", "--steps", 5, "--batch-size", 4,
              "--out", ckpt, "--resume")
    assert "at step 3" in out and "step 4/5" in out and "step 3/5" not in out     # continues, not restarts
    out = run("tokenize", "--data", data, "--tokenizers", ckpt, "--out", tokens, "--shard-size", 5)
    assert "3 shards written" in out
    assert "0 shards written, 3 already done" in run("tokenize", "--data", data, "--tokenizers", ckpt, "--out",
                                                     tokens, "--shard-size", 5)
    shards, tok = TokenShards(tokens), load_tokenizers(ckpt)["LULC"]
    ds = terramesh.TerraMeshDataset(data, ["LULC"], size=None)
    assert shards.ids == ds.ids and shards.modalities == ["LULC"]
    assert torch.equal(shards.get("LULC", ds.ids[7]), tok.encode(ds[7]["LULC"][None])[0])
    assert shards.tokens["LULC"].dtype == torch.int16 and shards.get("LULC", ds.ids[0]).shape == (4, 4)
    out = run("reconstruct", "--modality", "LULC", "--data", data, "--tokenizers", ckpt, "--out", tmp_path / "rec",
              "--n", 4, "--pictures", 1)
    assert "mean image" in out and (tmp_path / "rec" / "metrics_LULC.json").exists()


def test_real_tiles_tokenize_to_14x14():
    ds = terramesh.TerraMeshDataset(REAL, ["S2L2A", "LULC"], size=224)
    model = ImageTokenizer(TokenizerConfig.preset("smoke", "S2L2A"))
    tokens = model.encode(torch.stack([ds[i]["S2L2A"] for i in range(len(ds))]))
    assert tokens.shape == (len(ds), 14, 14) and 0 <= tokens.min() and tokens.max() < 15360
    lulc = ImageTokenizer(TokenizerConfig.preset("smoke", "LULC"))
    assert lulc.encode(torch.stack([ds[i]["LULC"] for i in range(len(ds))])).shape == (len(ds), 14, 14)


@pytest.mark.slow
def test_from_official_loads_a_full_size_state_dict(tmp_path):
    """A TerraMind_Tokenizer_LULC.pt-shaped file (official keys, random values) loads strictly and encodes."""
    source = ImageTokenizer(TokenizerConfig.preset("official", "LULC"))
    torch.save(source.state_dict(), tmp_path / "TerraMind_Tokenizer_LULC.pt")
    model = ImageTokenizer.from_official(tmp_path / "TerraMind_Tokenizer_LULC.pt", "LULC")
    x = torch.randint(0, 10, (1, 224, 224))
    assert torch.equal(model.encode(x), source.encode(x)) and model.encode(x).shape == (1, 14, 14)
    with pytest.raises(ValueError, match="does not fit the DEM tokenizer"):
        ImageTokenizer.from_official(tmp_path / "TerraMind_Tokenizer_LULC.pt", "DEM")


def test_official_preset_follows_the_papers_tokenizer_recipe():
    """paper §8.1: 100 epochs, base lr 1e-4 at global batch 256 (scaled by global batch / 256 as 4M), fp16 for the
    diffusion tokenizers, EMA; the official code: EMA 0.9999 (LULC 0.99, bf16), a one-epoch warmup."""
    import argparse

    from tokenizer_training import lr_at, train_recipe

    def flags(**given):
        return argparse.Namespace(**({k: None for k in ("epochs", "steps", "blr", "lr", "ema", "dtype")} |
                                     {"size": "official"} | given))
    r = train_recipe(flags(), "S2L2A", 8, 25_600, 32, cuda=True)            # 8 GPUs x 32 = 256, 100 steps an epoch
    assert (r.steps, r.warmup, r.lr, r.ema, r.dtype) == (100 * 100, 100, pytest.approx(1e-4), 0.9999, "fp16")
    assert "100 epochs x 100 steps" in r.text and "base lr 1.0e-04 x 256 / 256" in r.text
    r = train_recipe(flags(), "LULC", 4, 25_600, 32, cuda=True)             # global batch 128: half the rate
    assert (r.steps, r.lr, r.ema, r.dtype) == (100 * 200, pytest.approx(5e-5), 0.99, "bf16")
    r = train_recipe(flags(steps=50, lr=1e-3, ema=0.0, dtype="bf16"), "DEM", 8, 25_600, 32, cuda=True)
    assert (r.steps, r.lr, r.ema, r.dtype, r.warmup) == (50, 1e-3, 0.0, "bf16", 2)
    r = train_recipe(flags(size="smoke"), "DEM", 1, 300, 16, cuda=False)
    assert (r.steps, r.lr, r.ema, r.dtype) == (400, 5e-4, 0.0, "fp32")
    assert lr_at(0, 1000, 1e-4, warmup=100) == pytest.approx(1e-6) and lr_at(100, 1000, 1e-4, warmup=100) == 1e-4


def refused(*args) -> str:
    """Runs a command that must refuse its input: one line on stderr, exit status 1."""
    cmd = [sys.executable, str(ROOT / "fsq_tokenizer.py"), *map(str, args), "--device", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr


def test_commands_never_overwrite_a_file_unless_told(tmp_path):
    """issue 19: train, reconstruct and tokenize refuse, before any work, a file in --out that they would
    replace: train unless --overwrite (or --resume with its state), reconstruct unless --overwrite, tokenize a
    file that is not one of its shards."""
    data, ckpt = tmp_path / "synth", tmp_path / "ckpt"
    synthetic.synthesize(data, n=8, size=64, seed=0, workers=1)
    ckpt.mkdir()
    user_file = ckpt / "tokenizer_DEM.safetensors"
    user_file.write_text("a user's file")
    train = ("train", "--modality", "DEM", "--data", data, "--size", "smoke", "--batch-size", 4, "--out", ckpt,
             "--steps")
    for extra in ([], ["--resume"]):                       # --resume without a state: nothing to continue
        said = refused(*train, 1, *extra)
        assert f"--out {user_file}: the file exists; pass --overwrite" in said
    assert user_file.read_text() == "a user's file"
    assert "step 1/1" in run(*train, 1, "--overwrite")
    assert "step 2/2" in run(*train, 2, "--resume")                        # continues its own files
    rec = ("reconstruct", "--modality", "DEM", "--data", data, "--tokenizers", ckpt, "--out", tmp_path / "rec",
           "--n", 2, "--steps", 1, "--pictures", 1)
    run(*rec)
    metrics = tmp_path / "rec" / "metrics_DEM.json"
    before = metrics.read_bytes()
    assert f"--out {metrics}: the file exists; pass --overwrite" in refused(*rec)
    assert metrics.read_bytes() == before
    assert "wrote" in run(*rec, "--overwrite")
    shard = tmp_path / "tokens" / "DEM" / "shard_00000.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_text("a user's file")
    said = refused("tokenize", "--data", data, "--tokenizers", ckpt, "--out", tmp_path / "tokens")
    assert f"{shard}: is not a DEM token shard" in said and shard.read_text() == "a user's file"
