"""SOLVER.CLIP_GRADIENTS "norm" in batched ops (clip_each_parameter_norm): the numbers of
Detectron2's per-parameter clip_grad_norm_ calls, in NonLocalTrainer and in the LazyConfig
optimizer."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_optimizer
from torch import nn

from nonlocal_det.engine import NonLocalTrainer, clip_each_parameter_norm


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 5))


def clip_cfg(clip_type="norm", norm_type=2.0):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM = 0.1, 0.9
    c = cfg.SOLVER.CLIP_GRADIENTS
    c.ENABLED, c.CLIP_TYPE, c.CLIP_VALUE, c.NORM_TYPE = True, clip_type, 0.05, norm_type
    return cfg


def steps(optimizer, net, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)
        optimizer.zero_grad()
        (net(x) ** 2).sum().mul(10.0**i).backward()
        net[1].weight.grad = None  # a parameter without a gradient is skipped
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_numbers_as_detectron2s_clipping(norm_type, dtype):
    cfg = clip_cfg(norm_type=norm_type)
    ours_net, theirs_net = model().to(dtype), model().to(dtype)
    unclipped = cfg.clone()
    unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
    ours = clip_each_parameter_norm(build_optimizer(unclipped, ours_net), 0.05, norm_type)
    theirs = build_optimizer(cfg, theirs_net)  # Detectron2's SGDWithGradientClip
    assert type(theirs).__name__ == "SGDWithGradientClip"
    assert type(ours).__name__ == "SGDWithEachNormClip" and isinstance(ours, torch.optim.SGD)
    a, b = steps(ours, ours_net, dtype), steps(theirs, theirs_net, dtype)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def test_the_clip_binds_each_parameter_on_its_own():
    w, v = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    opt = clip_each_parameter_norm(torch.optim.SGD([w, v], lr=1.0), 1.0)
    w.grad, v.grad = torch.full((4,), 10.0), torch.tensor([0.3, 0.4])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), -0.5))  # norm 20 -> 1
    torch.testing.assert_close(v.detach(), torch.tensor([-0.3, -0.4]))  # norm 0.5: kept


@pytest.mark.parametrize(
    "clip_type,name", [("norm", "SGDWithEachNormClip"), ("value", "SGDWithGradientClip")]
)
def test_trainer_uses_it_for_norm_clipping(clip_type, name):
    optimizer = NonLocalTrainer.build_optimizer(clip_cfg(clip_type), model())
    assert type(optimizer).__name__ == name
