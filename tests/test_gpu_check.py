"""The GPU check's offline parts, on the CPU: the install of the carried wheels that its dry run
lists, the time limits of one device call, and that the carried wheels plus the GPU machine's own
packages cover every module the check's steps import."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import gpu_check
finally:
    sys.path.pop(0)


def test_dry_run_lists_the_offline_install_and_the_steps(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = ["sal_detectron2-0.7.2-py3-none-any.whl", "fvcore-0.1.5-py3-none-any.whl"]
    for name in names:
        (wheels / name).write_bytes(b"")
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--wheels", str(wheels), "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    install = next(l for l in lines if l.startswith("0. offline install"))
    for flag in ("-m pip", "--no-index", "--no-deps", f"--target {out / 'site'}"):
        assert flag in install, install
    assert all(str(wheels / name) in install for name in names), install
    steps = [l for l in lines if re.match(r"[1-9]\. ", l)]
    assert len(steps) == 4 and all(re.search(r"\(\d+ s\): `", l) for l in steps), steps
    # Only the test files with CUDA tests are collected (the others may import mmdetection).
    assert "-m cuda" in steps[0] and "tests/test_cuda.py" in steps[0]
    assert "test_convert_mmdet" not in steps[0] and "test_zoo_models" not in steps[0]
    assert "MODEL.WEIGHTS ''" in steps[3] and "MODEL.DEVICE" not in steps[3]
    assert "SOLVER.AMP.ENABLED True" in steps[3] and "SOLVER.MAX_ITER 20" in steps[3]
    # The CPU rehearsal: the same steps, small.
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--output", str(out)]) == 0
    cpu = capsys.readouterr().out
    assert "0. offline install" not in cpu and "2 AMP iterations" in cpu
    assert "MODEL.DEVICE cpu" in cpu and cpu.count("--quick") == 2


def test_wheels_folder_without_wheels_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--wheels", str(tmp_path), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--wheels {tmp_path}: no *.whl there" in err and "scripts/gpu_wheels.sh" in err


def test_install_and_steps_fit_one_device_call_of_eight_minutes():
    limits = [limit for _, _, limit in gpu_check.steps("out")]
    assert all(limit >= 60 for limit in limits), limits
    assert gpu_check.INSTALL_LIMIT_S + sum(limits) <= gpu_check.TOTAL_LIMIT_S == 8 * 60
    # The CPU rehearsal: the same steps, with more time each.
    cpu = [limit for _, _, limit in gpu_check.steps("out", device="cpu")]
    assert cpu == [gpu_check.CPU_LIMIT_FACTOR * limit for limit in limits]


def test_carried_ranges_are_the_set_up_ones():
    """The wheels carried to the GPU machine are of the versions `make setup` installs."""
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    d2_deps = re.search(r"^D2_DEPS=\((.*?)\)$", setup, re.S | re.M).group(1)
    setup_specs = {gpu_check._dist_name(s): s for s in re.findall(r'"([^"]+)"|(\S+)', d2_deps)
                   for s in s if s}  # fmt: skip
    for spec in gpu_check.GPU_WHEELS:
        name = gpu_check._dist_name(spec)
        if name in setup_specs and setup_specs[name] != name:  # a range in the set-up
            assert setup_specs[name] == spec, (spec, setup_specs[name])
    assert gpu_check.main(["--wheel-specs"]) == 0


@pytest.mark.slow
def test_carried_wheels_cover_every_import_of_the_steps():
    """One Python start imports the steps' modules (train_net.py, the benchmarks, the CUDA test
    files and what they import): each third-party distribution is on the GPU machine's list or
    carried, and each carried one is imported (nothing carried in vain)."""
    probe = gpu_check.probe_imports(sys.executable)
    assert probe["missing"] == {}, probe["missing"]
    assert gpu_check.uncovered_distributions(probe["found"]) == [], probe["found"]
    imported = {gpu_check._dist_name(d) for dists in probe["found"].values() for d in dists}
    carried = {gpu_check._dist_name(s) for s in gpu_check.GPU_WHEELS} | {gpu_check.DETECTRON2_DIST}
    assert carried - imported == set(), sorted(imported)
    assert {"torch", "torchvision", "numpy"} <= imported
    # An import that is neither on the machine nor carried is named.
    found = dict(probe["found"], mmdet=["mmdet"])
    assert gpu_check.uncovered_distributions(found) == ["mmdet"]


def test_wheel_folder_is_ignored_by_git():
    proc = subprocess.run(
        ["git", "check-ignore", "-q", ".gpu_wheels/x-1.0-py3-none-any.whl"], cwd=REPO
    )
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, "scripts/gpu_wheels.sh's folder .gpu_wheels/ must stay untracked"
