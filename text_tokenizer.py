"""
The text stage: one WordPiece tokenizer for captions and geolocations, by hand, id-exact with
TerraMind v1.

TerraMind tokenizes both sequence modalities with one adapted BERT WordPiece vocabulary (30k
entries) whose first 6366 ids are "added tokens": [PAD] [UNK] [SOS] [EOS], the 4M sentinels
[S_0]..[S_199], 4M's detection tokens and one token per 0.25 degree of latitude and longitude
(paper §3.1; official: the v1 vocabulary JSON shipped in `assets/official/`, and terratorch
.../terramind/tokenizer/text_tokenizer.py).

This file reads and writes the Hugging Face `tokenizers` JSON format and reproduces its encoding
exactly: added tokens matched whole before normalization (leftmost-longest, `single_word` at word
boundaries), BERT normalization, BERT pre-tokenization, greedy longest-match-first WordPiece with
`##` continuations.

It consumes a tokenizer JSON (the official one, or one trained here from captions) and produces
token ids; `train` consumes caption files (one caption per non-empty line) and produces a
tokenizer JSON that keeps every special, sentinel and coordinate token at its official id.

    python text_tokenizer.py train --corpus data/synth/caption --vocab-size 30000 --out data/tok.json
    python text_tokenizer.py encode "A river."   # the official v1 vocabulary, in assets/official/

There is no GPU or multi-GPU variant: tokenization is plain Python on one CPU process (a
DataLoader's workers each hold a copy).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import string
import time
import unicodedata
import warnings
from pathlib import Path

import torch

from cli import output_file, positive_int, run_main
from geotiff import write_text
from modalities import format_coords, parse_coords
from wordpiece_training import alphabet, count_words, learn_merges

# ---------------------------------------------------------------------------------------------
# The official layout of the first 6366 ids (the v1 vocabulary in assets/official); a trained
# vocabulary keeps it.

PAD_ID, UNK_ID, SOS_ID, EOS_ID = 0, 1, 2, 3
OFFICIAL_DIR = Path(__file__).resolve().parent / "assets" / "official"
OFFICIAL_VOCAB = OFFICIAL_DIR / "terramind_v1_wordpiece_30k.json"
# [S_k] has id 4 + k; 4M numbers span sentinels from [S_1] (4M: fourm/data/masking.py)
SENTINEL_ID = 4
N_SENTINELS = 200
COORD_STEP = 0.25        # official: coordinates are snapped with round(x * 4) / 4


def sentinel_id(k: int) -> int:
    if not 0 <= k < N_SENTINELS:
        raise ValueError(f"sentinel index {k} outside 0..{N_SENTINELS - 1}")
    return SENTINEL_ID + k


def official_added_tokens() -> list[tuple[str, bool]]:
    """The 6366 added tokens of TerraMind v1 in id order, as (content, single_word)."""
    specials = ["[PAD]", "[UNK]", "[SOS]", "[EOS]"]
    sentinels = [f"[S_{k}]" for k in range(N_SENTINELS)]
    corners = ("xmin", "ymin", "xmax", "ymax")
    boxes = [f"{c}={i}" for c in corners for i in range(1000)]           # 4M detection
    lats = [f"lat={-90 + COORD_STEP * k:.2f}" for k in range(721)]       # -90.00 .. 90.00
    lons = [f"lon={-180 + COORD_STEP * k:.2f}" for k in range(1441)]     # -180.00 .. 180.00
    tokens = [(t, False) for t in specials]
    tokens += [(t, True) for t in sentinels + boxes + lats + lons]
    return tokens


# ---------------------------------------------------------------------------------------------
# Character classes, as the reference (Rust `tokenizers`) defines them

# Rust char::is_whitespace: these characters and the range U+2000..U+200A
_WHITESPACE_CHARS = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE = _WHITESPACE_CHARS + "\u2000-\u200a"          # as a regex character class
_WHITESPACE_SET = set(_WHITESPACE_CHARS) | {chr(c) for c in range(0x2000, 0x200b)}
# ASCII controls are dropped, except \t \n \r which become spaces
_ASCII_CLEAN = {c: None for c in [*range(32), 127]}
_ASCII_CLEAN.update({ord(c): " " for c in "\t\n\r"})
_PUNCT = re.escape(string.punctuation)                     # Rust is_ascii_punctuation
# BertPreTokenizer, ASCII part: runs of word characters, or one punctuation character
_SPLIT = re.compile(rf"[^{_WHITESPACE}{_PUNCT}]+|[{_PUNCT}]")
_CJK = (   # BertNormalizer's "Chinese" blocks
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_OTHER_ALPHABETIC = (   # letters of category So
    (0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))
# Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation
_WORD_CATEGORIES = ("Lu", "Ll", "Lt", "Lm", "Lo", "Nl", "Mn", "Mc", "Me", "Nd", "Pc")


def _is_control(c: str) -> bool:
    """BertNormalizer: Cc/Cf/Co/Cs are dropped, except \\t \\n \\r."""
    return unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") and c not in "\t\n\r"


def _is_punctuation(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c)[0] == "P"


def _is_word_char(c: str) -> bool:
    cp = ord(c)
    if unicodedata.category(c) in _WORD_CATEGORIES or cp in (0x200C, 0x200D):
        return True
    return any(a <= cp <= b for a, b in _OTHER_ALPHABETIC)


def _is_cjk(c: str) -> bool:
    return c >= "\u3400" and any(a <= ord(c) <= b for a, b in _CJK)


def _trie_regex(words) -> re.Pattern:
    """A regex matching the longest of `words` at the leftmost position (Aho-Corasick
    LeftmostLongest)."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}   # a word ends here

    def pattern(node):
        children = sorted(node.items())
        alts = [re.escape(c) + pattern(child) for c, child in children if c]
        if len(alts) == 1:
            body = alts[0]
        elif alts:
            body = "(?:" + "|".join(alts) + ")"
        else:
            body = ""
        if "" in node and body:
            return f"(?:{body})?"   # greedy: longer continuations first
        return body
    return re.compile(pattern(trie) or r"(?!x)x")


