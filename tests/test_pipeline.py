"""The scripts chained through their checkpoints, on tiny generated data, and the one
checkpoint schema (docs/checkpoints.md): a checkpoint's top-level metrics are its own
model's, each earlier stage's figures sit under that stage's name."""
import json

import pytest
import torch

import finetune
import prune
import quantize
from checkpoint import CHAIN, load_checkpoint
from conftest import script_args
from model import build_model_from_checkpoint
from utils import UserError, get_sparsity, measure

FIGURES = {"val_acc", "test_acc", "sparsity", "size_bits", "macs"}


def test_train_writes_a_dense_checkpoint(chain_dir):
    ckpt = load_checkpoint(chain_dir / "dense.pt", stages=("dense",))
    assert ckpt["config"] == {"width": 0.0625, "num_classes": 10}
    assert FIGURES <= set(ckpt["metrics"]) and len(ckpt["history"]) == 2
    assert ckpt["metrics"]["sparsity"] == pytest.approx(0.0, abs=1e-3)
    assert not set(ckpt["metrics"]) & set(CHAIN)  # the first stage carries none
    assert ckpt["split"]["val_size"] == 40
    assert not (chain_dir / "dense.resume.pt").exists()


def test_sensitivity_writes_json_plots_and_a_usable_suggestion(chain_dir):
    result = json.loads((chain_dir / "sensitivity.json").read_text())
    assert result["sparsities"] == [0.5, 0.9] and len(result["accuracy"]) == 17
    assert result["split"] == "val" and result["num_images"] == 40
    suggestion = json.loads((chain_dir / "sparsity_suggested.json").read_text())
    assert set(suggestion) == set(result["accuracy"]) and set(suggestion.values()) <= {0.0, 0.5, 0.9}
    plots = chain_dir.parent / "plots"
    assert (plots / "sensitivity.png").stat().st_size > 10_000
    assert (plots / "parameters.png").stat().st_size > 5_000


@pytest.mark.parametrize("stage,earlier", [("dense", []), ("pruned", ["dense"]),
                                           ("finetuned", ["dense", "pruned"])])
def test_each_checkpoint_describes_its_own_model_and_carries_the_earlier_stages(chain_dir, stage, earlier):
    ckpt = load_checkpoint(chain_dir / f"{stage}.pt", stages=(stage,))
    model = build_model_from_checkpoint(ckpt)
    assert {k: ckpt["metrics"][k] for k in ("sparsity", "size_bits", "macs")} == measure(model, stage != "dense")
    assert [s for s in CHAIN if s in ckpt["metrics"]] == earlier
    for name in earlier:  # carried as that stage's own file said, top-level figures only
        source = load_checkpoint(chain_dir / f"{name}.pt", stages=(name,))["metrics"]
        own = {k: v for k, v in source.items() if k not in CHAIN}
        assert {k: v for k, v in ckpt["metrics"][name].items() if k != "checkpoint_bytes"} == own
    if earlier:
        assert ckpt["metrics"]["dense"]["checkpoint_bytes"] == (chain_dir / "dense.pt").stat().st_size
    pruned = load_checkpoint(chain_dir / "pruned.pt", stages=("pruned",))["metrics"]
    finetuned = load_checkpoint(chain_dir / "finetuned.pt", stages=("finetuned",))["metrics"]
    assert pruned["sparsity"] == pytest.approx(0.8, abs=0.01) and finetuned["sparsity"] >= pruned["sparsity"]
    assert finetuned["export_bytes"] < finetuned["dense"]["checkpoint_bytes"]


def test_a_checkpoint_from_an_older_version_is_refused_in_one_line(chain, tmp_path):
    old = load_checkpoint(chain / "pruned.pt", stages=("pruned",))
    old["metrics"] = {"val_acc": 1.0, "test_acc": 1.0, "dense_val_acc": 2.0}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(UserError, match="older version of this repo"):
        load_checkpoint(tmp_path / "old.pt", stages=("pruned",))


def test_prune_applies_a_json_dict_and_keeps_the_rest_dense(chain, image_folder):
    (chain / "sparsity.json").write_text(json.dumps({"backbone.conv5.weight": 0.9, "backbone.conv7.weight": 0.75,
                                                     "classifier.weight": 0.5}))
    out = prune.main(script_args(prune.get_args_parser(), image_folder, chain, "--sparsity",
                                 str(chain / "sparsity.json")))
    ckpt = load_checkpoint(chain / "pruned.pt", stages=("pruned",))
    assert ckpt["sparsity"] == {"backbone.conv5.weight": 0.9, "backbone.conv7.weight": 0.75,
                                "classifier.weight": 0.5}
    assert get_sparsity(ckpt["model"]["backbone.conv5.weight"]) == pytest.approx(0.9, abs=1e-3)
    assert get_sparsity(ckpt["model"]["backbone.conv4.weight"]) == 0.0
    assert ckpt["masks"]["backbone.conv5.weight"].dtype == torch.bool
    assert (chain.parent / "plots" / "weights.png").exists()
    assert out["macs"] < ckpt["metrics"]["dense"]["macs"]


