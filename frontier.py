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
  NAME-gradual    the same allocation reached gradually during finetuning (finetune.py --gradual);
  NAME-iterative  Han et al.'s iterative pruning: the targets in increasing order, each
           pruned one-shot from the previous target's finetuned model with its masks held
           (prune.py --checkpoint checkpoints/finetuned.pt); the first from the dense model.
Every run gets the same budget (finetuning recipe and images, then --bits weight sharing
as quantize.py does it); --seeds sets each run's randomness (and random's masks). A point
is the scripts' result for the same flags and seed. Each finished run goes into
checkpoints/frontier.json at once, its exports into checkpoints/frontier/; the same command
skips the runs already there, so an interrupted or extended sweep loses only the runs in
progress. Prints mean +- sample std over the seeds and draws plots/frontier.png: test
accuracy against the bytes on disk (fp32 and weight-shared exports) and against MACs.
"""
import multiprocessing
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty

import torch

from checkpoint import ensure_writable, file_sha256, load_checkpoint, write_json
from cli import cli, fraction_list, int_in, nonnegative_int, positive_float, positive_int, resolve_jobs, seed_list
from data import check_views, load_data_for
from export import load_sparse_export, save_sparse_export
from finetune import finetune_model
from model import build_model_from_checkpoint
from plots import plot_frontier
from prune import add_pruning_args, resolve_names
from pruning import get_prunable_names, prune_model
from quantize import quantize_model
from sensitivity import load_scan, scan_plan
from sweep import (METHODS, check_starts, export_name, load_sweep, lock_sweep, plan_chains, print_table, run_key,
                   split_method, summarize)
from train import FINETUNE, Recipe
from train import get_args_parser as get_training_args_parser
from utils import Interrupted, UserError, evaluate, get_device, measure, plural


@dataclass(frozen=True)
class Budget:
    """What every run of a sweep gets, so that its runs compare: the finetuning recipe (its
    seed set per run), the images, the tensors kept dense, gradual pruning's ramp, and the
    weight sharing after it. A sweep file holds runs of one budget only."""
    recipe: Recipe
    train_subset: int | None
    eval_views: int
    exclude: str
    ramp: float
    prune_every: int
    bits: int
    quantize_epochs: int
    quantize_lr: float
    compile: bool = False  # torch.compile the training step: no part of the record

    @classmethod
    def from_args(cls, args):
        return cls(Recipe.from_args(args, seed=0), **{k: getattr(args, k) for k in (*BUDGET_FLAGS, "compile")})

    def record(self):
        """The budget as frontier.json stores it: every field but the recipe's seed."""
        recipe = {k: v for k, v in asdict(self.recipe).items() if k != "seed"}
        return {**recipe, **{k: getattr(self, k) for k in BUDGET_FLAGS}}


BUDGET_FLAGS = ("train_subset", "eval_views", "exclude", "ramp", "prune_every", "bits", "quantize_epochs",
                "quantize_lr")


def parse_methods(text):
    """'global,scan-gradual' -> ('global', 'scan-gradual'), each checked against METHODS."""
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # each once, in order
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    return methods


def run_point(dense, loaders, budget, run, start, scan, folder):
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
    exclude = resolve_names(budget.exclude, get_prunable_names(model))
    pruner, _, schedule = prune_model(model, allocation, target, sparsity_dict, exclude, held,
                                      kind == "gradual", budget.ramp, budget.prune_every, seed)
    recipe, desc = replace(budget.recipe, seed=seed), f"{method} {target:g} seed {seed}"
    pruner, history, best_epoch = finetune_model(model, pruner.state_dict(), schedule, loaders, recipe, desc=desc,
                                                 compile=budget.compile)
    check_finite(model, f"{desc}: finetuning", "--lr")
    record = {"method": method, "target": target, "seed": seed, "start": start and start["target"],
              "val_acc": history[best_epoch - 1]["val_acc"], "test_acc": evaluate(model, loaders["test"]),
              **measure(model), "best_epoch": best_epoch, "finetune_epochs": epochs_before + recipe.epochs,
              "export_bytes": save_sparse_export(model.state_dict(), pruner.masks, dense["config"],
                                                 folder / export_name(run)),
              "layers": dict(pruner.sparsity)}
    if budget.bits:
        codebook = replace(recipe, epochs=budget.quantize_epochs, lr=budget.quantize_lr)
        record["quantized"] = share_weights(model, loaders, codebook, budget, folder / export_name(run, budget.bits),
                                            dense["config"], desc)
    record["seconds"] = time.perf_counter() - t0
    return record


