"""generate.py's sampling against analytic facts: sampled tokens follow the tempered, top-k / top-p filtered
softmax (a chi-square test against the distribution computed here by hand); multi-step MaskGIT commits the
most confident positions in the schedule's counts; classifier-free guidance is the official
`uncond + (cond - uncond) * scale` (TM/model/generate.py, from 4M) on fixed logits.

The generation tests use a tiny TerraMind whose `encode` and `logits` are replaced by stubs with known outputs,
so that every committed position and every guided logit can be worked out by hand."""
import math

import pytest
import torch

import generate
from generate import Sampling, cosine_schedule, generate_tokens, linear_schedule, sample
from terramind import PRESETS, TerraMind, TerraMindConfig

LOGITS = [1.3, -0.2, 2.1, 0.4, -1.5, 0.9, 1.7, -0.7, 0.1, -2.4]   # V = 10, unsorted on purpose


def filtered_softmax(logits: list, temperature: float, top_k: float, top_p: float) -> list:
    """The official sampling distribution, written out: keep the top-k logits (k a count, or a share of V if
    a float), then the smallest most-likely prefix whose (untempered) probability exceeds top_p, then
    softmax(logit / T) over what is kept; 0 elsewhere."""
    V = len(logits)
    order = sorted(range(V), key=lambda i: -logits[i])
    k = int(top_k * V) if isinstance(top_k, float) else top_k
    kept = order[:k] if k > 0 else order
    if top_p > 0:
        z = sum(math.exp(logits[i]) for i in kept)
        mass, prefix = 0.0, []
        for i in kept:
            prefix.append(i)
            mass += math.exp(logits[i]) / z
            if mass > top_p:
                break
        kept = prefix
    w = {i: math.exp(logits[i] / temperature) for i in kept}
    return [w.get(i, 0.0) / sum(w.values()) for i in range(V)]


