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
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from checkpoint import atomic_write, ensure_writable, file_sha256, load_checkpoint, write_json
from cli import cli, fraction_list, int_in, nonnegative_int, positive_float, positive_int, resolve_jobs, seed_list
from cluster import check_reachable, connect, run_on_ray
from data import check_views, datasets_for, make_loaders
from export import encode_export, load_sparse_export
from finetune import finetune_model
from model import build_model_from_checkpoint
from plots import plot_frontier
from prune import add_pruning_args, resolve_names
from pruning import get_prunable_names, prune_model
from quantize import quantize_model
from sensitivity import load_scan, scan_plan
from sweep import (BELOW, METHODS, export_name, load_starts, load_sweep, lock_sweep, plan_chains, print_table, run_key,
                   run_label,
                   split_method, summarize)
from train import FINETUNE, Recipe
from train import get_args_parser as get_training_args_parser
from utils import Interrupted, UserError, compute_dtype, evaluate, get_device, measure, plural


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
    compile: bool = False  # how the steps run, not what they compute: no part of the record
    cudnn_benchmark: bool = True

    @classmethod
    def from_args(cls, args):
        fields = (*BUDGET_FLAGS, "compile", "cudnn_benchmark")
        return cls(Recipe.from_args(args, seed=0), **{k: getattr(args, k) for k in fields})  # seeds: per run

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


def run_point(dense, loaders, budget, run, start, scan):
    """Prune (from the dense model, or from the finished run `start` of an iterative chain:
    its record and exports), finetune with the sweep's budget, then share weights -> (the
    record of frontier.json, {export file name: bytes}); (None, {}) when the scan cannot
    reach the target, nor, in a chain, the one below it. Writes no file."""
    method, target, seed = run
    allocation, kind = split_method(method)
    device = loaders["train"].device
    t0 = time.perf_counter()
    if start is None:
        model, held, epochs_before = build_model_from_checkpoint(dense), {}, 0
    elif start[0] is None:
        return None, {}
    else:  # the export is bit-exact: the very model the earlier run finished with
        name = export_name(run_key(start[0]))
        model, held = load_sparse_export(name, with_masks=True, data=start[1][name])
        held, epochs_before = {n: m.to(device) for n, m in held.items()}, start[0]["finetune_epochs"]
    model.to(device, memory_format=torch.channels_last)
    sparsity_dict = None
    if allocation == "scan":
        allocation, sparsity_dict = "dict", scan_plan(scan, target, model)
        if sparsity_dict is None:
            return None, {}
    exclude = resolve_names(budget.exclude, get_prunable_names(model))
    pruner, _, schedule = prune_model(model, allocation, target, sparsity_dict, exclude, held,
                                      kind == "gradual", budget.ramp, budget.prune_every, seed)
    recipe, desc = replace(budget.recipe, seed=seed), run_label(run)
    pruner, history, best_epoch = finetune_model(model, pruner.state_dict(), schedule, loaders, recipe, desc=desc,
                                                 compile=budget.compile)
    check_finite(model, f"{desc}: finetuning", "--lr")
    exports = {export_name(run): encode_export(model.state_dict(), pruner.masks, dense["config"])}
    record = {"method": method, "target": target, "seed": seed, "start": start and start[0]["target"],
              "val_acc": history[best_epoch - 1]["val_acc"], "test_acc": evaluate(model, loaders["test"]),
              **measure(model), "best_epoch": best_epoch, "finetune_epochs": epochs_before + recipe.epochs,
              "export_bytes": len(exports[export_name(run)]), "layers": dict(pruner.sparsity),
              "dtype": compute_dtype(device)}  # on a cluster, each worker's hardware decides (utils.compute_dtype)
    if budget.bits:
        codebook = replace(recipe, epochs=budget.quantize_epochs, lr=budget.quantize_lr)
        record["quantized"], exports[export_name(run, budget.bits)] = share_weights(model, loaders, codebook, budget,
                                                                                    dense["config"], desc)
    record["seconds"] = time.perf_counter() - t0
    return record, exports


def share_weights(model, loaders, recipe, budget, config, desc):
    """quantize.py on a finetuned run, in place, with the sweep's --bits and its codebook
    recipe (--quantize-epochs, --quantize-lr) -> (the record's "quantized" part, the export)."""
    bits = {name: budget.bits for name in get_prunable_names(model)}
    # measure_shared off: the accuracy right after the k-means step would cost a pass over val and test
    masks, _, figures = quantize_model(model, bits, "exact", loaders, recipe, desc=f"{desc} codebook",
                                       measure_shared=False, compile=budget.compile)  # quantize.py's: exact, fp16 rest
    check_finite(model, f"{desc}: codebook training", "--quantize-lr")
    export = encode_export(model.state_dict(), masks, config, shared=True)
    return {"val_acc": figures["val_acc"], "test_acc": evaluate(model, loaders["test"]),
            "export_bytes": len(export)}, export


def check_finite(model, what, flag):
    """A run that diverged stops the sweep rather than record NaN weights."""
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise UserError(f"{what} diverged (the weights are not finite): lower {flag}")


