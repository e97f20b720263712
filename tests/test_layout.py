"""The import graph: commands (``nonlocal_det.tools``) sit above the library and beside each other;
the library never imports a command, no command imports another (their shared helpers live in
``tools/_common.py``), and no benchmark imports a command (what they share lives in the library)."""

import ast
import glob
import os
import subprocess
import sys

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
    assert len(commands) >= 7
    for path in commands:
        bad = {
            m for m in _imports(path) if m.startswith("nonlocal_det.tools.") and "_common" not in m
        }
        assert not bad, (path, bad)


def test_no_benchmark_imports_a_command():
    benchmarks = sorted(glob.glob(os.path.join(REPO, "benchmarks", "**", "*.py"), recursive=True))
    assert len(benchmarks) >= 5
    for path in benchmarks:
        bad = {m for m in _imports(path) if m.startswith("nonlocal_det.tools")}
        assert not bad, (path, bad)


# In a fresh interpreter without OpenCV (its import fails as when it is not installed) and without
# the demo project on the path: every library module imports, and none imported a demo module.
NO_OPENCV = r"""
import importlib, pkgutil, sys

class NoOpenCV:
    def find_spec(self, name, path=None, target=None):
        if name == "cv2" or name.startswith("cv2."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoOpenCV())
import nonlocal_det
names = [m.name for m in pkgutil.walk_packages(nonlocal_det.__path__, "nonlocal_det.")]
library = [n for n in names if not n.startswith("nonlocal_det.tools")]
for name in library:
    importlib.import_module(name)
print(len(library), sorted(m for m in sys.modules if m.startswith(("cv2", "nonlocal_demo"))))
"""


def test_every_library_module_imports_without_opencv_and_the_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_OPENCV], cwd=str(tmp_path), env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, imported = proc.stdout.split(" ", 1)
    library = [p for p in _modules("**/*.py") if os.sep + "tools" + os.sep not in p]
    assert int(count) == len(library) - 1  # all but nonlocal_det/__init__.py
    assert imported.strip() == "[]"


def test_no_library_module_names_the_demo():
    """The library knows nothing of the demo project (its datasets, keys or modules)."""
    for path in [p for p in _modules("**/*.py") if os.sep + "tools" + os.sep not in p]:
        text = open(path).read()
        for needle in ("nonlocal_demo", "nl_synthetic", "HeadSampledROIHeads", "GatherROIAlign"):
            assert needle not in text, (path, needle)
