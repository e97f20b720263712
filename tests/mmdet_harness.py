"""mmdetection's own Faster / Mask R-CNN on the CPU, for the converter's tests.

mmdetection 3 (a test dependency: ``make setup`` installs ``mmdet``, ``mmcv-lite``, ``mmengine``)
imports ``mmcv.ops``, whose Python wrappers load mmcv's compiled extension ``mmcv._ext``, absent
from ``mmcv-lite``. Importing this module first registers a stand-in ``mmcv._ext``: the two
kernels the R-CNN path calls, ``nms`` and ``roi_align_forward``, run torchvision's (the kernels
Detectron2 calls here too); every other name is a function that raises. mmcv's own wrappers
(``RoIAlign``, ``nms``, ``batched_nms``) and everything above them run unchanged.
"""

import copy
import os
import sys
import types
from typing import Dict

import numpy as np
import torch
import torchvision

__all__ = [
    "MMDET_CONFIGS",
    "PUBLISHED",
    "build",
    "load_config",
    "randomize",
    "run",
    "save_like_mmdetection",
]

_GC = "gcnet/mask-rcnn_{}_fpn_1x_coco.py"
# Each config of configs/mmdet -> mmdetection's config of that published checkpoint.
PUBLISHED = {
    "mask_rcnn_R50.yaml": "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
    "mask_rcnn_R50_GC_r16.yaml": _GC.format("r50-gcb-r16-c3-c5"),
    "mask_rcnn_R50_GC_r4.yaml": _GC.format("r50-gcb-r4-c3-c5"),
    "mask_rcnn_R101.yaml": "mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py",
    "mask_rcnn_R101_GC_r16.yaml": _GC.format("r101-gcb-r16-c3-c5"),
    "mask_rcnn_R101_GC_r4.yaml": _GC.format("r101-gcb-r4-c3-c5"),
    "mask_rcnn_R50_syncbn.yaml": _GC.format("r50-syncbn"),
    "mask_rcnn_R50_syncbn_GC_r16.yaml": _GC.format("r50-syncbn-gcb-r16-c3-c5"),
    "mask_rcnn_R50_syncbn_GC_r4.yaml": _GC.format("r50-syncbn-gcb-r4-c3-c5"),
    "mask_rcnn_R101_syncbn.yaml": _GC.format("r101-syncbn"),
    "mask_rcnn_R101_syncbn_GC_r16.yaml": _GC.format("r101-syncbn-gcb-r16-c3-c5"),
    "mask_rcnn_R101_syncbn_GC_r4.yaml": _GC.format("r101-syncbn-gcb-r4-c3-c5"),
    "mask_rcnn_X101_32x4d_syncbn.yaml": _GC.format("x101-32x4d-syncbn"),
    "mask_rcnn_X101_32x4d_syncbn_GC_r16.yaml": _GC.format("x101-32x4d-syncbn-gcb-r16-c3-c5"),
    "mask_rcnn_X101_32x4d_syncbn_GC_r4.yaml": _GC.format("x101-32x4d-syncbn-gcb-r4-c3-c5"),
    "faster_rcnn_R50.yaml": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    "faster_rcnn_R50_GA_1111.yaml": "empirical_attention/faster-rcnn_r50-attn1111_fpn_1x_coco.py",
    "faster_rcnn_R50_GA_0010.yaml": "empirical_attention/faster-rcnn_r50-attn0010_fpn_1x_coco.py",
}


def _unavailable(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv._ext.{name}: a compiled mmcv op, absent from the stand-in of "
            "tests/mmdet_harness.py"
        )

    return op


def _nms(boxes, scores, iou_threshold, offset):
    if offset != 0:
        raise NotImplementedError("mmcv._ext.nms stand-in: only offset 0 (mmdetection 2/3 boxes)")
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _roi_align_forward(inputs, rois, output, argmax_y, argmax_x, **kw):
    if kw["pool_mode"] != 1:  # 1: average
        raise NotImplementedError("mmcv._ext.roi_align_forward stand-in: only pool_mode 'avg'")
    size = (kw["aligned_height"], kw["aligned_width"])
    args = (kw["spatial_scale"], kw["sampling_ratio"], kw["aligned"])
    output.copy_(torchvision.ops.roi_align(inputs, rois, size, *args))


def _install_stand_in() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext", "test stand-in for mmcv's compiled ops")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(name)

    ext.__getattr__ = __getattr__
    ext.nms = _nms
    ext.roi_align_forward = _roi_align_forward
    sys.modules["mmcv._ext"] = ext


_install_stand_in()

import mmdet  # noqa: E402
import mmengine  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu  # noqa: E402

register_all_modules()
MMLogger.get_current_instance().setLevel("WARNING")
MMDET_CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")


def load_config(name: str, proposals: int = 0, detections: int = 0) -> Config:
    """An mmdetection config shipped with the package (``gcnet/...py``), without pretrained
    weights; at test time ``proposals`` RPN proposals (default 1000) and ``detections`` per image
    (default 100) when > 0."""
    cfg = Config.fromfile(os.path.join(MMDET_CONFIGS, name))
    cfg.model.backbone.init_cfg = None
    if proposals:
        cfg.model.test_cfg.rpn.max_per_img = proposals
    if detections:
        cfg.model.test_cfg.rcnn.max_per_img = detections
    return cfg


