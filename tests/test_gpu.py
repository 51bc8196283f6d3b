"""The one-command GPU run (make gpu ... SMOKE=1 on the CPU), its data step and bench.py's
peak figures, on tiny generated data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import data
from model import build_model
from utils import UserError, compute_dtype, get_model_macs, native_bf16_cpu

ROOT = Path(__file__).parent.parent
STEPS = ["data", "bench", "train", "sensitivity", "1-prune", "2-finetune", "3-prune", "4-finetune", "quantize",
         "frontier"]


def make_gpu(out, data_dir):
    return subprocess.run(["make", "gpu", f"OUT={out}", f"DATA_DIR={data_dir}", "SMOKE=1", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_make_gpu_smoke_runs_every_step_and_writes_under_out(image_folder, tmp_path):
    out = tmp_path / "gpu"
    result = make_gpu(out, image_folder)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads((out / "gpu.json").read_text())
    assert sorted(s["name"] for s in record["steps"]) == sorted(STEPS)
    assert all(s["returncode"] == 0 and Path(s["log"]).stat().st_size > 0 for s in record["steps"])
    order = [s["name"] for s in record["steps"]]
    assert order[:3] == ["data", "bench", "train"]  # the two branches come after the dense model
    assert [n for n in order if n in STEPS[3:9]] == STEPS[3:9]  # the pipeline in its order
    assert record["failed"] is None and record["finished"] is True and record["smoke"] is True
    assert 0 <= record["dense"]["test_acc"] <= 100 and record["quantized"]["export_bytes"] > 0
    assert record["finetuned"]["sparsity"] > 0.9  # the second round's 0.95
    runs = {(p["method"], p["target"]) for p in record["frontier"]}
    assert runs == {(m, t) for m in ("global", "global-gradual", "global-iterative") for t in (0.9, 0.95, 0.98)}
    for path in ("plots/frontier.png", "plots/sensitivity.png", "plots/summary.png", "checkpoints/quantized.pt",
                 "frontier.json", "data/cifar-10-batches-py/test_batch"):
        assert (out / path).is_file(), path
    bench_log = (out / "logs" / "bench.log").read_text()
    assert "peak matmul" in bench_log and "training jobs side by side" in bench_log
    again = make_gpu(out, image_folder)  # a finished run is not overwritten
    assert again.returncode != 0 and "holds a finished run" in again.stderr

    # A run that stopped goes on from where it stopped: here, as if quantize had failed.
    record.update(finished=False, failed="quantize")
    record["steps"] = [s for s in record["steps"] if s["name"] != "quantize"]
    (out / "gpu.json").write_text(json.dumps(record))
    again = make_gpu(out, image_folder)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "train: done in the earlier run, skipped" in again.stdout and "] quantize:" in again.stdout
    assert "] train:" not in again.stdout and "] frontier:" not in again.stdout
    resumed = json.loads((out / "gpu.json").read_text())
    assert resumed["finished"] is True and sorted(s["name"] for s in resumed["steps"]) == sorted(STEPS)
    other = make_gpu(out, image_folder.parent)  # not the same command: refused
    assert other.returncode != 0 and "not an earlier run of this command" in other.stderr


def test_make_gpu_refuses_bad_data_in_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "gpu"
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "junk.txt").write_text("not CIFAR-10")
    result = make_gpu(out, tmp_path / "nodata")
    lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert result.returncode != 0 and len(lines) == 1 and "is not a CIFAR-10 folder" in lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_run_without_a_gpu_asks_for_smoke(tmp_path, image_folder):
    import gpu

    with pytest.raises(UserError, match="no CUDA GPU here"):
        gpu.main(gpu.get_args_parser().parse_args(["--out", str(tmp_path / "g"), "--data-dir", str(image_folder)]))
    assert not (tmp_path / "g").exists()


def test_make_gpu_needs_out():
    result = subprocess.run(["make", "gpu"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "make gpu needs OUT=folder" in result.stderr


def test_decoding_once_gives_the_same_images(image_folder, tmp_path):
    folder = data.main(data.get_args_parser().parse_args(["--data-dir", str(image_folder), "--out",
                                                          str(tmp_path / "py")]))
    assert folder == tmp_path / "py" / "cifar-10-batches-py"
    for a, b in zip(data.load_cifar10(image_folder), data.load_cifar10(tmp_path / "py")):
        assert torch.equal(a, b)
    for out in (tmp_path / "py", tmp_path / "py" / "cifar-10-batches-py", tmp_path / "py" / "sub"):
        with pytest.raises(UserError, match="overlap"):
            data.main(data.get_args_parser().parse_args(["--data-dir", str(tmp_path / "py"), "--out", str(out)]))
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == ["cifar-10-batches-py"]  # nothing written


def test_a_split_missing_a_class_is_refused(image_folder, tmp_path):
    import shutil

    copy = Path(shutil.copytree(image_folder, tmp_path / "copy"))
    for image in (copy / "test" / "dog").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="test/dog holds no images"):
        data.main(data.get_args_parser().parse_args(["--data-dir", str(copy), "--out", str(tmp_path / "py")]))
    assert not (tmp_path / "py").exists()


# The CPU's own choice, and the other dtype forced through the environment.
@pytest.mark.parametrize("autocast", ["auto", "fp32" if native_bf16_cpu() else "bf16"])
def test_bench_reports_the_step_against_the_peak_of_its_own_dtype(autocast, image_folder, capsys, monkeypatch):
    monkeypatch.setenv("PRUNING_AUTOCAST", autocast)
    argv = ["--data-dir", str(image_folder), "--device", "cpu", "--width", "0.0625", "--batch-size", "16",
            "--steps", "1", "--scan-images", "0", "--jobs", "1", "--profile"]
    out = bench.main(bench.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    dtype = compute_dtype(torch.device("cpu"))  # its rule is tested in test_utils
    assert set(out["peak_macs"]) == {"fp32", dtype} and all(v > 0 for v in out["peak_macs"].values())
    assert f"the repo's step computes in {dtype}" in printed and f"repo of {dtype} peak" in printed
    figures = out["widths"][0.0625]
    macs = get_model_macs(build_model(0.0625), torch.zeros(1, 3, 32, 32))
    assert figures["train_peak_fraction"] == pytest.approx(3 * macs * figures["train_images_per_s"]
                                                           / out["peak_macs"][dtype])
    assert 0 < figures["baseline_train_peak_fraction"] < 1
    if autocast == "auto":  # a dtype the CPU only emulates has no true peak: a fraction can pass 1
        assert 0 < figures["train_peak_fraction"] < 1
    else:
        assert figures["train_peak_fraction"] > 0 and ("no native bf16" in printed) == (dtype == "bf16")
    assert figures["train_ratio"] > 0 and "jobs_ratio" not in figures
    assert "share of the step" in printed and "aten::" in printed  # the profile, op by op
    assert "peak matmul" in printed and "--- width 0.0625" in printed


def test_bench_jobs_that_fail_stop_with_one_line_not_a_hang(image_folder):
    # Every job loads its data itself: a batch larger than the 200 images fails in each.
    args = bench.get_args_parser().parse_args(["--data-dir", str(image_folder), "--device", "cpu",
                                                "--batch-size", "150", "--steps", "1"])
    with pytest.raises(UserError, match="side-by-side training job failed"):
        bench.time_jobs(args, 0.0625, 2)
