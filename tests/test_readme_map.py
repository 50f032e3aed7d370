"""The README's map from the paper to the code names functions that exist: every `file.py: name` in the
section "From the paper to the code" is a top-level file of the repository that defines that name (a function
or class, `Class.method`, or a module-level constant)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def map_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## From the paper to the code")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def references(section: str) -> list[tuple[str, str]]:
    """(file, name) for every `file.py: a, b.c` in the section."""
    found = []
    for code in re.findall(r"`([a-z_]+\.py): ([^`]+)`", section):
        file, names = code
        found += [(file, name.strip()) for name in names.split(",")]
    return found


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments, and `Class.method` for every method."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_map_names_only_code_that_exists():
    refs = references(map_section())
    assert len(refs) > 60, "the map lost its rows"
    missing = [f"{file}: {name}" for file, name in refs
               if not (ROOT / file).exists() or name not in defined_names(ROOT / file)]
    assert missing == []


def test_the_map_covers_the_stage_files():
    files = {file for file, _ in references(map_section())}
    stages = {"terramesh.py", "fsq_tokenizer.py", "diffusion_decoder.py", "text_tokenizer.py",
              "terramind.py", "masking.py", "pretrain.py", "generate.py", "tim_finetune.py",
              "eval_pangaea.py"}
    assert stages <= files
