"""Smoke test of ``benchmarks/bench_nonlocal.py --quick`` (tiny sizes, a few seconds)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nonlocal.py"
PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")


@pytest.mark.slow
def test_bench_quick_prints_table():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--markdown", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "CPU:" in out and "torch " in out  # machine header
    assert "shipped ms" in out and "naive ms" in out and "naive MiB" in out

    md_rows = [line for line in out.splitlines() if line.startswith("| cpu ")]
    text_rows = [line for line in out.splitlines() if line.startswith("cpu ")]
    for rows in (md_rows, text_rows):
        assert len(rows) == 2 * len(PAIRWISE), rows  # subsample on and off
        for pw in PAIRWISE:
            assert sum(f" {pw} " in row for row in rows) == 2, pw
    for row in md_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        float(cells[5]), float(cells[6])  # shipped ms, naive ms: numbers, not errors

    # both ops compute the same function on the same weights
    check = [line for line in out.splitlines() if line.startswith("check:")]
    assert check and float(check[0].rsplit(" ", 1)[1]) < 1e-4, check
    # the target lines are printed (SKIP: the quick sizes do not include res3)
    assert out.count("SKIP:") == 6