def run_chains(chains, dense, datasets, budget, scan, device, emit):
    """Run `chains` here, one after another, calling emit((record, exports), run) after each run."""
    loaders = make_loaders(datasets, budget.recipe, device, budget.eval_views)
    for chain in chains:
        below = None
        for run, start in chain:
            below = run_point(dense, loaders, budget, run, below if start == BELOW else start, scan)
            emit(below, run)


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
    add("--jobs", type=positive_int, default=None,
        help="runs at once on this machine, each a Ray task with its share of the threads (on CUDA a GPU "
             "each); 1 runs them here, one after another, without Ray (default: two on a CPU, where at width "
             "0.25 two 1-thread runs beat one 2-thread run (bench.py); one per GPU on CUDA)")
    add("--address", default=None, metavar="HOST:PORT",
        help="run on the Ray cluster there (`ray start --head` prints it; default: $RAY_ADDRESS, else this machine)")
    add("--retries", type=nonnegative_int, default=1,
        help="on Ray (--jobs N, --address): times a run is retried when its worker dies (killed, out of memory, "
             "a lost node) (default: %(default)s)")
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


def recorder(sweep, out, folder, todo):
    """-> emit((record, exports) or (None, {}), run): writes a finished run's exports into
    `folder`, adds its record to `sweep` and rewrites `out`, at once."""
    done = []

    def emit(result, run):
        (record, exports), target = result, run[1]
        if record is None:
            print(f"{run_label(run)}: skipped, the scan's sparsities cannot reach {target:g} "
                  "(scan higher --sparsities in sensitivity.py)")
            return
        for name, data in exports.items():
            atomic_write(folder / name, lambda f, data=data: f.write(data))
        sweep["points"].append(record)
        done.append(record)
        write_json(sweep, out)
        q = record.get("quantized")
        print(f"[{len(done)}/{todo}] {run_label(run)}: sparsity {record['sparsity']:.4f} | val "
              f"{record['val_acc']:.2f}% | test {record['test_acc']:.2f}%"
              + (f" | {sweep['budget']['bits']}-bit test {q['test_acc']:.2f}%, {q['export_bytes']:,} bytes" if q
                 else "") + f" | {record['seconds']:.0f} s")
    return emit


def sweep_jobs(jobs, address, device):
    """--jobs and --address (or RAY_ADDRESS) -> how many runs at once here (0: on the cluster)."""
    if address:
        if jobs:
            raise UserError(f"--jobs is for a sweep on this machine, but a Ray cluster is named ({address}, by "
                            "--address or RAY_ADDRESS), which runs as many runs at once as it has CPUs (or GPUs)")
        return 0
    gpus = (torch.cuda.device_count() if device.index is None else 1) if device.type == "cuda" else 0
    if gpus and (jobs or 0) > gpus:
        raise UserError(f"--jobs {jobs} is more than the {plural(gpus, 'GPU')} of --device {device}: "
                        f"pass at most {gpus}")
    return resolve_jobs(jobs or 0, gpus or 2)


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
    address = args.address or os.environ.get("RAY_ADDRESS")
    jobs = sweep_jobs(args.jobs, address, device)
    if address:
        check_reachable(address)
    model = build_model_from_checkpoint(dense_ckpt)
    resolve_names(args.exclude, get_prunable_names(model))  # a bad name fails now, not at a run
    scan = load_scan(args.scan or ckpt_dir / "sensitivity.json", model, dense["checkpoint_sha256"]) if any(
        m.startswith("scan") for m in methods) else None
    budget = Budget.from_args(args)

    def plan():
        points = load_sweep(out, dense, budget.record())
        chains = load_starts(plan_chains(methods, targets, seeds, points), folder, dense_ckpt["config"])
        ensure_writable(folder, [export_name(r, bits) for chain in chains for r, _ in chain for bits in (0, args.bits)])
        return points, chains

    chains = plan()[1]  # a bad sweep file fails here, before Ray starts or the lock file is made
    datasets = datasets_for(dense_ckpt, args.data_dir, budget.train_subset)  # read once, here
    make_loaders(datasets, budget.recipe, "cpu", budget.eval_views)  # a bad --batch-size fails now, in one line
    jobs = min(jobs, len(chains))  # a chain's runs run one after another
    ray_options = connect(address, jobs, device) if chains and (address or jobs > 1) else None
    with lock_sweep(out):  # until the runs end
        points, chains = plan()  # again: a sweep that ended meanwhile may have added runs
        sweep = {"dense": dense, "budget": budget.record(), "points": points}
        todo = sum(map(len, chains))
        where = f" on the Ray cluster at {address}" if address else f" in {plural(jobs, 'job')}" if ray_options else ""
        print(f"{plural(len(points), 'run')} in {out}, {plural(todo, 'run')} to do{where}")
        emit = recorder(sweep, out, folder, todo)
        try:
            if ray_options:
                run_on_ray(chains, dense_ckpt, datasets, budget, scan, device, *ray_options, args.retries, emit)
            else:
                run_chains(chains, dense_ckpt, datasets, budget, scan, device, emit)
        except KeyboardInterrupt:
            saved = f"{plural(len(points), 'run')} saved in {out}" if points else "no run had finished"
            raise Interrupted(f"{saved}; rerun the same command to continue") from None
    if not points:
        raise UserError("no run could be done: see the lines above")
    print_table(sweep)
    plot = plot_frontier(sweep, summarize(sweep["points"]), plot_dir / "frontier.png")
    print(f"saved {out}, the exports in {folder}/ and {plot}")
    return sweep


if __name__ == "__main__":
    cli(main, get_args_parser())
