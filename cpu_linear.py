"""
Linear layers whose fp32 matrix products on CPU run on oneDNN rather than MKL.

Why: at PyTorch's default float32 matmul precision ("highest"), an fp32 matrix product
on CPU goes to MKL's sgemm. On AMD CPUs MKL runs its AVX2 kernels even where the CPU has
AVX-512 (seen here on an AMD EPYC), while oneDNN (built into the same PyTorch) picks its
kernels from the instruction set alone. On this project's 2-core AMD EPYC machines,
oneDNN's fp32 inner product runs the TerraMind `tiny` layer shapes at 370-490 GFLOP/s
(forward) and 360-465 (forward + backward), and MKL at 185-230 (bench/bench_linear.py).
It is still fp32 arithmetic: the results differ from MKL's only by summation order, at
float32 rounding level (tests/test_cpu_linear.py).

  * `linear(x, w, b)` is `F.linear` with this routing. `Linear` is an `nn.Linear` that
    calls it, with the same parameters and state-dict keys, so official checkpoints load
    unchanged.
  * Everything else goes to `F.linear`, which leaves the choice to PyTorch. That covers
    GPU tensors, dtypes other than float32, autocast, torch.compile tracing, empty
    inputs and PyTorch builds without oneDNN. It also covers any float32 matmul
    precision other than "highest": "high" or "medium" (terratorch sets "medium" when it
    is imported) let PyTorch use oneDNN itself, with bf16 arithmetic allowed where the
    CPU has it.
  * `ENABLED = False` turns the routing off. The benchmark uses it to time the model
    with and without.

The route is taken only where it is faster on the machine at hand. `speedup()` times
forward and backward of the layers in SHAPES (the MLP and qkv layers of a `smoke` and a
`tiny` step), both routes taking turns in pairs of rounds (one round in each order, so
load from other processes hits both alike), and keeps the median of 7 pair ratios (about
1.5 s). oneDNN is used when it is more than `MIN_SPEEDUP` times faster. On this
project's 2-core AMD EPYC, on a quiet machine, eight measurements gave 1.00-1.08
(route off), and whole training steps ran at 0.98-1.10x with the route forced on (two
runs of bench/bench_linear.py --step, smoke and tiny); on an Intel Xeon with AVX-512 the route made the model
step slower (0.96x, issue 20), which this check leaves out.

The two routes round differently, so every process of a run must take the same one: DDP
ranks must agree, and a resumed run must repeat the arithmetic of the run it continues.
The verdict is therefore measured once per machine (CPU model, torch version, thread
count) and kept in the user cache, `~/.cache/terramind/cpu_linear.json`; the first
process measures under a file lock and the others read its verdict.
`TERRAMIND_CPU_LINEAR=onednn` or `=torch` fixes the route without measuring.
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# file locks: one process measures the route, the others wait and read its verdict
try:
    import fcntl
except ImportError:      # Windows: no lock, at worst two processes measure at once
    fcntl = None

ENABLED = True
MIN_SPEEDUP = 1.1        # oneDNN must beat F.linear by this factor in speedup()
# The layers the verdict is timed on, (rows, in, out): the MLP and qkv layers of a `smoke` step
# (run_cpu.sh: 32 samples x 64 tokens) and of a `tiny` step (8 samples x 256 tokens).
SHAPES = ((2048, 64, 256), (2048, 256, 64), (2048, 64, 192),
          (2048, 192, 768), (2048, 768, 192), (2048, 192, 576))
WARM_UP = 3              # untimed rounds first
PAIRS = 7                # timed pairs of rounds, one in each order; verdict: median ratio
# Part of the cache key: a verdict measured another way (the one-product forward timing
# before) is ignored.
MEASUREMENT = "fwd+bwd of 6 layers, median of 7 pairs"
# oneDNN's fp32 inner product on dense tensors: a @ b.T + bias (the op torch.compile's CPU
# backend uses)
try:
    _INNER_PRODUCT = None
    if torch.backends.mkldnn.is_available():
        _INNER_PRODUCT = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):
    _INNER_PRODUCT = None
_SPEEDUP = None          # speedup()'s verdict, read or measured once per process
# "onednn" or "torch" fixes the route; unset: the machine's verdict
ROUTE_ENV = "TERRAMIND_CPU_LINEAR"


def _mm_t(a, b, bias=None):
    """a (..., K) @ b (O, K).T (+ bias) -> (..., O), through oneDNN."""
    return _INNER_PRODUCT(a, b, bias, "none", [], "")


def _forward_backward(product, x, w, grad):
    """Seconds for one forward and backward (input and weight gradients) of
    product(x, w)."""
    start = time.perf_counter()
    torch.autograd.grad(product(x, w), (x, w), grad)
    return time.perf_counter() - start


def _onednn_product(x, w):
    return _OneDNNLinear.apply(x, w, None)


def _layer_cases() -> list:
    """(x, w, grad) per shape of SHAPES, fp32, seeded."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for rows, n_in, n_out in SHAPES:
        x = torch.randn(rows, n_in, generator=g, requires_grad=True)
        w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        grad = torch.randn(rows, n_out, generator=g)
        cases.append((x, w.requires_grad_(), grad))
    return cases


