"""What a block costs inside a real detector: Mask R-CNN R50-FPN at 800x1333, with each placement of
the non-local block and each block type of the family, against the model without blocks.

    python benchmarks/bench_model.py --markdown                  # every row, CPU, batch 1 and 2
    python benchmarks/bench_model.py --rows baseline,nl_paper_10,naive_paper_10 --batch 2
    python benchmarks/bench_model.py --device cuda --amp fp32,fp16,bf16 --markdown
    python benchmarks/bench_model.py --quick                     # tiny model and images: a smoke test

Each row is one model (``configs/mask_rcnn_R50_NL.yaml`` with the row's ``MODEL.NONLOCAL``
overrides; the generalized-attention rows put mmdetection's Faster R-CNN setting into this Mask
R-CNN so that every row has the same detector), random weights, random images with 4 ground-truth
objects each. Every (row, batch, precision) runs in a fresh process: a warm-up train step, then
``--repeat`` timed train steps (forward, backward, SGD step; the median is reported), a warm-up and
``--repeat`` timed inference passes. The blocks start as the identity, so every row sees the same
proposals and detections as the baseline: the heads do the same work in every row.

- ``naive_*`` rows compute the same non-local blocks with the textbook N x M attention (a switch of
  this benchmark only, not of the library), to compare memory.
- Baseline rows alternate with the others (every ``--baseline-every`` rows and at the end); their
  spread is printed and a difference smaller than it is noise.
- ``--keep-freed-memory``: glibc returns every freed chunk above 32 MiB to the system, so each
  CPU train step page-faults its large tensors afresh, a cost that grows with the memory a row
  allocates; with this switch the workers keep freed memory (``MALLOC_MMAP_MAX_=0``, no trimming),
  as a caching allocator does.
- Memory: CPU, the peak resident set of the process during the train steps (``VmHWM``, reset
  before the first one); CUDA, ``torch.cuda.max_memory_allocated``.
- FLOPs: fvcore's count of one forward pass on one image (``python -m nonlocal_det.tools.analyze``),
  the models one after the other in one process of their own; "share" is the increase over the
  baseline, in percent. "step FLOP share" counts one train step as it runs instead (``torch.utils.flop_counter``,
  forward and backward on one image): frozen layers compute no weight gradients and the heads see
  512 RoIs, while a block's backward costs 2-3x its forward, so a block's share of the train
  step's arithmetic is larger than its share of the forward pass's.
- Target: a row's train-step (and inference) time overhead is at most 1.1 x its FLOP share + 1
  point; at batch 2, ``nl_paper_10`` peaks at no more than half the memory of ``naive_paper_10``.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mask_rcnn_R50_NL.yaml")
NL = "MODEL.NONLOCAL."
# row -> MODEL.NONLOCAL overrides of configs/mask_rcnn_R50_NL.yaml (the published placements).
ROWS = {
    "baseline": [NL + "ENABLED", "False"],
    "nl_paper_1": [NL + "PLACEMENT", "paper_1"],
    "nl_paper_5": [NL + "PLACEMENT", "paper_5"],
    "nl_paper_10": [NL + "PLACEMENT", "paper_10"],
    "naive_paper_1": [NL + "PLACEMENT", "paper_1"],
    "naive_paper_5": [NL + "PLACEMENT", "paper_5"],
    "naive_paper_10": [NL + "PLACEMENT", "paper_10"],
    "gc_r16": [NL + "TYPE", "global_context", NL + "PLACEMENT", "all_res3_res5"]
    + [NL + "POSITION", "after_conv3", NL + "GC.RATIO", "0.0625"],
    "gc_r4": [NL + "TYPE", "global_context", NL + "PLACEMENT", "all_res3_res5"]
    + [NL + "POSITION", "after_conv3", NL + "GC.RATIO", "0.25"],
    "snl": [NL + "TYPE", "simplified", NL + "POSITION", "after_add", NL + "SNL.ZERO_INIT", "True"],
    "dnl": [
        NL + "TYPE",
        "disentangled",
        NL + "POSITION",
        "after_add",
        NL + "DNL.ZERO_INIT",
        "True",
    ],
    "dnl_c4c5": [NL + "TYPE", "disentangled", NL + "POSITION", "after_add"]
    + [NL + "PLACEMENT", "paper_1_all_res5", NL + "DNL.ZERO_INIT", "True"],
    "cc": [NL + "TYPE", "criss_cross"],
    "ga_0010": [NL + "TYPE", "generalized_attention", NL + "PLACEMENT", "all_res4_res5"]
    + [NL + "POSITION", "after_conv2", NL + "GA.ATTENTION_TYPE", "[0, 0, 1, 0]"],
    "ga_1111": [NL + "TYPE", "generalized_attention", NL + "PLACEMENT", "all_res4_res5"]
    + [NL + "POSITION", "after_conv2", NL + "GA.ATTENTION_TYPE", "[1, 1, 1, 1]"],
}
# The smoke test: Mask R-CNN with Detectron2's ResNet-18 up to res4 and slim heads, 128 px images.
QUICK_CONFIG = os.path.join(REPO, "configs", "mask_rcnn_R50_NL.yaml")
QUICK_ROWS = ("baseline", "nl_paper_1", "naive_paper_1", "snl")
_RES2_4 = "['res2', 'res3', 'res4']"
QUICK_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
QUICK_OPTS += ["MODEL.RESNETS.OUT_FEATURES", _RES2_4, "MODEL.FPN.IN_FEATURES", _RES2_4]
QUICK_OPTS += ["MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']"]  # p5: p4 max-pooled
QUICK_OPTS += ["MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p3', 'p4']"]
QUICK_OPTS += ["MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256]]"]
QUICK_OPTS += ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
QUICK_OPTS += ["MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.NUM_CLASSES", "4"]
QUICK_OPTS += ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100"]
AMP_DTYPES = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
# glibc malloc without mmap'd chunks and without trimming: freed memory stays in the process, as in
# a caching allocator, so a train step does not page-fault (and zero) its large tensors afresh.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


# ------------------------------------------------------------------------------------------------
# Worker side: one (row, batch, precision) in a fresh process
# ------------------------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not allowed here: the peak then includes the model's construction
        pass


def _naive_attention(block, q, k, v):
    """The textbook softmax(theta^T phi * scale) g with the N x M matrix: (N, L, C_inner)."""
    import torch

    if block.pairwise not in ("embedded_gaussian", "gaussian"):
        raise ValueError(f"naive rows: pairwise={block.pairwise!r} is not benchmarked")
    logits = torch.matmul(q.transpose(1, 2), k) * block.scale  # (N, L, M)
    return torch.matmul(torch.softmax(logits, dim=-1), v.transpose(1, 2))


def _build(spec: dict):
    import torch
    from detectron2.modeling import build_model

    from nonlocal_det.config import get_nonlocal_cfg
    from nonlocal_det.layers import NonLocalBlock

    opts = list(spec["opts"]) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", spec["device"]]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # a fixed number of detections (100)
    cfg = get_nonlocal_cfg(spec["config"], opts)
    if spec["naive"]:
        NonLocalBlock._aggregate = _naive_attention
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _inputs(spec: dict, device, train: bool):
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    gen = torch.Generator().manual_seed(1)
    h, w = spec["size"]
    batch = []
    for _ in range(spec["batch"]):
        image = (torch.rand(3, h, w, generator=gen) * 255).to(device)
        item = {"image": image, "height": h, "width": w}
        if train:
            xy = torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
            wh = (0.1 + torch.rand(4, 2, generator=gen) * 0.3) * torch.tensor([w, h])
            boxes = torch.cat([xy, xy + wh], dim=1)
            masks = torch.zeros(4, h, w, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            gt = Instances((h, w))
            gt.gt_boxes, gt.gt_classes = Boxes(boxes), torch.arange(4) % 80
            gt.gt_masks = BitMasks(masks)
            item["instances"] = gt.to(device)
        batch.append(item)
    return batch


def _median_time(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_one(spec: dict) -> dict:
    """Measure one (row, batch, precision): train step, inference, peak memory, parameters."""
    import torch
    from detectron2.utils.events import EventStorage

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg, model = _build(spec)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, AMP_DTYPES[spec["amp"]]) if AMP_DTYPES[spec["amp"]] else None
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    train_inputs, test_inputs = _inputs(spec, device, True), _inputs(spec, device, False)

    def train_step():
        with autocast():
            losses = model(train_inputs)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not all(torch.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite losses {losses}")

    def inference():
        with torch.no_grad(), autocast():
            model(test_inputs)

    model.train()
    with EventStorage():
        train_step()  # warm-up (and lazy allocations)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        train_s = _median_time(train_step, spec["repeat"], sync)
    peak = torch.cuda.max_memory_allocated() / 1024**2 if cuda else _peak_rss_mib()
    model.eval()
    inference()
    infer_s = _median_time(inference, spec["repeat"], sync)
    return {
        **spec,
        "train_s": train_s,
        "infer_s": infer_s,
        "peak_mib": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }


def profile_one(spec: dict) -> dict:
    """torch.profiler of one train step (after a warm-up step): the ops by self time, and the
    share of the step spent inside the blocks (their forward and backward, by module name)."""
    import torch
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile, record_function

    from nonlocal_det.layers import BLOCK_TYPES

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg, model = _build(spec)
    inputs = _inputs(spec, torch.device(spec["device"]), True)
    blocks = [m for m in model.modules() if isinstance(m, tuple(BLOCK_TYPES.values()))]
    for m in blocks:  # label every block's forward; autograd tags its backward ops with it
        m.register_forward_pre_hook(
            lambda mod, a: mod.__dict__.update(_rf=record_function("BLOCK").__enter__())
        )
        m.register_forward_hook(
            lambda mod, a, out: mod.__dict__.pop("_rf").__exit__(None, None, None)
        )
    model.train()
    with EventStorage():
        sum(model(inputs).values()).backward()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sum(model(inputs).values()).backward()
        step_s = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    forward = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "BLOCK") / 1e6
    return {**spec, "step_s": step_s, "block_forward_s": forward, "table": table}


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels; give it the CPU one (same formulas)."""
    from torch.ops import aten
    from torch.utils import flop_counter as fc

    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    if fwd in fc.flop_registry:
        return
    fc.register_flop_formula(fwd)(
        lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    )
    fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda go, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(go, q, k, v)
    )


