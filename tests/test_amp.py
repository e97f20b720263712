"""Mixed precision with non-local blocks.

* CPU autocast (bf16, and fp16 where PyTorch's CPU autocast supports it) of the block with large
  activations (theta . phi beyond fp16's range: tests/test_nonlocal_block.py): finite and close to
  the float64 reference.
* ``SOLVER.AMP.ENABLED`` (a LazyConfig's ``train.amp.enabled``) on CPU trains (bf16 autocast of
  the forward; Detectron2's AMPTrainer needs CUDA), and evaluates in fp32.
* CUDA fp16: Detectron2's AMPTrainer with non-local blocks (skipped without a GPU).

Every block type of the family in float16 (autocast and half modules, gradients, against
float64): tests/test_fp16_blocks.py.
"""

import json
import math

import pytest
import torch
from coco_files import write_split
from subproc import DEMO, TINY
from test_nonlocal_block import _large_activation_block, _large_input, reference
from utils import lazy_demo_cfg, train_cfg

from nonlocal_det.data import register_datasets_for_config
from nonlocal_det.engine import CPUAutocast, NonLocalTrainer
from nonlocal_det.layers import PAIRWISE_FUNCTIONS, NonLocalBlock
from nonlocal_det.modeling import check_model_config


def _autocast_forward(block, x, device, dtype):
    with torch.autocast(device, dtype=dtype):
        out = block(x)
        w = block.attention_for_queries(x, torch.tensor([0, 5, 11]))
    return out, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_block_under_cpu_autocast_large_activations(pairwise, dtype):
    block = _large_activation_block(pairwise)  # fp32 weights, as in mixed-precision training
    x = _large_input(torch.float32)
    with torch.no_grad():
        out, w = _autocast_forward(block, x, "cpu", dtype)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    expected, attention, _ = reference(block, x)
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"
    err_w = (w.double() - attention[:, [0, 5, 11]].reshape(w.shape)).abs().max()
    assert err_w < 2e-2 * attention.abs().max()

    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = block(x).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("amp")), "train")


def _trainer(data, tmp_path, extra=()):
    opts = ["DATASETS.TRAIN_JSON", data["json"], "DATASETS.TRAIN_IMAGES", data["images"], *TINY]
    opts += ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path), *extra]
    cfg = train_cfg(DEMO, opts)
    check_model_config(cfg)
    cfg.freeze()
    register_datasets_for_config(cfg)
    torch.manual_seed(0)
    return NonLocalTrainer(cfg)


def test_amp_training_on_cpu_runs_the_blocks_in_bf16(data, tmp_path):
    trainer = _trainer(data, tmp_path, ["SOLVER.AMP.ENABLED", "True"])
    assert isinstance(trainer.model, CPUAutocast)
    seen = []
    blocks = [m for m in trainer.model.modules() if isinstance(m, NonLocalBlock)]
    assert len(blocks) == 3  # res4 + 2 in the keypoint head
    for b in blocks:
        b.g.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    losses = {k: h.latest() for k, h in trainer.storage.histories().items() if "loss" in k}
    assert "loss_keypoint" in losses and all(math.isfinite(v) for v in losses.values())
    # checkpoints hold the detector's own names, not the autocast wrapper's
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert any(k.startswith("backbone.bottom_up.res4.nonlocal") for k in ckpt["model"])
    # evaluation runs in fp32
    seen.clear()
    trainer.model.eval()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = trainer.model([{"image": image, "height": 96, "width": 128}])
    assert set(seen) == {torch.float32} and out[0]["instances"].pred_boxes.tensor.dtype == (
        torch.float32
    )


@pytest.mark.slow
def test_lazy_config_amp_training_on_cpu_runs_the_blocks_under_autocast(tmp_path, monkeypatch):
    """A LazyConfig's ``train.amp.enabled`` on CPU trains under the same bfloat16 autocast."""
    from nonlocal_det.engine import train

    seen, forward = [], NonLocalBlock.forward

    def recorded_forward(self, x):
        if self.training:
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return forward(self, x)

    monkeypatch.setattr(NonLocalBlock, "forward", recorded_forward)
    monkeypatch.setattr(train, "do_test", lambda *a: None)  # no evaluation
    train.do_train(lazy_demo_cfg(tmp_path, "train.max_iter=1", "train.amp.enabled=True"))
    assert seen and set(seen) == {torch.bfloat16}
    record = json.loads((tmp_path / "metrics.json").read_text().splitlines()[-1])
    losses = {k: v for k, v in record.items() if "loss" in k}
    assert "loss_keypoint" in losses and all(math.isfinite(v) for v in losses.values())


@pytest.mark.cuda
def test_amp_training_on_cuda_fp16(data, tmp_path):
    from detectron2.engine import AMPTrainer

    trainer = _trainer(data, tmp_path, ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda"])
    assert isinstance(trainer._trainer, AMPTrainer)
    trainer.train()
    losses = {k: h.latest() for k, h in trainer.storage.histories().items() if "loss" in k}
    assert all(math.isfinite(v) for v in losses.values())


@pytest.mark.cuda
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_block_under_cuda_fp16_autocast_large_activations(pairwise):
    block = _large_activation_block(pairwise).cuda()
    x = _large_input(torch.float32).cuda()
    with torch.no_grad():
        out, w = _autocast_forward(block, x, "cuda", torch.float16)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    expected = reference(block.cpu(), x.cpu())[0]
    err = (out.cpu().double() - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"
