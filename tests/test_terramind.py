"""terramind.py against the official implementation (committed fixtures, made by
tests/fixtures/make_terramind_fixtures.py with terratorch), the official key lists and parameter counts
(assets/official), and analytic facts (log V loss at init, softmax attention, FLOP counts)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import cpu_linear
from checkpoints import load_safetensors
from entries import ENTRIES, entry_kind
from masking import Masking
from modalities import MODALITIES
from terramind import PRESETS, TerraMind, TerraMindConfig, flops_per_token

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "terramind"
SPEC = Path(__file__).resolve().parents[1] / "assets" / "official"
VARIANTS = ("gelu224", "swiglu64")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def batch_fixture():
    t, meta = load_safetensors(FIXTURES / "batch.safetensors")
    batch = {k[6:]: v.float() if v.is_floating_point() else v for k, v in t.items() if k.startswith("batch.")}
    inputs = {k[7:]: v for k, v in t.items() if k.startswith("inputs.")}
    inputs.update({e: batch[e] for e in ENTRIES if entry_kind(e) == "pixels"})
    return batch, {e: inputs[e] for e in ENTRIES}, meta


@pytest.fixture(scope="module", params=VARIANTS)
def official(request):
    t, meta = load_safetensors(FIXTURES / f"official_{request.param}.safetensors")
    state = {k[6:]: v.float() for k, v in t.items() if k.startswith("state.")}
    expect = {k[7:]: v for k, v in t.items() if k.startswith("expect.")}
    model = TerraMind.from_official(state, TerraMindConfig(**meta["config"])).eval()
    return model, expect, state


def test_from_official_encode_matches_official(official, batch_fixture):
    model, expect, _ = official
    _, inputs, _ = batch_fixture
    layers = range(model.config.encoder_depth)
    with torch.no_grad():
        enc = model.encode(inputs, layers=layers)
    for e in ENTRIES:
        assert rel(enc.tokens[e], expect[f"encoder.{e}"]) <= 1e-5, e
        for i in layers:
            assert rel(enc.layers[i][e], expect[f"encoder.layer{i}.{e}"]) <= 1e-5, (e, i)


def test_pretraining_loss_matches_official(official, batch_fixture):
    model, expect, _ = official
    batch, _, _ = batch_fixture
    with torch.no_grad():
        loss, losses = model(batch)
    assert rel(loss, expect["loss"][0]) <= 1e-5
    assert set(losses) == {k[5:] for k in expect if k.startswith("loss.")}
    for e, v in losses.items():
        assert rel(v, expect[f"loss.{e}"][0]) <= 1e-5, e


def test_logits_match_official(official, batch_fixture):
    model, expect, _ = official
    _, inputs, meta = batch_fixture
    with torch.no_grad():
        lulc = model.logits({e: inputs[e] for e in meta["logits_inputs"]}, "tok_LULC")        # fully masked
        coords = model.logits({**{e: inputs[e] for e in meta["coords_inputs"]}, "coords": torch.full((2, 1), 5)},
                              "coords", prefix=expect["coords_target"][:, :4])              # teacher forced
    assert lulc.shape == expect["logits.tok_LULC"].shape
    assert rel(lulc, expect["logits.tok_LULC"]) <= 1e-5
    assert rel(coords, expect["logits.coords"]) <= 1e-5
    # the official one-step ROAR generation at temperature 0 is the argmax of these logits
    assert torch.equal(lulc.argmax(-1).reshape(expect["roar.tok_LULC"].shape), expect["roar.tok_LULC"])


def test_from_official_is_strict(official):
    model, _, state = official
    config = model.config
    with pytest.raises(ValueError, match="unexpected official keys"):
        TerraMind.from_official({**state, "encoder.99.attn.qkv.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="no official weights for"):
        TerraMind.from_official({k: v for k, v in state.items() if k != "encoder_norm.weight"}, config)
    with pytest.raises(KeyError, match="missing official key"):
        TerraMind.from_official({k: v for k, v in state.items() if "tok_dem@224.token_emb" not in k}, config)
    tied = "decoder_embeddings.tok_lulc@224.to_logits.weight"
    with pytest.raises(ValueError, match="tied table"):
        TerraMind.from_official({**state, tied: state[tied] + 1}, config)


# official parameter counts (official models built with random weights, unique parameters)
PARAMS = {"tiny": 52_059_456, "small": 124_259_712, "base": 376_091_904, "large": 942_095_360}


@pytest.mark.parametrize("size", list(PARAMS))
def test_full_size_official_keys_and_parameter_counts(size):
    path = SPEC / "keys" / f"terramind_{size}_keys.txt"
    state = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.empty(tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), device="meta")
    model = TerraMind.from_official(state, size)          # meta tensors: every key and shape, no allocation
    assert model.config.inputs + model.config.targets == PRESETS[size].inputs + PRESETS[size].targets
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size]


def smoke_batch(config, n, seed=0, budgets=(64, 64)):
    g = torch.Generator().manual_seed(seed)
    masking = Masking(config.inputs, config.targets, *budgets, alphas="all2all", grid=config.grid)
    samples = []
    for b in range(n):
        s = {e: torch.randn(MODALITIES[e].channels, 16 * config.grid, 16 * config.grid, generator=g)
             for e in config.inputs if entry_kind(e) == "pixels"}
        s.update({e: torch.randint(0, config.vocab_size(e), (config.grid,) * 2, generator=g)
                  for e in config.inputs + config.targets if entry_kind(e) == "tokens"})
        s["caption"] = torch.randint(6366, 30000, (30,), generator=g)
        s["coords"] = torch.randint(4204, 6366, (2,), generator=g)
        samples.append(masking(s, np.random.default_rng([seed, b])))
    return default_collate(samples)


def test_loss_at_init_is_log_vocab():
    """Paper eq. 3: at initialization the prediction is near uniform, so each CE is close to log V."""
    torch.manual_seed(0)
    config = TerraMindConfig.preset("smoke")
    model = TerraMind(config)
    with torch.no_grad():
        loss, losses = model(smoke_batch(config, 8))
    assert set(losses) == set(config.targets)
    for e, v in losses.items():
        assert abs(v.item() - math.log(config.vocab_size(e))) < 0.02 * math.log(config.vocab_size(e)), e


def test_bf16_autocast_step():
    torch.manual_seed(0)
    config = TerraMindConfig.preset("smoke")
    model = TerraMind(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, losses = model(smoke_batch(config, 4))
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - math.log(15360)) < 0.3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_entry_parameters_are_the_only_ones_a_batch_can_leave_without_gradient():
    """pretrain.py keeps only entry_parameters() in the graph by a zero-weight term (DDP needs every parameter
    to get a gradient): a batch with a single input and a single target entry must reach all the others."""
    torch.manual_seed(0)
    config = TerraMindConfig.preset("smoke")
    model = TerraMind(config)
    batch = smoke_batch(config, 2)
    keep_in, keep_tg = config.inputs.index("tok_S1GRD"), config.targets.index("tok_LULC")
    for side, keep in (("input", keep_in), ("target", keep_tg)):
        names = config.inputs if side == "input" else config.targets
        mod = batch[f"{side}_mod"]
        batch[f"{side}_mod"] = mod.masked_fill(mod != ENTRIES.index(names[keep]), -1)
    loss, losses = model(batch)
    assert set(losses) == {"tok_LULC"}
    loss.backward()
    entry = {id(p) for p in model.entry_parameters()}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad and all(id(dict(model.named_parameters())[n]) in entry for n in no_grad), no_grad


def test_compile_blocks_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    config = TerraMindConfig(dim=32, encoder_depth=2, decoder_depth=1, num_heads=2, mlp_hidden=64, grid=4,
                             inputs=PRESETS["smoke"].inputs, targets=PRESETS["smoke"].targets)
    model, batch = TerraMind(config), smoke_batch(config, 2, budgets=(40, 40))
    loss, _ = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    keys = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == keys                           # checkpoints stay interchangeable
    loss2, _ = model(batch)
    loss2.backward()
    assert rel(loss2.detach(), loss.detach()) < 1e-5
    for n, p in model.named_parameters():
        if n in grads and grads[n].any():
            assert rel(p.grad, grads[n]) < 1e-4, n
        elif n in grads:          # an entry without slots in the batch: zero both times
            assert not p.grad.any(), n


def decoder_outputs(model, batch) -> torch.Tensor:
    """The decoder's output at every target slot (B, N_tgt, D): what the output heads read."""
    seen = []
    hook = model.decoder_norm.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        model(batch)
    hook.remove()
    return seen[0]


