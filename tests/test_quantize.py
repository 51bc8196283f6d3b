"""k-means weight sharing: at most 2**bits values per layer, zeros untouched (also after
the codebook trains), the shared export bit-exact and near its bound, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import finetune
import prune
import quantize
import train
from export import information_bound, load_sparse_export, save_sparse_export
from model import build_model
from prune import SPARSITY, FineGrainedPruner
from quantize import BITS, KMeansQuantizer, k_means_quantize, quantized_size
from train import build_optimizer
from utils import UserError, cli, load_checkpoint


def distinct_nonzero(tensor):
    return len(torch.unique(tensor[tensor != 0]))


@pytest.mark.parametrize("init", ["exact", "linear"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_k_means_keeps_zeros_and_at_most_2_to_the_bits_values(bits, init):
    torch.manual_seed(bits)
    w = torch.randn(64, 32, 3, 3)
    mask = prune.fine_grained_prune(w, 0.7)
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
        assert size <= 1.10 * bound
    assert size >= 0.99 * bound
    plain = save_sparse_export(model.state_dict(), masks, {"width": width, "num_classes": 10}, tmp_path / "p.pt")
    assert size < 0.5 * plain  # 4-bit indices instead of 32-bit values
    # The seed-style computed size: 4 bits a nonzero, plus codebooks and the rest at 32
    rest = sum(p.numel() for n, p in model.named_parameters() if n not in BITS)
    nonzero = sum(int(p.count_nonzero()) for n, p in model.named_parameters() if n in BITS)
    assert quantized_size(model, BITS) <= nonzero * 4 + 16 * 32 * len(BITS) + rest * 32


def test_truncated_shared_export_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = build_model(width=0.0625)
    masks = FineGrainedPruner(model, SPARSITY).masks
    KMeansQuantizer(model, BITS)
    path = tmp_path / "q.pt"
    save_sparse_export(model.state_dict(), masks, {"width": 0.0625, "num_classes": 10}, path, shared=True)
    entry = torch.load(path, weights_only=True)
    entry["sparse"]["backbone.conv3.weight"]["data"] = entry["sparse"]["backbone.conv3.weight"]["data"][:-9]
    torch.save(entry, tmp_path / "cut.pt")
    with pytest.raises(UserError, match="corrupted sparse export"):
        load_sparse_export(tmp_path / "cut.pt")


@pytest.fixture(scope="module")
def finetuned(image_folder, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("quantize") / "ckpt"
    common = ["--data-dir", str(image_folder), "--checkpoint-dir", str(ckpt), "--device", "cpu"]
    plots = ["--plot-dir", str(ckpt.parent / "plots")]
    train.main(train.get_train_args_parser().parse_args(
        [*common, "--width", "0.0625", "--val-size", "40", "--batch-size", "32", "--epochs", "1"]))
    prune.main(prune.get_args_parser().parse_args([*common, *plots, "--method", "global", "--target", "0.8"]))
    finetune.main(finetune.get_finetune_args_parser().parse_args([*common, *plots, "--epochs", "1",
                                                                   "--batch-size", "32"]))
    return ckpt


def test_quantize_script_writes_a_shared_model_and_export(finetuned, image_folder):
    out = quantize.main(quantize.get_quantize_args_parser().parse_args(
        ["--data-dir", str(image_folder), "--checkpoint-dir", str(finetuned), "--device", "cpu",
         "--epochs", "1", "--batch-size", "32", "--bits", "3"]))
    ckpt = load_checkpoint(finetuned / "quantized.pt", stages=("quantized",))
    pruned = load_checkpoint(finetuned / "finetuned.pt", stages=("finetuned",))
    for name, mask in pruned["masks"].items():
        w = ckpt["model"][name]
        assert (w[~mask] == 0).all() and distinct_nonzero(w) <= 8, name
    loaded = load_sparse_export(finetuned / "quantized.sparse.pt")
    for name, value in ckpt["model"].items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert out["export_bytes"] < out["dense_checkpoint_bytes"] / 5
    assert out["bits"] == {n: 3 for n in pruned["masks"]} | {n: 3 for n in BITS}


@pytest.mark.parametrize("extra,message", [
    (["--bits", "0"], "--bits must be an integer from 1 to 8"),
    (["--bits", "9"], "--bits must be an integer from 1 to 8"),
    (["--bits", "four"], None),
    (["--checkpoint", "{ckpt}/dense.pt"], "run `python finetune.py` first"),
])
def test_quantize_bad_input_is_one_line(finetuned, image_folder, capsys, extra, message):
    before = {p: p.read_bytes() for p in finetuned.iterdir()}
    argv = ["--data-dir", str(image_folder), "--checkpoint-dir", str(finetuned), "--device", "cpu",
            *[a.replace("{ckpt}", str(finetuned)) for a in extra]]
    with pytest.raises(SystemExit) as exit_info:
        cli(quantize.main, quantize.get_quantize_args_parser(), argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    if message:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], err
    assert {p: p.read_bytes() for p in finetuned.iterdir()} == before


def test_bad_bits_dict_names_what_is_allowed():
    names = prune.get_prunable_names(build_model(width=0.0625))
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
