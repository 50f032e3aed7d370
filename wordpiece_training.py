"""
Training a WordPiece vocabulary from captions, step by step: count the pre-tokenized words, lay out
the alphabet, then learn merges by the WordPiece likelihood score (Schuster & Nakajima 2012).

It consumes a tokenizer that normalizes and splits like the official file (the added tokens
alone) and caption texts, and produces the alphabet and the merged pieces in id order;
`text_tokenizer.WordPieceTokenizer.train` puts them after the official added tokens and is the
entry point:

    python text_tokenizer.py train --corpus data/synth/caption --vocab-size 30000 --out data/tok.json

Our own: TerraMind v1 uses one fixed vocabulary (assets/official/); this learns one from another
corpus and keeps the official added-token ids. Plain Python on one CPU process; there is no GPU or
multi-GPU variant.
"""
from __future__ import annotations

import heapq
import string
from collections import Counter


def count_words(base, texts) -> Counter:
    """How often each pre-tokenized word occurs in texts; added tokens are not words.
    `base` is a text_tokenizer.WordPieceTokenizer (its segments, normalize, pre_tokenize)."""
    counts = Counter()
    for text in texts:
        for _, plain in base.segments(text):
            if plain is not None:
                counts.update(base.pre_tokenize(base.normalize(plain)))
    return counts


def alphabet(base, words: list[str]) -> list[str]:
    """Printable ASCII and every character of `words`, as word starts, then as `##`
    continuations, each sorted."""
    chars = set("".join(words)) | set(base.normalize(string.printable.strip()))
    return sorted(chars) + sorted("##" + c for c in chars)


class MergeCounts:
    """The merge loop's state: each word as its current symbols (word start, then `##` pieces),
    and the symbol and adjacent-pair counts weighted by word frequency."""

    def __init__(self, words: list[str], freq: list[int]):
        self.symbols = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
        self.freq = freq
        self.sym_count = Counter()
        self.pair_count = Counter()
        self.pair_words = {}   # pair -> indices of the words that hold it
        self.sym_pairs = {}    # symbol -> pairs it is part of
        for k in range(len(words)):
            self.account(k, +1)

    def account(self, k: int, sign: int):
        """Adds (+1) or removes (-1) word k's symbols and adjacent pairs."""
        symbols = self.symbols[k]
        for s in symbols:
            self.sym_count[s] += sign * self.freq[k]
        for p in zip(symbols, symbols[1:]):
            self.pair_count[p] += sign * self.freq[k]
            if sign > 0:
                self.pair_words.setdefault(p, set()).add(k)
                self.sym_pairs.setdefault(p[0], set()).add(p)
                self.sym_pairs.setdefault(p[1], set()).add(p)
            elif self.pair_count[p] == 0:
                for s in p:
                    self.sym_pairs[s].discard(p)
                del self.pair_count[p], self.pair_words[p]

    def entry(self, p: tuple[str, str]) -> tuple:
        """Heap key: best score first, then the more frequent pair, then alphabetical."""
        count = self.pair_count[p]
        score = count / (self.sym_count[p[0]] * self.sym_count[p[1]])
        return (-score, -count, p)

    def heap(self) -> list[tuple]:
        """A fresh heap of every pair's current entry."""
        heap = [self.entry(p) for p in self.pair_count]
        heapq.heapify(heap)
        return heap

    def merge(self, pair: tuple[str, str]) -> str:
        """Joins every adjacent (a, b) into one symbol in the words that hold it; returns it."""
        a, b = pair
        merged = a + b[2:]
        for k in list(self.pair_words[pair]):
            self.account(k, -1)
            new = []
            for s in self.symbols[k]:
                if new and new[-1] == a and s == b:
                    new[-1] = merged
                else:
                    new.append(s)
            self.symbols[k] = new
            self.account(k, +1)
        return merged

    def pairs_touching(self, symbols) -> set[tuple[str, str]]:
        touching = set()
        for s in symbols:
            touching.update(self.sym_pairs.get(s, ()))
        return touching


def learn_merges(words: list[str], freq: list[int], budget: int, known: set[str]) -> list[str]:
    """Up to `budget` new pieces, best merge first (MergeCounts.entry), until every word is one
    piece. Scores change as counts do, so the heap holds stale entries that are skipped."""
    state = MergeCounts(words, freq)
    heap = state.heap()
    pieces = []
    while len(pieces) < budget and heap:
        item = heapq.heappop(heap)
        pair = item[2]
        if pair not in state.pair_count or item != state.entry(pair):
            continue   # stale: the pair's current score was pushed when its counts changed
        merged = state.merge(pair)
        if merged not in known:
            pieces.append(merged)
            known.add(merged)
        # every pair touching a symbol whose count changed gets its new score pushed
        for p in state.pairs_touching((pair[0], pair[1], merged)):
            heapq.heappush(heap, state.entry(p))
        if len(heap) > 4 * len(state.pair_count) + 100_000:   # drop stale entries, bounding memory
            heap = state.heap()
    return pieces
