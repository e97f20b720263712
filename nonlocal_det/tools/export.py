"""Export a model with non-local blocks: TorchScript (scripting, tracing) and ONNX.

    python -m nonlocal_det.tools.export --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml \\
        --output output/export MODEL.WEIGHTS output/demo/model_final.pth
    python -m nonlocal_det.tools.export --config-file configs/mask_rcnn_R50_NL.yaml --image photo.jpg \\
        --method scripting,tracing --output output/export MODEL.WEIGHTS model_final.pth

Uses Detectron2's own export machinery: ``scripting_with_instances`` (scripting) and
``TracingAdapter`` (tracing, and ONNX through the TorchScript-based ``torch.onnx.export``). The
exported models compute ``model.inference(inputs, do_postprocess=False)``: detections at the input
tensor's resolution, masks as 28x28 (``M``x``M``) probabilities per box, as Detectron2's
``tools/deploy/export_model.py`` exports them. After writing each file the command runs it on the
sample image and prints its largest difference from the eager model (ONNX: with onnxruntime, when
it is installed). ``onnx-backbone`` exports the backbone alone (image -> FPN features) with
dynamic height and width.

Not exportable to ONNX (the command says so and goes on with the other methods): the
``concatenation`` pairwise form (its exact O(N log N) algorithm needs ``searchsorted``, which ONNX
has no operator for; the other three forms export), and a keypoint head in the whole model
(Detectron2's keypoint decoding does not translate; scripting and tracing handle both).
"""

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ..layers import NonLocalBlock
from ._common import check_outputs, load_config

__all__ = [
    "METHODS",
    "INSTANCE_FIELDS",
    "script_model",
    "trace_model",
    "export_onnx",
    "export_backbone_onnx",
    "run_onnx",
    "main",
    "parser",
]

METHODS = ("scripting", "tracing", "onnx", "onnx-backbone")
# Fields of Detectron2's Instances in R-CNN inference (scripting needs them declared).
INSTANCE_FIELDS = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
    "pred_masks": torch.Tensor,
    "pred_keypoints": torch.Tensor,
    "pred_keypoint_heatmaps": torch.Tensor,
}
ONNX_OPSET = 17


class _ScriptableInference(nn.Module):
    """``model.inference`` with plain-dict outputs, so that scripting has a concrete signature."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model
        model.eval()

    def forward(self, inputs: Tuple[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        instances = self.model.inference(inputs, do_postprocess=False)
        return [i.get_fields() for i in instances]


def _inference(model: GeneralizedRCNN, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _plain_containers(model: nn.Module) -> None:
    """Turn omegaconf lists/dicts held by modules into Python ones, in place.

    A model built from a LazyConfig keeps list arguments (``out_features``, ``in_features``...) as
    omegaconf ``ListConfig``, which TorchScript cannot type; the values are unchanged.
    """
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, (DictConfig, ListConfig)):
                setattr(module, name, OmegaConf.to_container(value))


def script_model(model: GeneralizedRCNN) -> torch.jit.ScriptModule:
    """TorchScript by scripting (``scripting_with_instances``): input a tuple of
    ``{"image": CHW tensor}``, output one dict of prediction tensors per image.

    Works for models built from YAML configs and from LazyConfig files (whose omegaconf list
    attributes are first turned into Python lists, see :func:`_plain_containers`)."""
    _plain_containers(model)
    return scripting_with_instances(_ScriptableInference(model).eval(), INSTANCE_FIELDS)


def trace_model(model: GeneralizedRCNN, image: torch.Tensor):
    """TorchScript by tracing, through Detectron2's ``TracingAdapter``.

    Args:
        model: an R-CNN in eval mode.
        image: a CHW tensor in the model's input format (BGR 0-255 for the COCO configs).

    Returns:
        (traced module taking ``image`` and returning a flat tuple of tensors, adapter whose
        ``outputs_schema`` rebuilds ``[{"instances": Instances}]`` from that tuple).
    """
    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], _inference).eval()
    traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def _check_onnx_exportable(model: nn.Module) -> None:
    roi_heads = getattr(model, "roi_heads", None)
    if getattr(roi_heads, "keypoint_on", False):
        raise ValueError(
            "a keypoint head cannot be exported to ONNX: Detectron2's keypoint decoding "
            "(heatmaps_to_keypoints, a scripted loop over boxes) has no ONNX translation in this "
            "torch; export with MODEL.KEYPOINT_ON False, or use scripting / tracing"
        )
    for name, m in model.named_modules():
        if isinstance(m, NonLocalBlock) and m.pairwise == "concatenation":
            raise ValueError(
                f"{name}: pairwise='concatenation' (MODEL.NONLOCAL.PAIRWISE) cannot be exported to "
                "ONNX: its exact algorithm needs searchsorted, which ONNX has no operator for; "
                "allowed for ONNX: gaussian, embedded_gaussian, dot_product"
            )


def export_onnx(model: GeneralizedRCNN, image: torch.Tensor, path: str):
    """The whole model as ONNX (opset 17), via ``TracingAdapter`` like Detectron2's own export.

    The graph is traced for this image's size: give inputs of the same height and width.

    Returns:
        the ``TracingAdapter`` (its ``outputs_schema`` rebuilds Instances from the ONNX outputs).
    """
    _check_onnx_exportable(model)
    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], _inference).eval()
    with torch.no_grad():
        torch.onnx.export(
            adapter, adapter.flattened_inputs, path, dynamo=False, opset_version=ONNX_OPSET
        )
    return adapter


class _BackboneOutputs(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.names = sorted(backbone.output_shape())

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone(image)
        return tuple(features[k] for k in self.names)


def export_backbone_onnx(backbone: nn.Module, images: torch.Tensor, path: str) -> List[str]:
    """The backbone as ONNX (opset 17): input ``images`` (N, 3, H, W, normalised, H and W
    multiples of the backbone's size divisibility, both dynamic), one output per feature map.

    Returns:
        list[str]: the output names (``p2``...``p6`` for an FPN), in output order.
    """
    _check_onnx_exportable(backbone)
    wrapper = _BackboneOutputs(backbone).eval()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch", 2: f"{name}_h", 3: f"{name}_w"} for name in wrapper.names})
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (images,),
            path,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=wrapper.names,
            dynamic_axes=axes,
        )
    return wrapper.names


def run_onnx(path: str, inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    """Run an ONNX file with onnxruntime on the CPU (ImportError if it is not installed)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> str:
    if a.keys() != b.keys():
        return f"different fields: {sorted(a)} vs {sorted(b)}"
    parts = []
    for k in sorted(a):
        x, y = a[k].float(), b[k].float()
        parts.append(
            f"{k} {(x - y).abs().max().item() if x.numel() else 0.0:.2g}"
            if x.shape == y.shape
            else f"{k} shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        )
    return ", ".join(parts)


def _fields(instances: Instances) -> Dict[str, torch.Tensor]:
    return {k: getattr(v, "tensor", v) for k, v in instances.get_fields().items()}


def _sample_image(cfg, path: Optional[str]) -> torch.Tensor:
    if path:
        array = read_image(path, format=cfg.INPUT.FORMAT)
        return torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1)))
    size = min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(3, size, size, generator=generator) * 255).round()


