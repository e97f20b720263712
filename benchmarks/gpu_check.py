"""The GPU check: one command for a machine with one CUDA GPU, about 8 minutes, one Markdown report.

    python benchmarks/gpu_check.py --output output/gpu_check     # or: make gpu-check
    python benchmarks/gpu_check.py --dry-run                     # the steps, without running them

Steps, each with its own time limit (a step that runs out is reported, the next one runs):
1. the CUDA-only tests (``pytest -m cuda``): fused SDPA kernels at res3/res4 in fp32 / fp16 / bf16,
   CUDA equals CPU for every block type, AMP training;
2. the operator benchmark on CUDA (``bench_nonlocal.py``): res4 and res3, fp32 and fp16 / bf16
   autocast, shipped vs textbook;
3. the model benchmark on CUDA (``bench_model.py``): Mask R-CNN R50-FPN at 800x1333, batch 2,
   fp32 and bf16, every block type; FLOPs from ``benchmarks/flops_800x1333.json`` (fvcore on CPU);
4. 20 iterations of ``configs/mask_rcnn_R50_NL.yaml`` with ``SOLVER.AMP.ENABLED True`` on the
   generated data (no download): every loss finite.
The report (``--output``/report.md) names the GPU, torch and CUDA, and holds each step's output.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOPS_JSON = os.path.join(REPO, "benchmarks", "flops_800x1333.json")
MODEL_ROWS = "baseline,nl_paper_1,nl_paper_10,naive_paper_10,gc_r16,snl,dnl,cc,ga_0010,ga_1111"


def steps(out: str, python: str = sys.executable) -> List[Tuple[str, List[str], int]]:
    """(name, command, time limit in seconds) of every step."""
    bench = os.path.join(REPO, "benchmarks")
    train = [python, os.path.join(REPO, "train_net.py")]
    train += ["--config-file", os.path.join(REPO, "configs", "mask_rcnn_R50_NL.yaml")]
    train += ["SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "20", "SOLVER.IMS_PER_BATCH", "2"]
    train += ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.KEYPOINT_ON", "False"]
    train += ["DATASETS.TRAIN", '("nl_synthetic_train",)', "DATASETS.TEST", "()"]
    train += ["SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", os.path.join(out, "amp_train")]
    return [
        ("CUDA-only tests", [python, "-m", "pytest", "-q", "-m", "cuda", "tests"], 100),
        (
            "operator benchmark, CUDA",
            [python, os.path.join(bench, "bench_nonlocal.py"), "--device", "cuda"]
            + ["--sizes", "res4,res3", "--pairwise", "embedded_gaussian,dot_product"]
            + ["--amp", "fp32,fp16,bf16", "--markdown", "--repeat", "5"],
            110,
        ),
        (
            "model benchmark, CUDA",
            [python, os.path.join(bench, "bench_model.py"), "--device", "cuda", "--batch", "2"]
            + ["--amp", "fp32,bf16", "--rows", MODEL_ROWS, "--repeat", "5", "--markdown"]
            + ["--flops-json", FLOPS_JSON, "--baseline-every", "5"],
            200,
        ),
        ("20 AMP iterations of mask_rcnn_R50_NL.yaml", train, 70),
    ]


def _finite_losses(output_dir: str) -> Tuple[bool, str]:
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return False, f"{path} not written"
    records = [json.loads(line) for line in open(path) if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    last = max((r.get("iteration", -1) for r in records), default=-1)
    ok = bool(losses) and all(math.isfinite(v) for v in losses) and last == 19
    return ok, f"{len(losses)} logged total losses up to iteration {last}: {losses}"


def run(out: str, dry_run: bool = False) -> str:
    """Run every step (or only list them); returns the Markdown report."""
    import torch

    plan = steps(out)
    lines = ["# GPU check", ""]
    if dry_run:
        lines += ["Dry run: the steps and their time limits.", ""]
        lines += [f"{i}. {name} ({limit} s): `{' '.join(cmd)}`" for i, (name, cmd, limit) in
                  enumerate(plan, 1)]  # fmt: skip
        return "\n".join(lines) + "\n"
    gpu = torch.cuda.get_device_name(0)
    lines += [
        f"- GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("NONLOCAL_DET_DATASETS", os.path.join(out, "datasets"))
    start = time.perf_counter()
    for i, (name, cmd, limit) in enumerate(plan, 1):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit
            )
            status = "passed" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
            text = proc.stdout + ("\n" + proc.stderr[-3000:] if proc.returncode else "")
        except subprocess.TimeoutExpired as e:
            status = f"stopped at its {limit} s limit"
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        if name.startswith("20 AMP"):
            ok, detail = _finite_losses(os.path.join(out, "amp_train"))
            status += f"; losses {'all finite' if ok else 'NOT all finite'}"
            text = detail + "\n\n" + text[-3000:]
        lines += [f"## {i}. {name}: {status} ({time.perf_counter() - t0:.0f} s)", ""]
        lines += ["```", text.strip()[-12000:], "```", ""]
        print(f"{name}: {status}", flush=True)
    lines.append(f"Total: {time.perf_counter() - start:.0f} s.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="output/gpu_check", help="folder of the report and runs")
    p.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check needs a GPU (--dry-run lists its steps)")
        return 2
    out = os.path.abspath(args.output)
    report = run(out, args.dry_run)
    if args.dry_run:
        print(report)
        return 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    print(f"wrote {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
