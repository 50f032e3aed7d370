"""
What pretraining (pretrain.py) tells a person: log.jsonl (one JSON line per step
and per validation), the check that every step's loss and gradient norm are
finite, the error that names a diverged step and its samples, the Table 9 layout
of the validation losses, and the loss curves.

Produces in the run folder:
  log.jsonl   {"step", "loss", "losses", "lr", "grad_norm"} per step;
              {"step", "val", "val_loss"} per validation
  loss.png    train and validation loss next to the mean log(V)
  val.png     each modality's validation loss / log(V) (1 = a random model)

    steps = StepLog(out / "log.jsonl", targets, deferred=True, ...)
    steps.add(step, stats, norm, lr)   # no host sync when deferred
    steps.flush()                      # at log, validation and save steps
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from cli import TrainingDiverged
from pictures import plot_curves
from pretrain_data import PretrainData, short
from pretrain_state import STATE
from terramind import TerraMindConfig
from token_shards import read_header

# test hook: "1" checks finiteness as on CUDA (deferred to log, validation and save steps)
DEFERRED = "PRETRAIN_DEFERRED_CHECK"


def read_log(path: Path, upto: int | None = None) -> list:
    """The rows of log.jsonl, up to step `upto` (all rows when None)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    return [r for r in rows if upto is None or r["step"] <= upto]


def append_rows(path: Path, rows: list):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def defer_checks(device: torch.device) -> bool:
    """Whether StepLog defers its finiteness check: on CUDA (a per-step check is a
    host sync), or where the test hook asks for it."""
    return device.type == "cuda" or os.environ.get(DEFERRED) == "1"


class StepLog:
    """The per-step rows of log.jsonl and the check that each step's loss and
    gradient norm are finite. Eager (CPU): each step is checked as it ends.
    Deferred (CUDA): the step's statistics stay on the device until `flush()`, one
    transfer for all steps since the last one, so a step costs no host sync. Either
    way the first non-finite step is the one named, with the samples it read, and
    no row from it or after it is written; the caller flushes before it validates
    or saves, so nothing computed after that step is kept."""

    def __init__(self, path: Path, targets, deferred: bool, scale: int, diverged,
                 write: bool):
        self.path = path
        self.targets = list(targets)
        self.deferred = deferred
        self.scale = scale          # micro-batches x processes summed in stats[0]
        self.diverged = diverged    # (step, loss, norm) -> TrainingDiverged
        self.write = write          # rank 0 writes, every rank checks
        self.pending = []           # (step, lr, stats, norm) not yet checked

    def add(self, step: int, lr: float, stats: torch.Tensor, norm: torch.Tensor):
        """Step `step` (counted from 1) ended with train_step's stats and norm."""
        self.pending.append((step, lr, stats, norm))
        if not self.deferred:
            self.flush()

    def flush(self):
        """Checks and logs the pending steps; raises at the first non-finite one."""
        if not self.pending:
            return
        values = torch.stack([self.values(stats, norm) for _, _, stats, norm in self.pending])
        values = values.cpu()                                      # (S, 2 + 2T): one sync
        rows = []
        for (step, lr, _, _), v in zip(self.pending, values.tolist()):
            loss, norm = v[0], v[-1]
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.pending = []
                if self.write:
                    append_rows(self.path, rows)
                raise self.diverged(step, loss / self.scale, norm)
            rows.append(self.row(step, lr, v))
        self.pending = []
        if self.write:
            append_rows(self.path, rows)

    @staticmethod
    def values(stats: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """(1 + 2T,) stats and the () norm as one (2 + 2T,) float64 row."""
        return torch.cat([stats.double(), norm.detach().double().reshape(1)])

    def row(self, step: int, lr: float, v: list) -> dict:
        """The log.jsonl row of one step from its values (loss, T sums, T counts,
        norm)."""
        T = len(self.targets)
        sums, counts = v[1:1 + T], v[1 + T:1 + 2 * T]
        per = {}
        for e, total, n in zip(self.targets, sums, counts):
            if n > 0:
                per[e] = total / n
        return {"step": step, "loss": v[0] / self.scale, "losses": per, "lr": lr,
                "grad_norm": v[-1]}


def diverged(step: int, loss: float, norm: float, data: PretrainData, total: int,
             out: Path) -> TrainingDiverged:
    """The error of a step whose loss or gradient norm is non-finite: the step, the
    samples it read (stream positions, pretrain_data.py) and the last good
    checkpoint, which is left as it is."""
    positions = range((step - 1) * total, step * total)
    ids = [data.ds.ids[data.sample_index(k)] for k in positions]
    shown = ", ".join(ids[:16])
    if len(ids) > 16:
        shown += f" (+{len(ids) - 16} more)"
    last = "none yet"
    if (out / STATE).exists():
        last = f"{out / STATE} (step {read_header(out / STATE).get('step')})"
    return TrainingDiverged(
        f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: training stopped "
        f"before saving; the step's samples in {data.root}: {shown}; check them "
        f"with `python terramesh.py stats` or lower --lr; last good checkpoint: {last}")


def step_line(step: int, steps: int, acc: torch.Tensor, targets, window: int,
              scale: int, lr: float, dt: float, tokens: int, mfu: str) -> str:
    """The log line of the window of `window` steps that ends at `step`: mean loss,
    per-modality cross-entropy, learning rate, time per step, tokens/s."""
    T = len(targets)
    counts = acc[1 + T:]
    mods = []
    for j, e in enumerate(targets):
        if counts[j] > 0:
            mods.append(f"{short(e)} {(acc[1 + j] / counts[j]).item():.2f}")
    loss = acc[0].item() / (window * scale)
    return (f"step {step}/{steps} | loss {loss:.3f} | {' '.join(mods)} | "
            f"lr {lr:.1e} | {dt * 1e3:.0f} ms | {tokens / dt / 1e3:.1f}k tok/s{mfu}")


def val_table(val: dict, config: TerraMindConfig, label: str) -> str:
    """Paper Table 9 layout: one column per modality, the model's validation loss
    above the random bound log(V)."""
    cols = list(config.targets)
    width = max(len(label), 14)
    heads = [f"{short(e):>8s}" for e in cols]
    cells = [f"{val[e]:8.3f}" if e in val else f"{'-':>8s}" for e in cols]
    bounds = [f"{math.log(config.vocab_size(e)):8.3f}" for e in cols]
    head = f"{'':{width}s} " + " ".join(heads)
    row = f"{label:{width}s} " + " ".join(cells)
    bound = f"{'random (log V)':{width}s} " + " ".join(bounds)
    return "\n".join([head, row, bound])


def plot_log(out: Path, rows: list, config: TerraMindConfig):
    """loss.png: train and validation loss next to the mean log(V); val.png: each
    modality's validation loss divided by its log(V) (1 = a random model)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    logv = {e: math.log(config.vocab_size(e)) for e in config.targets}
    series = {}
    for name, points in (("train", train), ("val", val)):
        if points:
            series[name] = tuple(zip(*points))
    if series:
        plot_curves(out / "loss.png", series, title="pretraining loss (cross-entropy, nats)",
                    hlines={"mean log V": sum(logv.values()) / len(logv)})
    per = {}
    for e in config.targets:
        points = [(r["step"], r["val"][e] / logv[e]) for r in rows if e in r.get("val", {})]
        per[short(e)] = tuple(zip(*points))
    if any(len(xs) > 1 for xs, _ in per.values() if xs):
        curves = {k: v for k, v in per.items() if v}
        plot_curves(out / "val.png", curves, title="validation loss / log V",
                    hlines={"random": 1.0})
