"""frontier.py's runs are the scripts' runs: iterative chains, seeds, weight sharing,
resume per run, jobs, and its bad inputs, on tiny generated data."""
import json

import pytest
import torch

import finetune
import frontier
import prune
import quantize
from checkpoint import load_checkpoint
from conftest import script_args
from export import load_sparse_export
from utils import UserError

BUDGET = ("--epochs", "2", "--batch-size", "32")


def sweep(image_folder, ckpt, out, *extra):
    return frontier.main(script_args(frontier.get_args_parser(), image_folder, ckpt, *BUDGET, "--out", str(out),
                                     "--quantize-epochs", "1", "--jobs", "1", *extra))


def run_scripts(image_folder, source, folder, method, target, seed, gradual=False):
    """prune.py (or finetune.py --gradual), finetune.py and quantize.py (4 bits, 1 epoch) with
    the sweep's flags -> (finetuned metrics, quantized metrics)."""
    pruning = ["--checkpoint", str(source), "--method", method, "--target", str(target)]
    if not gradual:
        prune.main(script_args(prune.get_args_parser(), image_folder, folder, *pruning, "--seed", str(seed)))
    tuned = finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, folder, *BUDGET,
                                      "--seed", str(seed), *(["--gradual", *pruning] if gradual else [])))
    shared = quantize.main(script_args(quantize.get_quantize_args_parser(), image_folder, folder, "--epochs", "1",
                                       "--batch-size", "32", "--seed", str(seed), "--bits", "4"))
    return tuned, shared


def test_a_frontier_run_is_the_scripts_result_and_iterative_masks_only_shrink(chain, image_folder, tmp_path):
    out = tmp_path / "f.json"
    result = sweep(image_folder, chain, out, "--methods", "global-iterative,random,global-gradual",
                   "--sparsities", "0.5,0.8", "--seeds", "3")
    runs = {(p["method"], p["target"]): p for p in result["points"]}
    assert len(runs) == 6

    # global-iterative: 0.5 from dense, then 0.8 from 0.5's finetuned model, by the scripts
    first, _ = run_scripts(image_folder, chain / "dense.pt", tmp_path / "s1", "global", 0.5, 3)
    second, shared = run_scripts(image_folder, tmp_path / "s1" / "finetuned.pt", tmp_path / "s2", "global", 0.8, 3)
    random, _ = run_scripts(image_folder, chain / "dense.pt", tmp_path / "s3", "random", 0.8, 3)
    gradual, _ = run_scripts(image_folder, chain / "dense.pt", tmp_path / "s4", "global", 0.8, 3, gradual=True)
    for tuned, key in ((first, ("global-iterative", 0.5)), (second, ("global-iterative", 0.8)),
                       (random, ("random", 0.8)), (gradual, ("global-gradual", 0.8))):
        point = runs[key]
        for k in ("val_acc", "test_acc", "sparsity", "macs", "best_epoch", "finetune_epochs", "export_bytes"):
            assert point[k] == tuned[k], (key, k)
    assert runs[("global-iterative", 0.8)]["start"] == 0.5 and second["finetune_epochs"] == 4
    q = runs[("global-iterative", 0.8)]["quantized"]
    assert (q["val_acc"], q["test_acc"], q["export_bytes"]) == (shared["val_acc"], shared["test_acc"],
                                                                shared["export_bytes"])
    # the exports are the scripts' models, bit for bit
    scripts = load_checkpoint(tmp_path / "s2" / "finetuned.pt", stages=("finetuned",))
    model, masks = load_sparse_export(tmp_path / "f" / "global-iterative-0.8-seed3.sparse.pt", with_masks=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, scripts["model"][name]), name
    # along the chain a pruned weight stays pruned
    _, before = load_sparse_export(tmp_path / "f" / "global-iterative-0.5-seed3.sparse.pt", with_masks=True)
    for name, mask in masks.items():
        assert not (mask & ~before[name]).any(), name
    # and the chain's second round prunes more: 0.8 of the prunable weights, not 0.5
    assert sum(int((~m).sum()) for m in masks.values()) > sum(int((~m).sum()) for m in before.values())


