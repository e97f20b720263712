"""Where a demo training iteration spends its time: torch.profiler over a few train steps of the
demo config, each op's time given to the part of the detector that ran it; or the CPU time per
step of config variants, timed in turns.

    python projects/demo/profile_demo.py --threads 1                       # early: fresh weights
    python projects/demo/profile_demo.py --threads 1 --weights output/demo/model_final.pth   # late
    python projects/demo/profile_demo.py --threads 1 --weights output/demo/model_final.pth \
        --variant "" --variant "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO 2"

The steps are the trainer's (Detectron2's ``SimpleTrainer.run_step``): load a batch, forward with
losses, backward, optimizer step (with the config's gradient clipping), on the demo's data. After
``--warmup`` steps, ``--iters`` steps run under the profiler. Forward time goes to the innermost
labelled part (a module or a loss function) around each op; the backward of an op goes to the part
whose forward created it (autograd's sequence numbers link the two). A part's time includes the
Python between its ops. The printed table gives each part's forward, backward and total
milliseconds per step and its share of the profiled steps' wall time, then what the heads saw per
image: the proposals the RPN kept after NMS, the sampled foreground RoIs and the RoIs the mask and
keypoint heads trained on.

With ``--variant`` (repeated), each variant's overrides are added to the config's and the
variants' train steps are timed in turns (``--rounds`` rounds of ``--iters`` steps): the median
process CPU time per step, which other processes on the machine inflate less than wall time (with
one thread; with more, CPU time counts every thread).
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEMO_CONFIG = os.path.join(HERE, "configs", "mask_rcnn_R18_NL_demo.yaml")

# The rows, in print order; "other" collects what no label covers (autograd engine, glue).
ROWS = [
    "data (load, augment, batch)",
    "backbone (ResNet-18, no block)",
    "non-local block(s) in the backbone",
    "FPN",
    "RPN (head, anchors, proposals, NMS)",
    "RoI sampling (match, sample)",
    "box RoIAlign",
    "box head + predictor",
    "mask RoIAlign",
    "mask head",
    "keypoint RoIAlign",
    "keypoint head (no block)",
    "non-local blocks in the keypoint head",
    "losses (RPN, box, mask, keypoint)",
    "optimizer (clip, SGD step, zero grad)",
    "other (preprocess, RoI-heads glue, autograd)",
]
_BACKWARD_PREFIX = "autograd::engine::evaluate_function"


def _label_module(module, name: str) -> None:
    """Runs ``module``'s forward inside ``record_function(name)``."""
    from torch.profiler import record_function

    module.register_forward_pre_hook(
        lambda mod, args: mod.__dict__.setdefault("_profile_labels", []).append(
            record_function(name).__enter__()
        )
    )
    module.register_forward_hook(
        lambda mod, args, out: mod.__dict__["_profile_labels"].pop().__exit__(None, None, None)
    )


def _labelled(fn, name: str):
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def label_model(model) -> Dict[str, List[int]]:
    """Puts the labels of :data:`ROWS` on the detector's parts and loss functions; returns lists
    that collect, per step, the RoI counts the heads see (filled by forward hooks)."""
    from detectron2.modeling.roi_heads import keypoint_head, mask_head

    from nonlocal_det.layers import BLOCK_TYPES

    blocks = tuple(BLOCK_TYPES.values())
    backbone, heads = model.backbone, model.roi_heads
    _label_module(backbone, ROWS[3])
    _label_module(backbone.bottom_up, ROWS[1])
    for m in backbone.bottom_up.modules():
        if isinstance(m, blocks):
            _label_module(m, ROWS[2])
    rpn = model.proposal_generator
    _label_module(rpn, ROWS[4])
    rpn.losses = _labelled(rpn.losses, ROWS[13])
    heads.label_and_sample_proposals = _labelled(heads.label_and_sample_proposals, ROWS[5])
    heads.box_predictor.losses = _labelled(heads.box_predictor.losses, ROWS[13])
    parts = [("box_pooler", 6), ("box_head", 7), ("box_predictor", 7)]
    parts += [("mask_pooler", 8), ("mask_head", 9), ("keypoint_pooler", 10), ("keypoint_head", 11)]
    for attr, row in parts:
        if getattr(heads, attr, None) is not None:
            _label_module(getattr(heads, attr), ROWS[row])
    if getattr(heads, "keypoint_head", None) is not None:
        for m in heads.keypoint_head.modules():
            if isinstance(m, blocks):
                _label_module(m, ROWS[12])
    mask_head.mask_rcnn_loss = _labelled(mask_head.mask_rcnn_loss, ROWS[13])
    keypoint_head.keypoint_rcnn_loss = _labelled(keypoint_head.keypoint_rcnn_loss, ROWS[13])

    counts = defaultdict(list)
    rpn.register_forward_hook(lambda m, a, out: counts["proposals"].extend(len(p) for p in out[0]))
    for attr in ("mask_pooler", "keypoint_pooler"):
        if getattr(heads, attr, None) is not None:
            getattr(heads, attr).register_forward_pre_hook(
                lambda m, a, key=attr.split("_")[0]: counts[key].extend(len(b) for b in a[1])
            )
    return counts


