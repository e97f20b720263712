"""The context probe: do the blocks carry information from far away inside a detector?

    python projects/demo/context_probe.py                   # every model x 3 seeds, the cue task
    python projects/demo/context_probe.py --jobs 2          # two trainings at once (two free cores)
    python projects/demo/context_probe.py --quick           # smoke run: tiny data and model, seconds
    python projects/demo/context_probe.py --task twin --models baseline nonlocal --markdown
    python projects/demo/context_probe.py --task bar --iters 1200 --models nonlocal nonlocal_he
    python projects/demo/context_probe.py --collect output/context_probe --curves curves.png

Trains Faster R-CNN R18-FPN from scratch (``configs/faster_rcnn_R18_NL_probe.yaml``: the
ResNet stops at res4, no norm in the FPN) on a generated dataset (``nonlocal_demo.relational``)
where an object's class depends on something far away: ``--task cue`` (default), its shape x the
colour (red / blue) of a cue square in a corner; ``--task twin``, its shape x whether another
object has exactly its colour; ``--task match``, whether it has the colour of a cue triangle;
``--task bar`` / ``plus``, the two held-out variants of the cue task. Once per model and seed: the
baseline without any block, and one block of each type at the same place (after block 0 of res4,
12 x 12 positions), every other setting the same; or the non-local block with one of its
initialisation options (``nonlocal_he``, ``nonlocal_lecun``, ``nonlocal_noscale``,
``nonlocal_wz``, ``nonlocal_whiten``). Each training runs in a worker process with
``OMP_NUM_THREADS=1``; ``--jobs N`` runs N at once (use it only with N free cores).

Prints, per model: box AP (mean +- std over seeds) and AP50; the confusion of the
relation-determined classes for the matched detections (every ground-truth object takes the
top-scoring detection of IoU >= 0.5; the word of its class: red/blue, paired/single or
match/other); where the block looks: from the centre of every object (twin task: every paired
object) the share of its top-20 attended key positions that fall on its partner (the cue, or its
twin), and the attention mass there against its chance level (the partner's share of the key
grid); for the query-independent blocks (SNL, GC, DNL's unary term) the mass of their one map on
the partner; criss-cross: the first pass and the two passes composed. Then the wall time and the
machine, and whether the issue's two targets are met.

Results are cached: a run whose ``result.json`` exists in ``--output-dir`` with the same settings
is not trained again (``--fresh`` starts over). The first seed of every model with a block also
draws ``attention.png`` (the ``visualize`` command's ``draw``) on a validation image. Every run
with a block records how it learns (:func:`mechanism_recorder`: gradient norms, the attention's
entropy and its share on the cue along training) in its ``result.json``; ``--collect DIR...``
prints the task x model x seed table of finished runs and ``--curves PNG`` draws those records.
"""

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "configs", "faster_rcnn_R18_NL_probe.yaml")

# Model -> overrides of CONFIG. Every block sits where CONFIG's non-local block does
# (PLACEMENT paper_1, POSITION after_block); the SNL and DNL value convs start at zero, as the
# non-local block's W_z, GC's last conv and criss-cross's gamma do: every model starts as the
# baseline.
MODELS = {
    "baseline": ["MODEL.NONLOCAL.ENABLED", "False"],
    "nonlocal": [],
    "simplified": ["MODEL.NONLOCAL.TYPE", "simplified", "MODEL.NONLOCAL.SNL.ZERO_INIT", "True"],
    "global_context": ["MODEL.NONLOCAL.TYPE", "global_context", "MODEL.NONLOCAL.GC.RATIO", "0.25"],
    "disentangled": ["MODEL.NONLOCAL.TYPE", "disentangled", "MODEL.NONLOCAL.DNL.ZERO_INIT", "True"],
    "criss_cross": ["MODEL.NONLOCAL.TYPE", "criss_cross"],
    # the non-local block's initialisation options (issue 22; docs/context_probe.md)
    "nonlocal_he": ["MODEL.NONLOCAL.THETA_PHI_INIT", "he"],
    "nonlocal_lecun": ["MODEL.NONLOCAL.THETA_PHI_INIT", "lecun"],
    "nonlocal_noscale": ["MODEL.NONLOCAL.USE_SCALE", "False"],
    "nonlocal_wz": ["MODEL.NONLOCAL.OUT_INIT_STD", "0.01"],
    "nonlocal_whiten": ["MODEL.NONLOCAL.WHITEN", "True"],
}
LABELS = {
    "baseline": "baseline (no block)",
    "nonlocal": "NL (non-local)",
    "simplified": "SNL (simplified NL)",
    "global_context": "GC (global context)",
    "disentangled": "DNL (disentangled NL)",
    "criss_cross": "CC (criss-cross)",
    "nonlocal_he": "NL, theta/phi He init",
    "nonlocal_lecun": "NL, theta/phi LeCun init",
    "nonlocal_noscale": "NL, no 1/sqrt(C') scale",
    "nonlocal_wz": "NL, W_z std 0.01",
    "nonlocal_whiten": "NL, whitened theta/phi",
}
# the models run by default: the baseline and one of each block type
FAMILY_MODELS = list(MODELS)[:6]
PAIRWISE_MODELS = ("nonlocal", "disentangled", "criss_cross")
GLOBAL_MODELS = ("simplified", "global_context")
TOPK = 20

# --quick: a smaller model and data, 2 iterations: the whole pipeline in seconds per model.
QUICK_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
    "SOLVER.WARMUP_ITERS", "1",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip
QUICK_DATA = dict(num_train=8, num_val=4, image_size=192)


