"""How far can the model be pruned, and which method wins where: many prune + finetune
(+ weight sharing) runs from one dense model, over seeds, and the frontier they draw.

    python frontier.py                      # 10 methods x 6 sparsities, GPU-sized
    python frontier.py --methods global,global-iterative --sparsities 0.9,0.95,0.98 --seeds 0,1 --epochs 5

Methods (--methods), each pruned from the same dense checkpoint:
  uniform  the same sparsity for every tensor but the --exclude ones (prune.py --method uniform);
  global   one magnitude threshold over those tensors (prune.py --method global);
  scan     the sensitivity scan's suggestion for that target (sensitivity.py --target-sparsity;
           needs checkpoints/sensitivity.json with sparsities as high as the targets);
  random   uniform's sparsities with random masks, the control (prune.py --method random);
  NAME-gradual    the same allocation reached gradually during finetuning (prune.py --gradual);
  NAME-iterative  Han et al.'s iterative pruning: the targets in increasing order, each
           pruned one-shot from the previous target's finetuned model with its masks held
           (prune.py --checkpoint checkpoints/finetuned.pt); the first from the dense model.
Every run gets the same budget: finetuning epochs, learning rate, batch size and images,
then (--bits) k-means weight sharing and codebook training as quantize.py does. --seeds
sets each run's finetuning randomness (and random's masks); the dense model stays the same.
A point is finetune.py's result for the same flags and seed.

The dataset is read once per job. Each finished run is appended to checkpoints/frontier.json
at once and its exports are kept in checkpoints/frontier/; a rerun skips the runs already
there, per (method, target, seed), so an interrupted or extended sweep loses at most the
runs in progress. Validation accuracy chooses, test accuracy is reported. Prints a table
of mean +- sample std over the seeds and writes plots/frontier.png: test accuracy against
the bytes on disk (dense.pt over each export, fp32 and weight-shared) and against MACs.
"""
import contextlib
import copy
import fcntl
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
import traceback
from argparse import Namespace
from queue import Empty
from pathlib import Path

import torch

from data import check_views, load_data_for
from export import read_export, load_sparse_export, save_sparse_export
from finetune import finetune_model
from model import build_model_from_checkpoint
from prune import add_pruning_args, get_prunable_names, prune_model, resolve_names
from quantize import quantize_model
from sensitivity import drop_for_target, suggest_sparsity
from train import FINETUNE
from train import get_args_parser as get_training_args_parser
from checkpoint import ensure_writable, file_sha256, load_checkpoint, read_json, write_json
from cli import cli, fraction_list, int_in, is_fraction, nonnegative_int, positive_float, positive_int, seed_list
from plots import plot_frontier
from utils import (evaluate, format_table, get_device, Interrupted, measure, plural, resolve_jobs, tta_label,
                   TTA_VIEWS, UserError)

ALLOCATIONS = ("uniform", "global", "scan", "random")
METHODS = (*ALLOCATIONS, "uniform-gradual", "global-gradual", "scan-gradual",
           "uniform-iterative", "global-iterative", "scan-iterative")
# The flags that make runs comparable: a sweep file holds runs of one budget only.
BUDGET_FLAGS = ("epochs", "lr", "batch_size", "train_subset", "momentum", "weight_decay",
                "label_smoothing", "warmup", "bias_lr_scale", "translate", "low_res_epochs", "low_res",
                "exclude", "ramp", "prune_every", "bits", "quantize_epochs", "quantize_lr", "eval_views")


def split_method(method):
    """'global-iterative' -> ('global', 'iterative'); 'uniform' -> ('uniform', 'one-shot')."""
    allocation, _, kind = method.partition("-")
    return allocation, kind or "one-shot"


def parse_methods(text):
    """'global,scan-gradual' -> ('global', 'scan-gradual'), each checked against METHODS."""
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # each once, in order
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    return methods


def scan_plan(scan, target, model):
    """The scan's suggestion that removes at least `target` of the prunable weights, or
    None when even the highest scanned sparsities fall short."""
    params = dict(model.named_parameters())
    num_parameters = {n: params[n].numel() for n in scan["accuracy"]}
    drop = drop_for_target(scan["dense_acc"], scan["sparsities"], scan["accuracy"], num_parameters, target)
    return None if drop is None else suggest_sparsity(scan["dense_acc"], scan["sparsities"], scan["accuracy"], drop)