# the `tokenizers` WordPiece decoder's cleanup, applied token by token, in this order
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"),
            (" 're", "'re"))


def _cleanup(token: str) -> str:
    for dirty, clean in _CLEANUP:
        token = token.replace(dirty, clean)
    return token


# The official file's processing pipeline (official v1 vocabulary JSON), the only one implemented
_PIPELINE = {
    "truncation": None,
    "padding": None,
    "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                   "strip_accents": None, "lowercase": True},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": None,
    "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
    "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100}}
MAX_WORD_CHARS = _PIPELINE["model"]["max_input_chars_per_word"]


# ---------------------------------------------------------------------------------------------
# Reading a `tokenizers` JSON file

def _read_tokenizer_json(path) -> tuple[dict, list[dict], dict]:
    """(vocab token -> id, added-token entries, the rest of the pipeline) of a `tokenizers` JSON;
    a missing or broken file raises an error naming it."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab, added = cfg["model"]["vocab"], cfg["added_tokens"]
        pipeline = {k: v for k, v in cfg.items() if k not in ("added_tokens", "model")}
        pipeline["model"] = {k: v for k, v in cfg["model"].items() if k != "vocab"}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tokenizer file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a `tokenizers` JSON file ({type(e).__name__}: {e})") from None
    return vocab, added, pipeline


def _check_pipeline(path, pipeline: dict):
    for key, value in _PIPELINE.items():
        if pipeline.get(key) != value:
            raise ValueError(f"{path}: {key} is {pipeline.get(key)}; "
                             f"only the official {value} is implemented")


def _check_added(path, vocab: dict, added: list[dict]):
    """Every added token is of the one kind implemented, and has its vocabulary id."""
    for a in added:
        content = a.get("content")
        stripped = a.get("lstrip") or a.get("rstrip")
        if stripped or a.get("normalized") or not a.get("special"):
            raise ValueError(f"{path}: added token {content!r} must be special, not normalized, "
                             "without lstrip/rstrip (the only kind implemented)")
        if vocab.get(a["content"]) != a["id"]:
            raise ValueError(f"{path}: added token {a['content']!r} has id {a['id']}, "
                             f"the vocabulary says {vocab.get(a['content'])}")


# ---------------------------------------------------------------------------------------------
# The tokenizer

class WordPieceTokenizer:
    """BERT WordPiece with added tokens. `vocab[i]` is the token of id i; `added` lists (content,
    single_word) for the added tokens, which must also be in `vocab` (as in the official file)
    and are all special."""

    def __init__(self, vocab: list[str], added: list[tuple[str, bool]]):
        self.vocab = list(vocab)
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        if len(self.ids) != len(self.vocab):
            raise ValueError("vocabulary has duplicate tokens")
        needed = [t for t, _ in added] + ["[UNK]"]
        missing = [t for t in needed if t not in self.ids]
        if missing:
            raise ValueError(f"added tokens missing from the vocabulary: {missing[:5]}")
        self.added = [(t, bool(single)) for t, single in added]
        self.single_word = dict(self.added)
        self.special_ids = {self.ids[t] for t, _ in self.added}
        self.unk_id = self.ids["[UNK]"]
        self._added_re = _trie_regex(t for t, _ in self.added)
        pieces = [t[2:] if t.startswith("##") else t for t in self.vocab]
        self._max_piece = max(len(p) for p in pieces)
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < len(self.vocab):
            last = len(self.vocab) - 1
            raise ValueError(f"token id {int(i)} outside the vocabulary (0..{last})")
        return self.vocab[int(i)]

    # --- the `tokenizers` JSON format ---------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "WordPieceTokenizer":
        """Reads a `tokenizers` JSON with the official pipeline (the only one implemented);
        anything else, a broken file or an inconsistent vocabulary raises an error naming the
        file."""
        vocab, added, pipeline = _read_tokenizer_json(path)
        _check_pipeline(path, pipeline)
        tokens = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{path}: vocabulary ids must be exactly 0..{len(tokens) - 1}")
        _check_added(path, vocab, added)
        return cls(tokens, [(a["content"], a["single_word"]) for a in added])

    def to_json(self) -> dict:
        added = []
        for t, single in self.added:
            added.append(dict(id=self.ids[t], content=t, single_word=single, lstrip=False,
                              rstrip=False, normalized=False, special=True))
        pipeline = json.loads(json.dumps(_PIPELINE))   # a deep copy: callers may edit it
        cfg = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
               **pipeline}
        cfg["model"]["vocab"] = dict(self.ids)
        return cfg

    def save(self, path):
        """Writes the `tokenizers` JSON (atomic); the Hugging Face library loads it too."""
        write_text(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    # --- encoding -----------------------------------------------------------------------------
    @staticmethod
    def normalize(text: str) -> str:
        """BertNormalizer: drop controls, whitespace -> ' ', space out CJK, strip accents (NFD,
        drop Mn), lowercase."""
        if text.isascii():
            return text.translate(_ASCII_CLEAN).lower()
        chars = []
        for c in text:
            if " " <= c < "\x7f":   # printable ASCII passes through
                chars.append(c)
            elif c in "\0\ufffd" or _is_control(c):
                continue
            elif c in _WHITESPACE_SET:
                chars.append(" ")
            elif _is_cjk(c):
                chars.append(f" {c} ")
            else:
                chars.append(c)
        # official strip_accents: null = follow lowercase
        text = unicodedata.normalize("NFD", "".join(chars))
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        if "\u03a3" not in text:
            return text.lower()
        # lowercase per character, as Rust's char::to_lowercase (no final-sigma rule)
        return "".join(c.lower() for c in text)

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """BertPreTokenizer: split on whitespace, and isolate every punctuation character."""
        words = []
        for piece in _SPLIT.findall(text):
            if piece.isascii():
                words.append(piece)
                continue
            start = 0
            for k, c in enumerate(piece):
                if not _is_punctuation(c):
                    continue
                if k > start:
                    words.append(piece[start:k])
                words.append(c)
                start = k + 1
            if start < len(piece):
                words.append(piece[start:])
        return words

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first; the whole word is [UNK] if it is too long or a piece has
        no match."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids, start, n = [], 0, len(word)
        while start < n:
            if n > MAX_WORD_CHARS:
                ids = [self.unk_id]
                break
            longest_end = min(n, start + self._max_piece)   # no piece is longer
            for end in range(longest_end, start, -1):
                piece = word[start:end]
                if start > 0:
                    piece = "##" + piece
                i = self.ids.get(piece)
                if i is not None:
                    ids.append(i)
                    start = end
                    break
            else:
                ids = [self.unk_id]
                break
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def segments(self, text: str):
        """Yields (added token id, None) for each added token matched whole in the raw text, and
        (None, plain text) for the text between them. Matches are leftmost-longest; a
        `single_word` token only counts when no word character touches it on either side (as in
        `tokenizers`)."""
        start = 0
        for m in self._added_re.finditer(text):
            a, b = m.span()
            touched_before = a > 0 and _is_word_char(text[a - 1])
            touched_after = b < len(text) and _is_word_char(text[b])
            if self.single_word[m[0]] and (touched_before or touched_after):
                continue
            if a > start:
                yield None, text[start:a]
            yield self.ids[m[0]], None
            start = b
        if start < len(text):
            yield None, text[start:]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, exactly as `tokenizers` encodes with this vocabulary (no [EOS] is
        added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = []
        for added_id, plain in self.segments(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for word in self.pre_tokenize(self.normalize(plain)):
                ids += self.wordpiece(word)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: `##` pieces joined to the previous piece, other pieces after a space,
        space before . , ! ? removed. DEVIATION: an id outside the vocabulary raises
        (`tokenizers` silently drops it)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if skip_special_tokens:
            ids = [i for i in ids if int(i) not in self.special_ids]
        tokens = [self.id_to_token(i) for i in ids]
        out = []
        for k, t in enumerate(tokens):
            if k > 0:
                t = t[2:] if t.startswith("##") else " " + t
            out.append(_cleanup(t))
        return "".join(out)

    # --- batches ------------------------------------------------------------------------------
    def encode_batch(self, texts: list[str], length: int | None = None, eos: bool = True,
                     return_tensor: bool = False):
        """Texts -> ids (+ [EOS]), cut to `length` (4M truncates after adding [EOS]:
        fourm/data/masking.py) and padded with [PAD] to `length` (default: the longest). A list
        of lists, or a LongTensor (B, N)."""
        ending = [EOS_ID] if eos else []
        rows = [self.encode(t) + ending for t in texts]
        if length is None:
            length = max(map(len, rows), default=0)
        cut = [r[:length] for r in rows]
        rows = [r + [PAD_ID] * (length - len(r)) for r in cut]
        if not return_tensor:
            return rows
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)   # (B, N)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        """(B, N) ids -> B texts; each row stops at its first [EOS] and drops [PAD]."""
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        texts = []
        for row in batch:
            row = [int(i) for i in row]
            if EOS_ID in row:
                row = row[:row.index(EOS_ID)]
            unpadded = [i for i in row if i != PAD_ID]
            texts.append(self.decode(unpadded, skip_special_tokens))
        return texts

    # --- coordinates --------------------------------------------------------------------------
    def encode_coords(self, lon: float, lat: float) -> list[int]:
        """(lon, lat) in degrees -> [lat_id, lon_id, EOS] on the 0.25 degree grid (official
        CoordsTokenizer). DEVIATION: a value that rounds to -0.00 maps to the 0.00 token
        (upstream it splits into 9 pieces); NaN, infinities and out-of-range values raise
        instead of producing pieces."""
        if isinstance(lon, str) or isinstance(lat, str):
            raise TypeError("encode_coords takes numbers (lon, lat); for a text 'lat=.. lon=..' "
                            "use encode_coords(*parse_coords(text))")
        for name, value, limit in (("lon", lon, 180), ("lat", lat, 90)):
            value = float(value)
            if not math.isfinite(value) or abs(value) > limit:
                raise ValueError(f"encode_coords: {name}={value} is not a finite value in "
                                 f"[-{limit}, {limit}]")
        coords_text = format_coords(float(lon), float(lat))   # snaps, never '-0.00'
        lat_token, lon_token = coords_text.split()
        ids = [self.ids.get(lat_token), self.ids.get(lon_token), EOS_ID]
        if None in ids:
            raise ValueError("this vocabulary has no coordinate tokens "
                             f"({lat_token!r}, {lon_token!r})")
        return ids

    def decode_coords(self, ids) -> tuple[float, float]:
        """[lat_id, lon_id, ...] -> (lon, lat); anything else raises a ValueError saying what it
        found."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if len(ids) < 2:
            raise ValueError(f"decode_coords needs at least 2 ids (lat, lon), got {ids}")
        lat_token = self.id_to_token(ids[0])
        lon_token = self.id_to_token(ids[1])
        if not (lat_token.startswith("lat=") and lon_token.startswith("lon=")):
            raise ValueError("decode_coords: expected a lat= and a lon= token, "
                             f"got {lat_token!r} {lon_token!r}")
        return parse_coords(f"{lat_token} {lon_token}", path="decode_coords")

    def encode_coords_batch(self, coords, return_tensor: bool = True):
        """(B, 2) [lon, lat] (official order) -> (B, 3) ids [lat_id, lon_id, EOS]."""
        if isinstance(coords, torch.Tensor):
            coords = coords.tolist()
        else:
            coords = [list(c) for c in coords]
        if any(len(c) != 2 for c in coords):
            raise ValueError("encode_coords_batch expects coords of shape (B, 2) as [lon, lat]")
        rows = [self.encode_coords(lon, lat) for lon, lat in coords]
        if not return_tensor:
            return rows
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 3)   # (B, 3)

    def decode_coords_batch(self, batch) -> torch.Tensor:
        """(B, N) ids -> (B, 2) float [lon, lat]; a row that is not a coordinate pair becomes NaN
        with a warning (as the official decoder does), so one bad generation does not lose the
        batch."""
        out = torch.full((len(batch), 2), float("nan"))
        for b, row in enumerate(batch):
            try:
                out[b] = torch.tensor(self.decode_coords(row), dtype=torch.float64)
            except ValueError as e:
                warnings.warn(f"row {b}: {e}; returning NaN")
        return out

    # --- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int = 30_000) -> "WordPieceTokenizer":
        """Learns a WordPiece vocabulary from texts: ids 0..6365 are the official added tokens at
        their official ids, then the alphabet (printable ASCII and every character seen, as word
        start and as `##` continuation), then merged pieces until `vocab_size` entries or until
        every word is one piece. Each merge maximizes the WordPiece likelihood score
        count(ab) / (count(a) count(b)) (Schuster & Nakajima 2012); ties go to the more
        frequent pair, then alphabetically, so training is deterministic."""
        added = official_added_tokens()
        base = cls([t for t, _ in added], added)   # normalizes and splits like the official file
        counts = count_words(base, texts)
        words = [w for w in counts if len(w) <= MAX_WORD_CHARS]
        freq = [counts[w] for w in words]
        vocab = list(base.vocab) + alphabet(base, words)
        if vocab_size < len(vocab):
            raise ValueError(f"vocab size {vocab_size} is below the {len(added)} added tokens + "
                             f"{len(vocab) - len(added)} alphabet entries")
        vocab += learn_merges(words, freq, vocab_size - len(vocab), known=set(vocab))
        return cls(vocab, added)