# ------------------------------------------------------------------------------------------------
# Measurements (used by the workers; importable)
# ------------------------------------------------------------------------------------------------
def _iou_xywh(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """IoU of one [x, y, w, h] box with (K, 4) boxes."""
    if len(boxes) == 0:
        return np.zeros(0)
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter)


def relation_confusion(gt: Dict[str, Any], detections: List[Dict[str, Any]], iou: float = 0.5):
    """Confusion of the relation-determined classes for the matched detections.

    Every ground-truth object takes the top-scoring detection (any class) of IoU >= ``iou``; the
    relation word of its class (``paired`` / ``single``, or ``match`` / ``other``) is the
    prediction, ``missed`` when there is none.

    Args:
        gt: a COCO dict of a relational dataset (categories ``<shape>_<word>``).
        detections: COCO results (``image_id``, ``category_id``, ``bbox``, ``score``).

    Returns:
        dict: ``words`` (the two relation words, holds first), ``counts`` {truth: {pred: n}},
        ``relation_accuracy`` and ``shape_accuracy`` over the matched objects, ``matched``,
        ``objects``.
    """
    names = {c["id"]: c["name"].split("_", 1) for c in gt["categories"]}
    words = []
    for c in sorted(gt["categories"], key=lambda c: c["id"]):
        if names[c["id"]][1] not in words:
            words.append(names[c["id"]][1])
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    counts = {t: {p: 0 for p in words + ["missed"]} for t in words}
    right_shape = matched = 0
    for a in gt["annotations"]:
        shape, word = names[a["category_id"]]
        dets = by_image.get(a["image_id"], [])
        overlap = _iou_xywh(a["bbox"], np.array([d["bbox"] for d in dets], dtype=np.float64))
        candidates = [d for d, o in zip(dets, overlap) if o >= iou]
        if not candidates:
            counts[word]["missed"] += 1
            continue
        best = max(candidates, key=lambda d: d["score"])
        pred_shape, pred_word = names[best["category_id"]]
        counts[word][pred_word] += 1
        matched += 1
        right_shape += pred_shape == shape
    right = sum(counts[w][w] for w in words)
    return {
        "words": words,
        "counts": counts,
        "relation_accuracy": right / matched if matched else float("nan"),
        "shape_accuracy": right_shape / matched if matched else float("nan"),
        "matched": matched,
        "objects": len(gt["annotations"]),
    }


def partner_pairs(gt: Dict[str, Any], task: str) -> Dict[int, List[Tuple[List[float], list]]]:
    """{image id: [(query box, partner box)]}: for the twin task every paired object and its
    twin (the other object of exactly its colour, from the generator's record); for the other
    tasks every object and the cue."""
    anns: Dict[int, List[Dict[str, Any]]] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    out: Dict[int, List[Tuple[List[float], list]]] = {}
    for image in gt["images"]:
        objects = anns.get(image["id"], [])
        if task != "twin":
            pairs = [(a["bbox"], image["cue"]["bbox"]) for a in objects]
        else:
            pairs = [
                (a["bbox"], b["bbox"])
                for a in objects
                for b in objects
                if a is not b and a["colour"] == b["colour"]
            ]
        if pairs:
            out[image["id"]] = pairs
    return out


def _cells_on(box: Sequence[float], grid: Tuple[int, int], cell: Tuple[float, float]) -> np.ndarray:
    """Bool (kh, kw): the key cells (``cell`` = (height, width) in original-image pixels) that
    intersect the [x, y, w, h] ``box``."""
    kh, kw = grid
    ys = np.arange(kh) * cell[0]
    xs = np.arange(kw) * cell[1]
    rows = (ys < box[1] + box[3]) & (ys + cell[0] > box[1])
    cols = (xs < box[0] + box[2]) & (xs + cell[1] > box[0])
    return rows[:, None] & cols[None, :]


def _share(weights: np.ndarray, on: np.ndarray, topk: int) -> Dict[str, float]:
    """Of a (kh, kw) attention map: the share of its ``topk`` positions on ``on``, its mass
    there, the chance level of both (``on``'s share of the grid), its entropy (of the map
    normalised to sum 1, negative weights as 0) and that of the uniform map, log(kh kw)."""
    flat = weights.reshape(-1)
    k = min(topk, flat.size)
    top = np.argsort(-flat, kind="stable")[:k]
    p = np.clip(flat.astype(np.float64), 0.0, None)
    p = p / max(p.sum(), 1e-12)
    return {
        "top": float(on.reshape(-1)[top].mean()),
        "mass": float(flat[on.reshape(-1)].sum() / max(flat.sum(), 1e-12)),
        "chance": float(on.mean()),
        "entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        "uniform": float(np.log(flat.size)),
    }


def _block_input(model, image_bgr: np.ndarray, cfg, block):
    """Inference on one image with the block's input caught: (x, (sy, sx), stride)."""
    from nonlocal_det.modeling.attention import run_with_block_input

    return run_with_block_input(model, image_bgr, cfg, block)[1:]


_SHARE_KEYS = ("top", "mass", "chance", "entropy", "uniform")


