"""
The released TerraMind v1 in one command: a folder of official files -> one checkpoint folder.

Consumes a folder with any of the files of the Hugging Face model repositories
(README "Use the released model"), each from ibm-esa-geospatial/TerraMind-1.0-<...>:
  TerraMind_v1_<size>.pt          repository <size>: tiny, small, base, large
  TerraMind_Tokenizer_<MOD>.pt    repository Tokenizer-<MOD>: S2L2A S1GRD S1RTC DEM LULC NDVI
Produces one checkpoint folder that every stage takes as it is:
  <out>/terramind.safetensors        the model (`TerraMind.from_checkpoint(<out>)`;
                                     generate.py, tim_finetune.py, eval_pangaea.py `--model <out>`)
  <out>/tokenizer_<MOD>.safetensors  the tokenizers (`load_tokenizers(<out>)`; generate.py takes
                                     them from the --model folder, fsq_tokenizer.py tokenize /
                                     reconstruct `--tokenizers <out>`)
A file already in --out is replaced only with --overwrite.
Sizes and widths are read off the state dicts (heads are 64 wide in every release: official
terramind_register.py, vit_models.py); every key is loaded or checked strictly (official.py,
fsq_tokenizer.load_state_strict). The official pickles are read with
`torch.load(weights_only=True)` only: a pickle that would run code, a truncated file and a
pickle that is not a TerraMind state dict are each refused with one line.

    python release.py convert --release downloads/ --out ckpt/v1/
Conversion is CPU work in one process (no GPU or torchrun variant); `large` needs about 8 GB of
memory.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path

import torch

from cli import output_file, run_main
from entries import ENTRIES, entry_modality, official_key
from fsq_tokenizer import (ImageTokenizer, TokenizerConfig, load_state_strict,
                           tokenizer_path)
from modalities import TOKENIZED_IMAGES
from terramind import CHECKPOINT, PRESETS, TerraMind, TerraMindConfig

# official: every v1 size (192/3 ... 1024/16) and the tokenizers' ViT-B (768/12)
HEAD_DIM = 64
MODEL_FILE = re.compile(r"TerraMind_v1_(\w+)\.pt")
# + size (tiny, small, base, large) or Tokenizer-<MOD>
REPO = "ibm-esa-geospatial/TerraMind-1.0-"

# -----------------------------------------------------------------------------------------------
# Reading an official file safely


def read_pickle(path: Path) -> object:
    """torch.load(weights_only=True) of an official file; a truncated, corrupt or code-running
    pickle is refused with a one-line ValueError."""
    with open(path, "rb") as f:
        zip_magic = f.read(4) == b"PK\x03\x04"
    # torch.save's zip archive ends with its directory
    if zip_magic and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: truncated (its zip directory is missing); download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: truncated or corrupt ({e}); download it again") from None
        globals_named = [s.strip() for s in str(e).splitlines() if "GLOBAL" in s]
        reason = globals_named[0] if globals_named else "an object that is not a tensor"
        raise ValueError(f"{path}: refused: loading it would run code ({reason}); an official "
                         f"file is a plain state dict of tensors") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupt ({type(e).__name__}: {e}); "
                         f"download it again") from None


def load_official(path: Path, kind: str) -> dict:
    """An official pickle -> its state dict {key: tensor}, through torch.load(weights_only=True)
    only. `kind` "model" or "tokenizer" names the keys it must have. Refusals are one-line
    ValueErrors."""
    state = read_pickle(path)
    need = {"model": ("mask_token", "encoder.0.attn.qkv.weight"),
            "tokenizer": ("encoder.proj.weight", "quant_proj.weight")}[kind]
    is_dict = isinstance(state, dict)
    tensors = is_dict and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors or not all(k in state for k in need):
        what = f"a dict with keys {sorted(state)[:3]}" if is_dict else f"a {type(state).__name__}"
        raise ValueError(f"{path}: not a TerraMind {kind} state dict "
                         f"({what}; expected keys {', '.join(need)})")
    return state


# -----------------------------------------------------------------------------------------------
# Configurations read off the state dicts


def count_blocks(state: dict, prefix: str) -> int:
    """Number of numbered blocks under `prefix` ("encoder." -> encoder.0 ... encoder.11 -> 12)."""
    numbers = set()
    for k in state:
        first = k[len(prefix):].split(".")[0]
        if k.startswith(prefix) and first.isdigit():
            numbers.add(first)
    return len(numbers)


def heads(dim: int, what: str) -> int:
    if dim % HEAD_DIM:
        raise ValueError(f"{what} width {dim} is not a multiple of the released head width "
                         f"{HEAD_DIM}")
    return dim // HEAD_DIM


def official_size(found: dict) -> str | None:
    """The name of the official preset with exactly these settings, or None."""
    for name, config in PRESETS.items():
        same = all(getattr(config, k) == v for k, v in found.items())
        if name != "smoke" and same:
            return name
    return None


def model_config(state: dict) -> tuple[str | None, TerraMindConfig]:
    """(official size name or None, TerraMindConfig) of an official TerraMind state dict."""
    dim = state["mask_token"].shape[-1]
    found = dict(dim=dim,
                 encoder_depth=count_blocks(state, "encoder."),
                 decoder_depth=count_blocks(state, "decoder."),
                 num_heads=heads(dim, "model"),
                 mlp_hidden=state["encoder.0.mlp.fc1.weight"].shape[0],
                 swiglu="encoder.0.mlp.fc3.weight" in state)
    by_key = {official_key(e): e for e in ENTRIES}
    vocab = {}
    # released vocabularies are the table's; others (stand-ins) are overrides
    for key, t in state.items():
        if not key.endswith(".token_emb.weight"):
            continue
        entry = by_key.get(key.split(".")[1])
        if entry and t.shape[0] != entry_modality(entry).vocab_size:
            vocab[entry] = t.shape[0]
    return official_size(found), TerraMindConfig(**found, vocab=vocab)


def unet_config(state: dict) -> dict:
    """Width, per-level multipliers, ResBlocks per level and attention rates of a patched UNet
    decoder."""
    width = state["decoder.time_embed.0.weight"].shape[1]
    mult, blocks, attention, rate = [], [0], set(), 1
    for i in range(1, count_blocks(state, "decoder.input_blocks.")):
        block = f"decoder.input_blocks.{i}"
        if f"{block}.0.op.weight" in state:     # a downsampling step ends the level
            rate *= 2
            blocks.append(0)
            continue
        if blocks[-1] == 0:
            mult.append(state[f"{block}.0.out_layers.3.weight"].shape[0] // width)
        blocks[-1] += 1
        if f"{block}.1.qkv.weight" in state:
            attention.add(rate)
    return dict(unet_channels=width, unet_mult=tuple(mult), unet_blocks=blocks[0],
                unet_attn=tuple(sorted(attention)))


def tokenizer_config(state: dict, modality: str) -> TokenizerConfig:
    """The TokenizerConfig of an official DiVAE (diffusion decoder) or VQVAE (LULC: ViT
    decoder) state dict."""
    enc_dim = state["encoder.proj.weight"].shape[0]
    kw = dict(modality=modality,
              image_size=state["encoder.pos_emb"].shape[-1] * 16,
              enc_dim=enc_dim,
              enc_depth=count_blocks(state, "encoder.blocks."),
              enc_heads=heads(enc_dim, "encoder"),
              latent_dim=state["quant_proj.weight"].shape[0])
    if "decoder.out_proj.weight" in state:
        dec_dim = state["decoder.out_proj.weight"].shape[1]
        kw.update(dec_dim=dec_dim,
                  dec_depth=count_blocks(state, "decoder.blocks."),
                  dec_heads=heads(dec_dim, "decoder"))
    else:
        kw.update(unet_config(state))
    return TokenizerConfig(**kw)


# -----------------------------------------------------------------------------------------------
# Conversion


def find_release(folder: Path) -> tuple[list, dict]:
    """([model files], {modality: tokenizer file}) in a download folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; put the downloaded .pt files in one "
                                f"folder")
    models = sorted(p for p in folder.glob("*.pt") if MODEL_FILE.fullmatch(p.name))
    tokenizers = {}
    for m in TOKENIZED_IMAGES:
        path = folder / f"TerraMind_Tokenizer_{m}.pt"
        if path.is_file():
            tokenizers[m] = path
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise ValueError(f"{folder}: several models ({names}); a checkpoint folder holds one: "
                         f"convert them into separate --out folders, one at a time")
    if not models and not tokenizers:
        raise FileNotFoundError(f"{folder}: no TerraMind_v1_<size>.pt or "
                                f"TerraMind_Tokenizer_<MOD>.pt; download them from the {REPO}* "
                                f"repositories (README: Use the released model)")
    return models, tokenizers


