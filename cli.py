"""
What every command shares at its edge: argparse types that refuse a meaningless
number before any work is spent, and `run_main`, which turns a refused input into
one line on stderr instead of a traceback.

It imports nothing from the project (the lowest module of the import graph), so
every script can use it:

    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--warmup", type=fraction, help="warmup share of the steps")
    ...
    if __name__ == "__main__":
        run_main(main)

A stage refuses bad input by raising ValueError, OSError or KeyError with a
message that names the file or flag, what is wrong and what to do; `run_main`
prints `error: <message>` and exits with status 1. `TERRAMIND_TRACEBACK=1` shows
the full traceback instead (for debugging the code itself).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch


class TrainingDiverged(RuntimeError):
    """A loss or gradient became non-finite: training stopped at that step
    (the message says which)."""


def _number(text: str, kind):
    """`text` read as `kind` (int or float, finite), or the argparse error."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def bounded(kind, inside, must: str, doc: str):
    """The argparse type of a `kind` (int or float) number for which
    `inside(value)` holds; any other value is refused with "<value> must <must>"."""
    def parse(text: str):
        value = _number(text, kind)
        if not inside(value):
            raise argparse.ArgumentTypeError(f"{value} must {must}")
        return value
    parse.__doc__ = doc
    return parse


positive_int = bounded(
    int, lambda v: v >= 1, "be a positive integer (1 or more)",
    "An integer >= 1 (steps, batch sizes, intervals, counts).")
nonnegative_int = bounded(
    int, lambda v: v >= 0, "be 0 or more",
    "An integer >= 0 (seeds, worker processes).")
positive_float = bounded(
    float, lambda v: v > 0, "be greater than 0",
    "A finite number > 0 (learning rates, token budgets).")
nonnegative_float = bounded(
    float, lambda v: v >= 0, "be 0 or more",
    "A finite number >= 0 (weight decay, temperature, clip bounds; 0: off).")
fraction = bounded(
    float, lambda v: 0 <= v <= 1, "lie in [0, 1]",
    "A share in [0, 1] (warmup share, top-p, minimum class share).")
decay = bounded(
    float, lambda v: 0 <= v < 1, "lie in [0, 1) (0: off)",
    "An EMA decay in [0, 1): 0 is off, 1 would never move.")


def torch_device(text: str) -> str:
    """A torch device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:0, mps)") from None
    gpus = torch.cuda.device_count()
    if dev.type == "cuda" and dev.index is not None and dev.index >= gpus:
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has {gpus} CUDA GPU(s); "
            f"use --device cpu or another index")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has no CUDA GPU for torch {torch.__version__}; "
            f"use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(
            f"{text}: MPS is not available here; use --device cpu")
    return text


def layer_list(text: str) -> str:
    """Comma-separated block indices, e.g. 3,5,7,11 (checked against the
    encoder's depth once it is loaded)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected block indices separated by commas, e.g. 3,5,7,11")
    return text


def multiple_of(step: int):
    """The argparse type of a positive integer that is a multiple of `step`
    (tile sides: whole patches)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value % step:
            raise argparse.ArgumentTypeError(
                f"{value} is not a multiple of {step} (whole {step} px patches)")
        return value
    return parse


def writable_folder(path, flag: str = "--out") -> Path:
    """Creates the output folder if needed and proves it writable now, before
    any work is spent."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror}); "
                         f"choose another folder") from None
    return folder


def output_file(path, flag: str = "--out", overwrite: bool = False) -> Path:
    """An output file a command is about to write: its folder is created and
    proven writable now, and a file already there is refused unless `overwrite`
    (the command's --overwrite flag) says to replace it."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if target.exists() and not overwrite:
        raise ValueError(f"{flag} {path}: the file exists; pass --overwrite to "
                         f"replace it, or choose another name")
    writable_folder(target.parent if str(target.parent) else ".", flag)
    return target


def distinct_outputs(paths: dict) -> None:
    """Refuses two outputs of one command that resolve to the same file
    (`paths`: description -> path)."""
    seen = {}
    for what, path in paths.items():
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{path}: both the {seen[key]} and the {what} would "
                             f"be written there; give them different names")
        seen[key] = what


def one_line(error: BaseException) -> str:
    """The message of a refused input, one line. A DataLoader worker's error
    carries the worker's traceback in its text: its last line is the original
    message."""
    keyed = isinstance(error, KeyError) and error.args
    text = str(error.args[0] if keyed else error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    from_worker = "Original Traceback" in text
    joined = " ".join(line.strip() for line in lines)
    last = lines[-1] if from_worker else joined
    name = f"{type(error).__name__}: "
    return last[len(name):] if last.startswith(name) else last


def run_main(main, *args):
    """Calls main(*args); a ValueError, OSError, KeyError or TrainingDiverged
    ends the process with one line on stderr and exit status 1
    (TERRAMIND_TRACEBACK=1: the traceback)."""
    try:
        return main(*args)
    except (ValueError, OSError, KeyError, TrainingDiverged) as e:
        if os.environ.get("TERRAMIND_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
