"""The import graph: commands (``nonlocal_det.tools``) sit above the library and beside each other;
the library never imports a command, no command imports another (their shared helpers live in
``tools/_common.py``), and no benchmark imports a command (what they share lives in the library)."""

import ast
import glob
import os

from utils import REPO

PACKAGE = os.path.join(REPO, "nonlocal_det")


def _imports(path):
    """The ``nonlocal_det`` modules a file imports, relative imports resolved."""
    module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module[:-9]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
    return {m for m in out if m.startswith("nonlocal_det")}


def _modules(pattern):
    return sorted(glob.glob(os.path.join(PACKAGE, pattern), recursive=True))


def test_the_library_never_imports_a_command():
    library = [p for p in _modules("**/*.py") if os.sep + "tools" + os.sep not in p]
    assert len(library) > 10
    for path in library:
        bad = {m for m in _imports(path) if m.startswith("nonlocal_det.tools")}
        assert not bad, (path, bad)


def test_no_command_imports_another():
    commands = [p for p in _modules("tools/*.py") if not p.endswith(("__init__.py", "_common.py"))]
    assert len(commands) == 9
    for path in commands:
        bad = {
            m for m in _imports(path) if m.startswith("nonlocal_det.tools.") and "_common" not in m
        }
        assert not bad, (path, bad)


def test_no_benchmark_imports_a_command():
    benchmarks = sorted(glob.glob(os.path.join(REPO, "benchmarks", "**", "*.py"), recursive=True))
    assert len(benchmarks) >= 7
    for path in benchmarks:
        bad = {m for m in _imports(path) if m.startswith("nonlocal_det.tools")}
        assert not bad, (path, bad)
