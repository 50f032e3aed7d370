"""The GPU route against the CPU-tested one (`python -m pytest -m gpu`, run by bench/gpu_checks.sh): a bf16
autocast step against fp32, fused CUDA AdamW against the foreach implementation, compiled blocks and the
whole model compiled (no host sync) against eager, and, with two GPUs, torchrun with NCCL against one process with gradient accumulation. Every test skips where
there is no CUDA device, naming what it needs."""
import copy
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
import pretrain_log
from entries import entry_kind
from masking import Masking
from modalities import MODALITIES
from terramind import TerraMind, TerraMindConfig

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bash bench/gpu_checks.sh)")]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 references without TF32 (the default; some imports lower it)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def smoke_batches(config, n_batches, size=8):
    """Masked smoke batches of random pixels and tokens (the CPU tests' recipe, tests/test_pretrain.py)."""
    masking, g = Masking(config.inputs, config.targets, 64, 64, "all2all", 4), torch.Generator().manual_seed(0)
    batches = []
    for k in range(n_batches):
        samples = []
        for b in range(size):
            s = {e: torch.randn(MODALITIES[e].channels, 64, 64, generator=g) for e in config.inputs
                 if entry_kind(e) == "pixels"}
            s.update({e: torch.randint(0, config.vocab_size(e), (4, 4), generator=g) for e in config.targets
                      if entry_kind(e) == "tokens"})
            samples.append(masking(s, np.random.default_rng([k, b])))
        batches.append(torch.utils.data.default_collate(samples))
    return batches


def one_step(model, batches, dtype):
    """pretrain.train_step with a zero learning rate -> (loss, gradient norm)."""
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=0.0, fused=True)
    stats, norm = pretrain.train_step(model, model, opt, iter(batches), len(batches), 1, torch.device("cuda"),
                                      dtype, 0.0)
    return stats[0].item() / len(batches), norm.item()


def test_bf16_autocast_step_is_the_fp32_step_within_bf16_rounding():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); its products accumulate in fp32 and the
    losses run in fp32. Bound: loss within 1% and gradient norm within 5% of the fp32 step on the same batches."""
    torch.manual_seed(0)
    config = replace(TerraMindConfig.preset("smoke"), grid=4)
    model = TerraMind(config).cuda()
    batches = smoke_batches(config, 2)
    loss32, norm32 = one_step(copy.deepcopy(model), batches, None)
    loss16, norm16 = one_step(copy.deepcopy(model), batches, torch.bfloat16)
    assert abs(loss16 - loss32) <= 0.01 * loss32, (loss16, loss32)
    assert abs(norm16 - norm32) <= 0.05 * norm32, (norm16, norm32)


def test_fused_adamw_equals_foreach():
    """The CUDA fused kernel and the foreach implementation compute the same update (4M's betas, decay)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(256, 64), (64,), (3, 5, 7)]
    start = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    opts = {k: torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in start], lr=1e-3, betas=(0.9, 0.95),
                                 weight_decay=0.05, **{k: True}) for k in ("fused", "foreach")}
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
        for opt in opts.values():
            for p, grad in zip(opt.param_groups[0]["params"], grads):
                p.grad = grad.clone()
            opt.step()
    fused, foreach = (opts[k].param_groups[0]["params"] for k in ("fused", "foreach"))
    for a, b, p0 in zip(fused, foreach, start):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) and (a - p0).abs().max() > 1e-3   # moved, equally


def test_compiled_blocks_equal_eager_on_cuda():
    torch.manual_seed(0)
    config = replace(TerraMindConfig.preset("smoke"), grid=4)
    model = TerraMind(config).cuda()
    batches = smoke_batches(config, 1)
    eager = one_step(copy.deepcopy(model), batches, None)
    compiled = copy.deepcopy(model).compile_blocks()
    fast = one_step(compiled, batches, None)
    assert abs(fast[0] - eager[0]) <= 1e-5 * eager[0] and abs(fast[1] - eager[1]) <= 1e-4 * eager[1]


def test_whole_model_compiled_equals_eager_and_never_syncs_on_cuda():
    """pretrain.py --compile on CUDA: the eager loss and gradient norm, and after the first (compiling) call the
    compiled forward and backward run with CUDA's sync debug mode at "error" (any host sync would raise)."""
    torch.manual_seed(0)
    config = replace(TerraMindConfig.preset("smoke"), grid=4)
    model = TerraMind(config).cuda()
    batches = smoke_batches(config, 3)
    eager = one_step(copy.deepcopy(model), batches[:1], None)
    net = torch.compile(copy.deepcopy(model), fullgraph=True)
    fast = one_step(net, batches[:1], None)
    assert abs(fast[0] - eager[0]) <= 1e-5 * eager[0] and abs(fast[1] - eager[1]) <= 1e-4 * eager[1]
    for batch in batches[1:]:
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, sums = net(batch, sums=True)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item() and sums[1].sum().item() == (batch["target_mod"] >= 0).sum().item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_two_processes_equal_one_process_with_accumulation(token_shards, text_tokenizer, synth_world,
                                                                tmp_path):
    """torchrun on 2 GPUs (NCCL, 1 micro-batch of 4 each) against 1 GPU with 2 accumulation steps, fp32."""
    flags = ["pretrain.py", "--data", synth_world, "--tokens", token_shards, "--text-tokenizer", text_tokenizer,
             "--steps", 3, "--size", "smoke", "--batch-size", 4, "--total-batch-size", 8, "--lr", 2e-3,
             "--workers", 0, "--eval-every", 1000, "--eval-samples", 8, "--log-every", 1, "--device", "cuda",
             "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2"]}
    for name, head in runs.items():
        p = subprocess.run([*head, *map(str, flags), "--out", str(tmp_path / name)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = ({r["step"]: r["loss"] for r in pretrain_log.read_log(tmp_path / n / "log.jsonl") if "loss" in r}
                for n in runs)
    assert sorted(two) == [1, 2, 3] and all(abs(two[s] - one[s]) <= 1e-5 * abs(one[s]) for s in two), (one, two)
