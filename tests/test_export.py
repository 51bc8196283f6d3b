import numpy as np
import pytest
import torch

from export import information_bound, load_sparse_export, rice_decode, rice_encode, save_sparse_export
from model import build_model
from prune import SPARSITY, FineGrainedPruner
from utils import UserError

CONFIG = {"width": 0.25, "num_classes": 10}


def pruned_model(sparsity, seed=0):
    torch.manual_seed(seed)
    model = build_model(**CONFIG)
    with torch.no_grad():  # BatchNorm statistics that are not the init values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_()
    pruner = FineGrainedPruner(model, sparsity)
    return model.eval(), pruner.masks


@pytest.mark.parametrize("positions", [[], [0], [5], [0, 1, 2, 3], [3, 100, 101, 5000], list(range(0, 999, 7))])
def test_rice_code_round_trip(positions):
    positions = np.array(positions, dtype=np.int64)
    k, unary, remainder = rice_encode(positions)
    assert np.array_equal(rice_decode(k, len(positions), unary, remainder), positions)


@pytest.mark.parametrize("sparsity", [SPARSITY, {name: 0.9 for name in SPARSITY}])
def test_round_trip_is_bit_exact_and_near_the_bound(tmp_path, sparsity):
    model, masks = pruned_model(sparsity)
    path = tmp_path / "m.sparse.pt"
    size = save_sparse_export(model.state_dict(), masks, CONFIG, path)
    loaded = load_sparse_export(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    bound_bytes = information_bound(model, masks) / 8
    assert size <= 1.10 * bound_bytes
    assert size >= 0.99 * bound_bytes  # nobody beats the bound: the figure is honest


def test_float16_export_halves_the_values(tmp_path):
    model, masks = pruned_model({name: 0.5 for name in SPARSITY})
    full = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "a.pt")
    half = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "b.pt", dtype=torch.float16)
    assert half < 0.7 * full
    loaded = load_sparse_export(tmp_path / "b.pt")
    w = model.state_dict()["backbone.conv5.weight"]
    assert torch.allclose(loaded.state_dict()["backbone.conv5.weight"], w, rtol=1e-3, atol=1e-4)


def test_corrupted_and_truncated_exports_are_clear_errors(tmp_path):
    model, masks = pruned_model(SPARSITY)
    path = tmp_path / "m.sparse.pt"
    save_sparse_export(model.state_dict(), masks, CONFIG, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.pt"):
        load_sparse_export(tmp_path / "truncated.pt")
    # a checkpoint that loads, but whose coded mask no longer matches its values
    entry = torch.load(path, weights_only=True)
    entry["sparse"]["backbone.conv3.weight"]["count"] += 7
    torch.save(entry, tmp_path / "corrupt.pt")
    with pytest.raises(UserError, match="corrupted sparse export"):
        load_sparse_export(tmp_path / "corrupt.pt")
