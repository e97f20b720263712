"""Time and memory of the shipped ``NonLocalBlock`` versus the textbook (N x M matrix) form.

    python benchmarks/bench_nonlocal.py                      # res4 + res3, all forms, CPU (+ CUDA)
    python benchmarks/bench_nonlocal.py --quick              # tiny sizes: a smoke test
    python benchmarks/bench_nonlocal.py --sizes res4 --pairwise dot_product --markdown
    python benchmarks/bench_nonlocal.py --scope aggregation --sizes res3 --subsample off

Every configuration (device, size, pairwise, subsample, op) runs forward + backward of the whole
block (the 1x1 convs included) on ``x`` of shape (2, 1024, H, W) requiring grad, at the res4 and
res3 sizes of an 800 x 1333 image (50 x 84 and 100 x 167 positions).

With ``--scope aggregation`` only the part that differs between the two ops is timed: the
aggregation (1/C) f g, forward + backward, on random theta, pooled phi and pooled g (no 1x1 convs,
which cost the same in both ops and bound the whole-block speed-up).

The naive op uses the block's own weights, convs and pooling but aggregates with the N x M matrix:
softmax(theta^T phi * scale) g for the Gaussian forms, (theta^T phi / M) g for the dot product and
(ReLU(a_i + b_j) / M) g for concatenation (the N x M matrix, not the (2 C_inner, N, M) tensor).

Memory ("extra peak"): the peak beyond what the inputs, weights and output gradient already hold.
On CPU every (configuration, op) runs in a fresh subprocess; its peak resident set (``VmHWM``,
the ``ru_maxrss`` of that process alone) minus the resident set read from ``/proc/self/statm``
just before the first forward. ``VmHWM`` is reset there through ``/proc/self/clear_refs`` when
allowed. (``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: after fork/vfork + exec it starts at
the *parent's* peak.) On CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated memory
before the first forward.

Time: the median of ``--repeat`` timed iterations after one warm-up. When the warm-up itself takes
longer than ``--warmup-max-s`` (the huge naive runs on CPU), it is counted as the first timed
iteration instead of being thrown away; such cells are marked with a dagger.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

SIZES = {"res5": (25, 42), "res4": (50, 84), "res3": (100, 167)}
QUICK_SIZES = {"tiny": (6, 10)}
PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
TARGET_SIZE = "res3"
TARGET_MEMORY_MIB = 1536.0
TARGET_DOT_SPEEDUP = 20.0
MIB = 1024.0**2


# ------------------------------------------------------------------------------------------------
# Worker side: one (device, size, pairwise, subsample, op) measurement
# ------------------------------------------------------------------------------------------------
def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM: the high-water resident set of this process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_naive(block):
    """The textbook non-local op on the weights of ``block`` (shares its modules)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class NaiveNonLocal(nn.Module):
        def __init__(self, shipped):
            super().__init__()
            self.b = shipped

        def _pool(self, t):
            b = self.b
            if not b.subsample:
                return t
            s = t.shape[2:]
            if b.dim == 1:
                return F.max_pool1d(t, [min(2, s[0])])
            if b.dim == 2:
                return F.max_pool2d(t, [min(2, s[0]), min(2, s[1])])
            return F.max_pool3d(t, [1, min(2, s[1]), min(2, s[2])])

        def forward(self, x):
            b = self.b
            v = self._pool(b.g(x)).flatten(2)  # (N, C_inner, M)
            if b.pairwise == "gaussian":
                q, k = x.flatten(2), self._pool(x).flatten(2)
            else:
                q, k = b.theta(x).flatten(2), self._pool(b.phi(x)).flatten(2)
            y = self.aggregate(q, k, v)  # (N, L, C_inner)
            y = y.transpose(1, 2).reshape([x.shape[0], b.inner_channels] + list(x.shape[2:]))
            z = b.out(y)
            if b.norm is not None:
                z = b.norm(z)
            return z + x

        def aggregate(self, q, k, v):
            """(1/C) f v with the N x M matrix, for (N, C, L) / (N, C, M) inputs: (N, L, C_v)."""
            b = self.b
            m = k.shape[2]
            if b.pairwise == "concatenation":
                w = b.concat_project.weight.reshape(-1)
                c = b.inner_channels
                a = torch.einsum("ncl,c->nl", q, w[:c])
                bb = torch.einsum("ncm,c->nm", k, w[c:])
                att = F.relu(a.unsqueeze(2) + bb.unsqueeze(1)) / m  # (N, L, M)
            else:
                f = torch.bmm(q.transpose(1, 2), k)  # (N, L, M)
                if b.pairwise == "dot_product":
                    att = f / m
                else:
                    att = torch.softmax(f * b.scale, dim=2)
            return torch.bmm(att, v.transpose(1, 2))  # (N, L, C_inner)

    return NaiveNonLocal(block)