def attribute(events) -> Dict[str, Dict[str, float]]:
    """Milliseconds per row, forward and backward, from the profiler's events (see the module
    docstring)."""
    names = set(ROWS) | {"step", "forward", "backward"}
    seq_label = {}  # forward op's sequence number -> its row
    out = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})

    def enclosing(e):
        while e is not None:
            if e.name.startswith(_BACKWARD_PREFIX):
                return "bwd", e
            if e.name in names:
                return "label", e
            e = e.cpu_parent
        return None, None

    # Forward ops first: the map from sequence numbers to rows. An op reports the number the next
    # autograd node will get, so the node's creator is the last op (by start) with that number.
    for e in sorted(events, key=lambda e: e.time_range.start):
        kind, anchor = enclosing(e.cpu_parent)
        if e.sequence_nr >= 0 and kind == "label" and anchor.name != "backward":
            seq_label[e.sequence_nr] = anchor.name
    for e in events:
        kind, anchor = enclosing(e)
        if kind == "bwd":
            row = seq_label.get(anchor.sequence_nr, ROWS[-1])
            row = ROWS[-1] if row in ("forward", "step") else row
            out[row]["backward"] += e.self_cpu_time_total / 1e3
        elif kind == "label":
            row = anchor.name
            if row in ("forward", "backward", "step"):
                row = ROWS[-1]
            out[row]["forward"] += e.self_cpu_time_total / 1e3
    return out


def build_trainer_parts(config_file: str, opts: List[str], weights: str):
    """The model (``weights`` loaded, training mode), optimizer and train-data iterator that
    ``train_net.py`` builds from the config (seeded by ``SEED``); the config."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer

    from nonlocal_det.config import get_nonlocal_cfg
    from nonlocal_det.data import register_datasets_for_config
    from nonlocal_det.engine import NonLocalTrainer, fall_back_to_cpu
    from nonlocal_det.engine.trainer import CPUAutocast

    import nonlocal_demo

    nonlocal_demo.setup()  # the demo's keys and datasets
    cfg = get_nonlocal_cfg(config_file, opts)
    fall_back_to_cpu(cfg)
    cfg.freeze()
    register_datasets_for_config(cfg)
    torch.manual_seed(cfg.SEED)
    model = NonLocalTrainer.build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    optimizer = NonLocalTrainer.build_optimizer(cfg, model)
    data = iter(NonLocalTrainer.build_train_loader(cfg))
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":  # as the trainer: bf16 autocast
        model = CPUAutocast(model)
    return cfg, model.train(), optimizer, data


def train_step(model, optimizer, data, label=None) -> None:
    """One step as Detectron2's ``SimpleTrainer.run_step``: batch, forward, backward, update."""
    from contextlib import nullcontext

    from torch.profiler import record_function

    part = record_function if label else (lambda name: nullcontext())
    with part("step"):
        with part(ROWS[0]):
            batch = next(data)
        with part("forward"):
            losses = model(batch)
        with part("backward"):
            sum(losses.values()).backward()
        with part(ROWS[14]):
            optimizer.step()
            optimizer.zero_grad()


