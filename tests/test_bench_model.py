"""The model-level benchmark and the GPU check: a smoke run of ``bench_model.py --quick`` (tiny
model and images) and the GPU check's argument handling on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_bench_model_quick_prints_the_table_and_the_targets(tmp_path, capsys):
    flops = tmp_path / "flops.json"
    proc = _run(BENCH / "bench_model.py", "--quick", "--markdown", "--flops-json", flops)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "CPU:" in out and "torch " in out and "wall time" in out
    rows = [l for l in out.splitlines() if l.startswith("| ") or l.startswith("|---")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["row", "---", "baseline", "nl_paper_1", "naive_paper_1", "snl"], names
    baseline = next(r for r in rows if r.startswith("| baseline"))
    assert len(baseline.split("|")[4].split("/")) == 2  # the baseline ran twice (alternation)
    assert out.count("overhead") == 4  # train and inference targets of the two shipped rows
    import json

    saved = json.loads(flops.read_text())
    for counts in (saved["flops"], saved["train_flops"]):
        assert set(counts) == {"baseline", "nl_paper_1", "snl"}, counts
        assert all(counts[row] > counts["baseline"] for row in ("nl_paper_1", "snl")), counts
    assert "step FLOP share" in rows[0] and "share of the train step's FLOPs" in out
    # Saved counts are read back, not counted again (--flops-only: nothing timed either; in this
    # process, which starts no worker when nothing is left to count).
    bench_model = _bench_module("bench_model")
    assert bench_model.main(["--quick", "--flops-json", str(flops), "--flops-only"]) == 0
    again = capsys.readouterr().out
    assert f"FLOPs from {flops}" in again and "flops baseline:" not in again
    assert "nl_paper_1   forward" in again and "train step" in again


def test_bench_model_refuses_unknown_rows():
    proc = _run(BENCH / "bench_model.py", "--rows", "baseline,nl_paper_3")
    assert proc.returncode == 2 and "nl_paper_3" in proc.stderr and "nl_paper_10" in proc.stderr


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_gpu_check_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = _run(BENCH / "gpu_check.py", "--output", "unused")
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout
