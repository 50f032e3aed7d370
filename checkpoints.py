"""
Checkpoint files: safetensors with the writer's config as JSON metadata (STYLE.md point 6), and
their kinds.

Every stage writes its weights, states and token shards with `save_safetensors` (atomic:
temporary file, fsync, rename; a CRC32 over the tensors catches flipped bytes) and reads them
with `load_safetensors`, which refuses a missing, truncated, corrupted or diverged (NaN) file
with one line naming it. `checkpoint_kind` tells from the metadata which stage wrote a file, and
`expect_kind` refuses a file another stage wrote, naming both kinds.

    python -c "import checkpoints as c; t, meta = c.load_safetensors('model.safetensors');
               print(c.checkpoint_kind(meta))"
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import safetensors.torch
import torch

# ----------------------------------------------------------------------------
# Checkpoints: every stage writes safetensors with its config as JSON metadata (STYLE.md point 6)
def save_safetensors(path, tensors: dict, meta: dict):
    """Writes tensors plus JSON-able metadata ({"config": {...}, ...}) atomically: temp file,
    fsync, rename. A crash mid-write leaves the previous file intact. Shared storage (tied
    weights) is cloned apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    # the CRC detects flipped bytes that safetensors would load
    meta = {**meta, "crc32": _crc32(out)}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    safetensors.torch.save_file(out, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors(path, device="cpu") -> tuple[dict, dict]:
    """Reads a checkpoint written by `save_safetensors` -> (tensors, metadata). A missing,
    truncated or corrupted file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupted? "
                         f"({type(e).__name__}: {e})") from None
    if "crc32" in meta and meta.pop("crc32") != _crc32(tensors):
        raise ValueError(f"{path}: checkpoint is corrupted (checksum mismatch)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): "
                         f"written by a run that "
                         f"diverged; use an earlier checkpoint")
    return tensors, meta


CHECKPOINT_KINDS = {   # what each stage writes, told apart by the metadata keys it stores
    "pretrain state": "pretrain.py's pretrain_state.safetensors, read by --resume",
    "TerraMind model": "pretrain.py's terramind.safetensors or terramind.py convert's output",
    "tokenizer state": "fsq_tokenizer.py train's tokenizer_<MOD>.state.safetensors",
    "image tokenizer": "fsq_tokenizer.py train's tokenizer_<MOD>.safetensors",
    "TiM state": "tim_finetune.py train's state.safetensors",
    "TiM model": "tim_finetune.py train's model.safetensors",
    "PANGAEA head": "eval_pangaea.py seg's head.safetensors",
    "token shard": "fsq_tokenizer.py tokenize's shard_<N>.safetensors",
}


def checkpoint_kind(meta: dict) -> str:
    """Which stage wrote a checkpoint, from its metadata: a key of CHECKPOINT_KINDS, or 'unknown
    file'."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if "opt_ids" in meta:
        return "TiM state" if "sched" in meta else "pretrain state"
    if "opt" in meta:
        return "tokenizer state"
    if meta.get("kind") == "tokenizer":
        return "image tokenizer"
    if "ids" in meta and "modality" in meta:
        return "token shard"
    if "encoder" in config:
        return "TiM model"
    if "encoder" in meta:
        return "PANGAEA head"
    if "encoder_depth" in config:
        return "TerraMind model"
    return "unknown file"


def expect_kind(path, meta: dict, *expected: str):
    """Refuses a checkpoint another stage wrote: the error names the kind given and the kind
    expected."""
    kind = checkpoint_kind(meta)
    article = lambda k: "an" if k[0] in "aeiou" else "a"   # noqa: E731
    if kind not in expected:
        if kind in CHECKPOINT_KINDS:
            given = f"{article(kind)} {kind} ({CHECKPOINT_KINDS[kind]})"
        else:
            given = "not a checkpoint of this project"
        want = " or ".join(f"{article(k)} {k} ({CHECKPOINT_KINDS[k]})" for k in expected)
        raise ValueError(f"{path}: is {given}; expected {want}")


def _crc32(tensors: dict) -> int:
    crc = 0
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        crc = zlib.crc32(data, zlib.crc32(k.encode(), crc))
    return crc


def optimizer_state(tensors: dict, meta: dict) -> dict:
    """The AdamW state_dict of a training state written as flat tensors `opt.<id>.<name>`
    with `opt_ids` and `opt_groups` in its metadata (pretrain and TiM states): per parameter
    id its tensors, `step` back to a 0-d tensor."""
    state = {}
    for i in meta["opt_ids"]:
        prefix = f"opt.{i}."
        entries = {}
        for k, v in tensors.items():
            if k.startswith(prefix):
                entries[k.split(".", 2)[2]] = v.reshape(()) if k.endswith(".step") else v
        state[int(i)] = entries
    return {"param_groups": meta["opt_groups"], "state": state}