def _make_op(spec: dict):
    import torch
    from torch import nn

    from nonlocal_det.layers import NonLocalBlock

    torch.manual_seed(0)
    block = NonLocalBlock(
        spec["channels"], pairwise=spec["pairwise"], dim=2, subsample=spec["subsample"]
    )
    with torch.no_grad():  # W_z starts at zero: make the output depend on y
        nn.init.normal_(block.out.weight, std=0.01)
    return block if spec["op"] == "shipped" else _build_naive(block)


def run_one(spec: dict) -> dict:
    """Runs one measurement in this process; returns ms per iteration and extra peak MiB."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    h, w = spec["hw"]
    module = _make_op(spec).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    batch, channels = spec["batch"], spec["channels"]
    if spec.get("scope", "block") == "block":
        op = module
        inputs = [torch.randn(batch, channels, h, w, device=device, generator=gen)]
        grad_out = torch.randn(inputs[0].shape, device=device, generator=gen)
    else:  # the aggregation alone, on random (theta, pooled phi, pooled g)
        block = module if spec["op"] == "shipped" else module.b
        op = block._aggregate if spec["op"] == "shipped" else module.aggregate
        c_q = channels if block.pairwise == "gaussian" else block.inner_channels
        m = (h // 2) * (w // 2) if block.subsample else h * w
        shapes = [(batch, c_q, h * w), (batch, c_q, m), (batch, block.inner_channels, m)]
        inputs = [torch.randn(s, device=device, generator=gen) for s in shapes]
        grad_out = torch.randn(batch, h * w, block.inner_channels, device=device, generator=gen)
    for t in inputs:
        t.requires_grad_()
    x = inputs[0]
    params = list(module.parameters())

    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.get("amp", "fp32"))

    def step():
        for t in inputs + params:
            t.grad = None
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = op(*inputs)
        out.backward(grad_out.to(out.dtype))

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset = _reset_peak_rss()
        base = _current_rss_bytes()

    times = []
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    warmup_counted = first > spec["warmup_max_s"]
    if warmup_counted:
        times.append(first)
    while len(times) < spec["repeat"]:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _peak_rss_bytes() - base
    result = {
        "ms": 1000.0 * statistics.median(times),
        "times_ms": [1000.0 * t for t in times],
        "peak_mib": max(peak, 0) / MIB,
        "warmup_counted": warmup_counted,
    }
    if not cuda:
        result["hwm_reset"] = reset
    if spec.get("check"):  # the naive op computes the same function: compare outputs
        with torch.no_grad():
            other = dict(spec, op="naive" if spec["op"] == "shipped" else "shipped")
            if spec.get("scope", "block") == "block":
                y_other = _make_op(other).to(device)(x)
                result["max_abs_diff"] = float((op(x) - y_other).abs().max())
    return result


def _worker_main(spec_json: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    result = run_one(json.loads(spec_json))
    print("RESULT " + json.dumps(result), flush=True)


def run_isolated(spec: dict, timeout: Optional[float]) -> dict:
    """Runs ``run_one`` in a fresh Python process (clean allocator and peak RSS)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    kind = "OOM" if proc.returncode in (-9, 137) or "out of memory" in proc.stderr else "error"
    return {"error": f"{kind} (rc={proc.returncode}): {tail[:200]}"}


