"""The four scripts chained through their checkpoints, on tiny generated data."""
import json

import pytest
import torch

import finetune
import prune
import sensitivity
import train
from utils import UserError, get_sparsity, load_checkpoint


def args_for(parser, data_dir, tmp_path, *extra):
    common = ["--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu"]
    if "--plot-dir" in parser.format_help():
        common += ["--plot-dir", str(tmp_path / "plots")]
    return parser.parse_args([*common, *extra])


TRAIN = ["--width", "0.0625", "--val-size", "40", "--batch-size", "32", "--epochs", "2"]


@pytest.fixture(scope="module")
def chain(image_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    out = {"dir": tmp}
    out["train"] = train.main(args_for(train.get_train_args_parser(), image_folder, tmp, *TRAIN))
    out["scan"] = sensitivity.main(args_for(sensitivity.get_args_parser(), image_folder, tmp,
                                            "--sparsities", "0.5,0.9", "--max-drop", "5"))
    (tmp / "sparsity.json").write_text(json.dumps({"backbone.conv5.weight": 0.9, "backbone.conv7.weight": 0.75,
                                                   "classifier.weight": 0.5}))
    out["prune"] = prune.main(args_for(prune.get_args_parser(), image_folder, tmp,
                                       "--sparsity", str(tmp / "sparsity.json")))
    out["finetune"] = finetune.main(args_for(finetune.get_finetune_args_parser(), image_folder, tmp,
                                             "--epochs", "2", "--batch-size", "32"))
    return out


def test_train_writes_a_dense_checkpoint(chain):
    ckpt = load_checkpoint(chain["dir"] / "ckpt" / "dense.pt", stages=("dense",))
    assert ckpt["config"] == {"width": 0.0625, "num_classes": 10}
    assert set(ckpt["metrics"]) >= {"val_acc", "test_acc"} and len(ckpt["history"]) == 2
    assert ckpt["split"]["val_size"] == 40
    assert not (chain["dir"] / "ckpt" / "dense.resume.pt").exists()


def test_sensitivity_writes_json_plots_and_a_usable_suggestion(chain):
    ckpt_dir, plots = chain["dir"] / "ckpt", chain["dir"] / "plots"
    result = json.loads((ckpt_dir / "sensitivity.json").read_text())
    assert result["sparsities"] == [0.5, 0.9] and len(result["accuracy"]) == 17
    assert result["split"] == "val" and result["num_images"] == 40
    suggestion = json.loads((ckpt_dir / "sparsity_suggested.json").read_text())
    assert set(suggestion) == set(result["accuracy"]) and set(suggestion.values()) <= {0.0, 0.5, 0.9}
    assert (plots / "sensitivity.png").stat().st_size > 10_000
    assert (plots / "parameters.png").stat().st_size > 5_000


def test_prune_applies_the_json_dict_and_keeps_the_rest_dense(chain):
    ckpt = load_checkpoint(chain["dir"] / "ckpt" / "pruned.pt", stages=("pruned",))
    assert ckpt["sparsity"] == {"backbone.conv5.weight": 0.9, "backbone.conv7.weight": 0.75,
                                "classifier.weight": 0.5}
    assert get_sparsity(ckpt["model"]["backbone.conv5.weight"]) == pytest.approx(0.9, abs=1e-3)
    assert get_sparsity(ckpt["model"]["backbone.conv4.weight"]) == 0.0
    assert ckpt["masks"]["backbone.conv5.weight"].dtype == torch.bool
    assert (chain["dir"] / "plots" / "weights.png").exists()
    assert chain["prune"]["sparse_macs"] < chain["prune"]["dense_macs"]


def test_finetune_keeps_every_mask(chain):
    ckpt = load_checkpoint(chain["dir"] / "ckpt" / "finetuned.pt", stages=("finetuned",))
    for name, mask in ckpt["masks"].items():
        weight = ckpt["model"][name]
        assert (weight[~mask] == 0).all(), name
    assert get_sparsity(ckpt["model"]["backbone.conv5.weight"]) >= 0.9 - 1e-3
    assert 1 <= ckpt["metrics"]["best_epoch"] <= 2
    assert (chain["dir"] / "plots" / "summary.png").exists()
    assert chain["finetune"]["sparse_size_bits"] <= chain["prune"]["sparse_size_bits"]


def test_finetune_refuses_a_dense_checkpoint(chain, image_folder):
    parser = finetune.get_finetune_args_parser()
    args = args_for(parser, image_folder, chain["dir"], "--checkpoint", str(chain["dir"] / "ckpt" / "dense.pt"))
    with pytest.raises(UserError, match="'dense' checkpoint"):
        finetune.main(args)