@pytest.fixture(scope="module")
def masked():
    torch.manual_seed(0)
    config = TerraMindConfig(dim=32, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_hidden=64, grid=4,
                             inputs=PRESETS["smoke"].inputs, targets=PRESETS["smoke"].targets)
    model = TerraMind(config).eval()
    batch = smoke_batch(config, 3, budgets=(40, 40))
    return model, batch, decoder_outputs(model, batch)


def test_decoder_slots_see_only_their_own_entry(masked):
    """Official sep mask: moving one entry's target positions changes that entry's outputs only."""
    model, batch, y = masked
    lulc = batch["target_mod"] == ENTRIES.index("tok_LULC")
    assert lulc.any() and ((batch["target_mod"] >= 0) & ~lulc).any()
    moved = {**batch, "target_pos": torch.where(lulc, (batch["target_pos"] + 1) % 16, batch["target_pos"])}
    y2 = decoder_outputs(model, moved)
    others = (batch["target_mod"] >= 0) & ~lulc
    assert torch.allclose(y2[others], y[others], atol=1e-5)
    assert not torch.allclose(y2[lulc], y[lulc], atol=1e-2)


def test_sequence_slots_see_only_earlier_slots(masked):
    """Causal within a sequence target: changing the token that caption slot k reads changes slots k.. only."""
    model, batch, y = masked
    cap = batch["target_mod"] == ENTRIES.index("caption")
    b = int(cap.sum(1).argmax())
    slots = cap[b].nonzero()[:, 0]                                  # (K,) this row's caption slots, in order
    k = len(slots) // 2
    pos = int(batch["target_pos"][b, slots[k]])
    read = batch["input_pos"][b][batch["input_mod"][b] == ENTRIES.index("caption")]
    assert len(slots) >= 3 and pos not in read.tolist()             # an encoder input would change everything
    caption = batch["caption"].clone()
    caption[b, pos] = (caption[b, pos] + 1) % 30000
    y2 = decoder_outputs(model, {**batch, "caption": caption})
    assert torch.allclose(y2[b, slots[:k]], y[b, slots[:k]], atol=1e-5)
    assert not torch.allclose(y2[b, slots[k]], y[b, slots[k]], atol=1e-2)
    rest = (batch["target_mod"] >= 0) & ~cap
    assert torch.allclose(y2[rest], y[rest], atol=1e-5)


