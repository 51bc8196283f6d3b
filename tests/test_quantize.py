"""k-means weight sharing: at most 2**bits values per layer, zeros untouched (also after
the codebook trains), the shared export bit-exact and near its bound, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import finetune
import pruning
import quantize
from checkpoint import load_checkpoint
from conftest import interrupt_in_epoch, script_args
from export import information_bound, load_sparse_export, save_sparse_export
from model import build_model
from prune import SPARSITY
from pruning import FineGrainedPruner
from quantize import BITS, KMeansQuantizer, k_means_quantize, quantized_size
from train import build_optimizer
from utils import Interrupted, UserError


def distinct_nonzero(tensor):
    return len(torch.unique(tensor[tensor != 0]))


@pytest.mark.parametrize("init", ["exact", "linear"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_k_means_keeps_zeros_and_at_most_2_to_the_bits_values(bits, init):
    torch.manual_seed(bits)
    w = torch.randn(64, 32, 3, 3)
    mask = pruning.fine_grained_prune(w, 0.7)
    before = w.clone()
    codebook = k_means_quantize(w, bits, init=init)
    assert distinct_nonzero(w) <= 2 ** bits and len(codebook.centroids) == 2 ** bits
    assert (w[~mask] == 0).all() and (codebook.labels[~mask] == -1).all()
    assert torch.equal(w[mask], codebook.centroids[codebook.labels[mask]])
    # k-means converged: each weight sits at its nearest centroid
    nearest = (before[mask][:, None] - codebook.centroids).abs().min(1).values
    assert torch.allclose((w[mask] - before[mask]).abs(), nearest)
    if bits == 8:  # many clusters: a small error
        assert (w[mask] - before[mask]).abs().max() < 0.05


def test_k_means_is_exact_on_a_small_case():
    w = torch.tensor([0.0, -2.0, -1.9, 0.0, 1.0, 1.1, 3.0, 2.9])
    codebook = k_means_quantize(w, 1)
    assert sorted(codebook.centroids.tolist()) == pytest.approx([-1.95, 2.0])  # the optimal 2-means
    assert w[0] == 0 and w[3] == 0
    same = torch.tensor([0.0, 0.5, 0.5])  # fewer distinct values than 2**bits
    assert k_means_quantize(same, 4).centroids.tolist() == [0.5] and same.tolist() == [0.0, 0.5, 0.5]
    empty = torch.zeros(6)  # a fully pruned tensor
    assert (k_means_quantize(empty, 4).labels == -1).all() and not empty.any()
    # Deep Compression's start reaches the same optimum on this easy case
    lloyd = torch.tensor([0.0, -2.0, -1.9, 0.0, 1.0, 1.1, 3.0, 2.9])
    k_means_quantize(lloyd, 1, init="linear")
    assert sorted(set(lloyd[lloyd != 0].tolist())) == pytest.approx([-1.95, 2.0])


def test_codebook_training_keeps_the_sharing_and_the_zeros():
    torch.manual_seed(0)
    model = build_model(width=0.0625)
    masks = FineGrainedPruner(model, {n: 0.8 for n in SPARSITY}).masks
    quantizer = KMeansQuantizer(model, {n: 3 for n in SPARSITY})
    params = dict(model.named_parameters())
    start = {n: c.centroids.clone() for n, c in quantizer.codebooks.items()}
    optimizer = build_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(1, 6):
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        quantizer.apply(model, step=step)
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name
        assert distinct_nonzero(params[name].detach()) <= 8, name
    assert any(not torch.equal(start[n], c.centroids) for n, c in quantizer.codebooks.items())  # it learned


@pytest.mark.parametrize("width", [0.25, 0.0625])
def test_shared_export_is_bit_exact_and_near_its_bound(tmp_path, width):
    torch.manual_seed(0)
    model = build_model(width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
    masks = FineGrainedPruner(model, SPARSITY).masks
    KMeansQuantizer(model, BITS)
    path = tmp_path / "q.sparse.pt"
    size = save_sparse_export(model.state_dict(), masks, {"width": width, "num_classes": 10}, path, shared=True)
    loaded = load_sparse_export(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    bound = information_bound(model, masks, shared=True) / 8
    if width == 0.25:
        assert size <= 1.03 * bound
    assert size >= 0.99 * bound
    plain = save_sparse_export(model.state_dict(), masks, {"width": width, "num_classes": 10}, tmp_path / "p.pt")
    assert size < 0.5 * plain  # 4-bit indices instead of 32-bit values
    # The seed-style computed size: 4 bits a nonzero, plus codebooks and the rest at 32
    rest = sum(p.numel() for n, p in model.named_parameters() if n not in BITS)
    nonzero = sum(int(p.count_nonzero()) for n, p in model.named_parameters() if n in BITS)
    assert quantized_size(model, BITS) <= nonzero * 4 + 16 * 32 * len(BITS) + rest * 32


@pytest.fixture
def finetuned(chain):
    """A copy of the tiny chain's folder, whose finetuned.pt is global 80%."""
    return chain


def quantize_args(image_folder, ckpt_dir, *extra):
    return script_args(quantize.get_quantize_args_parser(), image_folder, ckpt_dir, "--batch-size", "32", *extra)


