"""docs/reliability.md's fault table stays true: every row names, in its last column, at least one
test (``tests/test_x.py::test_name``) that exists and injects that fault; every fault the table
promises has a row."""

import ast
import os
import re

from utils import REPO

PAGE = os.path.join(REPO, "docs", "reliability.md")
# The faults the table must cover, each found (case-insensitively) in the first cell of a row.
FAULTS = [
    "kill -9 during a save",
    "SIGTERM",
    "SIGUSR1",
    "Ctrl-C",
    "second signal during the save",
    "truncated newest checkpoint",
    "disk full",
    "corrupt",
    "empty",
    "mmdetection checkpoint",
    "validation-only COCO",
    "never joins",
    "non-finite loss",
    "fp16",
    "two runs in one folder",
    "resume with a changed model",
]


def _rows():
    text = open(PAGE).read()
    lines = text.split("## Fault table", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start + 2 : end]  # the first table after the heading, without its header
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


def _test_names(path):
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_fault_has_a_row():
    firsts = [row[0].lower() for row in _rows()]
    missing = [f for f in FAULTS if not any(f.lower() in cell for cell in firsts)]
    assert not missing, f"docs/reliability.md's fault table has no row for {missing}"


def test_every_row_names_tests_that_exist():
    rows = _rows()
    assert len(rows) >= len(FAULTS)
    for row in rows:
        refs = re.findall(r"(tests/test_\w+\.py)::(\w+)", row[-1])
        assert refs, f"row {row[0]!r} names no test (tests/test_x.py::test_name)"
        for path, name in refs:
            assert os.path.isfile(os.path.join(REPO, path)), f"row {row[0]!r}: {path} missing"
            assert name in _test_names(path), f"row {row[0]!r}: {path} has no {name}"
