"""The seed's own model (width 1.0) from data to frontier in one command, sized for a lent GPU.

    make gpu OUT=runs/gpu DATA_DIR=data/cifar10          # width 1.0 on CUDA (estimated: 9 minutes on one H200)
    make gpu OUT=/tmp/smoke DATA_DIR=data/cifar10 SMOKE=1  # the same steps at tiny size on the CPU

Each step is one of the repo's scripts, run as a user would run it, its log in OUT/logs/:
  1. data.py      decode the data once into OUT/data (every later read takes about a
                  second); in this process, so that bad data stops the run in one line
  2. bench.py     widths 0.25 and 1.0: images/s against the baseline, the fraction of the
                  GPU's matmul peak, cuDNN's autotuner off, two jobs sharing the GPU
  3. train.py     the dense model, with train.py's defaults
  4. then two branches side by side, on the same GPU, both from OUT/checkpoints/dense.pt:
     a. sensitivity.py, then the pipeline's iterative pruning (global 0.9, finetune,
        global 0.95 from the finetuned model, finetune), then quantize.py
     b. frontier.py: global, global-gradual and global-iterative at 0.9, 0.95 and 0.98,
        seed 0, 5 finetuning epochs and 1 codebook epoch a run, one run per GPU (OUT/frontier.json,
        the runs' exports in OUT/frontier/)
Checkpoints go to OUT/checkpoints/, plots to OUT/plots/, and OUT/gpu.json records each
step's command, seconds and exit status as it ends, then the headline figures. The first
step to fail stops the run (the other branch too) and prints its log's last lines; the
same command then goes on from there, skipping the steps that succeeded.
"""
import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from checkpoint import ensure_writable, load_checkpoint, read_json, write_json
from cli import cli
from utils import Interrupted, UserError

ITERATIVE = [["prune.py", "--method", "global", "--target", "0.9"], ["finetune.py"],
             ["prune.py", "--checkpoint", "{ckpt}/finetuned.pt", "--method", "global", "--target", "0.95"],
             ["finetune.py"]]
# frontier.py's default --jobs: one run per GPU, as Ray tasks when there are several.
FRONTIER = ["--methods", "global,global-gradual,global-iterative", "--sparsities", "0.9,0.95,0.98",
            "--seeds", "0", "--epochs", "5", "--quantize-epochs", "1"]
# --smoke: each script's flags for a run of seconds on tiny data (added after the usual ones)
TINY = ["--epochs", "1", "--batch-size", "32", "--train-subset", "128"]
SMOKE = {"bench.py": ["--width", "0.0625", "--batch-size", "16", "--steps", "1"],
         "train.py": [*TINY, "--width", "0.0625", "--val-size", "40"],
         "sensitivity.py": ["--scan-size", "40", "--sparsities", "0.5,0.9"],
         "finetune.py": TINY, "quantize.py": TINY, "frontier.py": TINY}


class Run:
    """The steps' record, OUT/gpu.json, rewritten as each step ends; stop() ends every step."""

    def __init__(self, out, smoke, data_dir, done=()):
        self.out, self.smoke, self.data_dir, self.steps, self.failed = out, smoke, data_dir, list(done), None
        self.done = {step["name"] for step in done}
        self.lock, self.processes, self.start = threading.Lock(), set(), time.perf_counter()

    def save(self, **extra):
        write_json({"smoke": self.smoke, "data_dir": self.data_dir, "steps": self.steps, "failed": self.failed,
                    "finished": False, "seconds": round(time.perf_counter() - self.start, 1), **extra},
                   self.out / "gpu.json")

    def stop(self, why):
        """Mark the run failed (`why`: a step's name) and end the steps still running."""
        with self.lock:
            if not self.failed:
                self.failed = why
                for process in self.processes:
                    process.terminate()

    def step(self, name, argv):
        """Run `python argv` with its output in OUT/logs/<name>.log; -> whether it succeeded."""
        if name in self.done:
            print(f"{name}: done in the earlier run, skipped", flush=True)
            return True
        command = [sys.executable, *argv, *(SMOKE.get(argv[0], []) if self.smoke else [])]
        log = self.out / "logs" / f"{name}.log"
        with self.lock:
            if self.failed:
                return False
            print(f"[{time.perf_counter() - self.start:6.0f} s] {name}: {' '.join(command[1:])}", flush=True)
            t0 = time.perf_counter()
            f = open(log, "w")
            process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).parent)
            self.processes.add(process)  # under the lock: a failure elsewhere now stops this one too
        with f:
            code = process.wait()
        with self.lock:
            self.processes.discard(process)
            self.steps.append({"name": name, "command": command[1:], "seconds": round(time.perf_counter() - t0, 1),
                               "returncode": code, "log": str(log)})
            first = code != 0 and not self.failed
            self.save()
        if first:
            lines = log.read_text(errors="replace").splitlines()[-15:]
            print(f"{name} failed (exit {code}); the end of {log}:\n" + "\n".join(lines), flush=True)
            self.stop(name)
        return code == 0

    def branch(self, steps):
        """Steps one after the other, until one fails."""
        for name, argv in steps:
            if not self.step(name, argv):
                return

    def all_steps(self, first, branches):
        """`first` in order, then the branches side by side, each in a thread of its own."""
        self.branch(first)
        if self.failed:
            return
        threads = [threading.Thread(target=self.branch, args=(steps,)) for steps in branches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def headline(ckpt_dir, frontier_json):
    """The figures a reader wants first, from the files the steps wrote."""
    figures = {}
    for stage in ("dense", "finetuned", "quantized"):
        path = ckpt_dir / f"{stage}.pt"
        if path.is_file():
            m = load_checkpoint(path, stages=(stage,))["metrics"]
            figures[stage] = {k: m[k] for k in ("test_acc", "val_acc", "sparsity", "export_bytes", "train_seconds")
                              if k in m}
    if frontier_json.is_file():
        points = json.loads(frontier_json.read_text())["points"]
        figures["frontier"] = [{"method": p["method"], "target": p["target"], "test_acc": p["test_acc"],
                                **({"quantized_test_acc": p["quantized"]["test_acc"],
                                    "quantized_export_bytes": p["quantized"]["export_bytes"]}
                                   if p.get("quantized") else {})} for p in points]
    return figures


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/cifar10",
                        help="CIFAR-10 in any form the scripts read (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for everything the run writes")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (width 0.0625, 1 epoch a step): proves the steps work")
    return parser


