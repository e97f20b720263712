"""Export of a whole Mask R-CNN (+ keypoints) with non-local blocks: TorchScript scripting and
tracing, ONNX of the backbone and of the model (run with onnxruntime), and the export command.

Tolerances: TorchScript runs the same kernels as eager, so its outputs must match to 1e-5
(measured: identical). onnxruntime has its own kernels: features and mask/score probabilities to
1e-4, boxes (pixels) to 1e-3 (measured on these models: at most 9.6e-6 on features, 1.9e-6 px on
boxes, 2.4e-7 on a single block)."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from utils import DEMO_DIR, DEMO_LAZY, DEMO_YAML, REPO, load_cfg

from nonlocal_det import NonLocalBlock
from nonlocal_det.tools.export import (
    export_backbone_onnx,
    export_onnx,
    run_onnx,
    script_model,
    trace_model,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit is deprecated
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # Detectron2's, expected
]
DEMO = DEMO_YAML
ORT_REASON = "onnxruntime is not installed (`make setup` installs it)"


def tiny_model(*opts):
    """The demo Mask R-CNN + keypoints (ResNet-18, one block in res4, two in the keypoint head),
    untrained, with every non-local block made non-trivial and peaky keypoint heatmaps (Detectron2's
    keypoint decoding asserts on near-flat ones)."""
    torch.manual_seed(0)
    return _nontrivial(build_model(load_cfg(DEMO, list(opts))).eval())


def _nontrivial(model):
    for m in model.modules():
        if isinstance(m, NonLocalBlock):
            torch.nn.init.normal_(m.out.weight, std=0.05)
    heads = model.roi_heads
    heads.box_predictor.test_score_thresh = 0.0
    heads.box_predictor.test_topk_per_image = 20
    if heads.keypoint_on:
        heads.keypoint_head.score_lowres.weight.data.mul_(50)
    return model


def image(h=128, w=160, seed=1):
    return (torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).round()


def eager(model, img):
    with torch.no_grad():
        inst = model.inference([{"image": img}], do_postprocess=False)[0]
    return {k: getattr(v, "tensor", v) for k, v in inst.get_fields().items()}


def assert_same(out, ref, atol=1e-5, rtol=1e-5, box_atol=None):
    assert set(out) == set(ref) and len(ref["scores"]) > 0
    for k in ref:
        a = box_atol if (k == "pred_boxes" and box_atol) else atol
        torch.testing.assert_close(out[k].to(ref[k].dtype), ref[k], atol=a, rtol=rtol, msg=k)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_scripted_model_matches_eager(model, tmp_path):
    path = str(tmp_path / "model.ts")
    script_model(model).save(path)
    scripted = torch.jit.load(path)
    for img in (image(), image(160, 96, seed=2)):  # scripting is not tied to one input size
        ref = eager(model, img)
        assert {"pred_masks", "pred_keypoints", "pred_keypoint_heatmaps"} <= set(ref)
        with torch.no_grad():
            out = scripted(({"image": img},))[0]
        assert_same({k: out[k] for k in ref}, ref)


def test_model_built_from_a_lazy_config_scripts():
    """LazyConfig models keep list arguments as omegaconf lists, which TorchScript cannot type
    (Detectron2's own LazyConfig models fail the same way); script_model converts them."""
    torch.manual_seed(0)
    cfg = LazyConfig.load(DEMO_LAZY)
    model = _nontrivial(instantiate(cfg.model).eval())
    scripted = script_model(model)
    img = image()
    ref = eager(model, img)
    with torch.no_grad():
        out = scripted(({"image": img},))[0]
    assert_same({k: out[k] for k in ref}, ref)


def test_traced_model_matches_eager(model, tmp_path):
    traced, adapter = trace_model(model, image())
    path = str(tmp_path / "model.ts")
    traced.save(path)
    loaded = torch.jit.load(path)
    for img in (image(), image(160, 96, seed=2)):
        with torch.no_grad():
            inst = adapter.outputs_schema(loaded(img))[0]["instances"]
        out = {k: getattr(v, "tensor", v) for k, v in inst.get_fields().items()}
        assert_same(out, eager(model, img))


def test_backbone_onnx_runs_in_onnxruntime(model, tmp_path):
    pytest.importorskip("onnxruntime", reason=ORT_REASON)
    images = model.preprocess_image([{"image": image()}]).tensor
    path = str(tmp_path / "backbone.onnx")
    names = export_backbone_onnx(model.backbone, images, path)
    assert names == ["p2", "p3", "p4", "p5"]  # the demo FPN: res2-res4, P5 max-pooled from P4
    # Height, width and batch are dynamic in the graph.
    other = model.preprocess_image([{"image": image(96, 224, 3)}, {"image": image(96, 224, 4)}])
    for x in (images, other.tensor):
        with torch.no_grad():
            ref = model.backbone(x)
        for name, out in zip(names, run_onnx(path, [x])):
            torch.testing.assert_close(torch.as_tensor(out), ref[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "gaussian", "dot_product"])
def test_every_exportable_pairwise_form_runs_in_onnxruntime(pairwise, tmp_path):
    pytest.importorskip("onnxruntime", reason=ORT_REASON)
    torch.manual_seed(0)
    block = NonLocalBlock(32, pairwise=pairwise).eval()
    torch.nn.init.normal_(block.out.weight, std=0.1)
    x = torch.randn(1, 32, 10, 12)
    path = str(tmp_path / "block.onnx")
    axes = {"x": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(block, (x,), path, dynamo=False, input_names=["x"], dynamic_axes=axes)
    for inp in (x, torch.randn(2, 32, 7, 9)):
        with torch.no_grad():
            ref = block(inp)
        assert (ref - inp).abs().max() > 1e-3  # the block is not the identity
        torch.testing.assert_close(
            torch.as_tensor(run_onnx(path, [inp])[0]), ref, atol=1e-5, rtol=1e-5
        )


def test_mask_rcnn_onnx_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime", reason=ORT_REASON)
    model = tiny_model("MODEL.KEYPOINT_ON", False)
    img = image()
    path = str(tmp_path / "model.onnx")
    adapter = export_onnx(model, img, path)
    outputs = [torch.as_tensor(o) for o in run_onnx(path, [img])]
    inst = adapter.outputs_schema(outputs)[0]["instances"]
    out = {k: getattr(v, "tensor", v) for k, v in inst.get_fields().items()}
    assert_same(out, eager(model, img), atol=1e-4, rtol=1e-4, box_atol=1e-3)


def test_onnx_export_refuses_what_onnx_cannot_express(tmp_path):
    path = str(tmp_path / "x.onnx")
    concat = tiny_model("MODEL.NONLOCAL.PAIRWISE", "concatenation", "MODEL.KEYPOINT_ON", False)
    with pytest.raises(ValueError, match="concatenation.*searchsorted"):
        export_onnx(concat, image(), path)
    with pytest.raises(ValueError, match="concatenation"):
        export_backbone_onnx(concat.backbone, torch.zeros(1, 3, 64, 64), path)
    with pytest.raises(ValueError, match="keypoint head.*MODEL.KEYPOINT_ON False"):
        export_onnx(tiny_model(), image(), path)
    assert not os.path.exists(path)


@pytest.mark.slow
def test_export_command(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, os.path.join(DEMO_DIR, "command.py"), "export", "--config-file"]
        + [DEMO_YAML, "--output", str(out), "MODEL.KEYPOINT_ON", "False"],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("model_scripted.ts", "model_traced.ts", "model.onnx", "backbone.onnx"):
        assert (out / name).is_file(), name
    lines = [l for l in proc.stdout.splitlines() if "max |exported - eager|" in l]
    assert len(lines) == 4, proc.stdout
    for line in lines[:2]:  # TorchScript: the same kernels as eager
        assert "pred_boxes 0," in line and "scores 0" in line, line
