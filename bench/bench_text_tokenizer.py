"""
Encode speed (captions per second) of text_tokenizer.WordPieceTokenizer next to the Hugging Face `tokenizers`
library on the same corpus and vocabulary, and a check that both give the same ids.

`tokenizers` is not a project dependency: the Hugging Face side runs in a separate Python that has it
(`--hf-python`, e.g. a scratch venv: python3 -m venv ~/hftok && ~/hftok/bin/pip install tokenizers), on
the same tokenizer file. Passing a file that text_tokenizer.py wrote (`train`) also checks that the Hugging
Face library loads our files and encodes like we do.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_text_tokenizer.py --corpus data/synth/caption \
        --hf-python ~/hftok/bin/python
    flock /tmp/cpu.lock .venv/bin/python bench/bench_text_tokenizer.py --corpus data/synth/caption \
        --tokenizer data/tok.json --hf-python ~/hftok/bin/python

CPU only; there is nothing to run on a GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "assets" / "official" / "terramind_v1_wordpiece_30k.json"


def best_rate(fn, n_items, repeats):
    """Items per second of the fastest of `repeats` runs of fn()."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def hf_worker(tokenizer_path, texts_path, repeats):
    """Runs inside the Python that has `tokenizers`: prints its timings and ids as JSON."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(tokenizer_path)
    texts = json.loads(Path(texts_path).read_text(encoding="utf-8"))
    result = {"version": tokenizers.__version__, "ids": [e.ids for e in tok.encode_batch(texts)],
              "single": best_rate(lambda: [tok.encode(t) for t in texts], len(texts), repeats),
              "batch": best_rate(lambda: tok.encode_batch(texts), len(texts), repeats)}
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description="text_tokenizer.py encode speed vs Hugging Face tokenizers")
    parser.add_argument("--corpus", nargs="+", default=[str(ROOT / "data" / "synth" / "caption")],
                        help="caption files (one per line) or folders of *.txt (default: the synthetic world's)")
    parser.add_argument("--tokenizer", default=str(OFFICIAL),
                        help="tokenizer JSON (default: the official v1 file)")
    parser.add_argument("--hf-python", help="a Python with `tokenizers` installed, for the reference side")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the fastest counts")
    parser.add_argument("--hf-worker", nargs=2, metavar=("TOKENIZER", "TEXTS_JSON"),
                        help="internal: run the Hugging Face side (used by this script through --hf-python)")
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(*args.hf_worker, args.repeats)

    sys.path.insert(0, str(ROOT))
    from text_tokenizer import WordPieceTokenizer, read_corpus
    texts = read_corpus(args.corpus)
    tok = WordPieceTokenizer.from_file(args.tokenizer)
    ids = [tok.encode(t) for t in texts]
    n_tokens = sum(map(len, ids))

    def cold():   # every word looked up afresh, as in the first epoch
        tok._cache.clear()
        [tok.encode(t) for t in texts]

    rates = {"ours, first pass (empty word cache)": best_rate(cold, len(texts), args.repeats),
             "ours, later passes (word cache full)": best_rate(lambda: [tok.encode(t) for t in texts],
                                                               len(texts), args.repeats)}
    print(f"corpus: {len(texts)} captions, {n_tokens} tokens ({n_tokens / len(texts):.1f} per caption), "
          f"tokenizer {args.tokenizer}, {os.cpu_count()} CPUs")
    if args.hf_python:
        with tempfile.TemporaryDirectory() as tmp:
            texts_path = Path(tmp) / "texts.json"
            texts_path.write_text(json.dumps(texts), encoding="utf-8")
            cmd = [args.hf_python, __file__, "--hf-worker", args.tokenizer, str(texts_path),
                   "--repeats", str(args.repeats)]
            hf = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        same = sum(a == b for a, b in zip(ids, hf["ids"]))
        print(f"ids identical to tokenizers {hf['version']}: {same}/{len(texts)} captions")
        rates[f"tokenizers {hf['version']} encode, one at a time"] = hf["single"]
        rates[f"tokenizers {hf['version']} encode_batch (Rust threads)"] = hf["batch"]
    for name, rate in rates.items():
        print(f"{name:48s} {rate:10.0f} captions/s")


if __name__ == "__main__":
    main()
