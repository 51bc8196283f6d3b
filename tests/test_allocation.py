"""Allocations (uniform, global) and gradual pruning: exact counts, torch's rule, no regrowth."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from model import build_model
from prune import resolve_names
from pruning import (EXCLUDE, FineGrainedPruner, GradualSchedule, allocate, cubic_sparsity, get_prunable_names,
                     global_allocation, gradual_schedule)
from train import build_optimizer
from utils import UserError


def model_with_weights(seed=0):
    torch.manual_seed(seed)
    return build_model(width=0.0625)


@pytest.mark.parametrize("target", [0.0, 0.3, 0.77, 0.9, 0.99, 1.0])
def test_global_matches_torch_global_unstructured(target):
    model = model_with_weights()
    names = [n for n in get_prunable_names(model) if n not in EXCLUDE]
    reference = model_with_weights()
    modules = dict(reference.named_modules())
    torch_prune.global_unstructured([(modules[n.rsplit(".", 1)[0]], "weight") for n in names],
                                    pruning_method=torch_prune.L1Unstructured, amount=target)
    pruner = FineGrainedPruner(model, global_allocation(model, names, target))
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(target * total)
    for name in names:
        torch_mask = modules[name.rsplit(".", 1)[0]].weight_mask.bool()
        assert torch.equal(pruner.masks[name], torch_mask), name


def test_global_breaks_ties_by_tensor_order_then_index():
    model = build_model(width=0.0625)
    names = ["backbone.conv1.weight", "backbone.conv2.weight"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.fill_(1.0)
    n1 = dict(model.named_parameters())[names[0]].numel()
    sparsity = global_allocation(model, names, 0.5)
    total = n1 + dict(model.named_parameters())[names[1]].numel()
    removed = round(0.5 * total)
    assert sparsity[names[0]] == min(1.0, removed / n1)  # the first tensor's weights go first
    assert sparsity == global_allocation(model, names, 0.5)


def test_uniform_keeps_the_excluded_tensors_dense():
    model = model_with_weights()
    plan = allocate(model, "uniform", 0.8, exclude=resolve_names("conv0,classifier", get_prunable_names(model)))
    assert set(plan) == set(get_prunable_names(model)) - set(EXCLUDE)
    pruner = FineGrainedPruner(model, plan)
    params = dict(model.named_parameters())
    assert all(int(params[n].count_nonzero()) == params[n].numel() for n in EXCLUDE)
    for name, mask in pruner.masks.items():
        assert int((~mask).sum()) == round(0.8 * mask.numel())


def test_allocation_needs_a_target_and_known_names():
    model = model_with_weights()
    with pytest.raises(UserError, match="needs --target"):
        allocate(model, "global", None)
    with pytest.raises(UserError, match="no prunable tensor named 'conv99'"):
        resolve_names("conv99", get_prunable_names(model))


def test_cubic_schedule_starts_ends_and_rises_fastest_early():
    values = [cubic_sparsity(0.0, 0.9, t, 100) for t in range(0, 121, 10)]
    assert values[0] == 0.0 and values[10] == pytest.approx(0.9) and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] > values[9] - values[8]
    assert cubic_sparsity(0.5, 0.9, 50, 100) == pytest.approx(0.9 - 0.4 / 8)


@pytest.mark.parametrize("method", ["global", "uniform", "dict"])
def test_gradual_masks_never_regrow_and_end_exact(method):
    model = model_with_weights()
    names = [n for n in get_prunable_names(model) if n not in EXCLUDE]
    if method == "dict":
        plan = {n: 0.5 + 0.4 * (i % 2) for i, n in enumerate(names)}
    else:
        plan = allocate(model, method, 0.9, exclude=EXCLUDE)
    record = gradual_schedule(model, method, plan, 0.9, ramp=0.6, every=3)
    total_steps = 20
    schedule = GradualSchedule(record, total_steps)
    pruner = FineGrainedPruner(model, record["initial"], schedule)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = dict(model.named_parameters())
    history = []
    for step in range(1, total_steps + 1):
        before = {n: m.clone() for n, m in pruner.masks.items()}
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.apply(model, step=step)
        for name, mask in pruner.masks.items():
            assert not (mask & ~before[name]).any(), f"{name} regrew at step {step}"
            assert (params[name][~mask] == 0).all()
        history.append(sum(int((~m).sum()) for m in pruner.masks.values()))
    assert history[0] == 0  # step 1 is not a recompute step
    assert history[schedule.ramp_steps - 1] == history[-1]  # frozen after the ramp
    assert len(set(history[:schedule.ramp_steps])) > 2  # and rising during it
    if method == "global":
        total = sum(params[n].numel() for n in names)
        assert history[-1] == round(0.9 * total)
    else:
        for name, s in plan.items():
            assert int((~pruner.masks[name]).sum()) == round(s * params[name].numel()), name


def test_gradual_refuses_to_lower_a_sparsity():
    model = model_with_weights()
    FineGrainedPruner(model, {"backbone.conv1.weight": 0.8})
    with pytest.raises(UserError, match="only raises sparsity"):
        gradual_schedule(model, "dict", {"backbone.conv1.weight": 0.5})


def test_a_pruned_weight_stays_pruned_even_beside_exact_zeros():
    model = build_model(width=0.0625)
    weight = dict(model.named_parameters())["classifier.weight"]
    with torch.no_grad():
        weight.fill_(1.0)
        weight.view(-1)[:3] = 0.0  # three live weights that happen to be exactly zero
    pruner = FineGrainedPruner(model, {"classifier.weight": 0.0})
    pruner.masks["classifier.weight"].view(-1)[-1] = False  # the last weight was pruned earlier
    pruner.prune(model, {"classifier.weight": 1 / weight.numel()})
    assert not pruner.masks["classifier.weight"].view(-1)[-1]  # still pruned, not weight 0 instead
    assert int((~pruner.masks["classifier.weight"]).sum()) == 1


def test_random_control_has_uniform_counts_and_seeded_masks():
    names = [n for n in get_prunable_names(model_with_weights()) if n not in EXCLUDE]
    masks = {}
    for seed in (0, 0, 1):
        model = model_with_weights()
        plan = allocate(model, "random", 0.9)
        assert plan == allocate(model, "uniform", 0.9)
        masks.setdefault(seed, []).append(FineGrainedPruner(model, plan, random_seed=seed).masks)
    magnitude = FineGrainedPruner(model_with_weights(), plan).masks
    for name in names:
        a, b = masks[0]
        assert torch.equal(a[name], b[name])  # the same seed, the same masks
        assert not torch.equal(a[name], masks[1][0][name]) and not torch.equal(a[name], magnitude[name])
        assert int((~a[name]).sum()) == round(0.9 * a[name].numel())