def load_scan(path, model, dense_sha256):
    """sensitivity.json of this very dense checkpoint -> dict."""
    fix = "run `python sensitivity.py` on this checkpoint first, or leave the scan methods out"
    scan = read_json(path, "the sensitivity scan that --methods scan needs", fix)
    params = dict(model.named_parameters())
    try:
        values = [scan["dense_acc"], *scan["sparsities"], *(a for accs in scan["accuracy"].values() for a in accs)]
        wrong = any(n not in params or params[n].numel() != k for n, k in scan["num_parameters"].items())
        wrong = wrong or any(len(a) != len(scan["sparsities"]) for a in scan["accuracy"].values())
        if (not scan["accuracy"] or set(scan["accuracy"]) != set(scan["num_parameters"])
                or not all(map(is_number, values)) or not all(map(is_fraction, scan["sparsities"]))):
            raise ValueError
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"{path} is not a scan written by sensitivity.py: {fix}") from None
    if "checkpoint_sha256" not in scan:
        raise UserError(f"{path} was written by an older version of sensitivity.py: {fix}")
    if wrong or scan["checkpoint_sha256"] != dense_sha256:
        raise UserError(f"{path} was scanned on another model than this dense checkpoint: {fix}")
    return scan


def export_name(run, bits=0):
    """(method, target, seed) -> the file name of its fp32 export, or of its bits-wide shared one."""
    method, target, seed = run
    return f"{method}-{target:g}-seed{seed}" + (f"-{bits}bit" if bits else "") + ".sparse.pt"


def run_point(dense, loaders, args, run, start, scan, folder):
    """Prune (from the dense model, or from the finetuned run `start` of an iterative chain),
    finetune with the sweep's budget, then share weights: one record of frontier.json, or
    None when the scan cannot reach the target."""
    method, target, seed = run
    allocation, kind = split_method(method)
    device = loaders["train"].device
    t0 = time.perf_counter()
    if start is None:
        model, held, epochs_before = build_model_from_checkpoint(dense), {}, 0
    else:  # the export is bit-exact: the very model the earlier run finished with
        model, held = load_sparse_export(folder / export_name(run_key(start)), with_masks=True)
        held, epochs_before = {n: m.to(device) for n, m in held.items()}, start["finetune_epochs"]
    model.to(device, memory_format=torch.channels_last)
    sparsity_dict = None
    if allocation == "scan":
        allocation, sparsity_dict = "dict", scan_plan(scan, target, model)
        if sparsity_dict is None:
            return None
    exclude = resolve_names(args.exclude, get_prunable_names(model))
    pruner, _, schedule = prune_model(model, allocation, target, sparsity_dict, exclude, held,
                                      kind == "gradual", args.ramp, args.prune_every, seed)
    run_args = Namespace(**{**vars(args), "seed": seed})
    best = {}

    def keep_best(pruner, history):  # in memory: a run is redone whole if interrupted
        best.update(model=copy.deepcopy(model.state_dict()), entry=history[-1],
                    masks={n: m.clone() for n, m in pruner.state_dict().items()})  # on the CPU, the live masks

    desc = f"{method} {target:g} seed {seed}"
    pruner, _ = finetune_model(model, pruner.state_dict(), schedule, loaders, run_args, keep_best, desc=desc)
    model.load_state_dict(best["model"])
    pruner.load_state_dict(best["masks"], device)
    check_finite(model, f"{desc}: finetuning", "--lr")
    record = {"method": method, "target": target, "seed": seed, "start": start and start["target"],
              "val_acc": best["entry"]["val_acc"], "test_acc": evaluate(model, loaders["test"]), **measure(model),
              "best_epoch": best["entry"]["epoch"], "finetune_epochs": epochs_before + args.epochs,
              "export_bytes": save_sparse_export(model.state_dict(), pruner.masks, dense["config"],
                                                 folder / export_name(run)),
              "layers": dict(pruner.sparsity)}
    if args.bits:
        record["quantized"] = share_weights(model, loaders, run_args, folder / export_name(run, args.bits),
                                            dense["config"], desc)
    record["seconds"] = time.perf_counter() - t0
    return record


def share_weights(model, loaders, run_args, path, config, desc):
    """quantize.py on a finetuned run, in place, with the sweep's --bits, --quantize-epochs
    and --quantize-lr, its export written to `path` -> the record's "quantized" part."""
    bits = {name: run_args.bits for name in get_prunable_names(model)}
    quantize_args = Namespace(**{**vars(run_args), "epochs": run_args.quantize_epochs, "lr": run_args.quantize_lr,
                                 "rest_dtype": "float16"})  # quantize.py's defaults, as its "exact" init
    # measure_shared off: the accuracy right after the k-means step would cost a pass over val and test
    masks, _, figures = quantize_model(model, bits, "exact", loaders, quantize_args, desc=f"{desc} codebook",
                                       measure_shared=False)
    check_finite(model, f"{desc}: codebook training", "--quantize-lr")
    return {"val_acc": figures["val_acc"], "test_acc": evaluate(model, loaders["test"]),
            "export_bytes": save_sparse_export(model.state_dict(), masks, config, path, shared=True)}


