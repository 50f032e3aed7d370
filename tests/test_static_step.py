"""The static training step (terramind.py: fixed-shape embeddings, TerraMind.heads_static): the loss and
gradients of the dense path, whose loss matches the official implementation (test_terramind.py), and one
compiled graph under torch.compile(fullgraph=True): no graph break, no recompile over batches with other masks
and other entry mixes, the eager loss and gradients through pretrain.train_step."""
import math
from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import pretrain
from entries import ENTRY_INDEX
from terramind import PRESETS, TerraMind, TerraMindConfig
from test_terramind import rel, smoke_batch

HOST_SYNCS = {"item", "tolist", "nonzero", "unique", "__bool__", "aten._local_scalar_dense.default"}
CONFIG = TerraMindConfig(dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_hidden=64, grid=4,
                         inputs=PRESETS["smoke"].inputs, targets=PRESETS["smoke"].targets)


def batches(n, config=CONFIG):
    """n masked batches of 2 samples (40 + 40 slots): other masks each time, and every other batch with some
    entries taken out of the inputs and others out of the targets (slots set to padding)."""
    out = []
    for i in range(n):
        batch = smoke_batch(config, 2, seed=i, budgets=(40, 40))
        if i % 2:
            for side, names in (("input", config.inputs), ("target", config.targets)):
                gone = torch.tensor([ENTRY_INDEX[e] for e in names[i % len(names)::3]])
                mod = batch[f"{side}_mod"]
                batch[f"{side}_mod"] = mod.masked_fill(torch.isin(mod, gone), -1)
        out.append(batch)
    return out


def loss_and_gradients(net, model, batch):
    model.zero_grad(set_to_none=True)
    loss, sums = net(batch, sums=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sums.detach(), grads


def assert_same_gradients(grads, ref):
    for n, g in ref.items():
        if g.any():
            assert rel(grads[n], g) <= 1e-5, n
        else:   # an entry without slots: zero (static path) or no gradient (dense path)
            assert n not in grads or not grads[n].any(), n


def test_static_heads_give_the_dense_loss_sums_and_gradients():
    torch.manual_seed(0)
    model = TerraMind(CONFIG)
    for batch in batches(4):
        model.static_heads = False
        loss, sums, grads = loss_and_gradients(model, model, batch)
        _, per_entry = model(batch)
        model.static_heads = True
        loss2, sums2, grads2 = loss_and_gradients(model, model, batch)
        # the loss is the mean over the entries with targets of their mean cross-entropy (paper eq. 2)
        assert loss.item() == pytest.approx(sum(v.item() for v in per_entry.values()) / len(per_entry), rel=1e-6)
        counts = [int((batch["target_mod"] == ENTRY_INDEX[e]).sum()) for e in CONFIG.targets]
        assert sums[1].tolist() == sums2[1].tolist() == counts
        assert rel(loss2, loss) <= 1e-6 and rel(sums2[0], sums[0]) <= 1e-6
        assert_same_gradients(grads2, grads)


def test_whole_model_compiles_to_one_graph_without_recompiles():
    """aot_eager traces forward and backward as inductor would, without generating code (fast on 2 cores)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = TerraMind(CONFIG)
    backend = CompileCounterWithBackend("aot_eager")
    net = torch.compile(model, fullgraph=True, backend=backend)    # a graph break would raise
    for batch in batches(21):
        loss, sums = net(batch, sums=True)
        loss.backward()
        assert math.isfinite(loss.item())
    assert backend.frame_count == 1                                 # compiled once, 20 batches reuse it
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and not counters["recompiles"]
    ops = {str(node.target) for node in backend.graphs[0].graph.nodes if node.op.startswith("call_")}
    assert not ops & HOST_SYNCS, ops & HOST_SYNCS                  # a captured .item() would still wait on the GPU


class GradientSnapshot(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of the gradients (pretrain.train_step clears them after the step)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = {}

    def step(self, closure=None):
        self.grads = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}


def test_compiled_train_step_gives_the_eager_loss_and_gradients():
    """pretrain.py --compile: torch.compile(model, fullgraph=True) with inductor through pretrain.train_step.
    One entry of each kind, so that inductor has less to compile (every entry: the tests above)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = replace(CONFIG, inputs=("S2L2A", "tok_LULC", "caption", "coords"), targets=("tok_S2L2A", "coords"))
    model = TerraMind(config)
    names = {id(p): n for n, p in model.named_parameters()}
    compiled = torch.compile(model, fullgraph=True)
    for batch in batches(2, config):
        results = []
        for net in (model, compiled):
            opt = GradientSnapshot(model.parameters())
            stats, norm = pretrain.train_step(net, model, opt, iter([batch]), 1, 1, torch.device("cpu"), None, 0)
            results.append((stats, norm, {names[k]: g for k, g in opt.grads.items()}))
        (stats, norm, grads), (stats2, norm2, grads2) = results
        assert rel(stats2, stats) <= 1e-5 and rel(norm2, norm) <= 1e-5
        assert_same_gradients(grads2, grads)