def profile_steps(args) -> dict:
    import torch
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, optimizer, data = build_trainer_parts(args.config_file, args.opts, args.weights)
    counts = label_model(getattr(model, "model", model))  # inside a CPUAutocast
    with EventStorage() as storage:
        for _ in range(args.warmup):
            train_step(model, optimizer, data)
        for v in counts.values():
            v.clear()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                train_step(model, optimizer, data, label=True)
        wall = time.perf_counter() - start
        sampled = [v for v, _ in storage.history("roi_head/num_fg_samples").values()]
    counts["foreground"] = sampled[-args.iters :] * cfg.SOLVER.IMS_PER_BATCH  # means per image
    per_step = {
        k: {d: v / args.iters for d, v in t.items()} for k, t in attribute(prof.events()).items()
    }
    images = args.iters * cfg.SOLVER.IMS_PER_BATCH
    return {
        "wall_ms": 1e3 * wall / args.iters,
        "rows": per_step,
        "per_image": {k: sum(v) / images for k, v in counts.items()},
    }


def time_variants(args) -> List[str]:
    """CPU time per train step of each ``--variant`` (overrides added to the config's), from the
    same weights, in turns (``--rounds`` rounds of ``--iters`` steps, after ``--warmup``): the
    process's CPU time, which other processes on the machine inflate less than wall time."""
    import statistics

    import torch
    from detectron2.utils.events import EventStorage

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    variants = [v.split() for v in args.variant]
    parts = [
        build_trainer_parts(args.config_file, args.opts + v, args.weights)[1:] for v in variants
    ]
    times = [[] for _ in variants]
    with EventStorage():
        for model, optimizer, data in parts:
            for _ in range(args.warmup):
                train_step(model, optimizer, data)
        for _ in range(args.rounds):
            for i, (model, optimizer, data) in enumerate(parts):
                start = clock()
                for _ in range(args.iters):
                    train_step(model, optimizer, data)
                times[i].append(1e3 * (clock() - start) / args.iters)
    first = statistics.median(times[0])
    lines = [
        f"| variant | {'wall' if args.wall else 'CPU'} ms per step (median) | vs the first | rounds |",
        "|---|---:|---:|---|",
    ]
    for v, t in zip(args.variant, times):
        med = statistics.median(t)
        rounds = ", ".join(f"{x:.0f}" for x in t)
        lines.append(f"| {v or '(the config)'} | {med:.0f} | {med / first:.2f} | {rounds} |")
    return lines


def table(result: dict) -> List[str]:
    rows, wall = result["rows"], result["wall_ms"]
    lines = ["| part | forward ms | backward ms | total ms | share |", "|---|---:|---:|---:|---:|"]
    total = 0.0
    for name in ROWS:
        f, b = rows.get(name, {}).get("forward", 0.0), rows.get(name, {}).get("backward", 0.0)
        total += f + b
        lines.append(f"| {name} | {f:.1f} | {b:.1f} | {f + b:.1f} | {100 * (f + b) / wall:.1f}% |")
    lines.append(f"| **step (wall, under the profiler)** | | | **{wall:.1f}** | 100% |")
    lines.append(f"(rows sum to {total:.1f} ms; the rest is the profiler's own bookkeeping)")
    seen = result["per_image"]
    lines.append(
        "per image: {:.1f} proposals after NMS, {:.1f} sampled foreground RoIs; the mask head "
        "trained on {:.1f} RoIs, the keypoint head on {:.1f}".format(
            *(seen.get(k, 0.0) for k in ("proposals", "foreground", "mask", "keypoint"))
        )
    )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEMO_CONFIG)
    p.add_argument("--weights", default="", help="a checkpoint (a late step); default: fresh")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    p.add_argument("--iters", type=int, default=5, help="profiled steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--variant",
        action="append",
        help="time this variant instead of profiling: overrides added to the config's, in one "
        "string ('' for none); repeat it, the first is the reference",
    )
    p.add_argument("--rounds", type=int, default=4, help="with --variant: rounds of --iters steps")
    p.add_argument(
        "--wall",
        action="store_true",
        help="with --variant: wall-clock time per step instead of the process's CPU time (which "
        "counts every thread: with several threads on a quiet machine, time what a step takes)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import machine_header

    if args.variant:
        lines = time_variants(args)
        print("\n".join(machine_header("cpu", args.threads)))
        print(
            f"{os.path.relpath(args.config_file, REPO)} {' '.join(args.opts)} "
            f"({args.weights or 'fresh weights'})"
        )
        print("\n".join(lines))
        return 0
    result = profile_steps(args)
    print("\n".join(machine_header("cpu", args.threads)))
    weights = args.weights or "fresh weights"
    print(
        f"{os.path.relpath(args.config_file, REPO)} {' '.join(args.opts)} ({weights}), "
        f"{args.iters} steps after {args.warmup}"
    )
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