def convert_model(path: Path, out: Path) -> TerraMindConfig:
    state = load_official(path, "model")
    size, config = model_config(state)
    model = TerraMind.from_official(state, config)
    named = MODEL_FILE.fullmatch(path.name).group(1)
    c = model.config
    mlp = "SwiGLU" if c.swiglu else "GELU"
    shape = (f"dim {c.dim}, {c.encoder_depth} + {c.decoder_depth} blocks, "
             f"{c.num_heads} head(s) of {HEAD_DIM}, {mlp} {c.mlp_hidden}")
    label = size or "no official size"
    note = f" (the file name says {named})" if size != named else ""
    model.save_checkpoint(out / CHECKPOINT, source=path.name, size=size or "custom")
    print(f"  {path.name}: {label}{note}: {shape}; inputs {' '.join(c.inputs)}; "
          f"targets {' '.join(c.targets)}")
    return c


def convert_tokenizer(path: Path, modality: str, out: Path) -> int:
    """Writes <out>/tokenizer_<MOD>.safetensors; returns the codebook size."""
    state = load_official(path, "tokenizer")
    cfg = tokenizer_config(state, modality)
    tok = ImageTokenizer(cfg)
    load_state_strict(tok, state, path)
    tok.save_checkpoint(tokenizer_path(out, modality), source=path.name)
    if cfg == TokenizerConfig.preset("official", modality):
        arch = "the released architecture"
    else:
        arch = f"encoder {cfg.enc_dim} x {cfg.enc_depth}, {cfg.image_size} px tables"
    print(f"  {path.name}: {modality} tokenizer, {tok.vocab_size} codes, {arch}")
    return tok.vocab_size


