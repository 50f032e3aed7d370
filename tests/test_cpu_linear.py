"""cpu_linear.py: the oneDNN route gives F.linear's values and gradients (float64 as the outside reference),
and hands back to F.linear wherever it does not apply."""
import json

import pytest
import torch
import torch.nn.functional as F

import cpu_linear
from cpu_linear import Linear, linear, uses_onednn
from terramind import TerraMind, TerraMindConfig
from test_terramind import rel, smoke_batch

needs_onednn = pytest.mark.skipif(cpu_linear._INNER_PRODUCT is None, reason="PyTorch built without oneDNN")


@pytest.fixture
def route(monkeypatch):
    """The oneDNN route taken whatever this machine's micro-benchmark says (its numerics are tested here)."""
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", 2 * cpu_linear.MIN_SPEEDUP)


@needs_onednn
@pytest.mark.parametrize("shape", [((3, 5, 24), 40), ((37, 40), 24), ((2, 9, 16), 16)])   # O > I, O < I, O = I
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_float64(shape, bias, route):
    (x_shape, out), g = shape, torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, requires_grad=True)
    w = torch.randn(out, x_shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(*x_shape[:-1], out, generator=g)
    assert uses_onednn(x, w)
    y = linear(x, w, b)
    y.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None)
    ref.backward(grad.double())
    assert y.dtype == torch.float32 and rel(y.detach(), ref.detach()) < 1e-6
    for t, r in zip(leaves, ref_leaves):
        assert t.grad.shape == t.shape and rel(t.grad, r.grad) < 1e-6


@needs_onednn
def test_input_without_gradient_and_no_grad_mode(route):
    layer, x = Linear(12, 20), torch.randn(4, 12)
    layer(x).sum().backward()                                   # pixels: no gradient wanted for the input
    assert layer.weight.grad is not None and layer.bias.grad is not None
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_defers_to_f_linear_where_the_route_does_not_apply(monkeypatch, route):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert not uses_onednn(x.double(), w.double())
    assert not uses_onednn(x[:0], w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, w)
        assert linear(x, w).dtype == torch.bfloat16             # autocast still applies, through F.linear
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")            # as importing terratorch leaves it
        assert not uses_onednn(x, w)
    finally:
        torch.set_float32_matmul_precision(previous)
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    assert not uses_onednn(x, w)


@needs_onednn
def test_terramind_step_is_the_same_with_and_without_the_route(monkeypatch, route):
    torch.manual_seed(0)
    config = TerraMindConfig.preset("smoke")
    model, batch = TerraMind(config), smoke_batch(config, 2)
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(cpu_linear, "ENABLED", enabled)
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ref, grads_ref) = results
    assert rel(loss, loss_ref) < 1e-6 and grads.keys() == grads_ref.keys()
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-4, n


@needs_onednn
def test_route_follows_the_micro_benchmark_measured_once_per_machine(monkeypatch, tmp_path):
    """The route is taken only where oneDNN measured faster on this machine. The measurement runs once per
    machine: a later process reads the cached verdict, so every process of a run takes the same route."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cpu_linear.ROUTE_ENV, raising=False)
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", None)
    old_key = cpu_linear._machine_key().rsplit(" | ", 1)[0]     # a verdict of the one-product benchmark
    cpu_linear.cache_file().parent.mkdir(parents=True)
    cpu_linear.cache_file().write_text(json.dumps({old_key: 9.0}))
    measured = []
    measure = cpu_linear._measure
    monkeypatch.setattr(cpu_linear, "_measure", lambda: measured.append(1) or measure())
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    first = uses_onednn(x, w)
    ratio = cpu_linear.speedup()
    assert len(measured) == 1 and 0.1 < ratio < 20 and ratio != 9.0   # the old verdict is not reused
    assert uses_onednn(x, w) == first == (ratio > cpu_linear.MIN_SPEEDUP) and len(measured) == 1
    cached = json.loads(cpu_linear.cache_file().read_text())
    assert cached == {old_key: 9.0, cpu_linear._machine_key(): ratio}
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", None)           # a new process on the same machine
    assert cpu_linear.speedup() == ratio and len(measured) == 1  # reads the verdict, times nothing
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", 0.9)            # a machine where oneDNN is slower (issue 20's Xeon)
    assert not uses_onednn(x, w)
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", 1.5)
    assert uses_onednn(x, w)


@needs_onednn
def test_micro_benchmark_times_forward_and_backward_of_every_shape_in_both_orders(monkeypatch):
    """Each pair of rounds times every layer of SHAPES through both routes, each route once first, and the
    verdict is the median pair ratio of F.linear's seconds over oneDNN's."""
    calls = []

    def fake_forward_backward(product, x, w, grad):
        calls.append((product, x.shape[1], w.shape[0]))
        return {F.linear: 3.0, cpu_linear._onednn_product: 2.0}[product]

    monkeypatch.setattr(cpu_linear, "_forward_backward", fake_forward_backward)
    assert cpu_linear._measure() == 1.5
    n = len(cpu_linear.SHAPES)
    rounds = [calls[k:k + 2 * n] for k in range(0, len(calls), 2 * n)]
    assert len(rounds) == cpu_linear.WARM_UP + 2 * cpu_linear.PAIRS
    timed = rounds[cpu_linear.WARM_UP:]
    firsts = [r[0][0] for r in timed]
    assert firsts[0::2] == [F.linear] * cpu_linear.PAIRS
    assert firsts[1::2] == [cpu_linear._onednn_product] * cpu_linear.PAIRS
    shapes = [(i, o) for _, i, o in sorted(timed[0][:n], key=lambda c: c[1:])]
    assert sorted((i, o) for _, i, o in cpu_linear.SHAPES) == shapes



@needs_onednn
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_micro_benchmark_runs_where_the_first_use_has_no_autograd(monkeypatch, mode):
    """The first linear of a process may come inside model.encode under no_grad or inference_mode;
    the verdict still times forward and backward."""
    monkeypatch.setattr(cpu_linear, "SHAPES", ((64, 16, 32),))
    with mode():
        assert 0.01 < cpu_linear._measure() < 100

@needs_onednn
def test_environment_fixes_the_route(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", 0.5)            # measured slower, but the user asks for it
    monkeypatch.setenv(cpu_linear.ROUTE_ENV, "onednn")
    assert uses_onednn(x, w)
    monkeypatch.setattr(cpu_linear, "_SPEEDUP", 5.0)
    monkeypatch.setenv(cpu_linear.ROUTE_ENV, "torch")
    assert not uses_onednn(x, w)
    monkeypatch.setenv(cpu_linear.ROUTE_ENV, "mkl")
    with pytest.raises(ValueError, match="TERRAMIND_CPU_LINEAR='mkl'"):
        uses_onednn(x, w)
