"""Gradual pruning through the scripts (finetune.py --gradual, --resume) and
frontier.py's sweep, on tiny generated data."""
import json
import os
import stat

import pytest
import torch

import finetune
import frontier
import prune
from checkpoint import load_checkpoint
from conftest import interrupt_in_epoch, script_args
from utils import Interrupted, UserError

@pytest.fixture
def dense(chain):
    """A copy of the tiny chain's folder: dense.pt and its scan, to sweep from."""
    return chain


def finetune_args(folder, ckpt_dir, *extra):
    # 160 training images / 32 = 5 steps an epoch; 3 epochs = 15 steps, the ramp 60% = 9 of them
    return script_args(finetune.get_finetune_args_parser(), folder, ckpt_dir, "--epochs", "3", "--batch-size", "32",
                       "--checkpoint", str(ckpt_dir.parent / "dense.pt"), "--gradual", "--method", "global",
                       "--target", "0.8", "--ramp", "0.6", "--prune-every", "2", *extra)


def test_gradual_chain_reaches_the_exact_global_count_and_resumes_identically(dense, image_folder, tmp_path,
                                                                             monkeypatch):
    (tmp_path / "dense.pt").write_bytes((dense / "dense.pt").read_bytes())
    once = finetune.main(finetune_args(image_folder, tmp_path / "once"))
    a = load_checkpoint(tmp_path / "once" / "finetuned.pt", stages=("finetuned",))
    assert a["schedule"]["method"] == "global" and a["schedule"]["target"] == 0.8
    names = list(a["schedule"]["final"])
    total = sum(a["model"][n].numel() for n in names)
    assert sum(int((~a["masks"][n]).sum()) for n in names) == round(0.8 * total)
    assert sum(int((a["model"][n] == 0).sum()) for n in names) >= round(0.8 * total)
    assert once["best_epoch"] >= 2  # epoch 1 ends before the ramp does: never the best
    assert not (tmp_path / "once" / "pruned.pt").exists()  # no plan waits in a pruned.pt

    # The same run, stopped in its third epoch (after the ramp), then resumed: --resume alone
    # brings back the gradual flags.
    interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(Interrupted):
        finetune.main(finetune_args(image_folder, tmp_path / "parts"))
    monkeypatch.undo()
    resumed = finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, tmp_path / "parts",
                                        "--checkpoint", str(tmp_path / "dense.pt"), "--resume"))
    b = load_checkpoint(tmp_path / "parts" / "finetuned.pt", stages=("finetuned",))
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    assert b["sparsity"] == a["sparsity"] and min(b["sparsity"].values()) > 0
    assert not (tmp_path / "parts" / "finetuned.resume.pt").exists()
    assert resumed["test_acc"] == once["test_acc"] and resumed["best_epoch"] == once["best_epoch"]


def sweep_args(image_folder, dense, out, *extra):
    return script_args(frontier.get_args_parser(), image_folder, dense, "--epochs", "1", "--batch-size", "32",
                       "--bits", "0", "--out", str(out), "--jobs", "1", *extra)


def test_frontier_sweeps_resumes_and_plots(dense, image_folder, tmp_path):
    out = tmp_path / "frontier.json"
    sweep = frontier.main(sweep_args(image_folder, dense, out, "--methods", "global,uniform-gradual",
                                     "--sparsities", "0.9"))
    points = json.loads(out.read_text())["points"]
    assert [(p["method"], p["target"]) for p in points] == [("global", 0.9), ("uniform-gradual", 0.9)]
    for p in points:
        assert set(p) >= {"method", "target", "sparsity", "val_acc", "test_acc", "export_bytes", "macs", "size_bits"}
        assert p["sparsity"] == pytest.approx(0.9, abs=0.01) and p["export_bytes"] > 0
        assert p["macs"] < sweep["dense"]["macs"]
    plot = tmp_path / "plots" / "frontier.png"
    assert plot.stat().st_size > 20_000
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, dense / "dense.pt"):  # the umask's permissions, as any file the user creates
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    # A rerun with one more sparsity and the scan method runs only the new points.
    again = frontier.main(sweep_args(image_folder, dense, out, "--methods", "global,uniform-gradual,scan",
                                     "--sparsities", "0.5,0.9"))
    keys = [(p["method"], p["target"]) for p in again["points"]]
    assert again["points"][:2] == points and len(keys) == len(set(keys))
    assert set(keys[2:]) >= {("global", 0.5), ("uniform-gradual", 0.5), ("scan", 0.5)}
    with pytest.raises(UserError, match="another dense model or budget"):
        frontier.main(sweep_args(image_folder, dense, out, "--lr", "0.01"))


def test_frontier_refuses_bad_methods_and_a_missing_scan(dense, image_folder, tmp_path):
    with pytest.raises(UserError, match="unknown"):
        frontier.main(sweep_args(image_folder, dense, tmp_path / "f.json", "--methods", "global,magic"))
    with pytest.raises(UserError, match="run `python sensitivity.py"):
        frontier.main(sweep_args(image_folder, dense, tmp_path / "f.json", "--methods", "scan",
                                 "--scan", str(tmp_path / "none.json")))


def test_frontier_refuses_the_scan_of_another_dense_model(dense, image_folder, tmp_path):
    ckpt = load_checkpoint(dense / "dense.pt", stages=("dense",))
    ckpt["metrics"]["val_acc"] += 1  # another file: the scan no longer belongs to it
    torch.save(ckpt, dense / "dense.pt")
    with pytest.raises(UserError, match="scanned on another model"):
        frontier.main(sweep_args(image_folder, dense, tmp_path / "f.json", "--methods", "scan"))
    assert not (tmp_path / "f.json").exists()


def test_a_method_or_target_given_twice_runs_once(dense, image_folder, tmp_path):
    sweep = frontier.main(sweep_args(image_folder, dense, tmp_path / "f.json", "--methods", "global,global",
                                     "--sparsities", "0.9,0.9"))
    assert [(p["method"], p["target"]) for p in sweep["points"]] == [("global", 0.9)]


def test_a_resume_from_another_checkpoint_is_refused(dense, image_folder, tmp_path, monkeypatch):
    for name in ("a", "b"):
        prune.main(script_args(prune.get_args_parser(), image_folder, tmp_path / name, "--checkpoint",
                               str(dense / "dense.pt"), "--method", "global", "--target", {"a": "0.5", "b": "0.7"}[name]))
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted):
        finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, tmp_path / "a", "--epochs", "2",
                                  "--batch-size", "32"))
    monkeypatch.undo()
    with pytest.raises(UserError, match="another checkpoint"):
        finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, tmp_path / "a", "--resume",
                                  "--checkpoint", str(tmp_path / "b" / "pruned.pt")))


def test_a_sweep_file_from_before_eval_views_counts_as_four(tmp_path):
    budget = {k: 1 for k in frontier.BUDGET_FLAGS if k != "eval_views"}
    dense = {"width": 0.0625}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"dense": dense, "budget": budget, "points": []}))
    assert frontier.load_sweep(path, dense, {**budget, "eval_views": 4}) == []
    with pytest.raises(UserError, match="another dense model or budget"):
        frontier.load_sweep(path, dense, {**budget, "eval_views": 1})
