"""release.py: the released TerraMind v1 files -> one checkpoint folder.

Against the official implementation: random-weight stand-ins in the official layout (tests/fixtures/
release_standins.py; layout, position tables and expected outputs made with the official classes by
tests/fixtures/release_make_official.py) are converted by the command, then `generate.py` on a real tile gives the
official tokens and LULC map. Against the official key lists (assets/official/keys): the size and the tokenizer
architecture read off every released layout. Refusals of bad files, and the README section's commands as written.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from checkpoints import load_safetensors  # noqa: E402
from conftest import assert_argmax_equals_official  # noqa: E402
from fsq_tokenizer import TokenizerConfig  # noqa: E402
from generate import Sampling, generate_tokens  # noqa: E402
from modalities import standardize  # noqa: E402
from release import convert, load_official, model_config, tokenizer_config  # noqa: E402
from release_standins import write_release  # noqa: E402
from terramesh import read_input  # noqa: E402
from terramind import TerraMind  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "release_official.safetensors"
KEYS = ROOT / "assets" / "official" / "keys"
TILE = ROOT / "assets" / "terramesh" / "S2L2A" / "38D_378R_2_3.tif"
IMAGE_TARGETS = ("tok_S2L2A", "tok_S1GRD", "tok_S1RTC", "tok_DEM", "tok_LULC", "tok_NDVI")


def command(*args, cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    """Runs a script of the repository; every one but release.py (which only converts files) gets --device cpu,
    so that a GPU host runs the same commands and compares the same float32 numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    device = [] if args[0] == "release.py" else ["--device", "cpu"]
    p = subprocess.run([sys.executable, *map(str, args), *device], cwd=cwd, capture_output=True, text=True, env=env)
    if check and p.returncode:
        raise AssertionError(f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def official():
    return load_safetensors(FIX)


def test_convert_then_generate_equals_official(official, readme_run):
    """The README's conversion of the stand-ins, then generate.py on the real tile: the official tokens."""
    fix, _ = official
    work, outputs = readme_run
    assert "TerraMind_v1_tiny.pt: no official size (the file name says tiny): dim 64, 2 + 2 blocks" in outputs[0]
    assert "missing: nothing" in outputs[0] and len(list((work / "ckpt" / "v1").glob("*.safetensors"))) == 7
    out = command("generate.py", "--model", work / "ckpt" / "v1", "--input", f"S2L2A={TILE}", "--targets", "LULC",
                  "--temperature", "0", "--out", work / "gen").stdout
    assert "10 DDIM steps" in out and "default is 50" in out
    lulc = tifffile.imread(work / "gen" / "LULC.tif")                  # tokens -> converted LULC tokenizer
    # 32 of 50176 pixels lie within 2e-4 of a tie (the closest 4.4e-6, at logits up to 1.9)
    assert_argmax_equals_official(lulc, fix["lulc_map"][0], fix["lulc_second"][0], fix["lulc_gap"][0], 2e-4,
                                  "LULC map")
    model = TerraMind.from_checkpoint(work / "ckpt" / "v1").eval()     # the folder, as every script takes it
    x = standardize("S2L2A", torch.from_numpy(read_input("S2L2A", str(TILE))[0]))[None]
    argmax = Sampling(temperature=0.0, top_p=0.0)
    for t in IMAGE_TARGETS:
        tokens = generate_tokens(model, {"S2L2A": x}, [t], argmax)[t]
        assert torch.equal(tokens, fix[f"tokens.{t}"]), t
        assert len(tokens.unique()) >= 15   # not a constant map: the test can tell models apart


def meta_state(name: str) -> dict:
    """An official key list (assets/official/keys) as a state dict of meta tensors: shapes only."""
    state = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.empty(tuple(int(s) for s in re.findall(r"\d+", shape)), device="meta")
    return state


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_size_read_off_the_official_layouts(size):
    state = meta_state(f"terramind_{size}_keys.txt")
    found, config = model_config(state)
    assert found == size and config.vocab == {}
    model = TerraMind.from_official(state, config)       # every key mapped or checked (shapes only)
    assert model.config.num_heads * 64 == model.config.dim and len(model.config.targets) == 7


@pytest.mark.parametrize("name,modality", [("s2l2a", "S2L2A"), ("s1grd", "S1GRD"), ("s1grd", "S1RTC"),
                                           ("dem", "DEM"), ("dem", "NDVI"), ("lulc", "LULC")])
def test_tokenizer_architecture_read_off_the_official_layouts(name, modality):
    state = meta_state(f"terramind_v1_tokenizer_{name}_keys.txt")
    assert tokenizer_config(state, modality) == TokenizerConfig.preset("official", modality)


class RunsCode:
    """Unpickling this would create a folder (it must not)."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_refuses_truncated_foreign_and_code_running_files(official, tmp_path):
    fix, meta = official
    path = write_release(tmp_path / "truncated", fix, meta, ["TerraMind_Tokenizer_LULC.pt"])[0]
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    (tmp_path / "foreign").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign" / "TerraMind_v1_base.pt")
    (tmp_path / "code").mkdir()
    torch.save({"mask_token": RunsCode(tmp_path / "ran")}, tmp_path / "code" / "TerraMind_v1_base.pt")
    for folder, reason in (("truncated", "truncated"), ("foreign", "not a TerraMind model state dict"),
                           ("code", "refused: loading it would run code (Trying to load unsupported GLOBAL")):
        with pytest.raises(ValueError, match=re.escape(reason)) as e:
            convert(tmp_path / folder, tmp_path / "out")
        assert "\n" not in str(e.value)
    p = command("release.py", "convert", "--release", tmp_path / "code", "--out", tmp_path / "out", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not a TerraMind tokenizer state dict"):   # a model where a tokenizer goes
        load_official(write_release(tmp_path / "m", fix, meta, ["TerraMind_v1_tiny.pt"])[0], "tokenizer")



def test_convert_never_overwrites_a_file_unless_told(official, tmp_path):
    """issue 19: a file already in --out (an earlier conversion, or a user's) is refused before any official
    file is read; --overwrite replaces it."""
    fix, meta = official
    release, out = tmp_path / "downloads", tmp_path / "out"
    write_release(release, fix, meta, ["TerraMind_v1_tiny.pt", "TerraMind_Tokenizer_LULC.pt"])
    out.mkdir()
    (out / "terramind.safetensors").write_text("a user's file")
    p = command("release.py", "convert", "--release", release, "--out", out, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert f"--out {out / 'terramind.safetensors'}: the file exists; pass --overwrite" in p.stderr
    assert (out / "terramind.safetensors").read_text() == "a user's file"
    assert not (out / "tokenizer_LULC.safetensors").exists()          # nothing written before the refusal
    command("release.py", "convert", "--release", release, "--out", out, "--overwrite")
    assert TerraMind.from_checkpoint(out).config.dim == 64
    assert (out / "tokenizer_LULC.safetensors").exists()

def readme_blocks() -> list[list[str]]:
    """The commands of each bash block of the README section "Use the released model", continuations joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the released model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [re.sub(r"\\\n\s*", "", b).splitlines() for b in blocks]
    return [[c.split("  #")[0].strip() for c in block if c.startswith("python ")] for block in lines]


def sandbox(tmp_path, official) -> Path:
    """A folder where the README's paths exist: the scripts and assets (links), the stand-in downloads."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "assets").symlink_to(ROOT / "assets")
    for script in ROOT.glob("*.py"):
        (work / script.name).symlink_to(script)
    write_release(work / "downloads", *official)
    return work


@pytest.fixture(scope="module")
def readme_run(official, tmp_path_factory):
    """The first bash block of the README section, run as written in a sandbox: (folder, outputs)."""
    work = sandbox(tmp_path_factory.mktemp("readme"), official)
    block = readme_blocks()[0]
    assert block[0] == "python release.py convert --release downloads/ --out ckpt/v1/" and len(block) >= 5
    return work, [command(*line.split()[1:], cwd=work).stdout for line in block]


def test_readme_commands_run_as_written(readme_run):
    work, outputs = readme_run
    assert "generated LULC, DEM, NDVI, S1RTC, coords" in outputs[1]
    assert "| v1 | S1GRD (Sen1Floods11) | zero-shot |" in outputs[2] and "S2L2A → DEM (terramesh)" in outputs[3]
    assert all(f"| {s} steps, clip 1 |" in outputs[4] for s in (1, 2, 5, 10, 25, 50))
    assert len(list((work / "out" / "v1" / "generate").glob("*.tif"))) == 4
    assert len(list((work / "out" / "v1" / "tokens").glob("*/shard_*.safetensors"))) == 5


def sen1floods11_standin(root: Path):
    """The v1.1 layout with the vendored chip as every sample (8 in train: one batch)."""
    chip, src = "Spain_7370579", ROOT / "assets" / "sen1floods11"
    for folder, sub in (("S1Hand", "S1"), ("S2Hand", "S2"), ("LabelHand", "Labels")):
        d = root / "v1.1" / "data" / "flood_events" / "HandLabeled" / folder
        d.mkdir(parents=True)
        (d / f"{chip}_{folder}.tif").symlink_to(src / sub / f"{chip}_{folder}.tif")
    splits = root / "v1.1" / "splits" / "flood_handlabeled"
    splits.mkdir(parents=True)
    for split, n in (("train", 8), ("valid", 1), ("test", 1)):
        (splits / f"flood_{split}_data.csv").write_text(f"{chip}_S1Hand.tif,{chip}_LabelHand.tif\n" * n)


def test_readme_finetuning_commands_run(official, tmp_path):
    """The second block as written plus `--epochs 1 --channels 16` (the defaults are 100 and 80 epochs of a
    512-channel head), on the converted stand-ins and a one-chip stand-in of Sen1Floods11."""
    work = sandbox(tmp_path, official)
    command(*readme_blocks()[0][0].split()[1:], cwd=work)
    sen1floods11_standin(work / "data" / "sen1floods11")
    for line in readme_blocks()[1]:
        out = command(*line.split()[1:], "--epochs", "1", "--channels", "16", cwd=work).stdout
        assert "test" in out and "mIoU" in out
