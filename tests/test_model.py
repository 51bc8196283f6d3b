import torch

from model import build_model
from pruning import get_prunable_names
from utils import get_model_macs

SEED_NAMES = [
    "backbone.conv0.weight", "backbone.conv1.weight",
    "backbone.residual_block0.conv1.weight", "backbone.residual_block0.conv2.weight",
    "backbone.conv2.weight", "backbone.conv3.weight",
    "backbone.residual_block1.conv1.weight", "backbone.residual_block1.conv2.weight",
    "backbone.conv4.weight", "backbone.conv5.weight",
    "backbone.residual_block2.conv1.weight", "backbone.residual_block2.conv2.weight",
    "backbone.conv6.weight", "backbone.conv7.weight",
    "backbone.residual_block3.conv1.weight", "backbone.residual_block3.conv2.weight",
    "classifier.weight",
]


def test_full_width_is_the_seed_model():
    model = build_model()
    assert sum(p.numel() for p in model.parameters()) == 20_145_738
    assert get_prunable_names(model) == SEED_NAMES
    assert abs(get_model_macs(model, torch.zeros(1, 3, 32, 32)) / 1e9 - 1.59) < 0.01


def test_width_scales_channels_and_keeps_names():
    small = build_model(width=0.25)
    assert get_prunable_names(small) == SEED_NAMES
    assert small.backbone.conv0.out_channels == 16 and small.classifier.in_features == 128
    assert small(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_stages_compose_to_forward():
    model = build_model(width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    out = x
    for stage in model.stages():
        out = stage(out)
    assert torch.equal(out, model(x))