# ------------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------------
def machine_header(devices: List[str]) -> List[str]:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        mem = f", {total_kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{mem}",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}",
    ]
    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        lines.append(f"load average at start: {load} (other processes slow the CPU timings)")
    except OSError:
        pass
    if "cuda" in devices:
        lines.append(f"CUDA: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    return lines


def _fmt(v: Optional[float], spec: str, mark: str = "") -> str:
    return "-" if v is None else format(v, spec) + mark


def build_rows(results: List[dict]) -> List[List[str]]:
    rows = []
    for r in results:
        s, n = r.get("shipped", {}), r.get("naive", {})
        s_ms, n_ms = s.get("ms"), n.get("ms")
        s_mib, n_mib = s.get("peak_mib"), n.get("peak_mib")
        speed = n_ms / s_ms if s_ms and n_ms else None
        ratio = n_mib / s_mib if s_mib and n_mib else None
        dag_s = "\u2020" if s.get("warmup_counted") else ""
        dag_n = "\u2020" if n.get("warmup_counted") else ""
        rows.append(
            [
                r["device"] + ("" if r.get("amp", "fp32") == "fp32" else " " + r["amp"]),
                f"{r['size']} {r['hw'][0]}x{r['hw'][1]}",
                f"{r['n']}x{r['m']}",
                r["pairwise"],
                "on" if r["subsample"] else "off",
                s.get("error", "")[:12] or _fmt(s_ms, ".1f", dag_s),
                n.get("error", "")[:12] or _fmt(n_ms, ".1f", dag_n),
                _fmt(speed, ".2f", "x"),
                _fmt(s_mib, ".0f"),
                _fmt(n_mib, ".0f"),
                _fmt(ratio, ".1f", "x"),
            ]
        )
    return rows


HEADER = [
    "device",
    "size (HxW)",
    "N x M",
    "pairwise",
    "subsample",
    "shipped ms",
    "naive ms",
    "speed-up",
    "shipped MiB",
    "naive MiB",
    "mem ratio",
]


def format_text(rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADER, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_markdown(rows: List[List[str]]) -> str:
    right = {5, 6, 7, 8, 9, 10}
    out = ["| " + " | ".join(HEADER) + " |"]
    out.append("|" + "|".join("---:" if i in right else "---" for i in range(len(HEADER))) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def check_targets(results: List[dict]) -> List[str]:
    """PASS/FAIL lines for the targets at res3 (100 x 167), C=1024, no subsampling, CPU."""
    sel: Dict[str, dict] = {
        r["pairwise"]: r
        for r in results
        if r["device"] == "cpu"
        and r["size"] == TARGET_SIZE
        and not r["subsample"]
        and r.get("amp", "fp32") == "fp32"
    }
    scope = results[0].get("scope", "block") if results else "block"
    where = f"{TARGET_SIZE} {SIZES[TARGET_SIZE][0]}x{SIZES[TARGET_SIZE][1]}, no subsampling, CPU"
    where += ", whole block fwd+bwd" if scope == "block" else ", aggregation only fwd+bwd"
    lines = []

    def verdict(ok: Optional[bool]) -> str:
        return "SKIP" if ok is None else ("PASS" if ok else "FAIL")

    for pw in PAIRWISE:
        mib = sel.get(pw, {}).get("shipped", {}).get("peak_mib")
        naive = sel.get(pw, {}).get("naive", {}).get("peak_mib")
        ok = None if mib is None else mib <= TARGET_MEMORY_MIB
        detail = "not measured" if mib is None else f"{mib:.0f} MiB"
        if naive is not None:
            detail += f" (naive {naive:.0f} MiB)"
        lines.append(
            f"{verdict(ok)}: {pw} extra peak memory <= {TARGET_MEMORY_MIB:.0f} MiB "
            f"[{where}]: {detail}"
        )
    eg = sel.get("embedded_gaussian", {})
    s, n = eg.get("shipped", {}).get("ms"), eg.get("naive", {}).get("ms")
    ok = None if s is None or n is None else s <= n
    detail = "not measured" if ok is None else f"shipped {s:.0f} ms vs naive {n:.0f} ms"
    lines.append(f"{verdict(ok)}: embedded_gaussian not slower than naive [{where}]: {detail}")
    dp = sel.get("dot_product", {})
    s, n = dp.get("shipped", {}).get("ms"), dp.get("naive", {}).get("ms")
    ok = None if s is None or n is None else n / s >= TARGET_DOT_SPEEDUP
    detail = "not measured" if ok is None else f"{n / s:.1f}x ({n:.0f} ms / {s:.0f} ms)"
    lines.append(
        f"{verdict(ok)}: dot_product >= {TARGET_DOT_SPEEDUP:.0f}x faster than naive [{where}]: "
        f"{detail}"
    )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma list of res3,res4,res5 (default res4,res3)")
    p.add_argument("--pairwise", default=",".join(PAIRWISE), help="comma list of pairwise forms")
    p.add_argument(
        "--subsample", choices=["both", "on", "off"], default="both", help="max-pool keys"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="'all': CPU, and CUDA when available",
    )
    p.add_argument("--repeat", type=int, default=None, help="timed iterations (default 3)")
    p.add_argument("--channels", type=int, default=None, help="C (default 1024; --quick 32)")
    p.add_argument(
        "--scope",
        choices=["block", "aggregation"],
        default="block",
        help="time the whole block (default) or only the aggregation (1/C) f g on random "
        "theta, phi, g: the part that differs between the two ops",
    )
    p.add_argument("--ops", default="shipped,naive", help="comma list of shipped,naive")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument(
        "--amp", default="fp32", help="comma list of fp32,fp16,bf16: autocast of the forward"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument(
        "--warmup-max-s",
        type=float,
        default=20.0,
        help="count the warm-up as a timed iteration when it takes longer than this",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="per measurement, seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes, in-process: smoke test")
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run every measurement in this process (memory figures are then approximate)",
    )
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or "tiny"
        args.channels = args.channels or 32
        args.repeat = args.repeat or 1
        args.threads = args.threads or 1  # tiny tensors: no intra-op stalls on a loaded CPU
        args.no_isolate = True
    args.sizes = args.sizes or "res4,res3"
    args.channels = args.channels or 1024
    args.repeat = args.repeat or 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return 0

    import torch

    sizes = {**SIZES, **QUICK_SIZES}
    size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    pairwise = [s.strip() for s in args.pairwise.split(",") if s.strip()]
    for s in size_names:
        if s not in sizes:
            raise SystemExit(f"--sizes: unknown size {s!r}; allowed: {sorted(sizes)}")
    for pw in pairwise:
        if pw not in PAIRWISE:
            raise SystemExit(f"--pairwise: unknown form {pw!r}; allowed: {list(PAIRWISE)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    ops = [s.strip() for s in args.ops.split(",") if s.strip()]
    if not ops or any(op not in ("shipped", "naive") for op in ops):
        raise SystemExit(f"--ops: {args.ops!r}; allowed: shipped, naive or shipped,naive")
    subsamples = {"both": [False, True], "on": [True], "off": [False]}[args.subsample]
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    if not amps or any(a not in ("fp32", "fp16", "bf16") for a in amps):
        raise SystemExit(f"--amp: {args.amp!r}; allowed: a comma list of fp32, fp16, bf16")

    print("Non-local block: shipped NonLocalBlock vs naive N x M form, forward + backward")
    for line in machine_header(devices):
        print(line)
    scope = (
        "whole block (1x1 convs included)"
        if args.scope == "block"
        else "aggregation (1/C) f g only, on random theta/phi/g (no convs)"
    )
    print(
        f"x: ({args.batch}, {args.channels}, H, W) fp32 requiring grad, C_inner = "
        f"{args.channels // 2}, dim=2; timed: {scope}; time = median of {args.repeat}; "
        f"memory = extra peak beyond inputs/weights "
        + ("(in-process, approximate)" if args.no_isolate else "(fresh process per cell)")
    )
    print(flush=True)

    results = []
    for device, amp in [(d, a) for d in devices for a in amps]:
        for size in size_names:
            h, w = sizes[size]
            for pw in pairwise:
                for sub in subsamples:
                    m = ((h // 2) * (w // 2)) if sub else h * w
                    rec = dict(device=device, size=size, hw=[h, w], pairwise=pw, subsample=sub)
                    rec["amp"] = amp
                    rec["scope"] = args.scope
                    rec.update(n=h * w, m=m)
                    for op in ops:
                        spec = dict(
                            rec,
                            op=op,
                            channels=args.channels,
                            batch=args.batch,
                            repeat=args.repeat,
                            warmup_max_s=args.warmup_max_s,
                            threads=args.threads,
                            scope=args.scope,
                            check=args.quick and op == "shipped",
                        )
                        t0 = time.perf_counter()
                        if args.no_isolate:
                            try:
                                res = run_one(spec)
                            except RuntimeError as e:  # e.g. out of memory
                                res = {"error": f"error: {str(e)[:200]}"}
                        else:
                            res = run_isolated(spec, args.timeout)
                        rec[op] = res
                        msg = res.get("error") or (
                            f"{res['ms']:.1f} ms, {res['peak_mib']:.0f} MiB"
                            + (" (warm-up counted)" if res.get("warmup_counted") else "")
                        )
                        print(
                            f"  [{device} {amp} {size} {pw} subsample={'on' if sub else 'off'} "
                            f"{op}] "
                            f"{msg}  ({time.perf_counter() - t0:.0f} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                    results.append(rec)

    rows = build_rows(results)
    print(format_text(rows))
    if any(r.get(op, {}).get("warmup_counted") for r in results for op in ("shipped", "naive")):
        print(
            "\u2020 warm-up took longer than --warmup-max-s: it is counted as a timed iteration "
            "(no separate warm-up)."
        )
    if args.quick:
        diffs = [r["shipped"].get("max_abs_diff") for r in results if "shipped" in r]
        diffs = [d for d in diffs if d is not None]
        if diffs:
            print(f"check: shipped == naive outputs, max abs diff {max(diffs):.2e}")
    if args.markdown:
        print()
        print(format_markdown(rows))
    print()
    for line in check_targets(results):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