def count_flops(spec: dict) -> dict:
    """fvcore's forward FLOPs of the row's model on one image (as ``tools.analyze`` counts), and
    the FLOPs of one train step as it runs (forward and backward on one image with 4 objects:
    frozen layers without weight gradients, the attention's backward with its recomputation),
    counted by ``torch.utils.flop_counter``."""
    import torch
    from detectron2.utils.events import EventStorage
    from torch.utils.flop_counter import FlopCounterMode

    from nonlocal_det.modeling.flops import count_flops as fvcore_flops

    cfg, model = _build(dict(spec, device="cpu", naive=False))
    h, w = spec["size"]
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        total = fvcore_flops(model.eval(), [{"image": image, "height": h, "width": w}]).total()
    _register_cpu_attention_flops()
    inputs = _inputs(dict(spec, batch=1), torch.device("cpu"), True)
    counter = FlopCounterMode(display=False)
    with EventStorage(), counter:
        sum(model.train()(inputs).values()).backward()
    # flop_counter counts 2 per multiply-add; fvcore counts 1
    return {**spec, "flops": total, "train_flops": counter.get_total_flops() / 2}


def count_flops_rows(spec: dict) -> dict:
    """:func:`count_flops` of each row of ``spec["rows"]`` (row -> its overrides), one after the
    other in this process (counting needs no isolation, and one start-up instead of one per row)."""
    counts = {}
    for row, opts in spec["rows"].items():
        got = count_flops(dict(spec, row=row, opts=opts))
        counts[row] = {"flops": got["flops"], "train_flops": got["train_flops"]}
    return {**spec, "counts": counts}


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("profile"):
        out = profile_one(spec)
    else:
        out = count_flops_rows(spec) if spec.get("flops_only") else run_one(spec)
    print("RESULT " + json.dumps(out), flush=True)


