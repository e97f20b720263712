"""The GPU check: one command for a machine with one CUDA GPU, at most 8 minutes, one Markdown report.

    python benchmarks/gpu_check.py --output output/gpu_check     # or: make gpu-check
    python benchmarks/gpu_check.py --dry-run                     # the steps, without running them
    # a machine without network (the GPU its own Python and torch, the rest carried as wheels made
    # by scripts/gpu_wheels.sh): installs them with pip --no-index first
    python3 benchmarks/gpu_check.py --wheels .gpu_wheels --output output/gpu_check
    # the same steps, small, on the CPU: a rehearsal of the offline install and of every import
    python3 benchmarks/gpu_check.py --wheels .gpu_wheels --device cpu --output /tmp/rehearsal

Steps, each with its own time limit (a step that runs out is reported, the next one runs):
0. with ``--wheels``: ``pip install --no-index --no-deps --target OUTPUT/site`` of the carried
   wheels, then one Python start that imports what the steps import and names what is missing;
1. the CUDA-only tests (``pytest -m cuda`` over the test files that have such tests): fused SDPA
   kernels at res3/res4 in fp32 / fp16 / bf16, CUDA equals CPU for every block type, AMP training,
   every block under fp16 autocast;
2. the operator benchmark on CUDA (``bench_nonlocal.py``): res4 and res3, fp32 and fp16 / bf16
   autocast, shipped vs textbook;
3. the model benchmark on CUDA (``bench_model.py``): Mask R-CNN R50-FPN at 800x1333, batch 2,
   fp32 and bf16, every block type; FLOPs from ``benchmarks/flops_800x1333.json`` (fvcore on CPU);
4. 20 iterations of ``configs/mask_rcnn_R50_NL.yaml`` with ``SOLVER.AMP.ENABLED True`` on the
   generated data (no download): every loss finite.
The report (``--output``/report.md, rewritten after each step) names the GPU, torch and CUDA, and
holds each step's output.
"""

import argparse
import glob
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOPS_JSON = os.path.join(REPO, "benchmarks", "flops_800x1333.json")
MODEL_ROWS = "baseline,nl_paper_1,nl_paper_10,naive_paper_10,gc_r16,snl,dnl,cc,ga_0010,ga_1111"
# The whole check, the offline install included, fits one device call of 8 minutes.
TOTAL_LIMIT_S = 480
# The rehearsal on a CPU (--device cpu) runs small steps, each a Python start that imports torch and
# Detectron2 (seconds on a loaded 2-core machine), with limits this many times the GPU's.
CPU_LIMIT_FACTOR = 2
# The offline install (about 10 s) and the import check (one Python start: about 10 s).
INSTALL_LIMIT_S = 50

# What the check imports that the lent GPU machine's image lacks: scripts/gpu_wheels.sh downloads
# these as wheels for CPython 3.12 on Linux x86-64 (the ranges of scripts/setup_env.sh), builds a
# pure-Python wheel of those that PyPI has as source only (fvcore, antlr4-python3-runtime), and
# adds the Detectron2 wheel of scripts/detectron2_wheel.sh (distribution sal-detectron2). Not
# hydra-core: Detectron2 imports it only for LazyConfig overrides and ``locate``, which the check's
# YAML training does not use.
GPU_WHEELS = (
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "yacs>=0.1.8",
    "termcolor>=1.1",
    "pycocotools>=2.0.2",
    "omegaconf>=2.1,<2.4",
    "antlr4-python3-runtime==4.9.*",
)
DETECTRON2_DIST = "sal-detectron2"
# What the check imports that the GPU machine's image has (its Python 3.12 with torch 2.11 /
# torchvision 0.26 for CUDA 13; the device tool's list of its packages): never carried, so that
# the machine's own builds are the ones used.
MACHINE_HAS = (
    "torch", "torchvision", "triton", "numpy", "scipy", "pillow", "opencv-python-headless",
    "matplotlib", "pyyaml", "tabulate", "tqdm", "cloudpickle", "portalocker", "tensorboard",
    "packaging", "pytest", "pytest-xdist", "pluggy", "iniconfig", "filelock", "fsspec", "jinja2",
    "markupsafe", "networkx", "sympy", "mpmath", "typing-extensions", "setuptools", "protobuf",
    "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six",
    "execnet", "pygments", "absl-py", "grpcio", "markdown", "werkzeug", "psutil",
)  # fmt: skip
# The modules the steps' processes import at start (tests/, benchmarks/, projects/demo/ on the path).
STEP_MODULES = ("train_net", "nonlocal_demo", "bench_nonlocal", "bench_model", "conftest")


def _dist_name(spec: str) -> str:
    """The normalized distribution name of a requirement: ``hydra-core>=1.1`` -> ``hydra-core``."""
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def cuda_test_files() -> List[str]:
    """The test files that hold tests marked ``cuda`` (the others are not even collected: they
    may import what the GPU machine lacks, mmdetection for one)."""
    files = sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py")))
    return [f for f in files if re.search(r"mark\.cuda\b", open(f, encoding="utf-8").read())]


