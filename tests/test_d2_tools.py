"""Detectron2's generic tools on the project's configs: LazyConfig files with Detectron2's own
scripts, YAML configs through ``python -m nonlocal_det.tools.d2_tool``, and nonlocal_det's trainer
on a LazyConfig file (the demo project's ``train_net.py``; real subprocesses, as a user runs them).

Detectron2's ``tools/`` scripts are not part of the upstream pip package; the PyPI redistribution
that ``make setup`` falls back to installs them as the module ``tools``. Tests that run them are
skipped when that module is absent (with Detectron2 installed from source, run them from its
checkout the same way: ``python -m nonlocal_det.tools.d2_tool ~/detectron2/tools/analyze_model.py``).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from utils import CONFIGS, DEMO_DIR, DEMO_LAZY, DEMO_YAML, REPO, SMALL_DEMO_DATA, shared_datasets_dir

LAZY_DEMO = DEMO_LAZY
YAML_DEMO = DEMO_YAML
# Few detections per image: an untrained model's COCO evaluation is then quick.
FAST_EVAL = ["model.roi_heads.box_predictor.test_topk_per_image=5"]

needs_d2_tools = pytest.mark.skipif(
    importlib.util.find_spec("tools") is None
    or importlib.util.find_spec("tools.analyze_model") is None,
    reason="Detectron2's tools/ scripts are not importable as the module `tools` (only the PyPI "
    "redistribution installs them; with a source checkout pass the script's path instead)",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # this checkout's package and the demo project (its LazyConfig imports nonlocal_demo)
    path = os.pathsep.join(p for p in (REPO, DEMO_DIR, os.environ.get("PYTHONPATH")) if p)
    return dict(
        os.environ,
        NONLOCAL_DET_DATASETS=shared_datasets_dir(tmp_path_factory),
        OMP_NUM_THREADS="1",
        PYTHONPATH=path,  # whatever the working directory
    )


def run(args, env, cwd=REPO, ok=True):
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, log[-4000:]
    return log


@pytest.fixture(scope="module")
def lazy_trained(env, tmp_path_factory):
    """Two iterations of the LazyConfig demo with the demo project's ``train_net.py``."""
    out = tmp_path_factory.mktemp("lazy_train")
    log = run(
        [
            os.path.join("projects", "demo", "train_net.py"),
            "--config-file",
            LAZY_DEMO,
            "train.max_iter=2",
            "train.log_period=1",
            f"train.output_dir={out}",
            *FAST_EVAL,
        ],
        env,
    )
    return out, log


@pytest.mark.slow
def test_train_net_trains_a_lazy_config_checkpoints_and_evaluates(lazy_trained):
    out, log = lazy_trained
    assert "iter: 1" in log
    assert "build_with_blocks" in (out / "config.yaml").read_text()  # add_blocks' target
    for task in ("bbox", "segm", "keypoints"):
        assert f"Evaluation results for {task}" in log, task
    for name in ("model_final.pth", "last_checkpoint", "config.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in open(out / "metrics.json")]
    assert {"loss_keypoint", "loss_mask", "loss_cls"} <= set(records[0])


@pytest.mark.slow
@needs_d2_tools
def test_detectron2_lazyconfig_train_net_evaluates_a_lazy_config(lazy_trained, env):
    """Detectron2's own tools/lazyconfig_train_net.py, unmodified, on a configs/lazy file."""
    out, _ = lazy_trained
    log = run(
        [
            "-m",
            "tools.lazyconfig_train_net",
            "--config-file",
            LAZY_DEMO,
            "--eval-only",
            f"train.init_checkpoint={out / 'model_final.pth'}",
            f"train.output_dir={out / 'eval'}",
            *FAST_EVAL,
        ],
        env,
    )
    for task in ("bbox", "segm", "keypoints"):
        assert f"copypaste: Task: {task}" in log, task


@pytest.mark.slow
@needs_d2_tools
def test_detectron2_analyze_model_on_a_lazy_config(env):
    log = run(
        ["-m", "tools.analyze_model", "--config-file", LAZY_DEMO, "--tasks", "flop"]
        + ["--num-inputs", "1"],
        env,
    )
    assert "Total GFlops" in log
    assert "roi_heads.keypoint_head.nonlocal2" in log  # the table shows modules 3 levels deep


@pytest.mark.slow
@needs_d2_tools
def test_detectron2_tools_on_yaml_configs_through_the_entry_point(env, tmp_path):
    yaml_cfg = os.path.join(CONFIGS, "mask_rcnn_R50_NL.yaml")
    # Unwrapped, Detectron2's tools cannot read the project's YAML (they call a bare get_cfg) ...
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.NONLOCAL"):
        get_cfg().merge_from_file(yaml_cfg)
    # ... through the entry point it can (module name), from any directory ...
    log = run(
        ["-m", "nonlocal_det.tools.d2_tool", "tools.analyze_model", "--tasks", "parameter"]
        + ["--config-file", yaml_cfg],
        env,
        cwd=str(tmp_path),
    )
    assert "backbone.bottom_up.res4.nonlocal4 " in log and "| model " in log
    # ... and given the script's path, through the demo project's tools.py with its generated
    # dataset registered.
    script = importlib.util.find_spec("tools.visualize_data").origin
    vis = tmp_path / "vis"
    run(
        [
            os.path.join(DEMO_DIR, "command.py"),
            "d2_tool",
            script,
            "--source",
            "annotation",
            "--config-file",
            YAML_DEMO,
        ]
        + ["--output-dir", str(vis), "DATASETS.TRAIN", '("nl_synthetic_val",)'],
        env,
    )
    assert len(list(vis.glob("*.png"))) == SMALL_DEMO_DATA["num_val"]  # one per image


def test_entry_point_patches_get_cfg_only_while_the_tool_runs(tmp_path, monkeypatch, capsys):
    import detectron2.config
    import detectron2.config.config

    from nonlocal_det.tools import d2_tool

    # What the patch relies on: Detectron2 defines get_cfg in detectron2.config.config and its
    # tools import it from detectron2.config (one function under both names).
    assert detectron2.config.get_cfg is detectron2.config.config.get_cfg
    config = os.path.join(CONFIGS, "mask_rcnn_R50_NL.yaml")
    script = tmp_path / "tool.py"
    script.write_text(
        "import sys\n"
        "from detectron2.config import get_cfg\n"
        "cfg = get_cfg()\n"
        "cfg.merge_from_file(sys.argv[1])\n"
        "print('placement', cfg.MODEL.NONLOCAL.PLACEMENT, cfg.MODEL.DEVICE, sys.argv[1:])\n"
    )
    original = detectron2.config.get_cfg
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    d2_tool.main([str(script), config])
    assert f"placement paper_1 cpu ['{config}']" in capsys.readouterr().out
    assert detectron2.config.get_cfg is original
    assert detectron2.config.config.get_cfg is original
    assert "NONLOCAL" not in original().MODEL
    with pytest.raises(FileNotFoundError, match="no such file"):
        d2_tool.main([str(tmp_path / "missing.py")])