def main(args):
    import torch

    import data

    if not args.out.strip():
        raise UserError("--out is empty: name the folder the run writes to")
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: width 1.0 would take days on the CPU; pass --smoke (SMOKE=1) "
                        "for the tiny CPU run")
    out, source = Path(args.out).absolute(), str(Path(args.data_dir).absolute())  # the steps run in the repo's folder
    ensure_writable(out, ("gpu.json",))
    done = []
    if (out / "gpu.json").is_file():  # go on from an earlier run of the same command
        earlier = read_json(out / "gpu.json", "an earlier run's record", "choose another --out")
        if not isinstance(earlier, dict) or not isinstance(earlier.get("steps"), list) or (
                earlier.get("smoke"), earlier.get("data_dir")) != (args.smoke, source):
            raise UserError(f"{out}/gpu.json is not an earlier run of this command (the same --data-dir, "
                            f"{'with' if args.smoke else 'without'} --smoke): choose another --out")
        if earlier.get("finished"):
            raise UserError(f"{out} holds a finished run (gpu.json): choose another --out, or delete it")
        done = [s for s in earlier["steps"] if s.get("returncode") == 0]
    run = Run(out, args.smoke, source, done)
    if "data" not in run.done:  # here, not in a child: bad data is one line and leaves no OUT behind
        t0 = time.perf_counter()
        data.main(argparse.Namespace(data_dir=source, out=str(out / "data")))
        log = out / "logs" / "data.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"decoded {source} into {out / 'data'}\n")
        run.steps.append({"name": "data", "command": ["data.py", "--data-dir", source, "--out", str(out / "data")],
                          "seconds": round(time.perf_counter() - t0, 1), "returncode": 0, "log": str(log)})
        run.save()
    try:
        run.all_steps(*plan(out, args.smoke))
    except KeyboardInterrupt:
        run.stop("interrupted")
        run.save()
        raise Interrupted(f"the steps done so far are in {out}/gpu.json: rerun the same command to go on") from None
    figures = headline(out / "checkpoints", out / "frontier.json")
    run.save(finished=not run.failed, **figures)
    seconds = time.perf_counter() - run.start
    if run.failed:
        raise UserError(f"the run stopped at {run.failed} after {seconds:.0f} s: see {out}/logs/{run.failed}.log, "
                        "then rerun the same command to go on")
    print(f"done in {seconds:.0f} s: {out}/gpu.json, logs in {out}/logs/, plots in {out}/plots/")
    for stage in ("dense", "finetuned", "quantized"):
        if stage in figures:
            print(f"{stage:9s} test {figures[stage]['test_acc']:.2f}%"
                  + (f", {figures[stage]['export_bytes']:,} bytes" if "export_bytes" in figures[stage] else ""))
    return figures


def plan(out, smoke):
    """-> (the steps before the branches, [each branch's steps]), each step (name, argv)."""
    ckpt, plots, data = out / "checkpoints", out / "plots", out / "data"
    device = ["--device", "cpu"] if smoke else []
    common = ["--data-dir", str(data), "--checkpoint-dir", str(ckpt), *device]
    with_plots = [*common, "--plot-dir", str(plots)]
    first = [("bench", ["bench.py", "--data-dir", str(data), "--width", "0.25,1.0", "--steps", "3",
                        "--scan-images", "0", "--jobs", "2", "--no-cudnn-benchmark", *device]),
             ("train", ["train.py", *common])]
    pipeline = [("sensitivity", ["sensitivity.py", *with_plots, "--scan-size", "2000"])]
    pipeline += [(f"{i + 1}-{argv[0][:-3]}", [*(a.format(ckpt=ckpt) for a in argv), *with_plots])
                 for i, argv in enumerate(ITERATIVE)]
    pipeline += [("quantize", ["quantize.py", *common])]
    frontier = [("frontier", ["frontier.py", *with_plots, *FRONTIER, "--out", str(out / "frontier.json")])]
    return first, [pipeline, frontier]


if __name__ == "__main__":
    cli(main, get_args_parser())