def check_finite(model, what, flag):
    """A run that diverged stops the sweep rather than record NaN weights."""
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise UserError(f"{what} diverged (the weights are not finite): lower {flag}")


def run_key(record):
    """A record's (method, target, seed): what a rerun skips by."""
    return record["method"], record["target"], record["seed"]


NUMBERS = ("target", "seed", "sparsity", "val_acc", "test_acc", "size_bits", "macs", "export_bytes",
           "finetune_epochs")  # of a record
QUANTIZED_NUMBERS = ("val_acc", "test_acc", "export_bytes")


def is_number(value):
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_point(p, bits):
    """Whether `p` is a record frontier.py writes with this --bits (the numbers it reads back
    are numbers)."""
    if not (isinstance(p, dict) and p.get("method") in METHODS and all(is_number(p.get(k)) for k in NUMBERS)
            and is_fraction(p["target"]) and isinstance(p["seed"], int) and p["seed"] >= 0):
        return False
    q = p.get("quantized")
    return not bits or (isinstance(q, dict) and all(is_number(q.get(k)) for k in QUANTIZED_NUMBERS))


def load_sweep(path, dense_record, budget):
    """The runs already in frontier.json; a file from another dense model or budget is refused."""
    if not path.exists():
        return []
    fix = "pass another --out, or delete it to start over"
    sweep = read_json(path, "a sweep written by frontier.py", fix)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("points"), list) or not isinstance(
            sweep.get("budget"), dict) or not all(is_point(p, sweep["budget"].get("bits")) for p in sweep["points"]):
        raise UserError(f"{path} is not a sweep written by this version of frontier.py: {fix}")
    if len({run_key(p) for p in sweep["points"]}) != len(sweep["points"]):
        raise UserError(f"{path} holds a run twice (method, target and seed): {fix}")
    if sweep.get("dense") != dense_record or {"eval_views": TTA_VIEWS, **sweep["budget"]} != budget:  # older files: 4
        raise UserError(f"{path} holds a sweep of another dense model or budget: {fix}")
    return sweep["points"]


def plan_chains(methods, targets, seeds, points):
    """The runs still to do, as chains to run in order: an iterative method's targets for
    one seed form one chain, each run starting from the run below it, a finished one or
    one earlier in the chain (None: the dense model); any other run is a chain of its own.
    -> [[(run, start)]], start None, a finished run's record, or an earlier run's key."""
    done = {run_key(p): p for p in points}
    chains = []
    for method in methods:
        for seed in seeds:
            if split_method(method)[1] != "iterative":
                continue
            chain, below = [], sorted(t for m, t, s in done if m == method and s == seed)
            for target in sorted(targets):
                if (method, target, seed) in done:
                    continue
                lower = (method, max(t for t in below if t < target), seed) if below and below[0] < target else None
                chain.append(((method, target, seed), done.get(lower, lower)))
                below = sorted({*below, target})
            if chain:
                chains.append(chain)
    return chains + [[((m, t, s), None)] for s in seeds for m in methods for t in targets  # in the order asked
                     if split_method(m)[1] != "iterative" and (m, t, s) not in done]


@contextlib.contextmanager
def lock_sweep(out):
    """Hold the OS's exclusive lock on OUT's lock file (.NAME.lock beside it, left there), so
    that a second sweep on the same file is refused, not left to overwrite the first one's
    runs; the kernel drops the lock of a killed process. Where the file system has no locks,
    a warning says so and the sweep runs."""
    lock_path = out.with_name(f".{out.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being written by another frontier.py right now: wait for it to end (rerunning "
                            "then continues the sweep), or pass another --out") from None
        except OSError as e:  # a file system without locks (some NFS or Lustre mounts): run unguarded
            print(f"warning: cannot lock {lock_path} ({e.strerror}); run one sweep at a time on {out.name}",
                  file=sys.stderr)
        yield