def _methods(text: str) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown method(s) {bad}; allowed: a comma-separated list of {list(METHODS)}"
        )
    return methods


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, help="directory for the exported files")
    p.add_argument(
        "--method",
        type=_methods,
        default=list(METHODS),
        help=f"comma-separated, from {','.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--image",
        help="sample image (read in INPUT.FORMAT, not resized: pass it at the size the exported "
        "model will see); default: a random image of INPUT.MIN_SIZE_TEST pixels",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    """Command-line entry point; returns {method: written file}."""
    args = parser().parse_args(argv)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu"] + list(args.opts))
    cfg.freeze()
    files = {"scripting": "model_scripted.ts", "tracing": "model_traced.ts", "onnx": "model.onnx"}
    outputs = [os.path.join(args.output, files.get(m, "backbone.onnx")) for m in args.method]
    inputs = {"--config-file": [args.config_file], "--image": [args.image or ""]}
    check_outputs({"--output": outputs}, {**inputs, "MODEL.WEIGHTS": [cfg.MODEL.WEIGHTS]})
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = _sample_image(cfg, args.image)
    os.makedirs(args.output, exist_ok=True)
    with torch.no_grad():
        eager = _fields(_inference(model, [{"image": image}])[0]["instances"])
    written = {}
    for method in args.method:
        if method == "scripting":
            path = os.path.join(args.output, "model_scripted.ts")
            script_model(model).save(path)
            with torch.no_grad():
                out = torch.jit.load(path)(({"image": image},))[0]
            check = _max_diff(eager, {k: v for k, v in out.items() if k in eager})
        elif method == "tracing":
            path = os.path.join(args.output, "model_traced.ts")
            traced, adapter = trace_model(model, image)
            traced.save(path)
            with torch.no_grad():
                flat = torch.jit.load(path)(image)
            check = _max_diff(eager, _fields(adapter.outputs_schema(flat)[0]["instances"]))
        elif method == "onnx":
            path = os.path.join(args.output, "model.onnx")
            try:
                adapter = export_onnx(model, image, path)
            except ValueError as e:
                print(f"onnx: not exported: {e}")
                continue
            check = _onnx_check(
                path, [image], lambda o: _fields(adapter.outputs_schema(o)[0]["instances"]), eager
            )
        else:
            path = os.path.join(args.output, "backbone.onnx")
            images = model.preprocess_image([{"image": image}]).tensor
            names = export_backbone_onnx(model.backbone, images, path)
            with torch.no_grad():
                ref = model.backbone(images)
            check = _onnx_check(path, [images], lambda o: dict(zip(names, o)), ref)
        written[method] = path
        print(f"{method}: wrote {path}; max |exported - eager| on the sample image: {check}")
    return written


def _onnx_check(path, inputs, rebuild, eager) -> str:
    try:
        outputs = run_onnx(path, inputs)
    except ImportError:
        return "not run (onnxruntime is not installed)"
    return _max_diff(eager, rebuild([torch.as_tensor(o) for o in outputs]))


if __name__ == "__main__":
    main()
