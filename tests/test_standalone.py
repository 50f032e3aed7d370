"""The repository stands alone: a clone placed anywhere needs nothing beside it.

Code, tests, scripts and docs never reach for a folder outside the repository, and what they need from
outside (the official vocabulary, key lists, constants, the real samples) is vendored in assets/ with its
source named in assets/README.md.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "runs", "data", "out", "ckpt"}
TEXT_SUFFIXES = {".py", ".sh", ".md", ".ini", ".txt", ".cfg", ".toml", ".yaml", ".json"}
# a path that climbs out of the repository to a sibling folder, written as a string or as pathlib steps
OUTSIDE = re.compile(r"\.\./shared|\.parent\s*/\s*[\"']shared[\"']")


def repository_text_files():
    for path in ROOT.rglob("*"):
        inside = path.relative_to(ROOT).parts
        if SKIP_DIRS.intersection(inside) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.parent.name == ".ci":
            yield path


def test_no_path_outside_the_repository():
    offending = []
    for path in repository_text_files():
        if path.stat().st_size > 1_000_000:   # the vocabulary JSON: data, not paths
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "paths outside the repository:\n" + "\n".join(offending)


def test_every_vendored_file_is_named_in_the_assets_readme():
    readme = (ROOT / "assets" / "README.md").read_text(encoding="utf-8")
    folders = sorted(p for p in (ROOT / "assets").iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["official", "sen1floods11", "terramesh"]
    for folder in folders:
        assert f"## {folder.name}/" in readme, folder.name
    for licence in ("Apache-2.0", "CC-BY-SA-4.0"):
        assert licence in readme
    assert (ROOT / "assets" / "terramesh" / "LICENSE").is_file()