def test_padding_slots_change_nothing(masked):
    """Six more padding slots on each side (encoder and decoder), holding arbitrary positions: every real target
    slot's output stays the same."""
    model, batch, y = masked
    B = batch["input_mod"].shape[0]
    pad_mod = torch.full((B, 6), -1)
    pad_pos = torch.randint(0, 16, (B, 6), generator=torch.Generator().manual_seed(0))   # any position
    padded = {**batch}
    for side in ("input", "target"):
        padded[f"{side}_mod"] = torch.cat([batch[f"{side}_mod"], pad_mod], 1)
        padded[f"{side}_pos"] = torch.cat([batch[f"{side}_pos"], pad_pos], 1)
    y2 = decoder_outputs(model, padded)[:, :y.shape[1]]
    real = batch["target_mod"] >= 0
    assert torch.allclose(y2[real], y[real], atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = TerraMindConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden=48, grid=4,
                             swiglu=True, vocab={"tok_LULC": 40, "caption": 300, "coords": 300, "tok_S2L2A": 50},
                             inputs=("S2L2A", "tok_LULC", "caption", "coords"), targets=("tok_S2L2A", "coords"))
    model = TerraMind(config)
    model.save_checkpoint(tmp_path / "tm.safetensors", step=7)
    again = TerraMind.from_checkpoint(tmp_path / "tm.safetensors")
    assert again.config == config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = {"S2L2A": torch.randn(2, 12, 64, 64), "tok_LULC": torch.randint(0, 40, (2, 4, 4)),
         "coords": torch.tensor([[210, 220, 3], [230, 240, 3]])}
    assert torch.equal(model.logits(x, "tok_S2L2A"), again.logits(x, "tok_S2L2A"))
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "tm.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match="bad.safetensors"):
        TerraMind.from_checkpoint(tmp_path / "bad.safetensors")


