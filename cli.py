"""
What every command shares at its edge: argparse types that refuse a meaningless number before any work is
spent, and `run_main`, which turns a refused input into one line on stderr instead of a traceback.

It imports nothing from the project (the lowest module of the import graph), so every script can use it:

    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--warmup", type=fraction, help="warmup share of the steps")
    ...
    if __name__ == "__main__":
        run_main(main)

A stage refuses bad input by raising ValueError, OSError or KeyError with a message that names the file or
flag, what is wrong and what to do; `run_main` prints `error: <message>` and exits with status 1.
`TERRAMIND_TRACEBACK=1` shows the full traceback instead (for debugging the code itself).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch


class TrainingDiverged(RuntimeError):
    """A loss or gradient became non-finite: training stopped at that step (the message says which)."""


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, intervals, counts)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (1 or more)")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (seeds, worker processes)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, token budgets)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, temperature, clip bounds; 0 often means off)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1] (warmup share, top-p, minimum class share)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must lie in [0, 1]")
    return value


def decay(text: str) -> float:
    """An EMA decay in [0, 1): 0 is off, 1 would never move."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must lie in [0, 1) (0: off)")
    return value


def torch_device(text: str) -> str:
    """A torch device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                                         f"use --device cpu or another index")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU for torch {torch.__version__}; "
                                         f"use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    return text


def layer_list(text: str) -> str:
    """Comma-separated block indices, e.g. 3,5,7,11 (checked against the encoder's depth once it is loaded)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected block indices separated by commas, e.g. 3,5,7,11")
    return text


def multiple_of(step: int):
    """The argparse type of a positive integer that is a multiple of `step` (tile sides: whole patches)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {step} (whole {step} px patches)")
        return value
    return parse


def writable_folder(path, flag: str = "--out") -> Path:
    """Creates the output folder if needed and proves it writable now, before any work is spent."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror}); choose another folder") from None
    return folder


def output_file(path, flag: str = "--out", overwrite: bool = False) -> Path:
    """An output file a command is about to write: its folder is created and proven writable now, and a file
    already there is refused unless `overwrite` (the command's --overwrite flag) says to replace it."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    if target.exists() and not overwrite:
        raise ValueError(f"{flag} {path}: the file exists; pass --overwrite to replace it, or choose another name")
    writable_folder(target.parent if str(target.parent) else ".", flag)
    return target


def distinct_outputs(paths: dict) -> None:
    """Refuses two outputs of one command that resolve to the same file (`paths`: description -> path)."""
    seen = {}
    for what, path in paths.items():
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{path}: both the {seen[key]} and the {what} would be written there; "
                             f"give them different names")
        seen[key] = what


def one_line(error: BaseException) -> str:
    """The message of a refused input, one line. A DataLoader worker's error carries the worker's traceback
    in its text: its last line is the original message."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1] if "Original Traceback" in str(text) else " ".join(line.strip() for line in lines)
    name = f"{type(error).__name__}: "
    return last[len(name):] if last.startswith(name) else last


def run_main(main, *args):
    """Calls main(*args); a ValueError, OSError, KeyError or TrainingDiverged ends the process with one line
    on stderr and exit status 1 (TERRAMIND_TRACEBACK=1: the traceback)."""
    try:
        return main(*args)
    except (ValueError, OSError, KeyError, TrainingDiverged) as e:
        if os.environ.get("TERRAMIND_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