def check_starts(chains, folder, config):
    """Every finished run that an iterative run goes on from must have its export, whole:
    refused now rather than after hours of training."""
    fix = "restore the file, or delete that run's record from the sweep file"
    for run, start in (item for chain in chains for item in chain):
        if isinstance(start, dict):
            path, what = folder / export_name(run_key(start)), f"{run[0]} at {run[1]:g} (seed {run[2]})"
            if not path.is_file():
                raise UserError(f"{path} is missing, but {what} goes on from it: {fix}")
            try:
                header, _ = read_export(path)
            except UserError as e:
                raise UserError(f"{e}; {what} would go on from it: {fix}") from None
            if header["config"] != config or path.stat().st_size != start["export_bytes"] or header["values"] != "float32":
                raise UserError(f"{path} is not the export its record in the sweep file describes, but {what} "
                                f"goes on from it: {fix}")


def run_chains(chains, dense_path, args, scan, folder, device, threads, emit):
    """Run `chains` (an iterable) one after another, calling emit(record or None, run) after each run."""
    if threads:
        torch.set_num_threads(threads)
    dense = load_checkpoint(dense_path, stages=("dense",))
    loaders = load_data_for(dense, Namespace(**{**vars(args), "seed": 0}), device, train=True)  # each run sets its seed
    for chain in chains:
        records = {}
        for run, start in chain:
            if isinstance(start, tuple):  # a run of this chain, finished above
                start = records[start]
            record = run_point(dense, loaders, args, run, start, scan, folder)
            records[run] = record
            emit(record, run)
            if record is None:  # the scan cannot reach it: nor the targets above
                break


def job_main(index, tasks, dense_path, args, scan, folder, device, threads, queue):
    """A --jobs worker process: takes chains from `tasks` until a None; its records go to
    the parent, which alone writes the sweep, as (kind, job index, payload) messages."""
    parent = multiprocessing.parent_process()

    def die_with_parent():  # a parent killed, not interrupted, leaves no orphan training on
        parent.join()
        os._exit(1)

    threading.Thread(target=die_with_parent, daemon=True).start()
    try:
        run_chains(iter(tasks.get, None), dense_path, args, scan, folder, device, threads,
                   lambda record, run: queue.put(("run", index, (record, run))))
        queue.put(("done", index, None))
    except KeyboardInterrupt:
        queue.put(("interrupted", index, None))
    except UserError as e:
        queue.put(("error", index, str(e)))
    except Exception as e:  # noqa: BLE001 (its traceback goes to stderr, its line to the parent)
        traceback.print_exc()
        queue.put(("error", index, f"{type(e).__name__}: {e} (traceback above)"))


def job_gpus(device):
    """How many GPUs --jobs spread over: every one with --device cuda, only the named one
    with cuda:N, none on the CPU."""
    return (torch.cuda.device_count() if device.index is None else 1) if device.type == "cuda" else 0


def run_jobs(chains, jobs, dense_path, args, scan, folder, device, emit):
    """Run the chains in `jobs` processes (each with its share of the threads and, with
    several GPUs, a GPU of its own), each taking the next chain when it is free, the
    longest first; emit() runs here, in the parent. A job that fails or dies stops the
    sweep; the runs finished by then are kept."""
    gpus = job_gpus(device)
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    tasks, queue = context.Queue(), context.Queue()
    for chain in [*sorted(chains, key=len, reverse=True), *[None] * jobs]:  # stable: else in the order asked
        tasks.put(chain)
    workers = [context.Process(target=job_main, args=(i, tasks, dense_path, args, scan, folder,
                                                      torch.device("cuda", i % gpus) if gpus > 1 else device,
                                                      threads, queue), daemon=True)
               for i in range(jobs)]
    for w in workers:
        w.start()
    running, silent, error = set(range(jobs)), {}, None
    try:
        while running and error is None:
            try:
                kind, index, payload = queue.get(timeout=1)
            except Empty:  # a job killed outright (out of memory, a crash) says nothing: watch them
                for i in [i for i in running if not workers[i].is_alive()]:
                    silent[i] = silent.get(i, 0) + 1
                    if silent[i] > 2:  # its last messages, if any, have had time to arrive
                        error = f"job {i} died (exit code {workers[i].exitcode})"
                continue
            if kind == "run":
                emit(*payload)
            elif kind == "done":
                running.discard(index)
            elif kind == "interrupted":
                raise KeyboardInterrupt
            else:
                error = payload
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    while error is not None:  # what the other jobs finished meanwhile is kept too
        try:
            kind, _, payload = queue.get(timeout=0.1)
        except Empty:
            raise UserError(f"a job failed: {error} (the runs finished before it are saved)") from None
        if kind == "run":
            emit(*payload)