def share_weights(model, loaders, recipe, budget, path, config, desc):
    """quantize.py on a finetuned run, in place, with the sweep's --bits and its codebook
    recipe (--quantize-epochs, --quantize-lr), its export written to `path` -> the record's
    "quantized" part."""
    bits = {name: budget.bits for name in get_prunable_names(model)}
    # measure_shared off: the accuracy right after the k-means step would cost a pass over val and test
    masks, _, figures = quantize_model(model, bits, "exact", loaders, recipe, desc=f"{desc} codebook",
                                       measure_shared=False, compile=budget.compile)  # quantize.py's: exact, fp16 rest
    check_finite(model, f"{desc}: codebook training", "--quantize-lr")
    return {"val_acc": figures["val_acc"], "test_acc": evaluate(model, loaders["test"]),
            "export_bytes": save_sparse_export(model.state_dict(), masks, config, path, shared=True)}


def check_finite(model, what, flag):
    """A run that diverged stops the sweep rather than record NaN weights."""
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise UserError(f"{what} diverged (the weights are not finite): lower {flag}")


def run_chains(chains, dense_path, data_dir, budget, scan, folder, device, threads, emit):
    """Run `chains` (an iterable) one after another, calling emit(record or None, run) after each run."""
    if threads:
        torch.set_num_threads(threads)
    dense = load_checkpoint(dense_path, stages=("dense",))
    loaders = load_data_for(dense, data_dir, device, budget.eval_views, budget.recipe, budget.train_subset)
    for chain in chains:
        records = {}
        for run, start in chain:
            if isinstance(start, tuple):  # a run of this chain, finished above
                start = records[start]
            record = run_point(dense, loaders, budget, run, start, scan, folder)
            records[run] = record
            emit(record, run)
            if record is None:  # the scan cannot reach it: nor the targets above
                break