def install_commands(wheels: str, site: str, python: str = sys.executable) -> List[List[str]]:
    """The offline install: the carried wheels into ``site`` beside the machine's own packages."""
    whl = sorted(glob.glob(os.path.join(wheels, "*.whl"))) or [os.path.join(wheels, "*.whl")]
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-index"]
    return [pip + ["--no-deps", "--upgrade", "--target", site] + whl]


def steps(out: str, python: str = sys.executable, device: str = "cuda") -> List[Tuple[str, List[str], int]]:
    """(name, command, time limit in seconds) of every step; ``device="cpu"``: the same steps,
    small, on the CPU (a rehearsal: every import, the data generation, two training iterations)."""
    bench = os.path.join(REPO, "benchmarks")
    cpu = device == "cpu"
    iters = 2 if cpu else 20
    train = [python, os.path.join(REPO, "projects", "demo", "train_net.py")]  # the demo's data
    train += ["--config-file", os.path.join(REPO, "configs", "mask_rcnn_R50_NL.yaml")]
    train += ["SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", "2"]
    train += ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.KEYPOINT_ON", "False"]
    train += ["DATASETS.TRAIN", '("nl_synthetic_train",)', "DATASETS.TEST", "()"]
    train += ["SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", os.path.join(out, "amp_train")]
    if cpu:
        train += ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "320"]
    op = [python, os.path.join(bench, "bench_nonlocal.py"), "--device", device, "--markdown"]
    if cpu:
        op += ["--quick", "--amp", "fp32,bf16"]
    else:
        op += ["--sizes", "res4,res3", "--pairwise", "embedded_gaussian,dot_product"]
        op += ["--amp", "fp32,fp16,bf16", "--repeat", "5"]
    model = [python, os.path.join(bench, "bench_model.py"), "--device", device, "--markdown"]
    if cpu:
        model += ["--quick", "--no-flops", "--amp", "fp32", "--baseline-every", "10"]
    else:
        model += ["--batch", "2", "--amp", "fp32,bf16", "--rows", MODEL_ROWS, "--repeat", "5"]
        model += ["--flops-json", FLOPS_JSON, "--baseline-every", "5"]
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda"]
    tests += [os.path.relpath(f, REPO) for f in cuda_test_files()]
    factor = CPU_LIMIT_FACTOR if cpu else 1
    return [
        ("CUDA-only tests", tests, 90 * factor),
        (f"operator benchmark, {device.upper()}", op, 100 * factor),
        (f"model benchmark, {device.upper()}", model, 170 * factor),
        (f"{iters} AMP iterations of mask_rcnn_R50_NL.yaml", train, 70 * factor),
    ]


def _finite_losses(output_dir: str, iters: int) -> Tuple[bool, str]:
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return False, f"{path} not written"
    records = [json.loads(line) for line in open(path) if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    last = max((r.get("iteration", -1) for r in records), default=-1)
    ok = bool(losses) and all(math.isfinite(v) for v in losses) and last == iters - 1
    return ok, f"{len(losses)} logged total losses up to iteration {last}: {losses}"


# Imports the steps' modules in one process and prints, as JSON, each third-party top-level module
# with its distributions, and the modules that failed to import with the error.
_IMPORT_PROBE = r"""
import importlib, importlib.metadata, json, sys
found, missing = {}, {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or what a module raises at import
        missing[name] = f"{type(e).__name__}: {e}"
dists = importlib.metadata.packages_distributions()
for mod in sorted({m.split(".")[0] for m in list(sys.modules)}):
    if mod in sys.stdlib_module_names or mod.startswith("_"):
        continue
    m = sys.modules.get(mod)
    if m is None or getattr(m, "__file__", None) is None:
        continue
    found[mod] = dists.get(mod, [])
print(json.dumps({"found": found, "missing": missing}))
"""


def probe_imports(python: str = sys.executable, env: Optional[Dict[str, str]] = None) -> dict:
    """Import the steps' modules in one ``python`` process: ``{"found": {module: [distribution,
    ...]}, "missing": {module: error}}`` (modules of this repository map to no distribution)."""
    env = dict(env or os.environ)
    paths = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "benchmarks")]
    paths.append(os.path.join(REPO, "projects", "demo"))  # nonlocal_demo: the AMP step's data
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths + [env.get("PYTHONPATH")]))
    modules = list(STEP_MODULES) + [os.path.basename(f)[:-3] for f in cuda_test_files()]
    proc = subprocess.run(
        [python, "-c", _IMPORT_PROBE, *modules], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"found": {}, "missing": {"(the import check)": proc.stderr.strip()[-2000:]}}
    return json.loads(proc.stdout)