def test_seeds_resume_per_run_and_jobs(chain, image_folder, tmp_path, capsys):
    out = tmp_path / "f.json"
    flags = ("--methods", "global,global-iterative", "--sparsities", "0.5,0.8", "--seeds", "0,1", "--bits", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of two jobs will run: the same sums in the same order
    try:
        one = sweep(image_folder, chain, out, *flags)
    finally:
        torch.set_num_threads(threads)
    assert len(one["points"]) == 8
    table = capsys.readouterr().out
    assert " +- " in table and "2-bit test %" in table
    rows = frontier.summarize(one["points"])
    assert [r["n"] for r in rows] == [2] * 4
    accs = [p["test_acc"] for p in one["points"] if (p["method"], p["target"]) == ("global", 0.8)]
    assert rows[2]["test_acc"] == pytest.approx(sum(accs) / 2)
    assert (tmp_path / "plots" / "frontier.png").stat().st_size > 20_000

    # Drop two runs: a rerun does just those, and the later iterative one goes on from
    # the 0.5 run already there (its export).
    kept = [p for p in one["points"] if not (p["seed"] == 1 and p["target"] == 0.8)]
    saved = json.loads(out.read_text())
    out.write_text(json.dumps({**saved, "points": kept}))
    torch.set_num_threads(2)  # a thread a job
    try:
        again = sweep(image_folder, chain, out, *flags, "--jobs", "2")  # and in two processes
    finally:
        torch.set_num_threads(threads)
    assert again["points"][:6] == kept

    def key(p):
        return p["method"], p["target"], p["seed"]

    redone = {key(p): p for p in again["points"][6:]}
    assert set(redone) == {("global", 0.8, 1), ("global-iterative", 0.8, 1)}
    for p in one["points"]:
        if key(p) in redone:
            assert {k: v for k, v in p.items() if k != "seconds"} == {
                k: v for k, v in redone[key(p)].items() if k != "seconds"}

    # An iterative run whose start export is gone is refused before any training.
    out.write_text(json.dumps({**saved, "points": kept}))
    (tmp_path / "f" / "global-iterative-0.5-seed1.sparse.pt").unlink()
    with pytest.raises(UserError, match="is missing, but global-iterative 0.8 seed 1"):
        sweep(image_folder, chain, out, *flags)
    assert json.loads(out.read_text())["points"] == kept


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"FGSPARSE\x05\x00\x00\x00{...", "truncated or corrupted export"),
    (b"PK\x03\x04 torch", "a torch checkpoint, not a compressed export"),
])
def test_a_bad_start_export_is_refused_before_training(chain, image_folder, tmp_path, content, message):
    out = tmp_path / "f.json"
    flags = ("--methods", "global-iterative", "--sparsities", "0.5", "--bits", "0", "--epochs", "1")
    sweep(image_folder, chain, out, *flags)
    (tmp_path / "f" / "global-iterative-0.5-seed0.sparse.pt").write_bytes(content)
    before = out.read_bytes()
    with pytest.raises(UserError, match=message):
        sweep(image_folder, chain, out, "--methods", "global-iterative", "--sparsities", "0.5,0.8", "--bits", "0",
              "--epochs", "1")
    assert out.read_bytes() == before


def test_every_finished_start_of_a_chain_is_checked_before_training(chain, image_folder, tmp_path):
    out = tmp_path / "f.json"
    flags = ("--methods", "global-iterative", "--bits", "0", "--epochs", "1")
    sweep(image_folder, chain, out, *flags, "--sparsities", "0.7")
    (tmp_path / "f" / "global-iterative-0.7-seed0.sparse.pt").unlink()
    before = out.read_bytes()
    # 0.5 would start from dense and train; 0.9 goes on from the finished 0.7, whose export is gone
    with pytest.raises(UserError, match="global-iterative-0.7-seed0.sparse.pt is missing, but global-iterative 0.9 seed 0"):
        sweep(image_folder, chain, out, *flags, "--sparsities", "0.5,0.7,0.9")
    assert out.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == []


def test_a_batch_larger_than_the_data_is_refused_before_any_run(chain, image_folder, tmp_path):
    with pytest.raises(UserError, match=r"^--batch-size 100000 is larger than the 160 training images"):
        frontier.main(script_args(frontier.get_args_parser(), image_folder, chain, "--epochs", "1", "--batch-size",
                                  "100000", "--bits", "0", "--out", str(tmp_path / "f.json"), "--jobs", "2",
                                  "--methods", "global,uniform", "--sparsities", "0.5"))
    assert not (tmp_path / "f.json").exists() and not (tmp_path / "f").exists()


def test_a_start_export_that_is_not_its_records_is_refused(chain, image_folder, tmp_path):
    out = tmp_path / "f.json"
    flags = ("--methods", "global-iterative", "--epochs", "1")
    sweep(image_folder, chain, out, *flags, "--sparsities", "0.5")
    folder = tmp_path / "f"
    (folder / "global-iterative-0.5-seed0.sparse.pt").write_bytes((folder / "global-iterative-0.5-seed0-4bit.sparse.pt")
                                                                  .read_bytes())  # a whole export, of another model
    with pytest.raises(UserError, match="is not the export its record in the sweep file describes"):
        sweep(image_folder, chain, out, *flags, "--sparsities", "0.5,0.8")


def test_a_run_twice_in_the_sweep_file_is_refused(chain, image_folder, tmp_path):
    out = tmp_path / "f.json"
    sweep(image_folder, chain, out, "--methods", "global", "--sparsities", "0.5", "--bits", "0", "--epochs", "1")
    saved = json.loads(out.read_text())
    out.write_text(json.dumps({**saved, "points": saved["points"] * 2}))
    with pytest.raises(UserError, match="holds a run twice"):
        sweep(image_folder, chain, out, "--methods", "global", "--sparsities", "0.5", "--bits", "0", "--epochs", "1")


def test_a_diverged_run_stops_the_sweep_in_one_line(chain, image_folder, tmp_path):
    with pytest.raises(UserError, match="finetuning diverged .* lower --lr"):
        sweep(image_folder, chain, tmp_path / "f.json", "--methods", "global", "--sparsities", "0.5", "--lr", "1e30",
              "--epochs", "1")


def test_a_dense_model_without_a_validation_split_is_refused(image_folder, tmp_path):
    import train
    from conftest import TINY_TRAIN

    train.main(script_args(train.get_train_args_parser(), image_folder, tmp_path / "ckpt", *TINY_TRAIN,
                           "--val-size", "0", "--epochs", "1"))
    with pytest.raises(UserError, match="--val-size 0, but a run keeps its best epoch by validation"):
        sweep(image_folder, tmp_path / "ckpt", tmp_path / "f.json", "--methods", "global", "--sparsities", "0.5")
    assert not (tmp_path / "f.json").exists()