def test_encode_visibility_grids_and_merge():
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke")).eval()
    s2, lulc = torch.randn(2, 12, 64, 64), torch.randint(0, 4375, (2, 4, 4))
    with torch.no_grad():
        both = model.encode({"S2L2A": s2, "tok_LULC": lulc}, layers=[0, 1])
        alone = model.encode({"S2L2A": s2})
        none = {"tok_LULC": torch.zeros(2, 16, dtype=torch.bool)}
        hidden = model.encode({"S2L2A": s2, "tok_LULC": lulc}, visible=none)
    # an input with no visible token is the same as no input (official generation masks)
    assert torch.allclose(hidden.tokens["S2L2A"], alone.tokens["S2L2A"], atol=1e-6)
    assert not torch.allclose(both.tokens["S2L2A"], alone.tokens["S2L2A"], atol=1e-3)
    assert both.image("S2L2A").shape == (2, 64, 4, 4)
    assert torch.equal(both.image("tok_LULC", 0)[:, :, 1, 2], both.layers[0]["tok_LULC"][:, 1 * 4 + 2])
    assert torch.equal(both.layers[1]["S2L2A"], both.tokens["S2L2A"])      # last block: the normed output
    assert torch.allclose(both.merge("mean"), (both.image("S2L2A") + both.image("tok_LULC")) / 2)
    assert both.merge("concat").shape == (2, 128, 4, 4)
    with pytest.raises(ValueError, match="S2L2A"):
        model.encode({"S2L2A": torch.randn(2, 13, 64, 64)})
    with pytest.raises(ValueError, match=r"\[0, 4375\)"):
        model.encode({"tok_LULC": lulc + 5000})


def test_logits_image_positions_and_grid_interpolation():
    """Image queries at permuted positions give permuted logits (they attend to each other without order);
    a model built for 14 x 14 runs on 4 x 4 through interpolated positions."""
    torch.manual_seed(0)
    model = TerraMind(TerraMindConfig.preset("smoke")).eval()
    x = {"S1GRD": torch.randn(2, 2, 64, 64)}
    with torch.no_grad():
        enc = model.encode(x)
        full = model.logits(enc, "tok_DEM")
        perm = torch.randperm(16).expand(2, -1)
        assert torch.allclose(model.logits(enc, "tok_DEM", positions=perm), full[:, perm[0]], atol=1e-5)
        big = TerraMind(TerraMindConfig(64, 1, 1, 2, 128, inputs=("S1GRD",), targets=("tok_DEM",), grid=14))
        assert big.logits(x, "tok_DEM").shape == (2, 16, 15360)


def test_flops_per_token_matches_a_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(cpu_linear, "ENABLED", False)   # the counter knows aten's matmuls, not oneDNN's op
    config = TerraMindConfig(dim=64, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_hidden=256, grid=8,
                             inputs=("tok_S2L2A", "tok_DEM"), targets=("tok_LULC", "tok_NDVI"),
                             vocab={"tok_LULC": 1000, "tok_NDVI": 1000})
    model = TerraMind(config)
    B, n_in, n_tgt = 2, 64, 48
    g = torch.Generator().manual_seed(0)
    batch = {e: torch.randint(0, 1000, (B, 8, 8), generator=g) for e in ENTRIES if entry_kind(e) == "tokens"}
    idx = {e: ENTRIES.index(e) for e in config.inputs + config.targets}
    batch["input_mod"] = torch.tensor([idx["tok_S2L2A"]] * 32 + [idx["tok_DEM"]] * 32).expand(B, -1)
    batch["input_pos"] = torch.cat([torch.arange(32), torch.arange(32)]).expand(B, -1)
    batch["target_mod"] = torch.tensor([idx["tok_LULC"]] * 24 + [idx["tok_NDVI"]] * 24).expand(B, -1)
    batch["target_pos"] = torch.cat([torch.arange(24), torch.arange(24)]).expand(B, -1)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)[0].backward()
    counted = counter.get_total_flops() / (B * (n_in + n_tgt))
    attention = 3 * (4 * n_in * n_in * 64 * 2 + 2 * (4 * n_tgt * n_tgt * 64 + 4 * n_tgt * n_in * 64)) / (n_in + n_tgt)
    if not any("attention" in str(op) for op in counter.get_flop_counts()["Global"]):
        counted += attention          # this torch's counter has no CPU flash-attention formula
    assert abs(counted - flops_per_token(config, n_in, n_tgt)) < 0.02 * counted
