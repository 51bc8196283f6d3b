"""What a user sees: bad input ends with one line on stderr and a non-zero exit, no
traceback, no file changed; an interrupted run resumes to the very same result."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune
import frontier
import prune
import sensitivity
import train
from utils import cli, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--width", "0.0625", "--val-size", "40", "--batch-size", "32", "--device", "cpu"]


def run_cli(module, parser, argv, capsys):
    """The scripts' real entry point, in-process: -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(module.main, parser, argv)
    return exit_info.value.code, capsys.readouterr().err


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """A tiny dense + pruned checkpoint pair to feed bad arguments next to."""
    ckpt = tmp_path_factory.mktemp("cli") / "ckpt"
    common = ["--data-dir", str(image_folder), "--checkpoint-dir", str(ckpt)]
    train.main(train.get_train_args_parser().parse_args([*common, *TINY_TRAIN, "--epochs", "1"]))
    prune.main(prune.get_args_parser().parse_args([*common, "--plot-dir", str(ckpt.parent / "plots")]))
    return ckpt


def bad_json(tmp_path, text):
    path = tmp_path / "s.json"
    path.write_text(text)
    return str(path)


BAD_INPUTS = [  # (script, extra args, what the one line must say)
    ("prune", lambda t: ["--sparsity", bad_json(t, "{not json")], "not valid JSON"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv99.weight": 0.5}')], "unknown layer"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv1.weight": 1.5}')], "number in [0, 1]"),
    ("prune", lambda t: ["--sparsity", bad_json(t, '{"backbone.conv1.weight": "high"}')], "number in [0, 1]"),
    ("prune", lambda t: ["--sparsity", str(t / "missing.json")], "cannot read"),
    ("prune", lambda t: ["--checkpoint", str(t / "nope.pt")], "run `python train.py` first"),
    ("finetune", lambda t: ["--checkpoint", str(t / "nope.pt")], "run `python prune.py` first"),
    ("finetune", lambda t: ["--checkpoint", "{ckpt}/dense.pt"], "'dense' checkpoint"),
    ("prune", lambda t: ["--checkpoint", bad_json(t, "garbage")], "not a readable checkpoint"),
    ("sensitivity", lambda t: ["--checkpoint", "{ckpt}/pruned.pt"], "'pruned' checkpoint"),
    ("sensitivity", lambda t: ["--sparsities", "0.5,abc"], "comma-separated numbers"),
    ("sensitivity", lambda t: ["--sparsities", "0.5,1.5"], "numbers in [0, 1]"),
    ("train", lambda t: ["--data-dir", str(t)], "is not a CIFAR-10 folder"),
    ("train", lambda t: ["--epochs", "0"], "--epochs must be at least 1"),
    ("train", lambda t: ["--train-subset", "-5"], "--train-subset must be a positive"),
    ("train", lambda t: ["--batch-size", "100000"], "larger than the"),
    ("train", lambda t: ["--val-size", "100000"], "--val-size"),
    ("finetune", lambda t: ["--epochs", "0"], "--epochs must be at least 1"),
    ("train", lambda t: ["--translate", "-1"], "--translate must be 0 or more"),
    ("train", lambda t: ["--translate", "32"], "less than the image side"),
    ("train", lambda t: ["--val-every", "0"], "--val-every must be at least 1"),
    ("train", lambda t: ["--low-res", "40"], "--low-res between 8 and 32"),
    ("finetune", lambda t: ["--low-res-epochs", "-1", "--batch-size", "16"],
     "--low-res-epochs must be 0 or more"),
    ("finetune", lambda t: ["--bias-lr-scale", "0"], "--bias-lr-scale must be positive"),
    ("train", lambda t: ["--checkpoint-dir", bad_json(t, "a file") + "/sub"], "cannot write"),
    ("prune", lambda t: ["--plot-dir", bad_json(t, "a file") + "/sub"], "cannot write"),
    ("prune", lambda t: ["--method", "global", "--target", "1.5"], "a fraction in [0, 1]"),
    ("prune", lambda t: ["--method", "uniform", "--target", "0.5", "--gradual", "--ramp", "0"],
     "--ramp must be in (0, 1]"),
    ("prune", lambda t: ["--method", "global", "--target", "0.5", "--gradual", "--prune-every", "0"],
     "--prune-every at least 1"),
    ("prune", lambda t: ["--method", "uniform", "--target", "0.5", "--sparsity", bad_json(t, "{}")],
     "--method uniform takes --target"),
    ("frontier", lambda t: ["--sparsities", "0.5,2"], "numbers in [0, 1]"),
    ("frontier", lambda t: ["--methods", "random"], "choose from uniform, global, scan"),
    ("frontier", lambda t: ["--checkpoint", "{ckpt}/pruned.pt"], "'pruned' checkpoint"),
]
PARSERS = {"train": (train, train.get_train_args_parser), "prune": (prune, prune.get_args_parser),
           "sensitivity": (sensitivity, sensitivity.get_args_parser),
           "finetune": (finetune, finetune.get_finetune_args_parser),
           "frontier": (frontier, frontier.get_args_parser)}


@pytest.mark.parametrize("script,extra,message", BAD_INPUTS, ids=[f"{s}:{m}" for s, _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(script, extra, message, trained, image_folder, tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("not cifar")
    module, parser = PARSERS[script]
    argv = ["--data-dir", str(image_folder), "--checkpoint-dir", str(trained), "--device", "cpu"]
    if script == "train":
        argv += TINY_TRAIN[:-2]
    if script != "train":
        argv += ["--plot-dir", str(tmp_path / "plots")]
    argv += [a.replace("{ckpt}", str(trained)) for a in extra(tmp_path)]
    before = snapshot(trained)
    code, err = run_cli(module, parser(), argv, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert snapshot(trained) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(trained, image_folder, capsys):
    argv = ["--data-dir", str(image_folder), "--checkpoint-dir", str(trained), "--device", "cuda"]
    code, err = run_cli(prune, prune.get_args_parser(), argv, capsys)
    assert code != 0 and "no CUDA" in err


def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path / "nowhere"),
                             "--checkpoint-dir", str(tmp_path / "c"), "--epochs", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --epochs must be at least 1, got 0"


def test_interrupted_training_resumes_to_the_same_result(image_folder, tmp_path):
    argv = ["--data-dir", str(image_folder), *TINY_TRAIN, "--epochs", "4", "--seed", "3"]
    once = tmp_path / "once"
    train.main(train.get_train_args_parser().parse_args([*argv, "--checkpoint-dir", str(once)]))

    # The same run in a real process, stopped with Ctrl-C (SIGINT) once an epoch is saved.
    parts = tmp_path / "parts"
    state = parts / "dense.resume.pt"
    cmd = [sys.executable, "train.py", *argv, "--checkpoint-dir", str(parts)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
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