def chi_square_quantile(df: int, z: float) -> float:
    """Upper quantile of the chi-square distribution at the normal quantile z (Wilson-Hilferty)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.0), (0.5, 0, 0.0), (2.0, 0, 0.0),              # temperature alone
    (1.0, 0, 0.8), (0.7, 0, 0.8),                              # the default nucleus, before the temperature
    (1.5, 4, 0.0), (1.0, 0.5, 0.0), (1.3, 6, 0.7)])           # top-k (count, share), then top-p
def test_sampled_tokens_follow_the_filtered_tempered_softmax(temperature, top_k, top_p):
    N = 40_000
    expected = torch.tensor(filtered_softmax(LOGITS, temperature, top_k, top_p), dtype=torch.float64)
    logits = torch.tensor(LOGITS).expand(1, N, -1)                                 # (B=1, K=N, V) draws
    ids, prob = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(ids.flatten(), minlength=len(LOGITS)).double()
    assert counts[expected == 0].sum() == 0                                      # filtered tokens never drawn
    assert torch.allclose(prob.double(), expected[ids], rtol=1e-5, atol=0)       # the returned confidence
    E, O = N * expected, counts
    small = (E > 0) & (E < 5)              # pool the rare tokens into one bin (chi-square needs E >= 5)
    E = torch.cat([E[E >= 5], E[small].sum()[None]]) if small.any() else E[E >= 5]
    O = torch.cat([O[N * expected >= 5], O[small].sum()[None]]) if small.any() else O[N * expected >= 5]
    chi2 = float(((O - E) ** 2 / E).sum())
    assert chi2 < chi_square_quantile(len(E) - 1, 4.75), (chi2, O.tolist(), E.tolist())   # p = 1e-6


def test_zero_temperature_is_argmax_with_the_softmax_confidence():
    logits = torch.tensor(LOGITS).expand(2, 3, -1)
    ids, prob = sample(logits, 0.0, top_p=0.8)
    assert (ids == 2).all() and torch.allclose(prob, torch.tensor(LOGITS).softmax(-1)[2].expand(2, 3))


# ---- generation with a stub model ---------------------------------------------------------------------------

# confidence of each of the 16 positions (4 x 4 grid) for two batch rows: distinct, shuffled
HEIGHT = torch.tensor([[5, 12, 0, 9, 14, 3, 7, 1, 15, 10, 6, 2, 13, 8, 4, 11],
                       [10, 3, 15, 6, 1, 12, 8, 14, 0, 5, 9, 13, 2, 7, 11, 4]], dtype=torch.float32)


@pytest.fixture
def stub():
    """A tiny TerraMind whose encoder call k returns k, and whose logits at call k put a peak of height
    HEIGHT[b, position] on token k + 1: the token written at a position says at which step it was decoded."""
    config = TerraMindConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden=32, grid=4,
                             inputs=PRESETS["smoke"].inputs, targets=PRESETS["smoke"].targets)
    model = TerraMind(config).eval()
    model.calls = []

    def encode(inputs, visible=None):
        model.calls.append(({e: t.clone() for e, t in inputs.items()}, visible))
        return len(model.calls) - 1

    def logits(enc, target, positions, grid):
        out = torch.zeros(*positions.shape, 20)                                   # (B, K, V)
        out[..., enc + 1] = (HEIGHT.gather(1, positions) + 1) * 0.5
        return out

    model.encode, model.logits = encode, logits
    return model


def test_maskgit_commits_the_most_confident_positions_by_the_schedule(stub):
    counts = cosine_schedule(4, 16)
    assert counts == [2, 6, 6, 2]                  # 0.5 (1 + cos(pi i / 4)) in steps of 16: 2.3, 5.7, 5.7, rest
    x = {"S2L2A": torch.zeros(2, 12, 64, 64)}
    out = generate_tokens(stub, x, ["tok_LULC"], Sampling("maskgit", 4, "cosine", temperature=0.0))["tok_LULC"]
    # by hand: heights 15, 14 go at step 1, 13..8 at step 2, 7..2 at step 3, 1, 0 at step 4
    step = [[3, 2, 4, 2, 1, 3, 3, 4, 1, 2, 3, 3, 2, 2, 3, 2],
            [2, 3, 1, 3, 4, 2, 2, 1, 4, 3, 2, 2, 3, 3, 2, 3]]
    assert out.flatten(1).tolist() == step
    assert len(stub.calls) == 4
    for k, (inputs, visible) in enumerate(stub.calls):   # step k sees the tokens decoded before it, as inputs
        before = torch.tensor(step) <= k
        assert torch.equal(visible["tok_LULC"].flatten(1), before)
        assert torch.equal(inputs["tok_LULC"].flatten(1)[before], torch.tensor(step)[before])


def test_roar_commits_the_linear_schedule_in_random_order(stub):
    x = {"S2L2A": torch.zeros(2, 12, 64, 64)}
    s = Sampling("roar", 4, temperature=0.0)
    out = generate_tokens(stub, x, ["tok_LULC"], s, torch.Generator().manual_seed(0))["tok_LULC"].flatten(1)
    assert linear_schedule(4, 16) == [4, 4, 4, 4]
    for k in range(1, 5):                               # 4 positions per step, whatever their confidence
        assert ((out == k).sum(1) == 4).all()
    stub.calls.clear()
    again = generate_tokens(stub, x, ["tok_LULC"], s, torch.Generator().manual_seed(1))["tok_LULC"].flatten(1)
    assert not torch.equal(out, again)                  # the order is random, not by confidence
    by_confidence = HEIGHT.argsort(1, descending=True)[:, :4]
    assert not (out.gather(1, by_confidence) == 1).all()


def test_classifier_free_guidance_is_the_official_formula(stub, monkeypatch):
    """Official: logits = uncond + (cond - uncond) * scale; uncond drops the conditioning inputs."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 16, 20, generator=g), torch.randn(2, 16, 20, generator=g)
    seq_cond, seq_uncond = torch.randn(2, 1, 30, generator=g), torch.randn(2, 1, 30, generator=g)
    seen = []
    monkeypatch.setattr(generate, "sample", lambda logits, *a: seen.append(logits) or sample(logits, *a))
    # an encoding with the image input is conditional; without it (or the empty context) unconditional
    stub.encode = lambda inputs, visible=None: "cond" if "S2L2A" in inputs else "uncond"
    stub.logits = lambda enc, target, positions, grid: (cond if enc == "cond" else uncond).gather(
        1, positions[..., None].expand(-1, -1, 20))
    monkeypatch.setattr(generate, "next_token_logits",
                        lambda model, enc, target, prefix: seq_cond if enc == "cond" else seq_uncond)
    x = {"S2L2A": torch.zeros(2, 12, 64, 64)}
    for scale in (1.0, 3.0, 0.5):
        seen.clear()
        generate_tokens(stub, x, ["tok_LULC"], Sampling("maskgit", 1, temperature=0.0, cfg=scale))
        assert torch.allclose(seen[0], uncond + (cond - uncond) * scale, atol=1e-6)
    seen.clear()
    generate_tokens(stub, x, ["caption"], Sampling(temperature=0.0, cfg=3.0))
    assert torch.allclose(seen[0], seq_uncond + (seq_cond - seq_uncond) * 3.0, atol=1e-6)