# ---------------------------------------------------------------------------------------------
# Command line

def read_corpus(paths) -> list[str]:
    """Every non-empty line of every file; a folder stands for its *.txt files (e.g.
    data/synth/caption)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such corpus file or folder")
    texts = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from None
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"no text found in {', '.join(map(str, paths))}")
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train",
                       help="learn a WordPiece vocabulary keeping the official added-token ids")
    p.add_argument("--corpus", nargs="+", required=True,
                   help="caption files (one per line) or folders of *.txt")
    p.add_argument("--vocab-size", type=positive_int, default=30_000,
                   help="largest vocabulary (official: 30000)")
    p.add_argument("--out", required=True,
                   help="tokenizer JSON to write (Hugging Face `tokenizers` format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p = sub.add_parser("encode", help="print the ids and pieces of a text")
    p.add_argument("--tokenizer", default=str(OFFICIAL_VOCAB),
                   help="tokenizer JSON (default: the official v1 vocabulary in assets/official/)")
    p.add_argument("text", help="text to encode")
    return parser


def main():
    args = build_parser().parse_args()
    if args.command == "train":
        output_file(args.out, "--out", args.overwrite)   # before any work
        texts = read_corpus(args.corpus)
        t0 = time.perf_counter()
        tok = WordPieceTokenizer.train(texts, args.vocab_size)
        seconds = time.perf_counter() - t0
        tok.save(args.out)
        n_unk = sum(tok.encode(t).count(UNK_ID) for t in texts)
        n_added = len(tok.added)
        print(f"trained on {len(texts)} texts in {seconds:.2f} s | vocab {len(tok)} "
              f"({n_added} added + {len(tok) - n_added} WordPiece) | [UNK] in corpus: {n_unk} | "
              f"wrote {args.out}")
    else:
        tok = WordPieceTokenizer.from_file(args.tokenizer)
        ids = tok.encode(args.text)
        pieces = [tok.vocab[i] for i in ids]
        print(f"ids    {ids}\npieces {pieces}\ndecode {tok.decode(ids)!r}")


if __name__ == "__main__":
    run_main(main)
