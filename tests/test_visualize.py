"""Attention pictures: top-k keys equal a reference computation; image and clip commands."""

import numpy as np
import pytest
import torch
from PIL import Image
from utils import CONFIGS, DEMO_YAML

from nonlocal_det import NonLocalBlock
from nonlocal_det.modeling.attention import compute_arrows
from nonlocal_det.tools.visualize import main, space_time_view


def _randomise(block):
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _reference_attention(block, x2d_or_3d, flat_query):
    """softmax_j(theta_q . phi_j / sqrt(C_inner)) over max-pooled keys, written out plainly."""
    dim = x2d_or_3d.dim() - 2
    conv = torch.nn.functional.conv2d if dim == 2 else torch.nn.functional.conv3d
    w_t, w_p = block.theta.weight, block.phi.weight
    if dim == 3 and w_t.dim() == 4:
        w_t, w_p = w_t.unsqueeze(2), w_p.unsqueeze(2)
    theta = conv(x2d_or_3d, w_t, block.theta.bias).flatten(2)[0]  # (C_inner, N)
    phi = conv(x2d_or_3d, w_p, block.phi.bias)
    phi = (
        torch.nn.functional.max_pool2d(phi, 2)
        if dim == 2
        else torch.nn.functional.max_pool3d(phi, (1, 2, 2))
    )
    phi = phi.flatten(2)[0]  # (C_inner, M)
    logits = theta[:, flat_query] @ phi / block.inner_channels**0.5
    return torch.softmax(logits, dim=0)


def test_topk_keys_equal_reference_2d():
    block = _randomise(NonLocalBlock(16)).eval()
    x = torch.randn(1, 16, 10, 14)
    stride, scale = 8, (0.5, 0.5)  # the network saw the image at half size
    pixels = [(100.0, 60.0), (20.0, 150.0)]
    arrows = compute_arrows(block, x, pixels, stride, scale, topk=5)
    for q, (px, py) in enumerate(pixels):
        i, j = int(py * 0.5 // stride), int(px * 0.5 // stride)
        assert arrows.queries[q].tolist() == [0, (j + 0.5) * stride / 0.5, (i + 0.5) * stride / 0.5]
        ref = _reference_attention(block, x, i * 14 + j)
        weights, index = ref.detach().topk(5)
        np.testing.assert_allclose(arrows.weights[q], weights.numpy(), rtol=1e-5)
        ki, kj = index // 7, index % 7  # pooled key grid is 5 x 7
        expected_x = ((kj * 2 + 1) * stride / 0.5).numpy()
        expected_y = ((ki * 2 + 1) * stride / 0.5).numpy()
        np.testing.assert_allclose(arrows.keys[q, :, 1], expected_x)
        np.testing.assert_allclose(arrows.keys[q, :, 2], expected_y)


def test_space_time_view_reference_3_frames():
    block = _randomise(NonLocalBlock(16)).eval()
    view = space_time_view(block)
    x = torch.randn(1, 16, 3, 6, 8)
    arrows = compute_arrows(
        view, x, [(40.0, 20.0)], stride=8, scale=(1.0, 1.0), topk=6, query_frame=1
    )
    i, j = 20 // 8, 40 // 8
    ref = _reference_attention(block, x, 1 * 48 + i * 8 + j)  # same 2-D weights, as 1x1x1 convs
    assert ref.sum().item() == pytest.approx(1.0, abs=1e-5)
    weights, index = ref.detach().topk(6)
    np.testing.assert_allclose(arrows.weights[0], weights.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(arrows.keys[0, :, 0], (index // 12).numpy())  # frame of each key
    assert arrows.queries[0][0] == 1


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    paths = []
    for t in range(3):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        path = d / f"frame{t}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


DEMO = DEMO_YAML
SMALL = ["MODEL.KEYPOINT_ON", "False", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]


def test_command_on_an_image_writes_png_of_image_size(frames, tmp_path):
    out = tmp_path / "att.png"
    arrows = main(
        [
            "--config-file",
            DEMO,
            "--input",
            frames[0],
            "--output",
            str(out),
            "--query",
            "64,48",
            "--query",
            "10,90",
            "--topk",
            "7",
            *SMALL,
        ]
    )
    width, height = Image.open(out).size
    assert width == round(128 * 512 / 96) and height > 512  # enlarged, legend below
    assert arrows.keys.shape == (2, 7, 3) and arrows.weights.shape == (2, 7)
    assert np.all(np.diff(arrows.weights, axis=1) <= 0)  # sorted by weight
    assert np.all((arrows.keys[..., 1] >= 0) & (arrows.keys[..., 1] <= 128))


def test_command_on_a_clip_lays_frames_side_by_side(frames, tmp_path):
    out = tmp_path / "clip.png"
    arrows = main(
        [
            "--config-file",
            DEMO,
            "--input",
            *frames,
            "--output",
            str(out),
            "--query",
            "64,48",
            "--topk",
            "30",
            *SMALL,
        ]
    )
    assert Image.open(out).size[0] == 3 * round(128 * 512 / 96) + 2 * 8
    assert set(arrows.keys[0, :, 0].astype(int)) <= {0, 1, 2}
    assert arrows.queries[0][0] == 1  # middle frame by default


def test_bad_block_name_lists_the_allowed_ones(frames, tmp_path):
    with pytest.raises(ValueError, match="backbone.bottom_up.res4.nonlocal0"):
        main(
            [
                "--config-file",
                DEMO,
                "--input",
                frames[0],
                "--output",
                str(tmp_path / "x.png"),
                "--block",
                "roi_heads.keypoint_head.nonlocal2",
                *SMALL,
            ]
        )


FAMILY = {  # type -> (overrides for the demo's ResNet-18, arrows?, heat map?)
    "simplified": (["MODEL.NONLOCAL.POSITION", "after_add"], False, True),
    "global_context": (["MODEL.NONLOCAL.POSITION", "after_conv2"], False, True),
    "disentangled": (["MODEL.NONLOCAL.POSITION", "after_add"], True, True),
    "criss_cross": ([], True, False),
    "generalized_attention": (["MODEL.NONLOCAL.POSITION", "after_conv2"], True, False),
}


@pytest.mark.parametrize("block_type", sorted(FAMILY))
def test_every_block_type_is_drawn(block_type, frames, tmp_path, monkeypatch):
    import nonlocal_det.tools.visualize as visualize

    overrides, has_arrows, has_heat = FAMILY[block_type]
    heats = []
    original = visualize.draw
    monkeypatch.setattr(visualize, "draw", lambda *a, **k: heats.append(a[2]) or original(*a, **k))
    out = tmp_path / "att.png"
    argv = ["--config-file", DEMO, "--input", frames[0], "--output", str(out), "--query", "64,48"]
    arrows = main(argv + [*SMALL, "MODEL.NONLOCAL.TYPE", block_type, *overrides])
    assert (arrows is not None) == has_arrows and (heats[0] is not None) == has_heat
    if has_heat:
        assert heats[0].sum() == pytest.approx(1.0, abs=1e-4)  # one map over the positions
    if block_type == "criss_cross":  # keys on the query's row or column (96x128 at stride 16)
        qx, qy = arrows.queries[0][1:]
        on_row = np.isclose(arrows.keys[0, :, 2], qy)
        on_column = np.isclose(arrows.keys[0, :, 1], qx)
        assert np.all(on_row | on_column)
    assert Image.open(out).size[1] > 512
