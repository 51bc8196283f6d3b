import pytest
import torch

from data import Loader
from model import build_model
from train import build_optimizer, build_scheduler, whitening_init


def test_whitening_init_decorrelates_the_first_layer():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 34, 34, generator=g), 3, 1) * 255
    loader = Loader(smooth.to(torch.uint8), torch.zeros(64, dtype=torch.long), 32, "cpu", train=True)
    conv = build_model(width=0.25).backbone.conv0
    whitening_init(conv, loader, eps=0)
    out = conv(loader.normalize(loader.images)).detach()
    half = out[:, :8].permute(1, 0, 2, 3).flatten(1)
    cov = torch.cov(half)  # patches at the border see zero padding, hence the tolerance
    assert torch.allclose(cov.diagonal(), torch.ones(8), atol=0.15)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.15
    assert torch.allclose(conv.weight[8:], -conv.weight[:8])  # each filter with both signs


def test_schedule_warms_up_then_decays_to_zero():
    model = build_model(width=0.0625)
    optimizer = build_optimizer(model, lr=0.4, momentum=0.9, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[2] == pytest.approx(0.4) and lrs[1] == pytest.approx(0.2)
    assert lrs[-1] == pytest.approx(0.05) and optimizer.param_groups[0]["lr"] == 0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
