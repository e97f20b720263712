"""``pip install .`` and ``pip install -e .`` into an environment that has detectron2 give an
importable ``nonlocal_det`` whose import registers the backbones and the keypoint head and does
nothing else (no dataset, no config default, no logging handler, no file, no global state)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from utils import REPO

pytestmark = pytest.mark.slow

# Runs in the new environment, from a directory outside the repository.
CHECK = r"""
import importlib.metadata, importlib.util, json, logging, os, sys, warnings

def files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)

def registries():
    from fvcore.common.registry import Registry
    out = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("detectron2") and mod is not None:
            for value in list(vars(mod).values()):
                if isinstance(value, Registry):
                    out[value._name] = sorted(value._obj_map)
    return out

def loggers():
    found = {"": logging.getLogger()}
    found.update(
        (n, l) for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)
    )
    return {n: [l.level, len(l.handlers), l.propagate, l.disabled] for n, l in found.items()}

def state():
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    return {
        "registries": registries(),
        "datasets": sorted(DatasetCatalog.list()),
        "metadata": sorted(MetadataCatalog.list()),
        "cfg": get_cfg().dump(),
        "get_cfg": id(get_cfg),
        "loggers": loggers(),
        "files": [files(d) for d in (os.getcwd(), os.path.expanduser("~"))],
        "modules": sorted(sys.modules),
        "rng": torch.random.get_rng_state().tolist(),
        "torch": [torch.get_num_threads(), str(torch.get_default_dtype())],
        "warning_filters": len(warnings.filters),
        "env": dict(os.environ),
    }

# What nonlocal_det builds on, imported first so that only the package's own effects differ.
import detectron2.config, detectron2.layers, detectron2.modeling, detectron2.data
import detectron2.modeling.roi_heads, detectron2.modeling.backbone.fpn
before = state()
import nonlocal_det
after = state()

report = {
    "file": nonlocal_det.__file__,
    "version": nonlocal_det.__version__,
    "dist_version": importlib.metadata.version("nonlocal_det"),
    "all": sorted(nonlocal_det.__all__),
    "added": {
        k: sorted(set(v) - set(before["registries"].get(k, [])))
        for k, v in after["registries"].items()
        if set(v) != set(before["registries"].get(k, []))
    },
    "removed": sorted(
        k for k, v in before["registries"].items() if set(v) - set(after["registries"][k])
    ),
    "new_modules": sorted(set(after["modules"]) - set(before["modules"])),
    "changed": sorted(
        k for k in before if k not in ("registries", "modules", "loggers") and before[k] != after[k]
    ),
    "logger_changes": sorted(
        n for n, v in after["loggers"].items()
        if before["loggers"].get(n, [logging.NOTSET, 0, True, False]) != v
    ),
    "shipped": {
        m: importlib.util.find_spec(m) is not None
        for m in ("nonlocal_det.engine.train", "nonlocal_det.tools.d2_tool",
                  "nonlocal_det.tools.export", "nonlocal_det.tools.warm_start",
                  "nonlocal_det.tools.predict", "nonlocal_det.tools.analyze",
                  "nonlocal_det.tools.visualize", "nonlocal_det.from_mmdet",
                  "nonlocal_det.data.coco_check", "nonlocal_det.engine")
    },
    # the demo project beside the library is not part of the package
    "demo": importlib.util.find_spec("nonlocal_demo") is not None,
}
print("REPORT " + json.dumps(report))
"""


def _source_copy(dst):
    """The files a fresh clone has that packaging uses (keeps build artefacts out of the repo)."""
    os.makedirs(dst)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), dst)
    shutil.copytree(
        os.path.join(REPO, "nonlocal_det"),
        os.path.join(dst, "nonlocal_det"),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


def _install(tmp_path, editable):
    src = str(tmp_path / "src")
    _source_copy(src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # This environment's packages (torch, detectron2, ...) seen from the new one, after its own:
    # its site-packages folders, including any it adds through .pth files of its own.
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parent = [sysconfig.get_paths()["purelib"]]
    parent += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    with open(os.path.join(purelib, "parent_environment.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(parent)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    target = ["-e", src] if editable else [src]
    proc = subprocess.run(
        pip + ["install", "--no-deps", "--no-build-isolation", *target],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python, src, purelib


def _check(python, tmp_path):
    work, home = tmp_path / "elsewhere", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NONLOCAL_DET_DATASETS")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [python, "-c", CHECK], cwd=str(work), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][0]
    return json.loads(line[len("REPORT ") :])


def _assert_import_only_registers(r):
    assert r["version"] == r["dist_version"] and r["version"].count(".") == 2
    assert {"NonLocalBlock", "add_nonlocal_config", "__version__"} <= set(r["all"])
    assert r["added"] == {
        "BACKBONE": [
            "build_nonlocal_backbone",
            "build_resnet_nonlocal_backbone",
            "build_resnet_nonlocal_fpn_backbone",
        ],
        "ROI_KEYPOINT_HEAD": ["NonLocalKRCNNHead"],
    }
    assert r["removed"] == []
    # Nothing else changed: datasets, metadata, get_cfg() and its defaults, files in the working
    # directory and in $HOME, the RNG, torch settings, warning filters, the environment.
    assert r["changed"] == [], r["changed"]
    assert r["logger_changes"] == []  # no handler, level or propagation set on any logger
    # Only the package's own registering modules are imported (not data, tools, export...).
    registering = ("nonlocal_det.config", "nonlocal_det.layers", "nonlocal_det.modeling")
    assert all(m == "nonlocal_det" or m.startswith(registering) for m in r["new_modules"]), r[
        "new_modules"
    ]
    # The rest of the package is there (the configs/ folder is not part of the package).
    assert all(r["shipped"].values()), r["shipped"]
    assert not r["demo"]


def test_pip_install(tmp_path):
    python, _, purelib = _install(tmp_path, editable=False)
    r = _check(python, tmp_path)
    assert r["file"].startswith(purelib + os.sep), r["file"]  # the installed copy
    _assert_import_only_registers(r)


def test_pip_install_editable(tmp_path):
    python, src, _ = _install(tmp_path, editable=True)
    r = _check(python, tmp_path)
    assert r["file"] == os.path.join(src, "nonlocal_det", "__init__.py")  # the sources themselves
    _assert_import_only_registers(r)