def build(cfg: Config, device: str = "cpu") -> torch.nn.Module:
    """mmdetection's model of ``cfg`` (PyTorch's default initialisation), in eval mode."""
    with torch.device(device):
        model = MODELS.build(cfg.model)
    return model.eval()


def randomize(model: torch.nn.Module, image: np.ndarray, seed: int = 0) -> None:
    """Random weights that make every part count: BN affine and running statistics (those
    measured on ``image``, so that activations stay in range), GC transforms and generalized
    attention's gamma non-zero, class and mask logits spread far from the thresholds, and
    objectness logits below -1 (see below)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                module.reset_parameters()
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.2, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(("appr_bias", "geom_bias")):
                p.normal_(0.0, 0.3, generator=gen)
        for name in ("roi_head.bbox_head.fc_cls", "roi_head.mask_head.conv_logits"):
            try:
                logits = model.get_submodule(name)
            except AttributeError:  # no mask head
                continue
            logits.weight.mul_(30.0)
            logits.bias.normal_(0.0, 2.0, generator=gen)
        bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # the statistics of the one calibration pass
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.2, generator=gen)
            bn.train()
        inputs = preprocess(model, image)[0]
        model.backbone(inputs)
        for bn in bns:
            bn.eval()
        # objectness logits with a spread of 2 and all below -1: mmdetection ranks the sigmoid,
        # Detectron2 the logit; near 1 the float sigmoid merges close logits into ties
        logits = torch.cat([c.flatten() for c in model.rpn_head(model.extract_feat(inputs))[0]])
        rpn_cls = model.rpn_head.rpn_cls
        scale = 2.0 / logits.std()
        rpn_cls.weight.mul_(scale)
        rpn_cls.bias.mul_(scale).sub_(logits.max() * scale + 1.0)


def _sample(image: np.ndarray) -> DetDataSample:
    h, w = image.shape[:2]
    return DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))


def preprocess(model: torch.nn.Module, image: np.ndarray):
    """mmdetection's own normalisation and padding of an HxWx3 uint8 BGR image (as its loader
    reads one): (input tensor, data samples)."""
    data = {
        "inputs": [torch.from_numpy(image.transpose(2, 0, 1).copy())],
        "data_samples": [_sample(image)],
    }
    data = model.data_preprocessor(data, False)
    return data["inputs"], data["data_samples"]


@torch.no_grad()
def run(model: torch.nn.Module, image: np.ndarray) -> Dict[str, object]:
    """Every stage the tests compare, computed by mmdetection's own calls (those of its
    ``TwoStageDetector.predict``): ``inputs`` (normalised, padded), ``features`` (P2-P6),
    ``proposals`` (RPN boxes, best first) and their ``proposal_scores``, ``ranked`` (boxes,
    scores, labels of every detection above the score threshold after NMS, before the cut to
    ``max_per_img``) and the final ``boxes``, ``scores``, ``labels`` (and ``masks``)."""
    inputs, samples = preprocess(model, image)
    features = model.extract_feat(inputs)
    proposals = model.rpn_head.predict(features, samples, rescale=False)
    metas = [s.metainfo for s in samples]
    uncut = copy.deepcopy(model.roi_head.test_cfg)
    uncut.max_per_img = -1
    ranked = model.roi_head.predict_bbox(features, metas, proposals, uncut, rescale=False)[0]
    final = model.roi_head.predict(features, proposals, samples, rescale=True)[0]
    result = {
        "inputs": inputs,
        "features": list(features),
        "proposals": proposals[0].bboxes,
        "proposal_scores": proposals[0].scores,
        "ranked": (ranked.bboxes, ranked.scores, ranked.labels),
        "boxes": final.bboxes,
        "scores": final.scores,
        "labels": final.labels,
    }
    if "masks" in final:
        result["masks"] = final.masks
    return result


def save_like_mmdetection(model: torch.nn.Module, cfg: Config, path: str, layout: str) -> None:
    """Save as mmdetection does: ``layout`` "3.x" as mmengine's runner and mmdetection 3's
    publish script leave it (``meta['cfg']``, ``dataset_meta``), "2.x" as mmdetection 2's runner
    and publish script (``meta['config']``, ``mmdet_version``, ``CLASSES``; saved in the old
    serialization)."""
    classes = tuple(f"class{i}" for i in range(80))
    state = weights_to_cpu(model.state_dict())
    if layout == "3.x":
        meta = dict(
            cfg=cfg.pretty_text,
            seed=0,
            experiment_name="test",
            time="20260101_000000",
            mmengine_version=mmengine.__version__,
            dataset_meta=dict(classes=classes, palette=[(220, 20, 60)] * 80),
            epoch=12,
            iter=88000,
        )
        save_checkpoint({"meta": meta, "state_dict": state}, path)
    elif layout == "2.x":
        meta = dict(
            mmdet_version="2.28.2", config=cfg.pretty_text, CLASSES=classes, epoch=12, iter=88000
        )
        torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=False)
    else:
        raise ValueError(f"layout={layout!r}; allowed: '2.x', '3.x'")
