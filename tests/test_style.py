"""tools/check_style.py, the line rules `.ci/run` holds the repository to: each rule fails on a file that
breaks it and passes on one that keeps it."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_style  # noqa: E402


def broken_rules(tmp_path, files: dict) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return check_style.check(tmp_path)[1]


def short_lines(n: int) -> str:
    return "".join(f"x{i} = {i}\n" for i in range(n))


def test_a_plain_file_passes(tmp_path):
    assert broken_rules(tmp_path, {"a.py": short_lines(100)}) == []


def test_long_lines_over_five_percent_fail(tmp_path):
    long = "y = '" + "a" * 100 + "'\n"
    assert broken_rules(tmp_path, {"a.py": short_lines(96) + long * 4}) == []     # 4%: allowed
    rules = broken_rules(tmp_path, {"a.py": short_lines(94) + long * 6})          # 6%
    assert any("over 100 characters" in r for r in rules)


def test_a_line_over_the_hard_limit_fails(tmp_path):
    rules = broken_rules(tmp_path, {"a.py": short_lines(200) + "y = '" + "a" * 120 + "'\n"})
    assert any("a line of 126 characters" in r for r in rules)


def test_a_dense_file_fails_on_its_mean(tmp_path):
    dense = "".join(f"value_{i} = {i} + {i} * {i} - {i} // 3 + {i} % 7 + {i} ** 2 - 1\n" for i in range(50))
    rules = broken_rules(tmp_path, {"a.py": dense})
    assert any("characters per line on average" in r for r in rules)


def test_a_long_function_fails_and_main_is_exempt(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    rules = broken_rules(tmp_path, {"a.py": "def work():\n" + body + "\n\ndef main():\n" + body})
    assert rules == ["a.py: work() is 71 lines (at most 60)"]


def test_a_long_file_fails(tmp_path):
    rules = broken_rules(tmp_path, {"a.py": short_lines(651)})
    assert rules == ["a.py: 651 lines (at most 650; split it by concept)"]


def test_an_import_cycle_fails_even_inside_a_function(tmp_path):
    files = {"a.py": "import b\n", "b.py": "def f():\n    from c import g\n", "c.py": "from a import x\n"}
    rules = broken_rules(tmp_path, files)
    assert rules == ["import cycle: a -> b -> c -> a"]
    files["c.py"] = "import os\n"
    assert broken_rules(tmp_path, files) == []