def uncovered_distributions(found: Dict[str, List[str]]) -> List[str]:
    """The distributions of ``found`` (``probe_imports``) that are neither on the GPU machine nor
    among the carried wheels."""
    covered = set(MACHINE_HAS) | {_dist_name(s) for s in GPU_WHEELS} | {DETECTRON2_DIST}
    dists = {_dist_name(d) for names in found.values() for d in names}
    dists -= {"nonlocal-det"}  # this repository (PYTHONPATH or an editable install)
    return sorted(dists - covered)


def _plan_lines(out: str, wheels: Optional[str], device: str) -> List[str]:
    lines = []
    if wheels:
        for cmd in install_commands(wheels, os.path.join(out, "site")):
            lines.append(f"0. offline install ({INSTALL_LIMIT_S} s with the import check): `{shlex.join(cmd)}`")
    for i, (name, cmd, limit) in enumerate(steps(out, device=device), 1):
        lines.append(f"{i}. {name} ({limit} s): `{shlex.join(cmd)}`")
    return lines


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


def _run_step(cmd: List[str], env: Dict[str, str], limit: float) -> Tuple[str, str]:
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        status = "passed" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
        return status, proc.stdout + ("\n" + proc.stderr[-3000:] if proc.returncode else "")
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"stopped at its {limit:.0f} s limit", text


def run(out: str, dry_run: bool = False, wheels: Optional[str] = None, device: str = "cuda") -> str:
    """Run every step (or only list them); returns the Markdown report, also written to
    ``out``/report.md after each step (a call cut short keeps the steps done)."""
    lines = ["# GPU check" if device == "cuda" else "# GPU check, rehearsed on the CPU", ""]
    if dry_run:
        lines += ["Dry run: the steps and their time limits.", ""]
        return "\n".join(lines + _plan_lines(out, wheels, device)) + "\n"
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "report.md")

    def flush():
        with open(report, "w") as f:
            f.write("\n".join(lines) + "\n")

    start = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("NONLOCAL_DET_DATASETS", os.path.join(out, "datasets"))
    env["PYTHONUNBUFFERED"] = "1"
    if wheels:
        site = os.path.join(out, "site")
        t0 = time.perf_counter()
        status, text = "passed", ""
        for cmd in install_commands(wheels, site):
            status, text = _run_step(cmd, env, INSTALL_LIMIT_S)
            if status != "passed":
                break
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
        probe = probe_imports(env=env)
        missing = [f"{m}: {e}" for m, e in probe["missing"].items()]
        uncovered = uncovered_distributions(probe["found"])
        text += "\n".join(["imports of the steps: " + ("all found" if not missing else "MISSING")]
                          + missing + [f"imported, neither on the machine's list nor carried: "
                                       f"{', '.join(uncovered) or 'none'}"])  # fmt: skip
        status += "" if not missing else "; imports missing (run scripts/gpu_wheels.sh again)"
        lines += [f"## 0. offline install of {wheels}: {status} ({time.perf_counter() - t0:.0f} s)"]
        lines += ["", "```", text.strip()[-6000:], "```", ""]
        print(f"offline install: {status}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    import torch

    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({_cpu_name()})"
    header = [
        f"- device: {where}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
    ]
    lines[2:2] = header
    flush()
    for i, (name, cmd, limit) in enumerate(steps(out, device=device), 1):
        t0 = time.perf_counter()
        status, text = _run_step(cmd, env, limit)
        if "AMP iterations" in name:
            iters = int(name.split()[0])
            ok, detail = _finite_losses(os.path.join(out, "amp_train"), iters)
            status += f"; losses {'all finite' if ok else 'NOT all finite'}"
            text = detail + "\n\n" + text[-3000:]
        lines += [f"## {i}. {name}: {status} ({time.perf_counter() - t0:.0f} s)", ""]
        lines += ["```", text.strip()[-12000:], "```", ""]
        print(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
        flush()
    lines.append(f"Total: {time.perf_counter() - start:.0f} s.")
    flush()
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="output/gpu_check", help="folder of the report and runs")
    p.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    p.add_argument(
        "--wheels",
        default=None,
        help="folder of wheels (scripts/gpu_wheels.sh) to install first with pip --no-index, "
        "beside this Python's own torch: for a machine without network",
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the same steps, small, on the CPU (a rehearsal of the install and the imports)",
    )
    p.add_argument(
        "--wheel-specs", action="store_true", help="print the requirements carried as wheels, one a line"
    )
    args = p.parse_args(argv)
    if args.wheels and not args.dry_run and not glob.glob(os.path.join(args.wheels, "*.whl")):
        p.error(f"--wheels {args.wheels}: no *.whl there; make them with scripts/gpu_wheels.sh")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wheel_specs:
        print("\n".join(GPU_WHEELS))
        return 0
    out = os.path.abspath(args.output)
    if args.dry_run:
        print(run(out, True, args.wheels, args.device))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check needs a GPU (--dry-run lists its steps; "
              "--device cpu rehearses them on the CPU)")  # fmt: skip
        return 2
    run(out, False, args.wheels, args.device)
    print(f"wrote {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
