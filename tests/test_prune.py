import pytest
import torch
import torch.nn.utils.prune as torch_prune

from model import build_model
from prune import SPARSITY
from pruning import FineGrainedPruner, check_sparsity_dict, fine_grained_prune, get_prunable_names
from train import build_optimizer
from utils import UserError, get_model_macs, get_sparse_macs, get_sparsity


@pytest.mark.parametrize("shape", [(7,), (16, 8, 3, 3), (10, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.13, 0.5, 0.77, 0.9, 1.0])
def test_matches_torch_l1_unstructured(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(w.clone())
    torch_prune.l1_unstructured(module, "weight", amount=sparsity)
    ours = w.clone()
    mask = fine_grained_prune(ours, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, module.weight_mask.bool())
    assert torch.equal(ours, module.weight.detach())
    assert int((~mask).sum()) == round(sparsity * w.numel())


def test_ties_keep_the_exact_count_and_are_deterministic():
    w = torch.tensor([0.0, 1.0, -1.0, 0.0, 1.0, 2.0, -1.0, 0.0])
    mask = fine_grained_prune(w.clone(), 0.5)
    # three zeros, then the first 1.0-magnitude element by index
    assert mask.tolist() == [False, False, True, False, True, True, True, False]
    again = torch.randn(20, 20)
    fine_grained_prune(again, 0.5)
    repruned = again.clone()
    m1 = fine_grained_prune(repruned, 0.6)  # pruning an already pruned tensor: 200 tied zeros
    m2 = fine_grained_prune(again.clone(), 0.6)
    assert int((~m1).sum()) == 240 and torch.equal(m1, m2)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_out_of_range_sparsity_raises(bad):
    with pytest.raises(ValueError):
        fine_grained_prune(torch.randn(10), bad)


def test_prune_works_on_channels_last_weights():
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    mask = fine_grained_prune(conv.weight, 0.75)
    assert get_sparsity(conv.weight) == 0.75 and torch.equal(conv.weight != 0, mask)


def test_default_dict_is_the_seeds_and_names_every_layer():
    assert set(SPARSITY) == set(get_prunable_names(build_model(width=0.0625)))
    assert SPARSITY["backbone.residual_block1.conv2.weight"] == 0.9
    assert SPARSITY["backbone.conv0.weight"] == 0.0 and SPARSITY["classifier.weight"] == 0.0


def test_masks_survive_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model(width=0.0625)
    pruner = FineGrainedPruner(model, {"backbone.conv3.weight": 0.8, "classifier.weight": 0.5})
    optimizer = build_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-2)
    params = dict(model.named_parameters())
    for _ in range(5):
        loss = model(torch.randn(8, 3, 32, 32)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.apply(model)
    for name, mask in pruner.masks.items():
        assert (params[name][~mask] == 0).all()
        assert (params[name][mask] != 0).all()
    assert get_sparsity(params["backbone.conv3.weight"]) == pytest.approx(0.8, abs=1e-3)


def test_bad_dicts_are_refused_with_the_valid_names():
    names = get_prunable_names(build_model(width=0.0625))
    with pytest.raises(UserError, match="backbone.conv0.weight"):
        check_sparsity_dict({"backbone.conv9.weight": 0.5}, names)
    for value in (1.2, -0.5, "half", None, float("inf")):
        with pytest.raises(UserError, match="number in \\[0, 1\\]"):
            check_sparsity_dict({"backbone.conv1.weight": value}, names)
    with pytest.raises(UserError):
        check_sparsity_dict([0.5], names)


def test_sparse_macs_leave_out_the_products_with_pruned_weights():
    model = build_model(width=0.125)  # conv1: 16x8x3x3 weights, each used at 32x32 positions
    inputs = torch.zeros(1, 3, 32, 32)
    dense = get_model_macs(model, inputs)
    FineGrainedPruner(model, {"backbone.conv1.weight": 0.5, "classifier.weight": 0.5})
    sparse = get_sparse_macs(model, inputs)
    assert type(sparse) is int  # a plain number, storable in a checkpoint's metrics
    assert sparse == dense - 576 * 32 * 32 - 320  # 320 of the classifier's 10x64, used once
    assert model.training


def test_held_masks_never_regrow_even_at_a_lower_target():
    model = build_model(width=0.0625)
    name = "backbone.conv5.weight"
    first = FineGrainedPruner(model, {name: 0.9})
    again = FineGrainedPruner(model, {name: 0.5}, masks=first.masks)
    assert torch.equal(again.masks[name], first.masks[name])
    assert again.sparsity[name] == pytest.approx(0.9, abs=1e-3)
    more = FineGrainedPruner(model, {name: 0.95}, masks=first.masks)
    assert not (more.masks[name] & ~first.masks[name]).any()
    assert get_sparsity(dict(model.named_parameters())[name]) == pytest.approx(0.95, abs=1e-3)
