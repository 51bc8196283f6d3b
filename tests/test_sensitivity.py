import torch

from data import Loader
from model import build_model
from sensitivity import drop_for_target, naive_sensitivity_scan, sensitivity_scan, suggest_sparsity


def tiny_setup():
    torch.manual_seed(0)
    model = build_model(width=0.0625).to(memory_format=torch.channels_last).eval()
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    return model, Loader(images, torch.arange(48) % 10, batch_size=20, device="cpu")


def test_shared_prefix_scan_equals_naive_scan_and_restores_the_model():
    model, loader = tiny_setup()
    # a model that is not a fresh init, so that different sparsities give different answers
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.bias.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsities = (0.3, 0.6, 0.95)
    fast = sensitivity_scan(model, loader, sparsities, show_progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit for bit
    naive = naive_sensitivity_scan(model, loader, sparsities)
    assert fast == naive
    assert len(fast) == 17 and all(len(a) == 3 for a in fast.values())
    assert len({tuple(a) for a in fast.values()}) > 1


def test_suggestion_takes_the_highest_sparsity_within_the_drop():
    sparsities = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    curves = {
        "flat": [90.0, 90.0, 89.9, 89.8, 89.6, 89.5],      # never drops past 1 point
        "cliff": [89.9, 89.5, 89.1, 88.5, 80.0, 60.0],    # 0.6 is the last within 1 point
        "fragile": [85.0, 80.0, 70.0, 60.0, 50.0, 40.0],  # nothing within: stays dense
        "noisy": [89.0, 90.5, 88.0, 89.2, 70.0, 50.0],    # the highest within, not the first
    }
    assert suggest_sparsity(90.0, sparsities, curves, max_drop=1.0) == {
        "flat": 0.9, "cliff": 0.6, "fragile": 0.0, "noisy": 0.7}
    assert suggest_sparsity(90.0, sparsities, curves, max_drop=0.0)["flat"] == 0.5


def test_target_sparsity_picks_the_smallest_drop_that_reaches_it():
    sparsities = [0.5, 0.9]
    curves = {"big": [90.0, 87.0], "small": [89.0, 80.0]}  # drops: big 0 / 3, small 1 / 10
    sizes = {"big": 900, "small": 100}
    # drop 0 removes 450 of 1000 weights, drop 1 adds small at 0.5 (500), drop 3 big at 0.9 (860)
    assert drop_for_target(90.0, sparsities, curves, sizes, 0.45) == 0.0
    assert drop_for_target(90.0, sparsities, curves, sizes, 0.5) == 1.0
    assert drop_for_target(90.0, sparsities, curves, sizes, 0.85) == 3.0
    assert drop_for_target(90.0, sparsities, curves, sizes, 0.9) == 10.0
    assert drop_for_target(90.0, sparsities, curves, sizes, 0.95) is None
