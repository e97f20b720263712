"""The README's Python and YAML examples for other Detectron2 projects run as written."""

import contextlib
import io
import os
import re
import shutil

import pytest
from detectron2.modeling import build_model
from utils import CONFIGS, REPO

from nonlocal_det.config import get_nonlocal_cfg

SECTIONS = ("## Using it from another Detectron2 project", "## LazyConfig")


def _blocks(language):
    text = open(os.path.join(REPO, "README.md")).read()
    found = []
    for heading in SECTIONS:
        body = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        found += re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)
    return found


PYTHON = _blocks("python")


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_python_example_runs_from_the_repository_root(code, monkeypatch):
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    if "print(" in code:
        assert out.getvalue().strip() == "['backbone.bottom_up.res4.nonlocal4']"


def test_yaml_example_builds_a_nonlocal_model(tmp_path):
    (yaml_text,) = _blocks("yaml")
    shutil.copy(os.path.join(CONFIGS, "Base-RCNN-FPN.yaml"), tmp_path)  # "your" base config
    (tmp_path / "yours.yaml").write_text(yaml_text)
    cfg = get_nonlocal_cfg(
        str(tmp_path / "yours.yaml"), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    )
    model = build_model(cfg)
    names = [n for n in model.state_dict() if ".nonlocal" in n]
    assert names and all(n.startswith("backbone.bottom_up.res4.nonlocal4.") for n in names)
    assert model.roi_heads.mask_on