def test_finetune_keeps_every_mask(chain_dir):
    ckpt = load_checkpoint(chain_dir / "finetuned.pt", stages=("finetuned",))
    for name, mask in ckpt["masks"].items():
        weight = ckpt["model"][name]
        assert (weight[~mask] == 0).all(), name
    assert 1 <= ckpt["metrics"]["best_epoch"] <= 2 and ckpt["metrics"]["finetune_epochs"] == 2
    assert (chain_dir.parent / "plots" / "summary.png").exists()


def test_a_compiled_finetune_still_holds_every_mask(chain, image_folder, monkeypatch):
    # The compiled module names its weights "_orig_mod.*": the masks must still reach them.
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or real_compile(model))
    finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, chain, "--epochs", "1",
                              "--batch-size", "32", "--compile", "--lr", "0.5"))
    assert len(compiled) == 1  # the real torch.compile ran the step
    ckpt = load_checkpoint(chain / "finetuned.pt", stages=("finetuned",))
    for name, mask in ckpt["masks"].items():
        assert (ckpt["model"][name][~mask] == 0).all() and (ckpt["model"][name][mask] != 0).any(), name
    assert ckpt["args"]["compile"] is True


def test_iterative_pruning_only_shrinks_the_masks(chain, image_folder):
    """Prune the finetuned model further, finetune again, twice: no kept weight comes back."""
    first = load_checkpoint(chain / "finetuned.pt", stages=("finetuned",))
    rounds = [first["masks"]]
    for target in (0.9, 0.95):
        prune.main(script_args(prune.get_args_parser(), image_folder, chain, "--checkpoint",
                               str(chain / "finetuned.pt"), "--method", "global", "--target", str(target)))
        out = finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, chain,
                                        "--epochs", "1", "--batch-size", "32"))
        ckpt = load_checkpoint(chain / "finetuned.pt", stages=("finetuned",))
        assert out["sparsity"] == pytest.approx(target, abs=0.01)
        for name, before in rounds[-1].items():
            assert not (ckpt["masks"][name] & ~before).any(), name  # kept now => kept before
            assert (ckpt["model"][name][~before] == 0).all(), name
        rounds.append(ckpt["masks"])
    assert ckpt["metrics"]["finetune_epochs"] == 2 + 1 + 1
    assert ckpt["metrics"]["dense"]["test_acc"] == first["metrics"]["dense"]["test_acc"]


def test_quantized_checkpoint_follows_the_schema(chain, image_folder):
    out = quantize.main(script_args(quantize.get_quantize_args_parser(), image_folder, chain,
                                    "--epochs", "1", "--batch-size", "32", "--bits", "2"))
    ckpt = load_checkpoint(chain / "quantized.pt", stages=("quantized",))
    assert [s for s in CHAIN if s in ckpt["metrics"]] == ["dense", "pruned", "finetuned"]
    assert ckpt["metrics"]["size_bits"] == quantize.quantized_size(build_model_from_checkpoint(ckpt), ckpt["bits"])
    assert ckpt["metrics"]["size_bits"] < ckpt["metrics"]["finetuned"]["size_bits"] / 4
    assert out["export_bytes"] == (chain / "quantized.sparse.pt").stat().st_size


def test_finetune_refuses_a_dense_checkpoint(chain_dir, image_folder, tmp_path):
    args = script_args(finetune.get_finetune_args_parser(), image_folder, tmp_path / "ckpt",
                       "--checkpoint", str(chain_dir / "dense.pt"))
    with pytest.raises(UserError, match="'dense' checkpoint"):
        finetune.main(args)


def test_export_script_and_bench_read_the_chains_files(chain_dir, image_folder):
    import bench
    import export

    path = chain_dir / "finetuned.sparse.pt"
    out = export.main(export.get_args_parser().parse_args([str(path), "--evaluate", "--data-dir", str(image_folder),
                                                           "--device", "cpu"]))
    finetuned = load_checkpoint(chain_dir / "finetuned.pt", stages=("finetuned",))["metrics"]
    assert out["export_bytes"] == path.stat().st_size == finetuned["export_bytes"]
    assert out["test_acc"] == finetuned["test_acc"]  # the file holds the very model
    argv = ["--export", "--checkpoint", str(chain_dir / "finetuned.pt")]
    ratios = bench.main(bench.get_args_parser().parse_args(argv))
    assert 1.0 <= ratios[str(chain_dir / "finetuned.pt")] <= 1.03
