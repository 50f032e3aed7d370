"""
The line rules of this codebase, written down where `.ci/run` can hold us to them. The figures come from the
codebases people hold up as readable (nanoGPT's model.py: 49 characters per line, 5% over 100; DiT's models.py:
40 and 2%; figures as issue 21 measured them).

For every top-level Python file of the repository:
  * at most 5% of its lines over 100 characters, and none over 120;
  * a mean under 52 characters per line (blank lines count, as in the references it is measured against);
  * every function at most 60 lines long, except `main` and argument parsers (`*parser*`, `parse_args`);
  * at most 650 lines: past that, something wants to move to a file named for what it holds.
For the repository as a whole: the project's own imports form no cycle (data -> model -> pipeline scripts).

    python tools/check_style.py            # the table, and exit status 1 if a rule is broken
    python tools/check_style.py --quiet    # only the broken rules
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LONG_SHARE = 0.05      # share of lines over LONG characters
LONG = 100
HARD_LIMIT = 120           # no line at all past this
MAX_MEAN = 52.0            # mean characters per line
MAX_FUNCTION = 60          # lines per function (main and argument parsers excepted)
MAX_FILE = 650             # lines per file


def line_figures(lines: list[str]) -> dict:
    """Line count, share of long lines, the longest line and the mean characters per line."""
    count = max(len(lines), 1)
    return {
        "lines": len(lines),
        "long_share": sum(len(line) > LONG for line in lines) / count,
        "longest": max((len(line) for line in lines), default=0),
        "mean": sum(len(line) for line in lines) / count,
    }


def is_exempt(name: str) -> bool:
    return name == "main" or name == "parse_args" or "parser" in name


def long_functions(tree: ast.Module) -> list[tuple[str, int]]:
    """(name, lines) of every function or method over MAX_FUNCTION lines."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION and not is_exempt(node.name):
            found.append((node.name, length))
    return found


def project_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """The project's own modules a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state = {}                                   # module -> "open" while on the stack, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def check(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(table rows, broken rules) for the top-level Python files under `root`."""
    files = sorted(root.glob("*.py"))
    modules = {f.stem for f in files}
    rows, broken, graph = [], [], {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=f.name)
        fig = line_figures(text.splitlines())
        graph[f.stem] = project_imports(tree, modules) - {f.stem}
        rows.append(f"{f.name:24s} {fig['lines']:5d} {100 * fig['long_share']:5.1f}% {fig['mean']:5.1f}")
        if fig["long_share"] > MAX_LONG_SHARE:
            broken.append(f"{f.name}: {100 * fig['long_share']:.1f}% of lines over {LONG} characters "
                          f"(at most {100 * MAX_LONG_SHARE:.0f}%)")
        if fig["longest"] > HARD_LIMIT:
            broken.append(f"{f.name}: a line of {fig['longest']} characters (at most {HARD_LIMIT})")
        if fig["mean"] >= MAX_MEAN:
            broken.append(f"{f.name}: {fig['mean']:.1f} characters per line on average (under {MAX_MEAN:.0f})")
        if fig["lines"] > MAX_FILE:
            broken.append(f"{f.name}: {fig['lines']} lines (at most {MAX_FILE}; split it by concept)")
        for name, length in long_functions(tree):
            broken.append(f"{f.name}: {name}() is {length} lines (at most {MAX_FUNCTION})")
    cycle = find_cycle(graph)
    if cycle:
        broken.append("import cycle: " + " -> ".join(cycle))
    return rows, broken


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true", help="print only the broken rules")
    args = p.parse_args()
    rows, broken = check()
    if not args.quiet:
        print(f"{'file':24s} {'lines':>5s} {'>100':>6s} {'mean':>5s}")
        print("\n".join(rows))
    for rule in broken:
        print(f"style: {rule}", file=sys.stderr)
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
