"""What a user sees: bad input ends with one line on stderr and a non-zero exit, no
traceback, no file changed; an interrupted run resumes to the very same result."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import export
import finetune
import frontier
import prune
import quantize
import sensitivity
import train
from checkpoint import load_checkpoint
from cli import cli
from conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parent.parent


def run_cli(module, parser, argv, capsys):
    """The scripts' real entry point, in-process: -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(module.main, parser, argv)
    return exit_info.value.code, capsys.readouterr().err


def tree(folder):
    """Every path under `folder` (folders too) with the bytes of each file."""
    return {p: p.read_bytes() if p.is_file() else None for p in Path(folder).rglob("*")}


def bad_json(tmp_path, text, name="s.json"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def pickled(tmp_path, batch):
    """A cifar-10-batches-py folder whose every batch holds `batch`."""
    folder = tmp_path / "pickled" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder.parent


def folder_named(tmp_path, name):
    """A checkpoint folder in which `name` is a folder."""
    (tmp_path / "outputs" / name).mkdir(parents=True)
    return tmp_path / "outputs"


def hand_made(tmp_path, **fields):
    path = tmp_path / "hand.pt"
    torch.save({"stage": "dense", "model": {}, **fields}, path)
    return path


BAD_INPUTS = [  # (script, extra args, what the one line must say)
    ("prune", lambda t: ["--sparsity", bad_json(t, "{not json")], "is not valid JSON"),
    ("prune", lambda t: ["--sparsity", bad_json(t, "")], "is empty"),
    ("prune", lambda t: ["--sparsity", bad_json(t, "[0.5]")], "maps layer names"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv99.weight": 0.5}')], "unknown layer"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv1.weight": 1.5}')], "number in [0, 1]"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv1.weight": "high"}')], "number in [0, 1]"),
    ("prune", lambda t: ["--sparsity", str(t / "missing.json")], "not found"),
    ("prune", lambda t: ["--sparsity", str(t)], "is a directory"),
    ("prune", lambda t: ["--checkpoint", str(t / "nope.pt")], "run `python train.py` first"),
    ("prune", lambda t: ["--checkpoint", str(t)], "is a directory, not a checkpoint"),
    ("finetune", lambda t: ["--checkpoint", str(t / "nope.pt")], "run `python prune.py` first"),
    ("finetune", lambda t: ["--checkpoint", "{ckpt}/dense.pt"], "'dense' checkpoint"),
    ("prune", lambda t: ["--checkpoint", bad_json(t, "garbage")], "not a file written by torch.save"),
    ("prune", lambda t: ["--checkpoint", bad_json(t, "")], "the file is empty"),
    ("prune", lambda t: ["--checkpoint", "{ckpt}/finetuned.sparse.pt"], "not a file written by torch.save"),
    ("sensitivity", lambda t: ["--checkpoint", "{ckpt}/pruned.pt"], "'pruned' checkpoint"),
    ("sensitivity", lambda t: ["--sparsities", "0.5,abc"], "comma-separated fractions in [0, 1], got '0.5,abc'"),
    ("sensitivity", lambda t: ["--sparsities", "0.5,1.5"], "comma-separated fractions in [0, 1]"),
    ("sensitivity", lambda t: ["--sparsities", ","], "comma-separated fractions"),
    ("train", lambda t: ["--data-dir", str(t)], "is not a CIFAR-10 folder"),
    ("train", lambda t: ["--batch-size", "100000"], "larger than the"),
    ("train", lambda t: ["--val-size", "100000"], "--val-size"),
    ("train", lambda t: ["--checkpoint-dir", bad_json(t, "a file") + "/sub"], "cannot write"),
    ("prune", lambda t: ["--plot-dir", bad_json(t, "a file") + "/sub"], "cannot write"),
    ("prune", lambda t: ["--method", "uniform"], "needs --target"),
    ("prune", lambda t: ["--method", "uniform", "--target", "0.5", "--sparsity", bad_json(t, "{}")],
     "--method uniform takes --target"),
    ("prune", lambda t: ["--method", "global", "--target", "0.9", "--exclude", "conv9"],
     "no prunable tensor named 'conv9'"),
    ("prune", lambda t: ["--target", "0.9"], "sensitivity.py --target-sparsity"),
    ("frontier", lambda t: ["--methods", "global,magic"], "choose from uniform, global, scan, random"),
    # A chain evaluates at its dense model's views (4 here) throughout.
    ("frontier", lambda t: ["--eval-views", "1"], "pass --eval-views 4"),
    ("finetune", lambda t: ["--eval-views", "2", "--method", "global", "--target", "0.9", "--gradual"],
     "pass --eval-views 4"),
    ("finetune", lambda t: ["--eval-views", "1"], "pass --eval-views 4"),
    ("quantize", lambda t: ["--eval-views", "3"], "pass --eval-views 4"),
    ("sensitivity", lambda t: ["--eval-views", "1"], "pass --eval-views 4"),
    ("finetune", lambda t: ["--method", "random", "--target", "0.5", "--gradual"], "one-shot control"),
    ("prune", lambda t: ["--method", "global", "--target", "0.5", "--gradual"], "run `python finetune.py --gradual`"),
    ("finetune", lambda t: ["--method", "global", "--target", "0.5"], "go with --gradual"),
    ("finetune", lambda t: ["--ramp", "0.3", "--exclude", "conv0"], "--exclude, --ramp: pruning flags"),
    ("finetune", lambda t: ["--gradual", "--target", "0.5"], "sensitivity.py --target-sparsity"),
    ("finetune", lambda t: ["--gradual", "--method", "global", "--target", "0.5", "--checkpoint", "{ckpt}/pruned.pt"],
     "'pruned' checkpoint"),
    ("frontier", lambda t: ["--checkpoint", "{ckpt}/pruned.pt"], "'pruned' checkpoint"),
    ("frontier", lambda t: ["--methods", "scan", "--scan", bad_json(t, '{"dense_acc": 1}')], "not a scan"),
    ("frontier", lambda t: ["--methods", "scan", "--scan", bad_json(t, "[1, 2")], "is not valid JSON"),
    ("frontier", lambda t: ["--out", bad_json(t, '{"points": 3}')], "not a sweep written by this version of frontier.py"),
    ("frontier", lambda t: ["--out", bad_json(t, "")], "is empty"),
    ("frontier", lambda t: ["--out", str(t)], "is a folder, but this run writes a file there"),
    ("frontier", lambda t: ["--out", bad_json(t, '{"points": [{"method": "global", "target": "0.8"}]}')],
     "not a sweep written by this version of frontier.py"),
    ("frontier", lambda t: ["--methods", "scan", "--scan", bad_json(t, json.dumps(
        {"dense_acc": "50", "sparsities": [0.5], "accuracy": {}, "num_parameters": {}}))], "not a scan"),
    ("frontier", lambda t: ["--methods", "scan", "--scan", bad_json(t, json.dumps(
        {"dense_acc": 50, "sparsities": [0.5, 2.0], "accuracy": {"backbone.conv1.weight": [40, 30]},
         "num_parameters": {"backbone.conv1.weight": 9}, "checkpoint_sha256": "0"}))], "not a scan"),
    ("frontier", lambda t: ["--out", str(t / ("b" * 250)) + ".json"], "the file name is too long"),
    ("train", lambda t: ["--data-dir", bad_json(t, "a file")], "is a file, not a folder"),
    ("train", lambda t: ["--data-dir", bad_json(t, "a file") + "/sub"], "is a file, not a folder"),
    ("train", lambda t: ["--data-dir", str(pickled(t, [1, 2]))], "cannot be read"),
    ("train", lambda t: ["--data-dir", str(pickled(t, {"data": [[0] * 3072], "labels": [1, 2]}))], "cannot be read"),
    ("train", lambda t: ["--data-dir", str(pickled(t, {"data": [[0] * 3072], "labels": [99]}))], "cannot be read"),
    ("train", lambda t: ["--checkpoint-dir", str(folder_named(t, "dense.pt"))], "is a folder, but this run writes"),
    ("prune", lambda t: ["--checkpoint", str(hand_made(t, metrics=5))], "older version of this repo"),
    ("bench", lambda t: ["--steps", "1", "--width", "0.0625", "--scan-images", "0"], "fewer than --batch-size"),
    ("quantize", lambda t: ["--checkpoint", "{ckpt}/dense.pt"], "run `python finetune.py` first"),
    ("bench", lambda t: ["--jobs", "999", "--batch-size", "8", "--steps", "1", "--scan-images", "0"], "--jobs 999 is more than"),
    ("frontier", lambda t: ["--jobs", "999"], "--jobs 999 is more than"),
    ("frontier", lambda t: ["--address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    ("frontier", lambda t: ["--address", "not-an-address"], "no Ray cluster answers"),
    ("frontier", lambda t: ["--address", "127.0.0.1:1", "--jobs", "2"], "--jobs is for a sweep on this machine"),
    ("bench", lambda t: ["--export", "--profile"], "--export measures file sizes only"),
]
# Every numeric flag is checked when parsed: (scripts, flag, bad values, what is allowed)
BAD_NUMBERS = [
    (("train", "finetune", "quantize", "frontier"), "--epochs", ("0", "-1", "2.5", "ten"), "an integer of 1 or more"),
    (("train", "finetune", "frontier"), "--batch-size", ("0", "-8"), "an integer of 1 or more"),
    (("train", "finetune", "quantize"), "--lr", ("0", "-0.1", "nan", "inf"), "a finite number above 0"),
    (("train", "frontier"), "--bias-lr-scale", ("0", "-1"), "a finite number above 0"),
    (("train", "finetune"), "--momentum", ("1", "-0.1", "1.5"), "a fraction in [0, 1)"),
    (("train", "finetune", "frontier"), "--weight-decay", ("-1e-4", "nan"), "a finite number of 0 or more"),
    (("train", "finetune", "quantize"), "--label-smoothing", ("2", "-0.1"), "a fraction in [0, 1]"),
    (("train", "finetune"), "--warmup", ("1", "-0.5"), "a fraction in [0, 1)"),
    (("train", "frontier"), "--translate", ("-1", "32"), "an integer from 0 to 31"),
    (("train", "finetune"), "--low-res-epochs", ("-1",), "an integer of 0 or more"),
    (("train",), "--low-res", ("4", "40"), "an integer from 8 to 32"),
    (("train", "finetune", "frontier"), "--train-subset", ("0", "-5"), "an integer of 1 or more"),
    (("train", "finetune", "quantize"), "--seed", ("-1", "x"), "an integer from 0 to 2**32 - 1"),
    (("train",), "--width", ("0", "-0.25", "nan", "1000"), "a number above 0 and at most 8"),
    (("train",), "--val-size", ("-1",), "an integer of 0 or more"),
    (("train",), "--val-every", ("0",), "an integer of 1 or more"),
    (("finetune", "frontier"), "--ramp", ("0", "1.5"), "a fraction in (0, 1]"),
    (("finetune", "frontier"), "--prune-every", ("0",), "an integer of 1 or more"),
    (("prune",), "--target", ("1.5", "-0.1", "nan"), "a fraction in [0, 1]"),
    (("sensitivity",), "--scan-size", ("0",), "an integer of 1 or more"),
    (("sensitivity",), "--max-drop", ("-1",), "a finite number of 0 or more"),
    (("sensitivity",), "--target-sparsity", ("0", "1.2"), "a fraction in (0, 1]"),
    (("quantize",), "--bits", ("0", "9", "four"), "an integer from 1 to 8"),
    (("frontier", "sensitivity"), "--sparsities", ("0.5,2", "x"), "comma-separated fractions in [0, 1]"),
    (("frontier",), "--seeds", ("-1", "0,x", ","), "comma-separated seeds (integers from 0)"),
    (("frontier",), "--bits", ("-1", "9"), "an integer from 0 to 8"),
    (("frontier",), "--quantize-epochs", ("0",), "an integer of 1 or more"),
    (("frontier",), "--quantize-lr", ("0", "nan"), "a finite number above 0"),
    (("frontier",), "--jobs", ("0", "-1", "two"), "an integer of 1 or more"),
    (("frontier",), "--retries", ("-1",), "an integer of 0 or more"),
    (("bench",), "--steps", ("0",), "an integer of 1 or more"),
    (("bench",), "--width", ("0", "1e20", "0.25,x", ","), "comma-separated widths (numbers above 0, at most 8)"),
    (("bench",), "--jobs", ("-1",), "an integer of 0 or more"),
    (("bench",), "--scan-images", ("-1",), "an integer of 0 or more"),
    (("train", "prune", "sensitivity", "finetune", "quantize", "frontier", "export"), "--eval-views", ("0", "5", "x"),
     "an integer from 1 to 4"),
]
PARSERS = {"train": (train, train.get_train_args_parser), "prune": (prune, prune.get_args_parser),
           "sensitivity": (sensitivity, sensitivity.get_args_parser),
           "finetune": (finetune, finetune.get_finetune_args_parser),
           "quantize": (quantize, quantize.get_quantize_args_parser),
           "frontier": (frontier, frontier.get_args_parser), "bench": (bench, bench.get_args_parser),
           "export": (export, export.get_args_parser)}


def script_argv(script, ckpt, image_folder, tmp_path):
    if script == "bench":
        return ["--data-dir", str(image_folder), "--device", "cpu"]
    argv = ["--data-dir", str(image_folder), "--checkpoint-dir", str(ckpt), "--device", "cpu"]
    if script == "train":
        argv += TINY_TRAIN
    if "--plot-dir" in PARSERS[script][1]().format_help():
        argv += ["--plot-dir", str(tmp_path / "plots")]
    return argv


def assert_one_line(code, err, message):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("script,extra,message", BAD_INPUTS, ids=[f"{s}:{m}" for s, _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(script, extra, message, chain, image_folder, tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("not cifar")
    module, parser = PARSERS[script]
    argv = script_argv(script, chain, image_folder, tmp_path)
    argv += [a.replace("{ckpt}", str(chain)) for a in extra(tmp_path)]
    before = tree(tmp_path)
    code, err = run_cli(module, parser(), argv, capsys)
    assert_one_line(code, err, message)
    assert tree(tmp_path) == before  # no file changed, no folder left behind


NUMBER_CASES = [(s, flag, v, allowed) for scripts, flag, values, allowed in BAD_NUMBERS
                for s in scripts for v in values]


@pytest.mark.parametrize("script,flag,value,allowed", NUMBER_CASES,
                         ids=[f"{s}{f}={v}" for s, f, v, _ in NUMBER_CASES])
def test_bad_numbers_are_refused_when_parsed(script, flag, value, allowed, tmp_path, capsys):
    module, parser = PARSERS[script]
    argv = ["--data-dir", str(tmp_path / "no-data"), "--device", "cpu", f"{flag}={value}"]
    code, err = run_cli(module, parser(), argv, capsys)  # before any data is looked for
    assert_one_line(code, err, f"argument {flag}: must be {allowed}, got '{value}'")
    assert list(tmp_path.iterdir()) == []


def failing_download(url, download_root, md5):
    """What a download cut off halfway leaves: a partial archive, then an error."""
    Path(download_root).mkdir(parents=True, exist_ok=True)
    (Path(download_root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
    raise ConnectionError("the network went away")


@pytest.mark.parametrize("script", ["train", "prune", "sensitivity", "finetune", "quantize", "frontier"])
def test_a_failed_run_leaves_no_empty_folders(script, tmp_path, capsys, monkeypatch):
    """No dense.pt to start from, or no data: the error names it and creates nothing."""
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", failing_download)
    module, parser = PARSERS[script]
    argv = ["--data-dir", str(tmp_path / "data" / "cifar10"), "--checkpoint-dir", str(tmp_path / "a" / "ckpt"),
            "--device", "cpu"]
    if "--plot-dir" in parser().format_help():
        argv += ["--plot-dir", str(tmp_path / "b" / "plots")]
    if script == "train":  # no data: the download starts, and fails
        argv += TINY_TRAIN
    code, err = run_cli(module, parser(), argv, capsys)
    assert code != 0 and err.startswith("error: ") and ("download failed" in err) == (script == "train")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_into_an_empty_folder_leaves_it_empty(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", failing_download)
    (tmp_path / "data").mkdir()
    argv = ["--data-dir", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ckpt"), *TINY_TRAIN]
    code, err = run_cli(train, train.get_train_args_parser(), argv, capsys)
    assert code != 0 and "download failed" in err
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and list((tmp_path / "data").iterdir()) == []


def test_every_script_explains_itself(capsys):
    for name, (module, parser) in PARSERS.items():
        text = parser().format_help()
        assert "default:" in text or name == "export", name
        assert "--resume" not in text or name in ("train", "finetune", "quantize"), name
        assert "below" not in text and "../shared" not in text, name
        for action in parser()._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(chain_dir, image_folder, capsys):
    argv = ["--data-dir", str(image_folder), "--checkpoint-dir", str(chain_dir), "--device", "cuda"]
    code, err = run_cli(prune, prune.get_args_parser(), argv, capsys)
    assert code != 0 and "no CUDA" in err


def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path / "nowhere"),
                             "--checkpoint-dir", str(tmp_path / "c"), "--epochs", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: argument --epochs: must be an integer of 1 or more, got '0' (see --help)"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_training_resumes_to_the_same_result(stop, image_folder, tmp_path):
    argv = ["--data-dir", str(image_folder), *TINY_TRAIN, "--device", "cpu", "--epochs", "4", "--seed", "3"]
    once = tmp_path / "once"
    train.main(train.get_train_args_parser().parse_args([*argv, "--checkpoint-dir", str(once)]))

    # The same run in a real process, stopped with Ctrl-C (SIGINT) or as a batch scheduler
    # stops it (SIGTERM) once an epoch is saved.
    parts = tmp_path / "parts"
    state = parts / "dense.resume.pt"
    cmd = [sys.executable, "train.py", *argv, "--checkpoint-dir", str(parts)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130
    assert "Last good state: " in err and "--resume" in err and "Traceback" not in err
    assert not (parts / "dense.pt").exists()
    done = load_checkpoint(state, stages=("resume",))["epoch"]
    assert 1 <= done < 4

    resumed = train.main(train.get_train_args_parser().parse_args(
        [*argv, "--checkpoint-dir", str(parts), "--resume", "--epochs", "99"]))  # the run's own flags win
    a = load_checkpoint(once / "dense.pt")
    b = load_checkpoint(parts / "dense.pt")
    assert b["args"]["epochs"] == 4 and len(b["history"]) == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert resumed["test_acc"] == a["metrics"]["test_acc"]
    assert not state.exists()
