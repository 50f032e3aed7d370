"""diffusion_decoder.py against analytic facts and the official DiVAE (fixtures from
tests/fixtures/make_tokenizer_fixtures.py: terratorch's classes with small widths and random weights)."""
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from diffusion_decoder import DiffusionDecoder, make_schedule, timestep_embedding, trailing_timesteps

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizer"


def official_state(tensors: dict) -> dict:
    """Official weights stored as int8 k, exponent e, offset o: w = k * 2^e + o (exact in fp32)."""
    sd = {k[2:]: v for k, v in tensors.items() if k.startswith("f.")}
    for k, v in tensors.items():
        if k.startswith("w."):
            sd[k[2:]] = v.float() * 2.0 ** int(tensors[f"e.{k[2:]}"]) + tensors[f"o.{k[2:]}"]
    return sd


def load_fixture(name: str) -> tuple[dict, dict]:
    path = FIXTURES / f"{name}.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return safetensors.torch.load_file(str(path)), config


def fixture_decoder(name: str) -> tuple[DiffusionDecoder, dict]:
    tensors, cfg = load_fixture(name)
    sd = {k[len("decoder."):]: v for k, v in official_state(tensors).items() if k.startswith("decoder.")}
    channels = tensors["x"].shape[1]
    dec = DiffusionDecoder(channels, 5, cfg["unet_channels"], tuple(cfg["unet_mult"]), cfg["unet_blocks"],
                           tuple(cfg["unet_attn"]))
    dec.load_state_dict(sd, strict=True)
    return dec.eval(), tensors


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_schedule_facts():
    ab = make_schedule()
    assert ab.shape == (1000,) and ab[-1] == 0.0                      # zero terminal SNR: pure noise at t=999
    assert abs(float(ab[0]) - 0.9999) < 1e-6 and abs(float(ab[499]) - 0.0760) < 5e-5   # official DiVAE schedule
    assert torch.all(ab[1:] < ab[:-1])


def schedule_float64() -> torch.Tensor:
    """The zero-terminal-SNR schedule (Lin et al. 2023, Algorithm 1) in float64: the closed form that float32
    implementations approximate."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    sqrt_ab = (sqrt_ab - sqrt_ab[-1]) * (sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1]))
    ab = sqrt_ab ** 2
    return torch.cumprod(torch.cat([ab[:1], ab[1:] / ab[:-1]]), 0)


def float32_schedule_bound() -> torch.Tensor:
    """Worst-case error (T,) of a float32 schedule: each of its two cumulative products of t + 1 factors adds
    at most one rounding (unit roundoff u = 2^-24) per factor and one in forming the factor, so the relative
    error of ab_t grows at most linearly, 2 (t + 1) u per product: 4 (t + 1) u ab_t in all, whatever order a
    torch build multiplies in."""
    t = torch.arange(1000, dtype=torch.float64)
    return 4 * (t + 1) * 2.0 ** -24 * schedule_float64()


def test_schedule_and_timesteps_equal_official():
    tensors, _ = load_fixture("s2l2a")
    exact, bound = schedule_float64(), float32_schedule_bound()
    # ours and the official float32 schedules, each within float32 error of the same closed form
    for ab in (make_schedule(), tensors["alphas_cumprod"]):
        assert ab.dtype == torch.float32 and ab[-1] == 0
        assert ((ab.double() - exact).abs() <= bound).all()
    assert trailing_timesteps(10) == tensors["timesteps10"].tolist() == list(range(999, 0, -100))
    assert trailing_timesteps(50) == tensors["timesteps50"].tolist()
    assert trailing_timesteps(50)[-1] == 19                            # official: [999, 979, ..., 19]


def test_trailing_timesteps_any_count():
    for n in (1, 3, 7, 999, 1000):
        ts = trailing_timesteps(n)
        assert len(ts) == n and ts[0] == 999 and ts == sorted(set(ts), reverse=True) and ts[-1] >= 0
    with pytest.raises(ValueError):
        trailing_timesteps(0)


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]), atol=1e-6)


@pytest.mark.parametrize("name", ["s2l2a", "dem"])
def test_one_denoising_step_matches_official(name):
    dec, t = fixture_decoder(name)
    with torch.no_grad():
        x0 = dec(t["x_t"].float(), t["t"], t["quant"])
    assert rel(x0, t["unet_x0"]) <= 1e-5


@pytest.mark.parametrize("name", ["s2l2a", "dem"])
def test_ten_step_ddim_matches_official(name):
    dec, t = fixture_decoder(name)
    out = dec.sample(t["quant"], (64, 64), steps=10, generator=torch.Generator().manual_seed(1234))
    assert rel(out, t["decoded"]) <= 1e-4
    # the same start noise passed explicitly gives the same image
    noise = torch.randn(t["decoded"].shape, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(dec.sample(t["quant"], (64, 64), steps=10, noise=noise), out)


def test_clip_bounds_every_output():
    dec, t = fixture_decoder("dem")                   # random output layer: |x0| > 1 for a third of pixels
    noise = torch.randn(t["decoded"].shape, generator=torch.Generator().manual_seed(0))
    bounded = dec.sample(t["quant"], (64, 64), steps=4, noise=noise, clip=1.0)
    wide = dec.sample(t["quant"], (64, 64), steps=4, noise=noise, clip=3.0)
    free = dec.sample(t["quant"], (64, 64), steps=4, noise=noise, clip=None)
    assert bounded.abs().max() <= 1.0 + 1e-6 and bounded.abs().max() > 0.99
    assert wide.abs().max() <= 3.0 + 1e-6 and free.abs().max() > 1.0


def test_ddim_with_exact_x0_returns_x0():
    """If the network always predicted the true x0, deterministic DDIM lands exactly on it (eta 0)."""
    dec = DiffusionDecoder(1, 5, 32, (1,), 1, ())
    x0 = torch.rand(2, 1, 16, 16) * 1.6 - 0.8
    dec.forward = lambda x_t, t, cond: x0
    out = dec.sample(torch.zeros(2, 5, 1, 1), (16, 16), steps=7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_fresh_decoder_predicts_zero_and_loss_is_mean_square():
    """Zero-initialised output layers (ADM): the untrained x0 prediction is 0, so the loss is E[x0^2]."""
    dec = DiffusionDecoder(2, 5, 32, (1, 2), 1, (2,))
    x0 = torch.randn(3, 2, 32, 32)
    assert torch.equal(dec(torch.randn_like(x0), torch.tensor([5, 500, 999]), torch.rand(3, 5, 2, 2)),
                       torch.zeros_like(x0))
    assert torch.allclose(dec.loss(x0, torch.rand(3, 5, 2, 2)), (x0 ** 2).mean())
    assert torch.equal(dec.add_noise(x0, x0 * 0 + 7, torch.tensor([999] * 3)), x0 * 0 + 7)   # ab_999 = 0


def test_bad_image_size():
    dec = DiffusionDecoder(1, 5, 32, (1,), 1, ())
    with pytest.raises(ValueError, match="divisible"):
        dec(torch.zeros(1, 1, 18, 18), 3, torch.zeros(1, 5, 1, 1))