def run_isolated(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )
    if spec.get("keep_freed_memory"):
        env.update(KEEP_FREED_MEMORY)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------
# Orchestrator: the sequence of runs, the table, the targets
# ------------------------------------------------------------------------------------------------
def schedule(rows: List[str], every: int) -> List[str]:
    """``rows`` with the baseline first, again after every ``every`` other rows, and last."""
    others = [r for r in rows if r != "baseline"]
    order = ["baseline"]
    for i, row in enumerate(others):
        order.append(row)
        if (i + 1) % every == 0 or i == len(others) - 1:
            order.append("baseline")
    return order


def machine_header(device: str, threads: int) -> List[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {threads or torch.get_num_threads()}, "
        f"load average {load} (at the start)",
        f"torch {torch.__version__}, Python {platform.python_version()}",
    ]
    if device == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return lines


def _pct(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


def build_table(
    results: List[dict], flops: Dict[str, float], train_flops: Optional[Dict[str, float]] = None
) -> List[dict]:
    """One line per (row, batch, precision), ratios against the median of its baseline runs."""
    lines = []
    keys = sorted({(r["batch"], r["amp"]) for r in results})
    for batch, amp in keys:
        group = [r for r in results if (r["batch"], r["amp"]) == (batch, amp) and "error" not in r]
        base = [r for r in group if r["row"] == "baseline"]
        if not base:
            continue
        ref = {k: statistics.median(r[k] for r in base) for k in ("train_s", "infer_s", "peak_mib")}
        spread = {k: _pct(max(r[k] for r in base), min(r[k] for r in base)) for k in ref}
        seen = []
        for r in [r for r in results if (r["batch"], r["amp"]) == (batch, amp)]:
            if r["row"] == "baseline" and "baseline" in seen:
                continue
            seen.append(r["row"])
            line = {"row": r["row"], "batch": batch, "amp": amp, "error": r.get("error")}
            if "error" not in r:
                runs = base if r["row"] == "baseline" else [r]
                line.update(
                    train_s=[x["train_s"] for x in runs],
                    infer_s=[x["infer_s"] for x in runs],
                    peak_mib=[x["peak_mib"] for x in runs],
                    params=r["params"],
                    train_pct=_pct(r["train_s"], ref["train_s"]),
                    infer_pct=_pct(r["infer_s"], ref["infer_s"]),
                    peak_pct=_pct(r["peak_mib"], ref["peak_mib"]),
                    spread=spread,
                )
            key = r["row"].replace("naive_", "nl_")
            if key in flops and "baseline" in flops:
                line["flops"] = flops[key]
                line["flops_pct"] = _pct(flops[key], flops["baseline"])
            if key in (train_flops or {}) and "baseline" in train_flops:
                line["step_flops_pct"] = _pct(train_flops[key], train_flops["baseline"])
            lines.append(line)
    return lines


HEADER = [
    "row", "batch", "prec", "train step s", "vs base", "FLOPs G", "FLOP share",
    "train/FLOP", "step FLOP share", "train/step FLOP", "infer s", "vs base", "peak MiB", "vs base", "params M",
]  # fmt: skip


def _cells(line: dict) -> List[str]:
    def f(v, spec="{:.2f}"):
        return "—" if v is None else spec.format(v)

    if line.get("error"):
        return [line["row"], str(line["batch"]), line["amp"], "error: " + " ".join(line["error"])]
    share = line.get("flops_pct")
    ratio = line["train_pct"] / share if share and line["row"] != "baseline" else None
    step = line.get("step_flops_pct")
    step_ratio = line["train_pct"] / step if step and line["row"] != "baseline" else None
    times = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    return [
        line["row"],
        str(line["batch"]),
        line["amp"],
        times(line["train_s"]),
        "—" if line["row"] == "baseline" else f"{line['train_pct']:+.1f}%",
        f(line.get("flops", 0) / 1e9 if "flops" in line else None, "{:.1f}"),
        "—" if line["row"] == "baseline" or share is None else f"{share:+.1f}%",
        f(ratio, "{:.2f}x"),
        "—" if line["row"] == "baseline" or step is None else f"{step:+.1f}%",
        f(step_ratio, "{:.2f}x"),
        times(line["infer_s"]),
        "—" if line["row"] == "baseline" else f"{line['infer_pct']:+.1f}%",
        " / ".join(f"{x:.0f}" for x in line["peak_mib"]),
        "—" if line["row"] == "baseline" else f"{line['peak_pct']:+.1f}%",
        f"{line['params'] / 1e6:.2f}",
    ]


def format_table(lines: List[dict], markdown: bool) -> str:
    rows = [_cells(l) for l in lines]
    if markdown:
        out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [
        max(len(x) for x in col) for col in zip(HEADER, *[r + [""] * len(HEADER) for r in rows])
    ]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(HEADER)] + [fmt(r) for r in rows])


