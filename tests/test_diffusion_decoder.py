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


# ---- the training objective (DDPM with x0 prediction) ------------------------------------------------------

U = 2.0 ** -24   # float32 unit roundoff


def test_add_noise_is_the_closed_form_at_every_step():
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps at all 1000 steps, to float32 rounding: 1 - ab, the square
    roots and the products round once each (relative error <= u) and the sum once, so |error| <= 4 u
    (|sqrt(ab) x0| + |sqrt(1 - ab) eps|)."""
    dec = DiffusionDecoder(1, 5, 32, (1,), 1, ())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1000, 1, 4, 4, generator=g), torch.randn(1000, 1, 4, 4, generator=g)
    ab = dec.alphas_cumprod.double().view(-1, 1, 1, 1)
    signal, noise = ab.sqrt() * x0.double(), (1 - ab).sqrt() * eps.double()
    x_t = dec.add_noise(x0, eps, torch.arange(1000))
    assert ((x_t.double() - (signal + noise)).abs() <= 4 * U * (signal.abs() + noise.abs())).all()


def test_training_noise_has_the_forward_process_statistics():
    """What loss() feeds the network: t uniform on 0..999 (chi-square over the 1000 steps), and x_t given x0
    with mean sqrt(ab_t) x0 and variance 1 - ab_t, i.e. (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t) standard
    normal: mean and variance within 6 standard errors, per step over 2000 draws and over all 4e5 values."""
    dec = DiffusionDecoder(1, 5, 32, (1,), 1, ())
    seen = []
    dec.forward = lambda x_t, t, cond: seen.append((x_t, t)) or x_t
    x0 = torch.full((25_000, 1, 4, 4), 0.7)
    torch.manual_seed(0)
    dec.loss(x0, torch.zeros(25_000, 5, 1, 1))
    x_t, t = seen[0]
    counts = torch.bincount(t, minlength=1000).double()
    chi2 = float(((counts - 25.0) ** 2 / 25.0).sum())
    assert len(counts) == 1000 and chi2 < 999 * (1 - 2 / 8991 + 4.75 * (2 / 8991) ** 0.5) ** 3   # p = 1e-6
    ab = dec.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    z = ((x_t.double() - ab.sqrt() * 0.7) / (1 - ab).sqrt()).flatten()
    assert abs(float(z.mean())) < 6 / len(z) ** 0.5 and abs(float(z.var()) - 1) < 6 * (2 / len(z)) ** 0.5
    # per step: the 16 values of a sample share t; steps 0, 500 and 998 over 2000 fresh draws each
    for step in (0, 500, 998):
        x_t = dec.add_noise(x0[:2000], torch.randn(2000, 1, 4, 4), torch.full((2000,), step)).double()
        a = float(dec.alphas_cumprod[step])
        n = x_t.numel()
        assert abs(float(x_t.mean()) - a ** 0.5 * 0.7) < 6 * ((1 - a) / n) ** 0.5, step
        assert abs(float(x_t.var()) - (1 - a)) < 6 * (1 - a) * (2 / n) ** 0.5, step


def test_x0_loss_has_its_known_value():
    """A network that predicts x0 + 0.5 has loss 0.25 exactly; one that returns x_t has, for x0 = c,
    E[loss] = mean over t of (1 - sqrt(ab_t))^2 c^2 + (1 - ab_t) (bias and noise of x_t as an x0 estimate)."""
    dec = DiffusionDecoder(1, 5, 32, (1,), 1, ())
    x0 = torch.randn(4, 1, 8, 8)
    dec.forward = lambda x_t, t, cond: x0 + 0.5
    assert dec.loss(x0, torch.zeros(4, 5, 1, 1)).item() == pytest.approx(0.25, abs=1e-6)
    B, P, c = 20_000, 16, 0.7
    dec.forward = lambda x_t, t, cond: x_t
    torch.manual_seed(1)
    loss = dec.loss(torch.full((B, 1, 4, 4), c), torch.zeros(B, 5, 1, 1)).item()
    ab = schedule_float64()
    bias2, var = (1 - ab.sqrt()) ** 2 * c ** 2, 1 - ab
    per_t = bias2 + var                                          # E[loss | t]
    # per sample: mean over P pixels of (bias + sqrt(var) eps)^2, variance (4 bias^2 var + 2 var^2) / P
    spread = per_t.var(unbiased=False) + ((4 * bias2 * var + 2 * var ** 2) / P).mean()
    assert abs(loss - float(per_t.mean())) < 6 * float(spread / B) ** 0.5


def test_a_tiny_decoder_learns_a_fixed_batch():
    """60 Adam steps on 8 images: the loss must fall below 0.8 x the batch variance, the loss of the best
    prediction that ignores the noisy image (the batch mean; the conditioning is the same for all 8). For
    unit-variance white noise the best per-pixel linear denoiser reaches mean_t(1 - ab_t) = 0.73 of it."""
    torch.manual_seed(0)
    dec = DiffusionDecoder(1, 5, 32, (1, 2), 1, ())
    x0, cond = torch.randn(8, 1, 16, 16), torch.zeros(8, 5, 1, 1)
    floor = float(x0.var(0, unbiased=False).mean())

    def held_out_loss():   # the same 32 draws of t and noise each time
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return sum(float(dec.loss(x0, cond)) for _ in range(32)) / 32
    start = held_out_loss()
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    for _ in range(60):
        loss = dec.loss(x0, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start == pytest.approx(float((x0 ** 2).mean()), rel=0.1)   # zero prediction at init
    assert held_out_loss() < 0.8 * floor, (start, held_out_loss(), floor)