def test_quantize_script_writes_a_shared_model_and_export(finetuned, image_folder):
    out = quantize.main(quantize_args(image_folder, finetuned, "--epochs", "1", "--bits", "3"))
    ckpt = load_checkpoint(finetuned / "quantized.pt", stages=("quantized",))
    pruned = load_checkpoint(finetuned / "finetuned.pt", stages=("finetuned",))
    for name, mask in pruned["masks"].items():
        w = ckpt["model"][name]
        assert (w[~mask] == 0).all() and distinct_nonzero(w) <= 8, name
    loaded = load_sparse_export(finetuned / "quantized.sparse.pt")
    for name, value in ckpt["model"].items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert out["export_bytes"] < out["dense"]["checkpoint_bytes"] / 5
    assert ckpt["bits"] == {n: 3 for n in BITS}


def test_a_gradual_plan_from_an_older_version_is_refused_in_one_line(finetuned, image_folder, tmp_path):
    # Until this version, prune.py --gradual wrote a pruned.pt of the unpruned model and a schedule.
    plan = load_checkpoint(finetuned / "pruned.pt", stages=("pruned",))
    plan["schedule"] = {"method": "global", "target": 0.9}
    torch.save(plan, tmp_path / "plan.pt")
    for main, args in ((quantize.main, quantize_args(image_folder, finetuned, "--checkpoint", str(tmp_path / "plan.pt"))),
                       (finetune.main, script_args(finetune.get_finetune_args_parser(), image_folder, finetuned,
                                                   "--checkpoint", str(tmp_path / "plan.pt")))):
        with pytest.raises(UserError, match="gradual pruning plan from an older version.*finetune.py --gradual"):
            main(args)
    assert not (finetuned / "quantized.pt").exists()


def test_an_interrupted_quantize_resumes_with_its_own_bits_and_init(finetuned, image_folder, tmp_path, monkeypatch):
    flags = ("--epochs", "2", "--bits", "2", "--init", "linear", "--checkpoint", str(finetuned / "finetuned.pt"))
    once = quantize.main(quantize_args(image_folder, tmp_path / "once", *flags))

    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted):
        quantize.main(quantize_args(image_folder, tmp_path / "parts", *flags))
    monkeypatch.undo()
    # --resume alone: the bits, init and epochs come from the saved state, not these defaults
    resumed = quantize.main(quantize_args(image_folder, tmp_path / "parts", "--resume", "--checkpoint",
                                          str(finetuned / "finetuned.pt")))
    a = load_checkpoint(tmp_path / "once" / "quantized.pt", stages=("quantized",))
    b = load_checkpoint(tmp_path / "parts" / "quantized.pt", stages=("quantized",))
    assert b["bits"] == {n: 2 for n in BITS} and b["args"]["init"] == "linear"
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert resumed["size_bits"] == once["size_bits"] and resumed["test_acc"] == once["test_acc"]


def test_bad_bits_dict_names_what_is_allowed():
    names = pruning.get_prunable_names(build_model(width=0.0625))
    with pytest.raises(UserError, match="unknown layer"):
        quantize.check_bits({"backbone.conv99.weight": 4}, names)
    for bad in (0, 9, 2.5, "4", True):
        with pytest.raises(UserError, match="integer from 1 to 8"):
            quantize.check_bits({"backbone.conv1.weight": bad}, names)


def test_update_codebook_moves_each_centroid_to_its_members_mean():
    labels = torch.tensor([-1, 0, 0, 2, 2, 2, -1])
    tensor = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 8.0, -7.0])  # the -1 entries must not count
    codebook = quantize.Codebook(torch.tensor([0.0, 9.0, 0.0]), labels)
    quantize.update_codebook(tensor, codebook)
    assert codebook.centroids.tolist() == [1.5, 9.0, 5.0]  # centroid 1 has no member: it stays


def test_the_packed_step_is_the_per_tensor_one():
    # KMeansQuantizer updates all tensors as one flat codebook; it must equal the course's
    # one-tensor-at-a-time update_codebook + k_means_quantize, in channels_last too.
    torch.manual_seed(0)
    model = build_model(0.0625).to(memory_format=torch.channels_last)
    FineGrainedPruner(model, {name: 0.8 for name in SPARSITY})
    quantizer = KMeansQuantizer(model, {name: 3 for name in SPARSITY})
    reference = {name: quantize.Codebook(c.centroids.clone(), c.labels.clone()) for name, c in quantizer.codebooks.items()}
    copy = build_model(0.0625).to(memory_format=torch.channels_last)
    copy.load_state_dict(model.state_dict())
    params, copied = dict(model.named_parameters()), dict(copy.named_parameters())
    for _ in range(3):
        with torch.no_grad():
            for name in SPARSITY:
                drift = torch.randn_like(params[name]) * 0.01
                params[name].add_(drift)
                copied[name].add_(drift)
        quantizer.apply(model, step=1)
        for name, codebook in reference.items():
            quantize.update_codebook(copied[name], codebook)
            k_means_quantize(copied[name], codebook=codebook)
        for name in SPARSITY:
            assert torch.allclose(params[name], copied[name], atol=1e-7), name
            assert torch.allclose(quantizer.codebooks[name].centroids, reference[name].centroids, atol=1e-7), name
    state = quantizer.state_dict()  # per tensor, as the checkpoints hold it
    assert set(state) == set(SPARSITY) and all(len(s["centroids"]) <= 8 for s in state.values())


def test_no_tensor_to_prune_or_share_is_a_no_op():
    model = build_model(0.0625)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FineGrainedPruner(model, {}).apply(model, step=1)
    KMeansQuantizer(model, {}).apply(model, step=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