def job_main(index, tasks, dense_path, data_dir, budget, scan, folder, device, threads, queue):
    """A --jobs worker process: takes chains from `tasks` until a None; its records go to
    the parent, which alone writes the sweep, as (kind, job index, payload) messages."""
    parent = multiprocessing.parent_process()

    def die_with_parent():  # a parent killed, not interrupted, leaves no orphan training on
        parent.join()
        os._exit(1)

    threading.Thread(target=die_with_parent, daemon=True).start()
    try:
        run_chains(iter(tasks.get, None), dense_path, data_dir, budget, scan, folder, device, threads,
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


def run_jobs(chains, jobs, dense_path, data_dir, budget, scan, folder, device, emit):
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
    workers = [context.Process(target=job_main, args=(i, tasks, dense_path, data_dir, budget, scan, folder,
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
    add_pruning_args(parser, choose=False, schedule=True)
    return parser


def read_dense(path, eval_views):
    """The dense checkpoint every run starts from, checked now -> (checkpoint, its record in frontier.json)."""
    ckpt = load_checkpoint(path, stages=("dense",))
    if not ckpt["split"]["val_size"]:
        raise UserError(f"{path} was trained with --val-size 0, but a run keeps its best epoch by validation: "
                        "train the dense model with a validation split")
    check_views(ckpt, eval_views)  # now, not in the runs
    figures = {k: ckpt["metrics"][k] for k in ("val_acc", "test_acc", "size_bits", "macs")}
    return ckpt, {"width": ckpt["config"]["width"], **figures, "checkpoint_bytes": path.stat().st_size,
                  "checkpoint_sha256": file_sha256(path)}


def recorder(sweep, out, todo):
    """-> emit(record or None, run): adds a finished run to `sweep` and rewrites `out` at once."""
    done = []

    def emit(record, run):
        method, target, seed = run
        if record is None:
            print(f"{method} {target:g} seed {seed}: skipped, the scan's sparsities cannot reach {target:g} "
                  "(scan higher --sparsities in sensitivity.py)")
            return
        sweep["points"].append(record)
        done.append(record)
        write_json(sweep, out)
        q = record.get("quantized")
        print(f"[{len(done)}/{todo}] {method} {target:g} seed {seed}: sparsity {record['sparsity']:.4f} | val "
              f"{record['val_acc']:.2f}% | test {record['test_acc']:.2f}%"
              + (f" | {sweep['budget']['bits']}-bit test {q['test_acc']:.2f}%, {q['export_bytes']:,} bytes" if q
                 else "") + f" | {record['seconds']:.0f} s")
    return emit


def main(args):
    ckpt_dir, plot_dir = ensure_writable(args.checkpoint_dir), ensure_writable(args.plot_dir, ("frontier.png",))
    methods, targets, seeds = parse_methods(args.methods), args.sparsities, args.seeds
    out = Path(args.out or ckpt_dir / "frontier.json")
    folder = out.with_suffix("") if out.suffix else out.with_name(out.name + "-runs")  # the runs' exports
    ensure_writable(out.parent, (out.name,))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, but the runs' exports go in a folder of that name: move it")
    source = Path(args.checkpoint or ckpt_dir / "dense.pt")
    dense_ckpt, dense = read_dense(source, args.eval_views)
    device = get_device(args.device, args.cudnn_benchmark)
    model = build_model_from_checkpoint(dense_ckpt)
    resolve_names(args.exclude, get_prunable_names(model))  # a bad name fails now, not at a run
    scan = load_scan(args.scan or ckpt_dir / "sensitivity.json", model, dense["checkpoint_sha256"]) if any(
        m.startswith("scan") for m in methods) else None
    budget = Budget.from_args(args)

    def plan():
        points = load_sweep(out, dense, budget.record())
        chains = plan_chains(methods, targets, seeds, points)
        check_starts(chains, folder, dense_ckpt["config"])
        ensure_writable(folder, [export_name(r, bits) for chain in chains for r, _ in chain for bits in (0, args.bits)])
        return points, chains

    plan()  # a bad sweep file fails here, before the lock file is made
    jobs = resolve_jobs(args.jobs, job_gpus(device) or 2)  # a CPU: two, each half the threads
    with lock_sweep(out):  # until the runs end
        points, chains = plan()  # again: a sweep that ended meanwhile may have added runs
        sweep = {"dense": dense, "budget": budget.record(), "points": points}
        todo, jobs = sum(map(len, chains)), min(jobs, len(chains))
        print(f"{plural(len(points), 'run')} in {out}, {plural(todo, 'run')} to do"
              + (f" in {plural(jobs, 'job')}" if jobs > 1 else ""))
        try:
            if jobs > 1:
                run_jobs(chains, jobs, source, args.data_dir, budget, scan, folder, device, recorder(sweep, out, todo))
            elif chains:
                run_chains(chains, source, args.data_dir, budget, scan, folder, device, None, recorder(sweep, out, todo))
        except KeyboardInterrupt:
            raise Interrupted(f"{plural(len(points), 'run')} saved in {out}; rerun the same command to "
                              "continue") from None
    if not points:
        raise UserError("no run could be done: see the lines above")
    print_table(sweep)
    plot = plot_frontier(sweep, summarize(sweep["points"]), plot_dir / "frontier.png")
    print(f"saved {out}, the exports in {folder}/ and {plot}")
    return sweep


if __name__ == "__main__":
    cli(main, get_args_parser())