# ---------------------------------------------------------------- the table and the plot

def summarize(points):
    """One row per (method, target): the number of runs and the mean and sample std
    (NaN for one run) of each figure -> list of dicts, by target then method."""
    def stats(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")

    groups = {}
    for p in points:
        groups.setdefault((p["method"], p["target"]), []).append(p)
    rows = []
    for (method, target), runs in sorted(groups.items(), key=lambda g: (g[0][1], METHODS.index(g[0][0]))):
        row = {"method": method, "target": target, "n": len(runs)}
        for key in ("sparsity", "val_acc", "test_acc", "export_bytes", "macs", "finetune_epochs"):
            row[key], row[key + "_std"] = stats([p[key] for p in runs])
        if all("quantized" in p for p in runs):
            for key in ("test_acc", "export_bytes"):
                row["q_" + key], row["q_" + key + "_std"] = stats([p["quantized"][key] for p in runs])
        rows.append(row)
    return rows


def print_table(sweep):
    dense, bits = sweep["dense"], sweep["budget"]["bits"]

    def pm(mean, std):
        return f"{mean:.2f}" + ("" if std != std else f" +- {std:.2f}")

    rows = []
    for r in summarize(sweep["points"]):
        row = [r["method"], f"{r['target']:g}", r["n"], f"{r['sparsity']:.4f}", f"{r['finetune_epochs']:g}",
               pm(r["test_acc"], r["test_acc_std"]), f"{r['test_acc'] - dense['test_acc']:+.2f}",
               f"{dense['checkpoint_bytes'] / r['export_bytes']:.1f}x"]
        if bits:
            q = "q_test_acc" in r
            row += [pm(r["q_test_acc"], r["q_test_acc_std"]) if q else "-",
                    f"{r['q_test_acc'] - dense['test_acc']:+.2f}" if q else "-",
                    f"{r['q_export_bytes']:,.0f}" if q else "-",
                    f"{dense['checkpoint_bytes'] / r['q_export_bytes']:.1f}x" if q else "-"]
        rows.append(row + [f"{r['macs'] / 1e6:,.1f}"])
    headers = ["method", "target", "runs", "sparsity", "epochs", "test %", "vs dense", "fp32 on disk"]
    if bits:
        headers += [f"{bits}-bit test %", "vs dense", "bytes", "on disk"]
    print(format_table(rows, headers + ["MACs (M)"]))
    print(f"dense: test {dense['test_acc']:.2f}% | val {dense['val_acc']:.2f}% | dense.pt "
          f"{dense['checkpoint_bytes']:,} bytes | {dense['macs'] / 1e6:,.1f} M MACs. test %: mean +- sample std "
          f"over the runs (seeds), {tta_label(sweep['budget']['eval_views'])}; epochs: finetuning epochs since dense; "
          "on disk: dense.pt's bytes over the export's")


def get_args_parser():
    parser = get_training_args_parser(__doc__, plots=True, resume=False, seed=False)
    parser.set_defaults(**FINETUNE)  # finetune.py's recipe
    add = parser.add_argument
    add("--checkpoint", default=None, help="dense model to prune (default: <checkpoint-dir>/dense.pt)")
    add("--methods", default=",".join(METHODS), help="comma-separated, see above (default: %(default)s)")
    add("--sparsities", type=fraction_list, default=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
        help="comma-separated targets, fractions of the prunable weights (default: 0.5,0.7,0.8,0.9,0.95,0.98)")
    add("--seeds", type=seed_list, default=(0,),
        help="comma-separated seeds; every (method, target) runs once per seed (default: 0)")
    add("--bits", type=int_in(0, 8), default=4,
        help="then share each finetuned run's weights through a 2^bits codebook and train it, as "
             "quantize.py does; 0 skips the stage (default: %(default)s)")
    add("--quantize-epochs", type=positive_int, default=3,
        help="codebook training epochs per run, quantize.py's --epochs (default: %(default)s)")
    add("--quantize-lr", type=positive_float, default=0.01,
        help="codebook training learning rate, quantize.py's --lr (default: %(default)s)")
    add("--jobs", type=nonnegative_int, default=0,
        help="runs at once, each in a process of its own with a share of the threads (and, with "
             "several GPUs and --device cuda, a GPU each); 0 = two on a CPU (at width 0.25 two "
             "processes side by side beat one with all the threads: bench.py), one per GPU on "
             "CUDA (default: %(default)s)")
    add("--scan", default=None, metavar="FILE.json",
        help="the scan for the scan methods (default: <checkpoint-dir>/sensitivity.json)")
    add("--out", default=None, help="the sweep's JSON; the runs' exports go to the folder of the same "
                                    "name (default: <checkpoint-dir>/frontier.json)")
    add_pruning_args(parser)
    return parser


def main(args):
    ckpt_dir, plot_dir = ensure_writable(args.checkpoint_dir), ensure_writable(args.plot_dir, ("frontier.png",))
    methods, targets, seeds = parse_methods(args.methods), args.sparsities, args.seeds
    out = Path(args.out or ckpt_dir / "frontier.json")
    folder = out.with_suffix("") if out.suffix else out.with_name(out.name + "-runs")  # the runs' exports
    ensure_writable(out.parent, (out.name,))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, but the runs' exports go in a folder of that name: move it")
    source = Path(args.checkpoint or ckpt_dir / "dense.pt")
    dense_ckpt = load_checkpoint(source, stages=("dense",))
    device = get_device(args.device)
    model = build_model_from_checkpoint(dense_ckpt)
    resolve_names(args.exclude, get_prunable_names(model))  # a bad name fails now, not at a run
    if not dense_ckpt["split"]["val_size"]:
        raise UserError(f"{source} was trained with --val-size 0, but a run keeps its best epoch by validation: "
                        "train the dense model with a validation split")
    check_views(dense_ckpt, args.eval_views)  # now, not in the runs
    source_sha256 = file_sha256(source)
    scan = load_scan(args.scan or ckpt_dir / "sensitivity.json", model, source_sha256) if any(
        m.startswith("scan") for m in methods) else None
    figures = {k: dense_ckpt["metrics"][k] for k in ("val_acc", "test_acc", "size_bits", "macs")}
    dense = {"width": dense_ckpt["config"]["width"], **figures, "checkpoint_bytes": source.stat().st_size,
             "checkpoint_sha256": source_sha256}
    budget = {k: getattr(args, k) for k in BUDGET_FLAGS}

    def plan():
        points = load_sweep(out, dense, budget)
        chains = plan_chains(methods, targets, seeds, points)
        check_starts(chains, folder, dense_ckpt["config"])
        ensure_writable(folder, [export_name(r, bits) for chain in chains for r, _ in chain for bits in (0, args.bits)])
        return points, chains

    plan()  # a bad sweep file fails here, before the lock file is made
    jobs = resolve_jobs(args.jobs, job_gpus(device) or 2)  # a CPU: two, each half the threads
    with lock_sweep(out):  # until the runs end
        points, chains = plan()  # again: a sweep that ended meanwhile may have added runs
        todo, jobs = sum(map(len, chains)), min(jobs, len(chains))
        print(f"{plural(len(points), 'run')} in {out}, {plural(todo, 'run')} to do"
              + (f" in {plural(jobs, 'job')}" if jobs > 1 else ""))
        done = []

        def emit(record, run):
            method, target, seed = run
            if record is None:
                print(f"{method} {target:g} seed {seed}: skipped, the scan's sparsities cannot reach {target:g} "
                      "(scan higher --sparsities in sensitivity.py)")
                return
            points.append(record)
            done.append(record)
            write_json({"dense": dense, "budget": budget, "points": points}, out)
            q = record.get("quantized")
            print(f"[{len(done)}/{todo}] {method} {target:g} seed {seed}: sparsity {record['sparsity']:.4f} | val "
                  f"{record['val_acc']:.2f}% | test {record['test_acc']:.2f}%"
                  + (f" | {args.bits}-bit test {q['test_acc']:.2f}%, {q['export_bytes']:,} bytes" if q else "")
                  + f" | {record['seconds']:.0f} s")

        try:
            if jobs > 1:
                run_jobs(chains, jobs, source, args, scan, folder, device, emit)
            elif chains:
                run_chains(chains, source, args, scan, folder, device, None, emit)
        except KeyboardInterrupt:
            raise Interrupted(f"{plural(len(points), 'run')} saved in {out}; rerun the same command to "
                              "continue") from None
    sweep = {"dense": dense, "budget": budget, "points": points}
    if not points:
        raise UserError("no run could be done: see the lines above")
    print_table(sweep)
    plot = plot_frontier(sweep, summarize(sweep["points"]), plot_dir / "frontier.png")
    print(f"saved {out}, the exports in {folder}/ and {plot}")
    return sweep


if __name__ == "__main__":
    cli(main, get_args_parser())