def _add_partner_shares(sums, block, x, pairs, scale, stride: float, topk: int) -> None:
    """Add to ``sums`` ({kind: running sums}) the :func:`_share` of the block's maps for one
    image: ``x`` its block input (1, C, h, w), ``pairs`` its (query box, partner box) in
    original-image pixels, ``scale`` (sy, sx) from the original image to the network input."""
    import torch

    from nonlocal_det.layers import CrissCrossAttention
    from nonlocal_det.modeling.attention import context_map

    sy, sx = scale
    h, w = x.shape[-2:]
    maps: Dict[str, List[np.ndarray]] = {}
    coords = [
        [min(int((qy + qh / 2) * sy // stride), h - 1), min(int((qx + qw / 2) * sx // stride), w - 1)]
        for (qx, qy, qw, qh), _ in pairs
    ]  # fmt: skip
    q = torch.tensor(coords, dtype=torch.long)
    with torch.no_grad():
        if hasattr(block, "attention_for_queries"):
            maps["pairwise"] = list(block.attention_for_queries(x, q)[0].float().numpy())
        if isinstance(block, CrissCrossAttention) and block.recurrence >= 2:
            first = block.attention_for_queries(x, torch.arange(h * w))[0].reshape(h * w, -1)
            second = block.attention_for_queries(block._pass(x), q)[0].reshape(len(q), -1)
            maps["two_pass"] = list((second @ first).reshape(len(q), h, w).float().numpy())
        if hasattr(block, "context_weights"):
            maps["map"] = [context_map(block, x)] * len(pairs)
    for kind, weights in maps.items():
        kh, kw = weights[0].shape
        cell = ((h // kh) * stride / sy, (w // kw) * stride / sx)
        for m, (_, partner) in zip(weights, pairs):
            s = _share(m, _cells_on(partner, (kh, kw), cell), topk)
            acc = sums.setdefault(kind, dict({k: 0.0 for k in _SHARE_KEYS}, queries=0))
            for key in _SHARE_KEYS:
                acc[key] += s[key]
            acc["queries"] += 1


def _means(sums: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    return {
        kind: {k: (v / acc["queries"] if k != "queries" else v) for k, v in acc.items()}
        for kind, acc in sums.items()
    }


def attention_on_partner(
    model, cfg, gt: Dict[str, Any], image_root: str, task: str, topk: int = TOPK
) -> Dict[str, Dict[str, float]]:
    """Where the model's first backbone block looks, averaged over the validation images.

    From the centre of every query object (:func:`partner_pairs`): the share of the ``topk``
    most attended key positions that fall on the partner (a key cell intersecting its box), the
    attention mass on the partner, and the chance level (the partner's cells / all cells); the
    attention's entropy and the uniform one's.

    Returns:
        {kind: {"top", "mass", "chance", "entropy", "uniform", "queries"}}, kind ``pairwise``
        (non-local, DNL's pairwise term, criss-cross's first pass), ``two_pass`` (criss-cross:
        the second pass's weights composed with the first's, residual paths left out) and
        ``map`` (the one map of SNL, GC and DNL's unary term, the same for every query). Empty
        without a block.
    """
    import cv2

    from nonlocal_det.modeling.attention import backbone_blocks

    names = backbone_blocks(model)
    if not names:
        return {}
    block = model.get_submodule(names[0])
    model.eval()
    sums: Dict[str, Dict[str, float]] = {}
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    for image_id, pairs in sorted(partner_pairs(gt, task).items()):
        image = cv2.imread(os.path.join(image_root, files[image_id]), cv2.IMREAD_COLOR)
        x, scale, stride = _block_input(model, image, cfg, block)
        _add_partner_shares(sums, block, x, pairs, scale, stride, topk)
    return _means(sums)


def mechanism_iters(max_iter: int) -> List[int]:
    """The iterations before which :func:`mechanism_recorder` measures the attention: 0-5, then
    every 10th; and the end of training (``max_iter``)."""
    return sorted(set(range(min(6, max_iter))) | set(range(10, max_iter, 10)) | {max_iter})


def mechanism_recorder(cfg, gt: Dict[str, Any], image_root: str, task: str, num_images=16):
    """A Detectron2 hook recording how the first backbone block learns (for the curves of
    docs/context_probe.md); it lives here, outside the library, and changes nothing in training.

    Every iteration, from the backward pass (before gradient clipping): the gradient norm, and
    after the step the weight norm and the distance from the initial weights, of every
    parameter of the block (``theta.weight``, ``phi.weight``,
    ``g.weight``, ``out.weight`` of the non-local block; ``conv_mask.weight``, ... of GC).
    Before the iterations of :func:`mechanism_iters` and after the last: on the first
    ``num_images`` validation images with partner pairs, the block's input through the bottom-up
    network in training mode (batch statistics, as in training; the BN running statistics and
    torch's RNG state restored afterwards, numpy's and Python's never drawn from: the training
    trajectory is the one without the hook), then :func:`_share` of the attention of every object's
    centre (entropy, uniform entropy, top-k share and mass on the partner), averaged.

    Returns:
        The hook; ``hook.record`` is {"grad_iters": [...], "grad": {name: [...]}, "weight":
        {name: [...]}, "delta": {name: [...]}, "attention_iters": [...], "attention": {kind:
        {key: [...]}}}, empty when the model has no block.
    """
    import cv2
    import torch
    from detectron2.data import transforms as T
    from detectron2.engine import HookBase
    from torch import nn

    from nonlocal_det.modeling.attention import backbone_blocks

    class _Caught(Exception):
        pass

    class MechanismRecorder(HookBase):
        def __init__(self):
            self.record: Dict[str, Any] = {}
            self.block = None

        def before_train(self):
            model = self.trainer.model
            names = backbone_blocks(model)
            if not names:
                return
            self.block = model.get_submodule(names[0])
            self.params = [(n, p) for n, p in self.block.named_parameters() if p.requires_grad]
            self.grads: Dict[str, float] = {}
            self.initial = {n: p.detach().clone() for n, p in self.params}
            for n, p in self.params:
                p.register_hook(lambda grad, n=n: self._catch_grad(n, grad))
            self.record = {
                "block": names[0],
                "grad_iters": [],
                "grad": {n: [] for n, _ in self.params},
                "weight": {n: [] for n, _ in self.params},
                "delta": {n: [] for n, _ in self.params},
                "attention_iters": [],
                "attention": {},
            }
            pairs = partner_pairs(gt, task)
            files = {im["id"]: im["file_name"] for im in gt["images"]}
            inputs, self.pairs, self.scales = [], [], []
            for image_id in sorted(pairs)[:num_images]:
                bgr = cv2.imread(os.path.join(image_root, files[image_id]), cv2.IMREAD_COLOR)
                # the test resize without ResizeShortestEdge.get_transform, which draws from
                # numpy's global RNG (the training loader's flips draw from it too)
                h, w = bgr.shape[:2]
                size = T.ResizeShortestEdge.get_output_shape(
                    h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
                )
                image = T.ResizeTransform(h, w, *size).apply_image(bgr)
                self.scales.append((image.shape[0] / bgr.shape[0], image.shape[1] / bgr.shape[1]))
                if cfg.INPUT.FORMAT == "RGB":
                    image = image[:, :, ::-1]
                chw = np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32")
                inputs.append({"image": torch.as_tensor(chw)})
                self.pairs.append(pairs[image_id])
            with torch.no_grad():
                self.images = model.preprocess_image(inputs).tensor
            self.when = set(mechanism_iters(self.trainer.max_iter))

        def _attention(self, iteration: int) -> None:
            model = self.trainer.model
            bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            saved = [[b.clone() for b in m.buffers()] for m in bns]
            rng = torch.get_rng_state()
            caught = []

            def catch(module, inputs):
                caught.append(inputs[0].detach())
                raise _Caught

            handle = self.block.register_forward_pre_hook(catch)
            try:
                with torch.no_grad():
                    getattr(model.backbone, "bottom_up", model.backbone)(self.images)
            except _Caught:
                pass
            finally:
                handle.remove()
                with torch.no_grad():
                    for m, buffers in zip(bns, saved):
                        for b, v in zip(m.buffers(), buffers):
                            b.copy_(v)
                torch.set_rng_state(rng)
            x = caught[0]
            stride = 2 ** round(np.log2(self.images.shape[-2] / x.shape[-2]))
            sums: Dict[str, Dict[str, float]] = {}
            for i, (pairs, scale) in enumerate(zip(self.pairs, self.scales)):
                _add_partner_shares(sums, self.block, x[i : i + 1], pairs, scale, stride, TOPK)
            self.record["attention_iters"].append(iteration)
            for kind, values in _means(sums).items():
                series = self.record["attention"].setdefault(kind, {})
                for key, value in values.items():
                    series.setdefault(key, []).append(value)

        def before_step(self):
            if self.block is not None and self.trainer.iter in self.when:
                self._attention(self.trainer.iter)

        def _catch_grad(self, name: str, grad):
            self.grads[name] = float(grad.detach().norm())

        def after_step(self):
            # DefaultTrainer runs the step in an inner SimpleTrainer, which calls its own hooks'
            # after_backward: the gradients are caught by tensor hooks instead, before clipping.
            if self.block is None:
                return
            self.record["grad_iters"].append(self.trainer.iter)
            for n, p in self.params:
                self.record["grad"][n].append(self.grads.pop(n, 0.0))
                self.record["weight"][n].append(float(p.detach().norm()))
                self.record["delta"][n].append(float((p.detach() - self.initial[n]).norm()))

        def after_train(self):
            if self.block is not None:
                self._attention(self.trainer.max_iter)

    return MechanismRecorder()


def draw_attention(model, cfg, gt, image_root: str, task: str, output: str, index=None) -> None:
    """The picture of ``python -m nonlocal_det.tools.visualize`` (``nonlocal_det.modeling.attention``)
    of a validation image (the first with a partner pair, or ``index``): arrows (8 per query) from
    the query objects' centres for pairwise blocks, the heat map for query-independent ones, the
    partners outlined in white."""
    import cv2
    from PIL import Image

    from nonlocal_det.modeling.attention import backbone_blocks, compute_arrows, context_map
    from nonlocal_det.tools.visualize import draw

    names = backbone_blocks(model)
    pairs = partner_pairs(gt, task)
    if not names or not pairs:
        return
    images = {im["id"]: im for im in gt["images"]}
    image_id = sorted(pairs)[0] if index is None else gt["images"][index]["id"]
    block = model.get_submodule(names[0])
    bgr = cv2.imread(os.path.join(image_root, images[image_id]["file_name"]), cv2.IMREAD_COLOR)
    x, scale, stride = _block_input(model, bgr, cfg, block)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
    queries = [a for a in anns if any(a["bbox"] == q for q, _ in pairs.get(image_id, []))]
    partners = {tuple(p) for _, p in pairs.get(image_id, [])}
    for bx, by, bw, bh in partners:
        cv2.rectangle(rgb, (bx - 2, by - 2), (bx + bw + 1, by + bh + 1), (255, 255, 255), 1)
    centres = [(a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2) for a in queries]
    arrows = heat = None
    if hasattr(block, "attention_for_queries"):
        arrows = compute_arrows(block, x, centres, int(round(stride)), scale, topk=8)
    if hasattr(block, "context_weights"):
        heat = context_map(block, x)
    title = f"{names[0].replace('backbone.bottom_up.', '')}: {type(block).__name__}"
    partner_word = "twins" if task == "twin" else "cue"
    legend = [title, f"white boxes: the {partner_word}"]
    labels = [f"{cats[a['category_id']]} (ground truth)" for a in queries]
    picture = draw([rgb], arrows, heat, legend, labels, min_size=384)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    Image.fromarray(picture).save(output)


# ------------------------------------------------------------------------------------------------
# Worker: train and measure runs one after the other
# ------------------------------------------------------------------------------------------------
def _run_one(run: Dict[str, Any]) -> Dict[str, Any]:
    from detectron2.utils.env import seed_all_rng

    from nonlocal_det.config import get_nonlocal_cfg
    from nonlocal_det.data import (
        check_datasets,
        configure_coco_json_datasets,
        register_datasets_for_config,
    )
    from nonlocal_det.engine import fall_back_to_cpu
    from nonlocal_det.modeling import check_model_config

    from nonlocal_det.engine.train import Trainer

    import nonlocal_demo

    nonlocal_demo.setup()

    start = time.perf_counter()
    cfg = get_nonlocal_cfg(CONFIG, run["opts"])
    fall_back_to_cpu(cfg)
    configure_coco_json_datasets(cfg)
    check_model_config(cfg)
    cfg.freeze()
    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    handler = logging.FileHandler(os.path.join(out, "log.txt"), mode="w")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%H:%M:%S"))
    loggers = [logging.getLogger(n) for n in ("detectron2", "nonlocal_det", "fvcore")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        seed_all_rng(cfg.SEED)
        register_datasets_for_config(cfg)
        check_datasets(cfg)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        with open(cfg.DATASETS.TEST_JSON) as f:
            gt = json.load(f)
        recorder = mechanism_recorder(cfg, gt, cfg.DATASETS.TEST_IMAGES, run["task"])
        trainer.register_hooks([recorder])
        load = os.getloadavg()
        t0 = time.perf_counter()
        trainer.train()  # evaluates at the end (Detectron2's EvalHook)
        train_s = time.perf_counter() - t0
        bbox = dict(trainer._last_eval_results["bbox"])
        name = cfg.DATASETS.TEST[0]
        with open(os.path.join(out, "inference", name, "coco_instances_results.json")) as f:
            detections = json.load(f)
        model = trainer.model
        result = {
            "model": run["model"],
            "seed": run["seed"],
            "key": run["key"],
            "bbox": bbox,
            "confusion": relation_confusion(gt, detections),
            "attention": attention_on_partner(
                model, cfg, gt, cfg.DATASETS.TEST_IMAGES, run["task"], TOPK
            ),
            "train_s": train_s,
            "load": [load, os.getloadavg()],
            "mechanism": recorder.record,
        }
        if run.get("picture"):
            draw_attention(model, cfg, gt, cfg.DATASETS.TEST_IMAGES, run["task"], run["picture"])
        result["total_s"] = time.perf_counter() - start
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
    tmp = os.path.join(out, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out, "result.json"))
    return result


def _worker_main(path: str) -> None:
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="nonlocal_det", abbrev_name="nl")
    with open(path) as f:
        runs = json.load(f)
    for run in runs:
        _run_one(run)


# ------------------------------------------------------------------------------------------------
# Sweeps over tasks and schedules: the table and the mechanism's curves (--collect)
# ------------------------------------------------------------------------------------------------
LEARNED = 0.9  # a run learned the cue when its relation accuracy reaches this (chance: 0.5)
CURVE_MODELS = ("nonlocal", "global_context", "nonlocal_he", "nonlocal_lecun", "nonlocal_noscale",
                "nonlocal_wz", "nonlocal_whiten")  # fmt: skip


def collect(dirs: Sequence[str]) -> List[Dict[str, Any]]:
    """Every finished run under ``dirs`` (``<dir>/<model>_seed<N>/result.json``), with its task
    and schedule read from the run's ``config.yaml``."""
    import glob

    import yaml

    rows = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*_seed*", "result.json"))):
            with open(path) as f:
                result = json.load(f)
            with open(os.path.join(os.path.dirname(path), "config.yaml")) as f:
                cfg = yaml.safe_load(f)
            data = os.path.basename(os.path.dirname(os.path.dirname(cfg["DATASETS"]["TEST_JSON"])))
            acc = result["confusion"]["relation_accuracy"]
            rows.append(
                dict(
                    result,
                    task=data.split("_coco_v")[0],
                    iters=cfg["SOLVER"]["MAX_ITER"],
                    learned=acc >= LEARNED,
                )
            )
    return rows


def sweep_table(rows: List[Dict[str, Any]], markdown: bool = True) -> str:
    """Per task, schedule and model: every seed's box AP and relation accuracy, how many
    learned the cue (accuracy >= :data:`LEARNED`), minutes per run and the load average."""
    groups: Dict[Tuple[str, int, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["iters"], r["model"]), []).append(r)
    order = {m: i for i, m in enumerate(MODELS)}
    head = ["task", "iterations", "model", "box AP per seed (accuracy)", "mean AP", "learned",
            "min/run", "load (1 min avg, start-end)"]  # fmt: skip
    out = []
    for (task, iters, model), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):  # fmt: skip
        rs = sorted(rs, key=lambda r: r["seed"])
        seeds = " / ".join(
            f"s{r['seed']}: {r['bbox']['AP']:.1f} ({100 * r['confusion']['relation_accuracy']:.0f}%)"
            for r in rs
        )
        loads = [r["load"] for r in rs if "load" in r]
        load = (
            f"{statistics.mean(a[0] for a, _ in loads):.1f}-{statistics.mean(b[0] for _, b in loads):.1f}"
            if loads
            else "-"
        )
        out.append(
            [task, str(iters), LABELS[model], seeds,
             "{:.1f} ± {:.1f}".format(*_mean_std([r["bbox"]["AP"] for r in rs])),
             f"{sum(r['learned'] for r in rs)}/{len(rs)}",
             f"{statistics.mean(r['total_s'] for r in rs) / 60:.1f}", load]
        )  # fmt: skip
    return _table(head, out, markdown)


def _smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def mechanism_numbers(rows: List[Dict[str, Any]], at: Sequence[int] = (0, 1, 10, 100, 300, 600)):
    """Markdown rows of the mechanism at chosen iterations, per model and seed: the gradient
    norms (theta, phi, g, W_z; GC: conv_mask and the transform's two convs), the attention's
    entropy over the uniform one, its top-20 share and mass on the cue."""
    head = ["model", "seed", "iteration", "gradient norms", "entropy / uniform",
            f"top-{TOPK} on the cue", "mass on the cue (chance)"]  # fmt: skip
    params = {
        "pairwise": ("theta.weight", "phi.weight", "g.weight", "out.weight"),
        "map": ("conv_mask.weight", "channel_add_conv.0.weight", "channel_add_conv.3.weight"),
    }
    out = []
    for r in sorted(rows, key=lambda r: (CURVE_MODELS.index(r["model"]), r["seed"])):
        mech = r["mechanism"]
        kind = "pairwise" if "pairwise" in mech["attention"] else "map"
        att = mech["attention"][kind]
        for it in at:
            if it not in mech["attention_iters"]:
                continue
            i = mech["attention_iters"].index(it)
            grads = ""
            last = mech["grad_iters"][-1] if mech["grad_iters"] else None
            if it in mech["grad_iters"] or (it == last + 1 and last is not None):
                g = mech["grad_iters"].index(min(it, last))  # the end: the last step's
                grads = ", ".join(
                    f"{n.split('.weight')[0]} {mech['grad'][n][g]:.1e}"
                    for n in params[kind]
                    if n in mech["grad"]
                )
            out.append(
                [LABELS[r["model"]], str(r["seed"]), str(it), grads,
                 f"{att['entropy'][i] / att['uniform'][i]:.3f}", f"{100 * att['top'][i]:.0f}%",
                 f"{100 * att['mass'][i]:.0f}% ({100 * att['chance'][i]:.0f}%)"]
            )  # fmt: skip
    return _table(head, out, True)


def mechanism_curves(rows: List[Dict[str, Any]], output: str, title: str = "") -> None:
    """One PNG: per model (colour) and seed (line style), along training: the gradient norm
    reaching theta (GC: conv_mask; 10-iteration mean), the weight change of theta from its
    initialisation, the attention's entropy over the uniform one, the top-20 share and the mass
    on the cue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["gradient norm: theta (NL), conv_mask (GC)", "gradient norm: W_z (NL), last conv (GC)",
              "|W - W_0| / |W_0|: theta (NL), conv_mask (GC)", "attention entropy / uniform",
              f"top-{TOPK} keys on the cue", "attention mass on the cue"]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = dict(zip(CURVE_MODELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {1: "-", 2: "--", 3: ":"}
    for r in sorted(rows, key=lambda r: (CURVE_MODELS.index(r["model"]), r["seed"])):
        mech = r["mechanism"]
        kind = "pairwise" if "pairwise" in mech["attention"] else "map"
        first, last = (
            ("theta.weight", "out.weight") if kind == "pairwise" else
            ("conv_mask.weight", "channel_add_conv.3.weight")
        )  # fmt: skip
        style = dict(color=colours[r["model"]], ls=styles.get(r["seed"], "-"), lw=1.2)
        label = f"{LABELS[r['model']]}, seed {r['seed']} ({r['bbox']['AP']:.0f} AP)"
        its = np.asarray(mech["grad_iters"])
        for ax, name in ((axes[0, 0], first), (axes[0, 1], last)):
            smooth = _smooth(mech["grad"][name])
            ax.plot(its[len(its) - len(smooth) :], np.maximum(smooth, 1e-12), **style)
        if "delta" in mech:  # (not recorded by the first runs)
            w0 = np.linalg.norm(mech["weight"][first][0])  # after step 0: W_0 to 1e-3 or better
            axes[0, 2].plot(its, np.asarray(mech["delta"][first]) / w0, **style)
        att = mech["attention"][kind]
        ai = mech["attention_iters"]
        axes[1, 0].plot(ai, np.asarray(att["entropy"]) / np.asarray(att["uniform"]), **style)
        axes[1, 1].plot(ai, att["top"], **style)
        axes[1, 2].plot(ai, att["mass"], label=label, **style)
    for ax, name in zip(axes.flat, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes[0, :2]:
        ax.set_yscale("log")
    axes[0, 2].set_yscale("log")
    axes[1, 2].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main: data, runs, table
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    from nonlocal_demo.relational import RELATION_TASKS

    p.add_argument("--task", choices=list(RELATION_TASKS), default="cue")
    p.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=None,
        help="default: the baseline and each block type; with --collect, every model",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (one core each)")
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER (default: config's)")
    p.add_argument("--num-train", type=int, default=None, help="training images (default 4000)")
    p.add_argument("--num-val", type=int, default=None, help="validation images (default 200)")
    p.add_argument("--image-size", type=int, default=None, help="image size (default 192)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="the generated data (made if missing)")
    p.add_argument("--output-dir", default=None, help="default output/context_probe[_quick]")
    p.add_argument("--fresh", action="store_true", help="train again even where results exist")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and model")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every model")
    p.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="DIR",
        help="print the table of the finished runs under these output folders",
    )
    p.add_argument(
        "--curves",
        default=None,
        metavar="PNG",
        help="with --collect: draw the mechanism's curves of the runs with a block",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: allowed: an integer >= 1")
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters {args.iters}: allowed: an integer >= 1")
    if args.models is None:
        args.models = list(MODELS) if args.collect else FAMILY_MODELS
    return args


def _data(args) -> Tuple[str, Dict[str, Any]]:
    """Generate the data if missing; returns (root, its parameters)."""
    from nonlocal_demo.relational import generate_relation_coco, relation_dataset_root

    params = dict(num_train=4000, num_val=200, image_size=192)
    if args.quick:
        params.update(QUICK_DATA)
    for key in params:
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    params["seed"] = args.data_seed
    if args.data_root:
        root = args.data_root
    elif args.quick:
        root = os.path.join(args.output_dir, "data")
    elif params == dict(num_train=4000, num_val=200, image_size=192, seed=0):
        root = relation_dataset_root(args.task)  # the config's own data (nl_twin_* / nl_match_*)
    else:
        tag = "_".join(str(params[k]) for k in ("num_train", "num_val", "image_size", "seed"))
        root = relation_dataset_root(args.task) + "_" + tag
    start = time.perf_counter()
    if generate_relation_coco(root, args.task, **params):
        print(f"generated {root} ({time.perf_counter() - start:.1f} s)", flush=True)
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        info = json.load(f)["info"]
    if info.get("task") != args.task or any(
        info.get(k) != params[k] for k in ("image_size", "seed")
    ):
        raise ValueError(f"--data-root {root} holds other data: {info}; allowed: a new folder")
    return root, params


def _runs(args, root: str) -> List[Dict[str, Any]]:
    data = [
        "DATASETS.TRAIN_JSON", os.path.join(root, "annotations", "instances_train.json"),
        "DATASETS.TRAIN_IMAGES", os.path.join(root, "train"),
        "DATASETS.TEST_JSON", os.path.join(root, "annotations", "instances_val.json"),
        "DATASETS.TEST_IMAGES", os.path.join(root, "val"),
    ]  # fmt: skip
    common = list(QUICK_OPTS) if args.quick else []
    if args.iters is not None:
        steps = f"({int(args.iters * 0.75)}, {int(args.iters * 0.93)})"
        common += ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", steps]
    common += list(args.opts)
    runs = []
    for seed in args.seeds:
        for model in args.models:
            out = os.path.join(os.path.abspath(args.output_dir), f"{model}_seed{seed}")
            opts = data + common + MODELS[model] + ["SEED", str(seed), "OUTPUT_DIR", out]
            key = hashlib.sha256(json.dumps([args.task, opts]).encode()).hexdigest()[:16]
            first = seed == args.seeds[0] and model != "baseline"
            runs.append(
                {
                    "model": model,
                    "seed": seed,
                    "task": args.task,
                    "opts": opts,
                    "key": key,
                    "out": out,
                    "picture": os.path.join(out, "attention.png") if first else None,
                }
            )
    return runs


def _cached(run: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    path = os.path.join(run["out"], "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result.get("key") == run["key"] else None


def machine(jobs: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs; {jobs} training(s) at once, 1 thread each "
        f"(OMP_NUM_THREADS=1); torch {torch.__version__}, Python {platform.python_version()}"
    )


def _mean_std(values: List[float]) -> Tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: List[Dict[str, Any]], models: List[str]) -> Dict[str, Dict[str, Any]]:
    """Per model: box AP / AP50 mean and std over seeds, summed confusion, mean accuracies and
    attention shares, mean minutes per run."""
    out = {}
    for model in models:
        rs = sorted((r for r in results if r["model"] == model), key=lambda r: r["seed"])
        if not rs:
            continue
        words = rs[0]["confusion"]["words"]
        counts = {t: {p: sum(r["confusion"]["counts"][t][p] for r in rs) for p in words + ["missed"]} for t in words}  # fmt: skip
        attention = {}
        for kind in sorted({k for r in rs for k in r["attention"]}):
            vals = [r["attention"][kind] for r in rs if kind in r["attention"]]
            attention[kind] = {
                k: statistics.mean(v[k] for v in vals) for k in ("top", "mass", "chance")
            }
        out[model] = {
            "seeds": [r["seed"] for r in rs],
            "ap": _mean_std([r["bbox"]["AP"] for r in rs]),
            "ap50": _mean_std([r["bbox"]["AP50"] for r in rs]),
            "ap_per_seed": [round(r["bbox"]["AP"], 1) for r in rs],
            "relation_accuracy": _mean_std([r["confusion"]["relation_accuracy"] for r in rs]),
            "shape_accuracy": _mean_std([r["confusion"]["shape_accuracy"] for r in rs]),
            "words": words,
            "counts": counts,
            "attention": attention,
            "minutes": statistics.mean(r["total_s"] for r in rs) / 60.0,
        }
    return out


def _table(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def targets(summary: Dict[str, Dict[str, Any]]) -> List[str]:
    """The issue's two targets, checked on ``summary``."""
    lines = []
    if "nonlocal" in summary and "baseline" in summary:
        (nl, nl_sd), (b, b_sd) = summary["nonlocal"]["ap"], summary["baseline"]["ap"]
        gap, noise = nl - b, 3 * max(nl_sd, b_sd)
        ok = gap >= 10 and gap > noise
        lines.append(
            f"target 1 (NL beats the baseline by >= 10 box AP and > 3x the larger seed std): "
            f"{gap:+.1f} AP vs 3 x {max(nl_sd, b_sd):.1f} = {noise:.1f}: "
            + ("met" if ok else "NOT met")
        )
    pair = [m for m in PAIRWISE_MODELS if m in summary]
    glob = [m for m in GLOBAL_MODELS if m in summary]
    if pair and glob:
        best_p = max(pair, key=lambda m: summary[m]["ap"][0])
        best_g = max(glob, key=lambda m: summary[m]["ap"][0])
        (p, p_sd), (g, g_sd) = summary[best_p]["ap"], summary[best_g]["ap"]
        noise = 3 * max(p_sd, g_sd)
        lines.append(
            f"target 2 (the best pairwise block beats the best of GC/SNL beyond seed noise, "
            f"> 3x the larger std): {LABELS[best_p]} {p:.1f} vs {LABELS[best_g]} {g:.1f}: "
            f"{p - g:+.1f} AP vs {noise:.1f}: " + ("met" if p - g > noise else "NOT met")
        )
    return lines


def report(summary, args, params, wall_s: float, machine_line: str) -> str:
    md = args.markdown
    words = next(iter(summary.values()))["words"]
    hold, other = words
    partner = "twin" if args.task == "twin" else "cue"
    head = [
        "model",
        "box AP",
        "AP50",
        "per seed",
        f"{hold}/{other} accuracy",
        "shape accuracy",
        f"top-{TOPK} keys on the {partner}",
        f"attention mass on the {partner} (chance)",
        "min/run",
    ]
    rows = []
    for model, s in summary.items():
        att = s["attention"]
        kind = "two_pass" if "two_pass" in att else "pairwise" if "pairwise" in att else "map"
        a = att.get(kind)
        note = {"two_pass": " (2 passes)", "map": " (map)", "pairwise": ""}[kind]
        top = f"{100 * a['top']:.0f}%{note}" if a else "-"
        mass = f"{100 * a['mass']:.0f}% ({100 * a['chance']:.0f}%)" if a else "-"
        if model == "disentangled" and "map" in att:
            mass += f"; unary map {100 * att['map']['mass']:.0f}%"
        if model == "criss_cross" and "pairwise" in att:
            mass += f"; 1st pass {100 * att['pairwise']['mass']:.0f}%"
        rows.append(
            [
                LABELS[model],
                "{:.1f} ± {:.1f}".format(*s["ap"]),
                "{:.1f}".format(s["ap50"][0]),
                " / ".join(f"{v:.1f}" for v in s["ap_per_seed"]),
                "{:.1%}".format(s["relation_accuracy"][0]),
                "{:.1%}".format(s["shape_accuracy"][0]),
                top,
                mass,
                f"{s['minutes']:.1f}",
            ]
        )
    conf_head = ["model"] + [f"{t} -> {p}" for t in words for p in words + ["missed"]]
    conf_rows = [
        [LABELS[m]] + [str(s["counts"][t][p]) for t in words for p in words + ["missed"]]
        for m, s in summary.items()
    ]
    seeds = " ".join(str(s) for s in args.seeds)
    lines = [
        f"context probe, {args.task} task: {params['num_train']} training / {params['num_val']} "
        f"validation images of {params['image_size']} px (data seed {params['seed']}), "
        f"seeds {seeds}, {'--quick' if args.quick else 'config ' + os.path.relpath(CONFIG, REPO)}"
        + (f", overrides {' '.join(args.opts)}" if args.opts else ""),
        "",
        _table(head, rows, md),
        "",
        "confusion of the relation (ground-truth objects -> class of their top-scoring "
        "detection of IoU >= 0.5, summed over seeds):",
        "",
        _table(conf_head, conf_rows, md),
        "",
        *targets(summary),
        f"wall time {wall_s / 60:.1f} min; machine: {machine_line}",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
        return 0
    if args.collect:
        rows = [r for r in collect(args.collect) if r["model"] in args.models]
        print(sweep_table(rows, args.markdown))
        curves = [r for r in rows if r.get("mechanism") and r["model"] in CURVE_MODELS]
        if args.curves and curves:
            mechanism_curves(curves, args.curves, ", ".join(args.collect))
            print(mechanism_numbers(curves))
        return 0
    start = time.perf_counter()
    if args.output_dir is None:
        args.output_dir = os.path.join(REPO, "output", "context_probe" + "_quick" * args.quick)
    if args.quick and args.seeds == [1, 2, 3]:
        args.seeds = [1]
    os.makedirs(args.output_dir, exist_ok=True)
    root, params = _data(args)
    runs = _runs(args, root)
    results, todo = [], []
    for run in runs:
        cached = None if args.fresh else _cached(run)
        (results.append(cached) if cached else todo.append(run))
    if results:
        print(f"{len(results)} run(s) already in {args.output_dir}, reused", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
    procs = []
    for j in range(min(args.jobs, len(todo))):
        chunk = todo[j :: args.jobs]
        # named by this process too: several sweeps may share an output folder
        path = os.path.join(args.output_dir, f"worker{os.getpid()}_{j}.json")
        with open(path, "w") as f:
            json.dump(chunk, f)
        log = open(path[: -len(".json")] + ".log", "w")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    pending = {run["out"]: run for run in todo}
    while pending:
        for out, run in list(pending.items()):
            result = _cached(run)
            if result is not None:
                del pending[out]
                results.append(result)
                print(
                    f"[{len(results)}/{len(runs)}] {run['model']} seed {run['seed']}: box AP "
                    f"{result['bbox']['AP']:.1f}, {result['total_s'] / 60:.1f} min",
                    flush=True,
                )
        if pending and all(p.poll() is not None for p, _ in procs):
            failed = [p.returncode for p, _ in procs if p.returncode]
            logs = [log.name for _, log in procs]
            raise RuntimeError(
                f"worker(s) stopped (exit {failed}) with {len(pending)} run(s) unfinished; "
                f"see {logs}"
            )
        time.sleep(1.0 if args.quick else 5.0)
    for p, log in procs:
        p.wait()
        log.close()
    summary = summarise(results, [m for m in MODELS if m in args.models])
    wall = time.perf_counter() - start
    text = report(summary, args, params, wall, machine(args.jobs))
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "wall_s": wall, "report": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