def _round(cases, onednn_first: bool) -> dict:
    """Seconds of each route over every case, F.linear and oneDNN taking turns in the given
    order."""
    order = [_onednn_product, F.linear] if onednn_first else [F.linear, _onednn_product]
    seconds = {}
    for product in order:
        seconds[product] = sum(_forward_backward(product, *case) for case in cases)
    return seconds


def _pair_ratio(cases) -> float:
    """F.linear's seconds over oneDNN's in two rounds, one in each order (the second of two
    products runs measurably faster than the first here, so the order must not favour a
    route)."""
    first, second = _round(cases, onednn_first=False), _round(cases, onednn_first=True)
    torch_seconds = first[F.linear] + second[F.linear]
    onednn_seconds = first[_onednn_product] + second[_onednn_product]
    return torch_seconds / onednn_seconds


def _measure() -> float:
    """F.linear's time over oneDNN's on forward + backward of SHAPES: the median of PAIRS
    pair ratios after WARM_UP untimed rounds (a process's first products run several
    times slower)."""
    # the first use may come under no_grad or inference_mode (model.encode): time with autograd
    with torch.inference_mode(False), torch.enable_grad():
        cases = _layer_cases()
        for k in range(WARM_UP):
            _round(cases, onednn_first=k % 2 == 1)
        ratios = [_pair_ratio(cases) for _ in range(PAIRS)]
    return statistics.median(ratios)


def _machine_key() -> str:
    """What the verdict depends on: the CPU model, the torch build and the number of
    threads."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = []
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                names.append(line.split(":", 1)[1].strip())
        model = names[0] if names else model
    threads = torch.get_num_threads()
    return f"{model} | torch {torch.__version__} | {threads} threads | {MEASUREMENT}"


def cache_file() -> Path:
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return home / "terramind" / "cpu_linear.json"


def _machine_verdict() -> float:
    """The speedup measured on this machine, from the user cache or measured now and
    cached."""
    path, key = cache_file(), _machine_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            known = json.loads(path.read_text()) if path.exists() else {}
            if key not in known:
                known[key] = _measure()
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(known, indent=1))
                os.replace(tmp, path)
            return float(known[key])
    except (OSError, ValueError, TypeError):
        # no writable cache, or a damaged one: this process alone
        return _measure()


def speedup() -> float:
    """F.linear's time over oneDNN's on this machine (see the module docstring), once per
    process; 0 where the oneDNN op is missing."""
    global _SPEEDUP
    if _SPEEDUP is None:
        _SPEEDUP = 0.0 if _INNER_PRODUCT is None else _machine_verdict()
    return _SPEEDUP


def _fixed_route() -> str:
    route = os.environ.get(ROUTE_ENV, "")
    if route not in ("", "onednn", "torch"):
        raise ValueError(f"{ROUTE_ENV}={route!r}: expected onednn, torch, or unset "
                         f"(measured per machine)")
    return route


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear(x, w) takes the oneDNN path."""
    if torch.compiler.is_compiling() or not ENABLED or _INNER_PRODUCT is None:
        return False
    fp32_cpu = x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
    highest = torch.get_float32_matmul_precision() == "highest"
    applies = fp32_cpu and x.numel() > 0 and highest and not torch.is_autocast_enabled("cpu")
    if not applies:
        return False
    route = _fixed_route()
    if route:
        return route == "onednn"
    return speedup() > MIN_SPEEDUP


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):                            # x (..., I), w (O, I)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _mm_t(x, w, b)                             # (..., O)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):                                 # g (..., O)
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g, w.t())                          # (..., I) = g @ w
        g2 = g.reshape(-1, g.shape[-1])                   # (N, O)
        x2 = x.reshape(-1, x.shape[-1])                   # (N, I)
        if ctx.needs_input_grad[1]:
            # (O, I) = g2.T @ x2. oneDNN is faster (measured) when the longer of O, I
            # sits on its weight side.
            if w.shape[0] >= w.shape[1]:
                gw = _mm_t(x2.t(), g2.t()).t()
            else:
                gw = _mm_t(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)                                # (O,)
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """F.linear (x @ w.T + b). CPU fp32 products go through oneDNN (see the module
    docstring)."""
    if uses_onednn(x, w):
        return _OneDNNLinear.apply(x, w, b)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """nn.Linear through `linear`: same parameters, initialization and state-dict
    keys."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
