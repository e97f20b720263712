"""README.md and docs/*.md stay true: every Python snippet runs as written, the YAML snippet builds
a model, and every shell command parses as its program would parse it, with its config and
overrides loading and passing the model checks (training on COCO itself is not run here)."""

import argparse
import contextlib
import glob
import importlib
import io
import os
import re
import shlex
import shutil

import pytest
from detectron2.config import LazyConfig
from detectron2.modeling import build_model
from utils import CONFIGS, REPO

from nonlocal_det.config import get_nonlocal_cfg
from nonlocal_det.engine.launch import default_argument_parser  # train_net.py's
from nonlocal_det.modeling import check_model_config

D2_CHECKOUT = "~/detectron2/"  # where the docs put a Detectron2 source checkout
PAGES = ["README.md", "projects/demo/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
)


def _blocks(language):
    found = []
    for page in PAGES:
        text = open(os.path.join(REPO, page)).read()
        for i, code in enumerate(re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)):
            found.append(pytest.param(code, id=f"{page}:{language}{i}"))
    return found


def _commands():
    """(page, command words) of every command line of the bash blocks; ``VAR=value`` lines set
    variables the later lines use."""
    out = []
    for param in _blocks("bash"):
        (code,) = param.values
        vars_ = {}
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            m = re.fullmatch(r"([A-Z0-9_]+)=(\S+)", line)
            if m:
                vars_[m[1]] = m[2]
                continue
            for name, value in vars_.items():
                line = line.replace(f"${name}", value)
            out.append(pytest.param(shlex.split(line), id=f"{param.id}:{line[:60]}"))
    return out


@pytest.mark.parametrize("code", _blocks("python"))
def test_python_snippets_run_from_the_repository_root(code, monkeypatch):
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "snippet", "exec"), {"__name__": "__snippet__"})
    if "nonlocal4" in code:
        assert out.getvalue().strip() == "['backbone.bottom_up.res4.nonlocal4']"


@pytest.mark.parametrize("code", _blocks("yaml"))
def test_yaml_snippets_build_a_model_with_blocks(code, tmp_path):
    for base in glob.glob(os.path.join(CONFIGS, "Base-*.yaml")):  # "your" base configs
        shutil.copy(base, tmp_path)
    (tmp_path / "yours.yaml").write_text(code)
    cfg = get_nonlocal_cfg(
        str(tmp_path / "yours.yaml"), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    )
    model = build_model(cfg)
    names = [n for n in model.state_dict() if ".nonlocal" in n]
    assert names and all(n.startswith("backbone.bottom_up.res4.nonlocal4.") for n in names)
    if "Base-RCNN-FPN.yaml" in code:  # the README's: Mask R-CNN
        assert model.roi_heads.mask_on


def _check_config(args):
    """A project YAML config with its overrides loads and passes the model checks; a LazyConfig
    ``.py`` file loads with its ``key=value`` overrides."""
    if args.config_file.endswith((".yaml", ".yml")) and args.config_file.startswith(
        ("configs/", "projects/demo/configs/")
    ):
        cfg = get_nonlocal_cfg(args.config_file, args.opts)
        check_model_config(cfg)
    elif args.config_file.endswith(".py"):
        LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)


@pytest.mark.parametrize("words", _commands())
def test_commands_parse_and_their_configs_load(words, monkeypatch):
    monkeypatch.chdir(REPO)
    program, args = words[0], words[1:]
    if program == "make":
        targets = re.findall(r"^([a-z-]+):", open(os.path.join(REPO, "Makefile")).read(), re.M)
        assert set(args) <= set(targets), (args, targets)
        return
    if program == "sbatch":  # scripts/slurm_train.sh runs train_net.py with the arguments after it
        script = next(i for i, a in enumerate(args) if a.endswith(".sh"))
        assert os.path.isfile(os.path.join(REPO, args[script])), args[script]
        _check_config(default_argument_parser().parse_args(args[script + 1 :]))
        return
    if program == "pip":
        assert args[:1] == ["install"]  # tests/test_packaging.py runs both forms
        return
    assert program == ".venv/bin/python", words
    if args[0] in ("train_net.py", "projects/demo/train_net.py"):
        parsed = default_argument_parser().parse_args(args[1:])
        # the demo's configs need the demo's script (its datasets and keys), and only its configs
        demo = parsed.config_file.startswith("projects/demo/")
        assert demo == (args[0] != "train_net.py"), words
        _check_config(parsed)
    elif (args[0] == "-m" and args[1].startswith("nonlocal_det.tools.")) or (
        args[0] == "projects/demo/command.py"
    ):
        name = args[1]
        if args[0] == "projects/demo/command.py":  # COMMAND: nonlocal_det's, or generate_data
            name = ("nonlocal_demo." if name == "generate_data" else "nonlocal_det.tools.") + name
        command = importlib.import_module(name)
        parsed = command.parser().parse_args(args[2:])
        config = getattr(parsed, "config_file", None) or ""
        assert config.startswith("projects/demo/") <= (args[0] == "projects/demo/command.py"), words
        if hasattr(parsed, "config_file"):
            _check_config(parsed)
        if hasattr(parsed, "tool_args"):  # d2_tool: a Detectron2 script and its --config-file
            assert parsed.tool.startswith((D2_CHECKOUT, "tools.")), parsed.tool
            tool_args = parsed.tool_args
            config = tool_args[tool_args.index("--config-file") + 1]
            opts = tool_args[tool_args.index("--opts") + 1 :] if "--opts" in tool_args else []
            _check_config(argparse.Namespace(config_file=config, opts=opts))
    elif args[0].startswith("benchmarks/") or args[0] in (
        "projects/demo/context_probe.py", "projects/demo/profile_demo.py"
    ):
        name = os.path.splitext(os.path.basename(args[0]))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, args[0]))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.parse_args(args[1:])
    elif args[0].startswith(D2_CHECKOUT):  # Detectron2's own scripts, on a LazyConfig of ours
        assert args[args.index("--config-file") + 1].startswith("configs/lazy/")
    else:
        pytest.fail(f"a command this test does not know how to check: {words}")


def test_coco_key_table_lists_what_the_code_allows():
    """docs/coco.md's MODEL.NONLOCAL table: the allowed values of each choice key are the code's."""
    from nonlocal_det.layers.nonlocal_block import NORMS, PAIRWISE_FUNCTIONS, THETA_PHI_INITS
    from nonlocal_det.modeling.insertion import PLACEMENTS

    rows = {}
    for line in open(os.path.join(REPO, "docs", "coco.md")):
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| `") and len(cells) >= 4:
            values = re.findall(r"`([^`]*)`", cells[2])
            rows[cells[0].strip("| `")] = {"" if v == '""' else v for v in values}
    expected = {
        "PAIRWISE": PAIRWISE_FUNCTIONS,
        "THETA_PHI_INIT": THETA_PHI_INITS,
        "NORM": NORMS,
        "PLACEMENT": PLACEMENTS,
    }
    for key, allowed in expected.items():
        assert rows[key] == set(allowed), (key, rows[key] ^ set(allowed))
