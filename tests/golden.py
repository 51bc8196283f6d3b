"""The golden run: the tiny chain and a tiny frontier, through the scripts' command lines,
-> every figure they report (accuracies, sparsities, MACs, sizes) and each export's SHA-256.

    python tests/golden.py OUT.json      # run in the repo whose figures you want

tests/golden.json holds the figures of the commit named in it; test_golden.py reruns this
file and compares them bit for bit. Each step runs in a fresh process with one thread,
fp32 and AVX2 kernels pinned (MKL_CBWR: MKL's reproducible mode), so that the figures do
not depend on the CPU's vector width.
"""
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PRUNING_AUTOCAST": "fp32", "ATEN_CPU_CAPABILITY": "avx2",
          "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2"}
TINY = ["--width", "0.0625", "--val-size", "40", "--batch-size", "32"]
FIGURES = ("val_acc", "test_acc", "sparsity", "size_bits", "macs", "export_bytes", "best_epoch",
           "shared_val_acc", "shared_test_acc")


def platform_key():
    """What the figures may depend on beyond the code: torch's version and the CPU's maker."""
    vendor = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")),
                  platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"torch {torch.__version__.split('+')[0]}, {platform.machine()}, {vendor}"


def make_data(folder):
    """200 training and 50 test images in the official pickle format (tests/conftest.py's)."""
    sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]
    from conftest import make_images
    from data import write_pickle_folder

    write_pickle_folder(*make_images(200, 0), *make_images(50, 1), folder / "cifar-10-batches-py")


def steps(data, work):
    """The commands, each `python SCRIPT flags`: the chain, gradual pruning, an iterative
    round, and a frontier of every kind of method."""
    def at(name):
        return ["--data-dir", str(data), "--device", "cpu", "--checkpoint-dir", str(work / name),
                "--plot-dir", str(work / "plots")]

    chain, gradual = at("chain"), at("gradual")
    return [
        ["train.py", *chain[:-2], *TINY, "--epochs", "2"],
        ["sensitivity.py", *chain, "--sparsities", "0.5,0.9", "--max-drop", "5"],
        ["prune.py", *chain, "--method", "global", "--target", "0.8"],
        ["finetune.py", *chain, "--epochs", "2", "--batch-size", "32"],
        ["quantize.py", *chain[:-2], "--epochs", "1", "--batch-size", "32"],
        ["finetune.py", *gradual, "--gradual", "--checkpoint", str(work / "chain" / "dense.pt"), "--method",
         "uniform", "--target", "0.7", "--ramp", "0.6", "--prune-every", "2", "--epochs", "3", "--batch-size", "32"],
        ["prune.py", *gradual, "--checkpoint", str(work / "gradual" / "finetuned.pt"), "--method", "global",
         "--target", "0.9"],
        ["finetune.py", *gradual, "--epochs", "1", "--batch-size", "32", "--seed", "3"],
        ["frontier.py", *chain, "--methods", "uniform,global,scan,random,global-gradual,global-iterative",
         "--sparsities", "0.5,0.8", "--seeds", "0,1", "--epochs", "1", "--batch-size", "32",
         "--quantize-epochs", "1", "--jobs", "1", "--out", str(work / "frontier.json")],
    ]


def figures_of(work):
    """{file: figures} for every checkpoint, export, scan and sweep the steps wrote."""
    out = {}
    for path in sorted(work.rglob("*")):
        name = str(path.relative_to(work))
        if path.name.endswith(".sparse.pt"):
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".pt":
            metrics = torch.load(path, map_location="cpu", weights_only=True)["metrics"]
            out[name] = {k: metrics[k] for k in FIGURES if k in metrics}
        elif path.name in ("sensitivity.json", "sparsity_suggested.json"):
            scan = json.loads(path.read_text())
            out[name] = {k: scan[k] for k in ("dense_acc", "accuracy", "max_drop")} if "accuracy" in scan else scan
        elif path.name == "frontier.json":
            keep = ("method", "target", "seed", "start", "layers", "quantized", "finetune_epochs", *FIGURES)
            out[name] = [{k: p[k] for k in keep if k in p} for p in json.loads(path.read_text())["points"]]
    return out


def run(repo, out_json):
    """Run the steps with `repo`'s scripts and write the figures to out_json."""
    repo = Path(repo).resolve()
    env = {**os.environ, **PINNED, "PYTHONPATH": str(repo)}
    with tempfile.TemporaryDirectory() as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "work"
        make_data(data)
        for argv in steps(data, work):
            done = subprocess.run([sys.executable, *argv], cwd=repo, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(argv[:1])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        figures = figures_of(work)
    Path(out_json).write_text(json.dumps({"platform": platform_key(), "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    run(Path(__file__).parents[1], sys.argv[1])
