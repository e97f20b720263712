"""roi_align_gather (torchvision's roi_align, Detectron2's ROIAlign, computed by gathers) and
roi_align_fast_backward / GatherROIAlign (torchvision's forward, the gathers' backward), against a
plain loop over the definition and against torchvision, forward and backward, fp32 and fp64, with
gradcheck; and MODEL.ROI_HEADS.GATHER_ROI_ALIGN in HeadSampledROIHeads."""

import math

import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.roi_heads import StandardROIHeads
from test_roi_heads import build, heads_cfg, inputs, train_losses
from torchvision.ops import roi_align

from nonlocal_demo.roi_align import GatherROIAlign, roi_align_fast_backward, roi_align_gather


def reference(feat, rois, out_hw, scale, ratio, aligned):
    """The definition, one sample at a time: each bin the mean of ratio x ratio bilinear samples
    at the centres of a regular grid; a sample more than a pixel outside reads 0, one within a
    pixel of the border reads the border."""
    n, c, h, w = feat.shape
    out = torch.zeros(len(rois), c, *out_hw, dtype=feat.dtype)

    def sample(img, y, x):
        if y < -1 or y > h or x < -1 or x > w:
            return torch.zeros(c, dtype=feat.dtype)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
        y = float(y0) if y0 == h - 1 else y
        x = float(x0) if x0 == w - 1 else x
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        ly, lx = y - y0, x - x0
        f = feat[img]
        return ((1 - ly) * (1 - lx) * f[:, y0, x0] + (1 - ly) * lx * f[:, y0, x1]
                + ly * (1 - lx) * f[:, y1, x0] + ly * lx * f[:, y1, x1])  # fmt: skip

    off = 0.5 if aligned else 0.0
    for k, (b, xa, ya, xb, yb) in enumerate(rois.tolist()):
        xa, ya, xb, yb = (v * scale - off for v in (xa, ya, xb, yb))
        rw, rh = xb - xa, yb - ya
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / out_hw[1], rh / out_hw[0]
        for i in range(out_hw[0]):
            for j in range(out_hw[1]):
                acc = torch.zeros(c, dtype=feat.dtype)
                for iy in range(ratio):
                    for ix in range(ratio):
                        y = ya + i * bh + (iy + 0.5) * bh / ratio
                        x = xa + j * bw + (ix + 0.5) * bw / ratio
                        acc = acc + sample(int(b), y, x)
                out[k, :, i, j] = acc / ratio**2
    return out


