"""
Token shards: the image tokens of a whole dataset, written once by `fsq_tokenizer.py tokenize`
and read by pretraining.

Format: `<out>/<MOD>/shard_<k>.safetensors` (checkpoints.save_safetensors, atomic), one per
--shard-size samples in sorted id order; tensor "tokens" int16 (n, h, w); metadata "ids" (row
order), "modality", "vocab_size", "tokenizer" (checksum of the tokenizer file) and "files" (size
and modification time of each sample's tile). A re-run skips a shard whose ids, files and
tokenizer match, and encodes it again otherwise (a tile fixed since, a retrained tokenizer).

  * `write_token_shards(tok, ds, m, out, ...)`: the shards of one modality;
  * `TokenShards(folder).get("S2L2A", "00042") -> LongTensor (h, w)` reads them back;
  * `read_header(path)`: the JSON metadata of any safetensors file of this project.

It has no command line of its own:
    python fsq_tokenizer.py tokenize --data data/synth --tokenizers ckpt/ --out tokens/
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
from tqdm import tqdm

from checkpoints import load_safetensors, save_safetensors
from tokenizer_data import batches, token_window


def read_header(path) -> dict:
    """The JSON metadata of a safetensors file without reading its tensors ({} when unreadable)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: json.loads(v) for k, v in metadata.items()}
    except Exception:
        return {}


def file_stamp(path) -> list | None:
    """[size, modification time in ns] of a sample's file: a tile changed since its shard was
    written is tokenized again (None for samples inside archives, whose shards are keyed by id
    and tokenizer only)."""
    if not isinstance(path, Path) or not path.is_file():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def shard_path(out, m: str, k: int) -> Path:
    return Path(out) / m / f"shard_{k:05d}.safetensors"


def check_shard_paths(paths: list[Path], m: str):
    """A file at a shard's path that is not a token shard of modality m (a user's file) is
    never replaced."""
    for path in paths:
        header = read_header(path)
        if path.exists() and (header.get("modality") != m or "ids" not in header):
            raise ValueError(f"{path}: is not a {m} token shard of `fsq_tokenizer.py tokenize`; "
                             f"move it away or choose another --out")


def write_token_shards(tok, ds, m: str, out, shard_size: int, batch_size: int, device,
                       fingerprint) -> tuple[int, int]:
    """Encodes the m tiles of `ds` with the tokenizer `tok` into shards under out/m; a shard
    whose ids, files and tokenizer `fingerprint` match is kept. -> (written, already done)."""
    starts = range(0, len(ds), shard_size)
    paths = [shard_path(out, m, s // shard_size) for s in starts]
    check_shard_paths(paths, m)                                    # before any work
    done = written = 0
    for s, path in zip(tqdm(starts, desc=f"tokenize {m}", unit="shard"), paths):
        ids = ds.ids[s:s + shard_size]
        stamps = [file_stamp(ds.files[m].get(sid)) for sid in ids]
        header = read_header(path)
        same_ids = header.get("ids") == ids and header.get("files") == stamps
        if same_ids and header.get("tokenizer") == fingerprint:
            done += 1
            continue
        parts = []
        for x in batches(ds, m, batch_size, range(s, s + len(ids))):
            parts.append(tok.encode(token_window(x).to(device)).cpu())     # (B, h, w)
        tokens = torch.cat(parts).to(torch.int16)
        meta = {"ids": ids, "modality": m, "vocab_size": tok.vocab_size,
                "tokenizer": fingerprint, "files": stamps}
        save_safetensors(path, {"tokens": tokens}, meta)
        written += 1
    return written, done


class TokenShards:
    """The token shards written by `tokenize` (format above), in memory as int16."""

    def __init__(self, folder, modalities=None):
        self.folder, self.tokens, self.rows = Path(folder), {}, {}
        found = []
        if self.folder.is_dir():
            found = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        for m in modalities or found:
            self.load(m)
        self.modalities = list(self.tokens)
        # samples with any tokenized modality
        self.ids = sorted(set().union(*self.rows.values()))

    def load(self, m: str):
        files = sorted((self.folder / m).glob("shard_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder / m}: no token shards "
                                    f"(run `fsq_tokenizer.py tokenize`)")
        shards = [load_safetensors(f) for f in files]
        self.tokens[m] = torch.cat([t["tokens"] for t, _ in shards])       # (n, h, w) int16
        ids = [sid for _, meta in shards for sid in meta["ids"]]
        self.rows[m] = {sid: i for i, sid in enumerate(ids)}
        if len(self.rows[m]) != len(self.tokens[m]):
            raise ValueError(f"{self.folder / m}: {len(self.tokens[m])} token rows, "
                             f"{len(self.rows[m])} ids")

    def has(self, modality: str, sample_id: str) -> bool:
        return sample_id in self.rows.get(modality, {})

    def get(self, modality: str, sample_id: str) -> torch.Tensor:
        """-> LongTensor (h, w) of token ids."""
        if not self.has(modality, sample_id):
            raise KeyError(f"{self.folder}: no {modality} tokens for sample {sample_id!r}")
        return self.tokens[modality][self.rows[modality][sample_id]].long()