def check_targets(lines: List[dict]) -> List[str]:
    out = []
    for l in lines:
        if l.get("error") or l["row"] == "baseline" or l["row"].startswith("naive_"):
            continue
        share = l.get("flops_pct")
        if share is None:
            continue
        limit = 1.1 * share + 1.0
        for what in ("train", "infer"):
            ok = l[f"{what}_pct"] <= limit
            noise = l["spread"][f"{what}_s"]
            step = l.get("step_flops_pct") if what == "train" else None
            out.append(
                f"{'PASS' if ok else 'FAIL'}: {l['row']} batch {l['batch']} {l['amp']} {what} "
                f"overhead {l[what + '_pct']:+.1f}% <= 1.1 x {share:.1f}% + 1 = {limit:.1f}% "
                f"(baseline spread {noise:.1f}%"
                + ("" if step is None else f"; share of the train step's FLOPs {step:+.1f}%")
                + ")"
            )
    by = {(l["row"], l["batch"], l["amp"]): l for l in lines if not l.get("error")}
    for (row, batch, amp), l in by.items():
        naive = by.get(("naive_paper_10", batch, amp))
        if row == "nl_paper_10" and batch == 2 and naive:
            a, b = l["peak_mib"][0], naive["peak_mib"][0]
            base = by.get(("baseline", batch, amp))
            out.append(
                f"{'PASS' if a <= b / 2 else 'FAIL'}: nl_paper_10 batch 2 {amp} peak memory "
                f"{a:.0f} MiB <= half of the textbook op's {b:.0f} MiB (whole process)"
            )
            if base:
                ref = statistics.median(base["peak_mib"])
                out.append(
                    f"{'PASS' if a - ref <= (b - ref) / 2 else 'FAIL'}: nl_paper_10 batch 2 "
                    f"{amp} peak memory over the baseline's {ref:.0f} MiB: {a - ref:.0f} MiB <= "
                    f"half of the textbook op's {b - ref:.0f} MiB (the blocks' own memory)"
                )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    p.add_argument("--batch", default="1,2", help="comma list of batch sizes (default 1,2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", default="fp32", help="comma list of fp32,fp16,bf16 (default fp32)")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations (median; default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--baseline-every", type=int, default=3, help="a baseline run every N rows")
    p.add_argument("--size", default="800,1333", help="image height,width (default 800,1333)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    p.add_argument(
        "--flops-json",
        default=None,
        help="FLOP counts by row: read from this file when it exists, else counted and written",
    )
    p.add_argument(
        "--flops-only", action="store_true", help="count (and save) the FLOPs, time nothing"
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run each worker with glibc malloc keeping freed memory (no mmap, no trim): steadier "
        "CPU times without page faults; peak RSS then includes the memory kept",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    p.add_argument("--quick", action="store_true", help="tiny model and images: a smoke test")
    p.add_argument(
        "--profile", action="store_true", help="profile one train step of each row instead"
    )
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rows = args.rows.split(",") if not args.quick else list(QUICK_ROWS)
    bad = [r for r in rows if r not in ROWS]
    amps = args.amp.split(",")
    if bad or any(a not in AMP_DTYPES for a in amps):
        p.error(f"--rows {bad} / --amp {amps}: allowed {list(ROWS)} / {list(AMP_DTYPES)}")
    args.rows, args.amps = rows, amps
    args.batches = [int(b) for b in args.batch.split(",")]
    args.hw = [int(v) for v in args.size.split(",")]
    if args.quick:
        args.batches, args.hw, args.repeat = [1], [128, 128], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    config = QUICK_CONFIG if args.quick else CONFIG
    extra = QUICK_OPTS if args.quick else []
    base_spec = dict(config=config, size=args.hw, device=args.device, repeat=args.repeat)
    base_spec["threads"] = args.threads
    base_spec["keep_freed_memory"] = args.keep_freed_memory
    start = time.perf_counter()
    print("\n".join(machine_header(args.device, args.threads)), flush=True)

    def spec(row, **kw):
        return dict(
            base_spec, row=row, opts=extra + ROWS[row], naive=row.startswith("naive_"), **kw
        )

    if args.profile:
        for row in args.rows:
            for batch in args.batches:
                out = run_isolated(spec(row, batch=batch, amp="fp32", profile=True), args.timeout)
                if "error" in out:
                    print(f"{row} batch {batch}: {out['error']}")
                    continue
                print(
                    f"\n{row} batch {batch}: profiled train step {out['step_s']:.2f} s, of which "
                    f"the blocks' forward {out['block_forward_s']:.2f} s\n{out['table']}"
                )
        return 0
    flops, train_flops, counted = {}, {}, False
    if args.flops_json and os.path.isfile(args.flops_json):
        with open(args.flops_json) as f:
            saved = json.load(f)
        flops, train_flops = saved["flops"], saved.get("train_flops", {})
        print(f"  FLOPs from {args.flops_json}", flush=True)
    # the naive rows compute what the nl rows compute: one count each
    flop_rows = list(dict.fromkeys(r.replace("naive_", "nl_") for r in ["baseline"] + args.rows))
    missing = [row for row in flop_rows if not (row in flops and row in train_flops)]
    if not args.no_flops and missing:
        rows = {row: extra + ROWS[row] for row in missing}
        count = dict(base_spec, rows=rows, flops_only=True, batch=1, amp="fp32", naive=False)
        out = run_isolated(count, args.timeout * len(missing))
        for row in missing:
            got = out.get("counts", {}).get(row, {"error": out.get("error", "not counted")})
            if "flops" in got:
                flops[row], train_flops[row], counted = got["flops"], got["train_flops"], True
            print(f"  flops {row}: {got}", flush=True)
    if args.flops_json and counted:
        with open(args.flops_json, "w") as f:
            saved = {"size": args.hw, "config": config, "flops": flops, "train_flops": train_flops}
            json.dump(saved, f, indent=1)
    if args.flops_only:
        for row in flop_rows:
            if row in flops and row in train_flops and "baseline" in flops:
                print(
                    f"{row:12s} forward {flops[row] / 1e9:7.1f} G "
                    f"({_pct(flops[row], flops['baseline']):+6.1f}%)   train step "
                    f"{train_flops[row] / 1e9:7.1f} G "
                    f"({_pct(train_flops[row], train_flops['baseline']):+6.1f}%)"
                )
        return 0
    results = []
    for amp in args.amps:
        for batch in args.batches:
            for row in schedule(args.rows, args.baseline_every):
                out = run_isolated(spec(row, batch=batch, amp=amp), args.timeout)
                results.append(out)
                shown = {k: out[k] for k in ("train_s", "infer_s", "peak_mib", "error") if k in out}
                print(f"  {row} batch {batch} {amp}: {shown}", flush=True)
    lines = build_table(results, flops, train_flops)
    print()
    print(format_table(lines, args.markdown))
    print()
    print("\n".join(check_targets(lines)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "flops": flops, "train_flops": train_flops}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