def case(dtype, seed=0, k=12):
    """Features of 3 images and k RoIs of every kind: inside, across a border, outside, tiny."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(3, 4, 9, 11, generator=g, dtype=dtype)
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * 50 - 8
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * 30
    rois = torch.cat([torch.randint(0, 3, (k, 1), generator=g).to(dtype), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([-40.0, -30.0, -9.0, -6.0])  # entirely outside
    rois[1, 1:] = torch.tensor([30.0, 20.0, 60.0, 50.0])  # across the bottom-right border
    rois[2, 1:] = torch.tensor([10.0, 10.0, 10.5, 10.2])  # smaller than a pixel
    return feat, rois


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio", [1, 2])
def test_equals_the_definition_and_torchvision(dtype, tol, aligned, ratio):
    feat, rois = case(dtype)
    feat.requires_grad_()
    args = ((3, 4), 0.25, ratio, aligned)
    ours = roi_align_gather(feat, rois, *args)
    ref = reference(feat.detach(), rois, *args)
    theirs = roi_align(feat, rois, *args)
    assert ours.shape == (12, 4, 3, 4) and ours.dtype == dtype
    assert ours[0].abs().max() == 0 and ref[1].abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    fast = roi_align_fast_backward(feat, rois, *args)
    assert torch.equal(fast, theirs)  # torchvision's forward
    grad = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, feat, grad)
    (g_theirs,) = torch.autograd.grad(theirs, feat, grad)
    (g_fast,) = torch.autograd.grad(fast, feat, grad)
    assert g_theirs.abs().max() > 0
    torch.testing.assert_close(g_ours, g_theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(g_fast, g_theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("fn", [roi_align_gather, roi_align_fast_backward])
@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck(fn, aligned):
    feat, rois = case(torch.float64, seed=1, k=5)
    feat = feat[:, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: fn(f, rois, (2, 3), 0.5, 2, aligned), (feat,))


def test_without_a_gradient_it_is_torchvisions():
    feat, rois = case(torch.float32)
    out = roi_align_fast_backward(feat.requires_grad_(), rois, (3, 3), 0.25, 1, True)
    assert out.grad_fn is not None and "ROIAlignGatherBackward" in type(out.grad_fn).__name__
    with torch.no_grad():
        plain = roi_align_fast_backward(feat, rois, (3, 3), 0.25, 1, True)
    assert plain.grad_fn is None and torch.equal(plain, out.detach())


def test_module_and_no_rois_and_bad_arguments():
    layer = GatherROIAlign(7, 0.25, 1, aligned=True)
    d2 = ROIAlign((7, 7), 0.25, 1, aligned=True)
    feat, rois = case(torch.float32)
    torch.testing.assert_close(layer(feat, rois), d2(feat, rois), rtol=2e-5, atol=2e-5)
    assert layer(feat, rois[:0]).shape == (0, 4, 7, 7)
    assert roi_align_gather(feat, rois[:0], (7, 7), 0.25, 1, True).shape == (0, 4, 7, 7)
    assert "sampling_ratio=1" in repr(layer)
    with pytest.raises(ValueError, match=r"sampling_ratio=0 .*>= 1"):
        GatherROIAlign(7, 0.25, 0)
    with pytest.raises(ValueError, match=r"rois of shape \(3, 4\).*\(K, 5\)"):
        roi_align_gather(feat, rois[:3, 1:], (7, 7), 0.25, 1, True)


def gather_cfg(**kw):
    cfg = heads_cfg(**kw)
    cfg.MODEL.ROI_HEADS.GATHER_ROI_ALIGN = True
    return cfg


def test_heads_with_gathers_compute_what_detectron2s_roi_align_computes():
    fast, plain = build(gather_cfg(mask_rois=8, keypoint_rois=4)), build(
        heads_cfg(mask_rois=8, keypoint_rois=4)
    )
    for name in ("box_pooler", "mask_pooler", "keypoint_pooler"):
        layers = getattr(fast, name).level_poolers
        assert len(layers) == 4 and all(type(m) is GatherROIAlign for m in layers), name
        assert all(type(m) is ROIAlign for m in getattr(plain, name).level_poolers), name
    assert fast.state_dict().keys() == plain.state_dict().keys()
    a, b = train_losses(fast), train_losses(plain)
    assert a.keys() == b.keys() and {"loss_mask", "loss_keypoint"} <= a.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    features, proposals, _ = inputs()
    with torch.no_grad():
        ours, theirs = [h.eval()(None, features, proposals)[0] for h in (fast, plain)]
    for x, y in zip(ours, theirs):
        assert len(x) == len(y) > 0
        for field in ("pred_boxes", "scores", "pred_masks", "pred_keypoints"):
            u, v = x.get(field), y.get(field)
            u, v = (u.tensor, v.tensor) if field == "pred_boxes" else (u, v)
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-3)


def test_scripted_and_traced_it_is_detectron2s_roi_align():
    layer, d2 = GatherROIAlign(7, 0.25, 2, aligned=True), ROIAlign((7, 7), 0.25, 2, aligned=True)
    assert isinstance(layer, ROIAlign)
    feat, rois = case(torch.float32)
    feat.requires_grad_()  # a gradient is wanted, yet no Python autograd.Function is recorded
    scripted = torch.jit.script(layer)
    traced = torch.jit.trace(layer, (feat, rois), check_trace=False)
    assert "PythonOp" not in str(traced.graph) and "torchvision::roi_align" in str(traced.graph)
    for m in (scripted, traced):
        assert torch.equal(m(feat, rois), d2(feat, rois))


def test_scripting_makes_no_new_modules():
    """TorchScript's preparation memo is keyed by id(): a module made by ``__prepare_scriptable__``
    can reuse the address of one Detectron2's ResNet/FPN preparation freed and be typed as it (a
    pooler level typed as ResNet, seen once in four full test runs). The scriptable heads reuse
    the model's own modules, GatherROIAlign included (the scripted demo model's predictions:
    test_export.test_model_built_from_a_lazy_config_scripts)."""
    heads = build(gather_cfg()).eval()
    scriptable = heads.__prepare_scriptable__()
    assert scriptable is not heads and type(scriptable) is StandardROIHeads
    own = {id(m) for m in heads.modules()}
    assert all(id(m) in own for m in scriptable.modules() if m is not scriptable)
    for name in ("box_pooler", "mask_pooler", "keypoint_pooler"):
        assert all(type(m) is GatherROIAlign for m in getattr(heads, name).level_poolers)


@pytest.mark.parametrize(
    "key,value,allowed",
    [("POOLER_SAMPLING_RATIO", 0, "an integer >= 1"), ("POOLER_TYPE", "ROIPool", "ROIAlign")],
)
def test_a_pooler_gathers_cannot_compute_names_the_key(key, value, allowed):
    cfg = gather_cfg()
    cfg.MODEL.ROI_MASK_HEAD[key] = value
    with pytest.raises(ValueError, match=rf"MODEL.ROI_MASK_HEAD.{key}.*allowed: {allowed}"):
        build(cfg)
