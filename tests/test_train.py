import pytest
import torch

from data import Loader
from model import build_model
from train import build_optimizer, build_scheduler, dirac_init, whitening_init


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
    optimizer = build_optimizer(model, lr=0.4, momentum=0.9, weight_decay=5e-4, bias_lr_scale=16)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    weights, bias = [lr[0] for lr in lrs], [lr[2] for lr in lrs]
    assert weights[0] == 0 and weights[2] == pytest.approx(0.4) and weights[1] == pytest.approx(0.2)
    assert weights[-1] == pytest.approx(0.05) and optimizer.param_groups[0]["lr"] == 0
    assert bias == pytest.approx([16 * w for w in weights])  # the same schedule, 16x larger


def test_optimizer_groups_decay_only_weights_and_speed_up_biases():
    model = build_model(width=0.0625)
    decay, plain, biases = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                           bias_lr_scale=8).param_groups
    names = {p: n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == biases["weight_decay"] == 0
    assert all(p.dim() > 1 for p in decay["params"]) and len(decay["params"]) == 17
    assert all(".bn" in names[p] and names[p].endswith("weight") for p in plain["params"])
    assert {names[p] for p in biases["params"]} >= {"classifier.bias", "backbone.bn0.bias"}
    assert all(names[p].endswith("bias") for p in biases["params"]) and biases["lr"] == pytest.approx(0.8)
    assert sum(len(g["params"]) for g in (decay, plain, biases)) == len(names)


def test_dirac_init_passes_the_first_channels_through():
    model = build_model(width=0.25)
    dirac_init(model)
    x = torch.randn(2, 16, 8, 8)
    conv1, conv3 = model.backbone.conv1, model.backbone.conv3  # 16 -> 32 and 64 -> 64 channels
    assert torch.allclose(conv1(x)[:, :16], x, atol=1e-6)
    assert not torch.allclose(conv1(x)[:, 16:], torch.zeros(2, 16, 8, 8))  # the rest stays random
    y = torch.randn(2, 64, 8, 8)
    assert torch.allclose(conv3(y), y, atol=1e-6)
    w0 = model.backbone.conv0.weight.clone()
    dirac_init(model)
    assert torch.equal(model.backbone.conv0.weight, w0)  # conv0 is whitening_init's