def missing_files(config: TerraMindConfig | None, codes: dict) -> list[str]:
    """What the release folder lacked, and what that costs."""
    lines = []
    if not config:
        lines.append(f"TerraMind_v1_<size>.pt ({REPO}<size>): no model to generate, "
                     f"fine-tune or evaluate")
    for m in TOKENIZED_IMAGES:
        if m not in codes:
            lines.append(f"TerraMind_Tokenizer_{m}.pt ({REPO}Tokenizer-{m}): {m} can be neither "
                         f"generated nor a token input")
    return lines


def check_outputs(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuses, before any official file is read, an output file that is already in `out`
    (unless `overwrite`). A folder that does not exist yet is made only once there is
    something to write."""
    if not out.exists():
        return
    for name in names:
        output_file(out / name, "--out", overwrite)


def vocabulary_notes(config: TerraMindConfig | None, codes: dict) -> list[str]:
    """A mixed release: token ids beyond the model's table would not embed."""
    notes = []
    for m, n in codes.items():
        entry = f"tok_{m}"
        if config and entry in config.targets and config.vocab_size(entry) != n:
            notes.append(f"  note: the model's {entry} vocabulary ({config.vocab_size(entry)}) "
                         f"differs from the {m} tokenizer's {n} codes")
    return notes


def convert(release, out, overwrite: bool = False) -> None:
    """Converts every official file of `release` into the checkpoint folder `out` and says what
    is missing. An output file already in `out` is refused unless `overwrite`."""
    release, out = Path(release), Path(out)
    models, tokenizers = find_release(release)
    names = [CHECKPOINT] if models else []
    names += [tokenizer_path(out, m).name for m in tokenizers]
    check_outputs(out, names, overwrite)
    print(f"found in {release}:")
    config = convert_model(models[0], out) if models else None
    codes = {}                                                   # {modality: codebook size}
    for m, path in tokenizers.items():
        codes[m] = convert_tokenizer(path, m, out)
    written = [CHECKPOINT] if config else []
    written += [tokenizer_path(out, m).name for m in codes]
    print(f"wrote {out}/: {', '.join(written)}")
    for note in vocabulary_notes(config, codes):
        print(note)
    missing = missing_files(config, codes)
    print("missing: " + ("nothing" if not missing else "\n  " + "\n  ".join(missing)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="official .pt files of a folder -> one checkpoint folder")
    c.add_argument("--release", required=True,
                   help="folder with TerraMind_v1_<size>.pt, TerraMind_Tokenizer_<MOD>.pt")
    c.add_argument("--out", required=True,
                   help="checkpoint folder to write (terramind.safetensors, tokenizer_<MOD>...)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace files of an earlier conversion in --out")
    args = p.parse_args()
    convert(args.release, args.out, args.overwrite)


if __name__ == "__main__":
    run_main(main)
