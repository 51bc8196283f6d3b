"""How far can the model be pruned, and which method wins where: many prune +
finetune runs from one dense model, and the accuracy-sparsity frontier.

    python frontier.py                      # 7 methods x 6 sparsities, GPU-sized
    python frontier.py --sparsities 0.8,0.9,0.95 --epochs 2 --train-subset 10000   # CPU-sized

Methods (--methods), each pruned from the same dense checkpoint:
  uniform  the same sparsity for every tensor but the --exclude ones (prune.py --method uniform);
  global   one magnitude threshold over those tensors (prune.py --method global);
  scan     the sensitivity scan's suggestion for that target (sensitivity.py --target-sparsity;
           needs checkpoints/sensitivity.json with sparsities as high as the targets);
  random   uniform's sparsities with random masks, the control (prune.py --method random);
  NAME-gradual  the same allocation reached gradually during finetuning (prune.py --gradual).
Every point gets the same finetuning: epochs, learning rate, batch size and images.
The dataset is read once. Each finished point is appended to checkpoints/frontier.json at
once; a rerun skips the points already there, so an interrupted or extended sweep loses
at most the point it was in. Validation accuracy is measured, test accuracy is reported:
nothing here is chosen on test data. Writes plots/frontier.png and prints a table.
"""
import tempfile
import time
from pathlib import Path

import torch

from data import load_data_for
from export import save_sparse_export
from model import build_model_from_checkpoint
from prune import (FineGrainedPruner, GradualSchedule, add_pruning_args, allocate, get_prunable_names,
                   gradual_schedule, resolve_names)
from sensitivity import drop_for_target, suggest_sparsity
from train import FINETUNE, fit
from train import get_args_parser as get_training_args_parser
from utils import (MiB, Interrupted, UserError, cli, ensure_writable, evaluate, file_sha256, format_table,
                   fraction_list, get_device, load_checkpoint, measure, plural, pyplot, read_json, save_figure, set_seed,
                   write_json)

METHODS = ("uniform", "global", "scan", "random", "uniform-gradual", "global-gradual", "scan-gradual")
# The flags that make points comparable: a sweep file holds points of one budget only.
BUDGET_FLAGS = ("epochs", "lr", "batch_size", "train_subset", "seed", "momentum", "weight_decay",
                "label_smoothing", "warmup", "bias_lr_scale", "translate", "low_res_epochs", "low_res",
                "exclude", "ramp", "prune_every")


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
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ValueError
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"{path} is not a scan written by sensitivity.py: {fix}") from None
    if "checkpoint_sha256" not in scan:
        raise UserError(f"{path} was written by an older version of sensitivity.py: {fix}")
    if wrong or scan["checkpoint_sha256"] != dense_sha256:
        raise UserError(f"{path} was scanned on another model than this dense checkpoint: {fix}")
    return scan


def run_point(dense, loaders, args, method, target, scan, device):
    """Prune a fresh copy of the dense model with `method` to `target`, finetune it with the
    sweep's budget, and measure it -> one record of frontier.json."""
    model = build_model_from_checkpoint(dense).to(device, memory_format=torch.channels_last)
    allocation, gradual = method.removesuffix("-gradual"), method.endswith("-gradual")
    if allocation == "scan":
        plan = scan_plan(scan, target, model)
        if plan is None:
            return None
        allocation = "dict"
    else:
        plan = allocate(model, allocation, target, exclude=resolve_names(args.exclude, get_prunable_names(model)))
    schedule = None
    if gradual:
        record = gradual_schedule(model, allocation, plan, target, args.ramp, args.prune_every)
        schedule = GradualSchedule(record, args.epochs * len(loaders["train"]))
        plan = record["initial"]
    pruner = FineGrainedPruner(model, plan, schedule, random_seed=args.seed if allocation == "random" else None)
    t0 = time.perf_counter()
    history = fit(model, loaders, args, None, pruner=pruner, desc=f"{method} {target:g}", val_every=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        export_bytes = save_sparse_export(model.state_dict(), pruner.masks, dense["config"], Path(tmp) / "m.pt")
    return {"method": method, "target": target, "val_acc": history[-1]["val_acc"],
            "test_acc": evaluate(model, loaders["test"]), **measure(model), "export_bytes": export_bytes,
            "seconds": time.perf_counter() - t0, "layers": dict(pruner.sparsity)}


NUMBERS = ("target", "sparsity", "val_acc", "test_acc", "size_bits", "macs", "export_bytes")  # of a point


def is_point(p):
    """Whether `p` is a record frontier.py writes (the numbers it reads back are numbers)."""
    return (isinstance(p, dict) and p.get("method") in METHODS
            and all(isinstance(p.get(k), (int, float)) and not isinstance(p.get(k), bool) for k in NUMBERS))


def load_sweep(path, dense_record, budget):
    """The points already in frontier.json; a file from another dense model or budget is refused."""
    if not path.exists():
        return []
    fix = "pass another --out, or delete it to start over"
    sweep = read_json(path, "a sweep written by frontier.py", fix)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("points"), list) or not all(
            map(is_point, sweep["points"])):
        raise UserError(f"{path} is not a sweep written by frontier.py: {fix}")
    if sweep.get("dense") != dense_record or sweep.get("budget") != budget:
        raise UserError(f"{path} holds a sweep of another dense model or finetuning budget: "
                        "pass another --out, or delete it to start over")
    return sweep["points"]


def plot_frontier(sweep, path):
    """Test accuracy against compression (left) and against MACs on nonzero weights (right),
    one line per method (a colour per allocation, dashed when gradual), the dense
    accuracy and its 0.5-point band."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    dense, points = sweep["dense"], sweep["points"]
    fig, (ax_size, ax_macs) = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    allocations = [m for m in METHODS if not m.endswith("-gradual")]
    for method in METHODS:
        rows = sorted((p for p in points if p["method"] == method), key=lambda p: p["sparsity"])
        if not rows:
            continue
        style = {"color": f"C{allocations.index(method.removesuffix('-gradual'))}", "marker": "o",
                 "ls": "--" if method.endswith("-gradual") else "-", "label": method}
        acc = [p["test_acc"] for p in rows]
        ax_size.plot([dense["size_bits"] / p["size_bits"] for p in rows], acc, **style)
        ax_macs.plot([p["macs"] / 1e6 for p in rows], acc, **style)
    for ax in (ax_size, ax_macs):
        ax.axhline(dense["test_acc"], color="k", lw=1, label=f"dense {dense['test_acc']:.2f}%")
        ax.axhspan(dense["test_acc"] - 0.5, dense["test_acc"], color="k", alpha=0.08, label="within 0.5 points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    worst = min(p["test_acc"] for p in points)
    ax_size.set_ylim(max(worst - 1, dense["test_acc"] - 20), dense["test_acc"] + 1)
    # The model size is the prunable nonzeros plus the rest (BatchNorm, biases), so each
    # sparsity of the prunable weights is one size ratio: label the axis with both.
    total, prunable = dense["num_parameters"], dense["num_prunable"]
    levels = [s for s in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
              if min(p["sparsity"] for p in points) - 0.05 <= s <= max(p["sparsity"] for p in points) + 0.01]
    ratios = [total / ((total - prunable) + (1 - s) * prunable) for s in levels]
    ax_size.set_xticks(ratios, [f"{r:.1f}x" for r in ratios])
    top = ax_size.twiny()
    top.set_xscale("log")
    top.set_xlim(ax_size.get_xlim())
    top.set_xticks(ratios, [f"{s:.0%}" for s in levels])
    top.xaxis.set_minor_formatter(NullFormatter())
    top.set_xlabel("sparsity of the prunable weights")
    ax_size.set_xlabel("compression of the model size (dense / nonzeros x 32 bits)")
    ax_size.set_ylabel("test accuracy (%)")
    low, high = min(p["macs"] for p in points) / 1e6, max(p["macs"] for p in points) / 1e6
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if 0.8 * low <= t <= 1.25 * high]
    ax_macs.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax_macs.set_xlabel(f"MACs per image on nonzero weights (M; dense {dense['macs'] / 1e6:,.0f} M)")
    ax_macs.legend(fontsize=8, loc="lower right")
    b = sweep["budget"]
    fig.suptitle(f"Test accuracy after pruning, width {dense['width']:g}: every point finetuned "
                 f"{plural(b['epochs'], 'epoch')} on {b['train_subset'] or 'all'} training images (lr {b['lr']:g}, batch {b['batch_size']})")
    fig.tight_layout()
    return save_figure(fig, path)


def print_table(sweep):
    dense = sweep["dense"]
    rows = [[p["method"], f"{p['target']:g}", f"{p['sparsity']:.4f}", f"{p['val_acc']:.2f}",
             f"{p['test_acc']:.2f}", f"{p['test_acc'] - dense['test_acc']:+.2f}",
             f"{dense['size_bits'] / p['size_bits']:.2f}x", f"{dense['checkpoint_bytes'] / p['export_bytes']:.2f}x",
             f"{p['macs'] / 1e6:,.1f}"]
            for p in sorted(sweep["points"], key=lambda p: (p["target"], METHODS.index(p["method"])))]
    print(format_table(rows, ["method", "target", "sparsity", "val %", "test %", "vs dense",
                              "size", "on disk", "MACs (M)"]))
    print(f"dense: test {dense['test_acc']:.2f}% | val {dense['val_acc']:.2f}% | "
          f"{dense['size_bits'] / MiB:.2f} MiB | {dense['macs'] / 1e6:,.1f} M MACs; 'on disk' is "
          "dense.pt's bytes over the compressed export's")


def get_args_parser():
    parser = get_training_args_parser(__doc__, plots=True, resume=False)
    parser.set_defaults(**FINETUNE)  # finetune.py's recipe
    add = parser.add_argument
    add("--checkpoint", default=None, help="dense model to prune (default: <checkpoint-dir>/dense.pt)")
    add("--methods", default=",".join(METHODS), help="comma-separated, see above (default: %(default)s)")
    add("--sparsities", type=fraction_list, default=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
        help="comma-separated targets, fractions of the prunable weights (default: 0.5,0.7,0.8,0.9,0.95,0.98)")
    add("--scan", default=None, metavar="FILE.json",
        help="the scan for the scan methods (default: <checkpoint-dir>/sensitivity.json)")
    add("--out", default=None, help="the sweep's JSON (default: <checkpoint-dir>/frontier.json)")
    add_pruning_args(parser)
    return parser


def main(args):
    ckpt_dir, plot_dir = ensure_writable(args.checkpoint_dir), ensure_writable(args.plot_dir, ("frontier.png",))
    methods, targets = parse_methods(args.methods), args.sparsities
    out = Path(args.out or ckpt_dir / "frontier.json")
    ensure_writable(out.parent, (out.name,))
    source = Path(args.checkpoint or ckpt_dir / "dense.pt")
    dense_ckpt = load_checkpoint(source, stages=("dense",))
    device = get_device(args.device)
    model = build_model_from_checkpoint(dense_ckpt)
    resolve_names(args.exclude, get_prunable_names(model))  # a bad name fails now, not at a point
    scan = load_scan(args.scan or ckpt_dir / "sensitivity.json", model, file_sha256(source)) if any(
        m.startswith("scan") for m in methods) else None
    prunable = [p for p in model.parameters() if p.dim() > 1]
    figures = {k: dense_ckpt["metrics"][k] for k in ("val_acc", "test_acc", "size_bits", "macs")}
    dense = {"width": dense_ckpt["config"]["width"], **figures, "checkpoint_bytes": source.stat().st_size,
             "num_parameters": sum(p.numel() for p in model.parameters()),
             "num_prunable": sum(p.numel() for p in prunable)}
    budget = {k: getattr(args, k) for k in BUDGET_FLAGS}
    points = load_sweep(out, dense, budget)
    todo = [(m, t) for t in targets for m in methods
            if not any(p["method"] == m and p["target"] == t for p in points)]
    print(f"{plural(len(points), 'point')} in {out}, {len(todo)} to run")
    loaders = load_data_for(dense_ckpt, args, device, train=True) if todo else None
    try:
        for i, (method, target) in enumerate(todo, 1):
            set_seed(args.seed)  # every point starts from the same random state
            record = run_point(dense_ckpt, loaders, args, method, target, scan, device)
            if record is None:
                print(f"[{i}/{len(todo)}] {method} {target:g}: skipped, the scan's sparsities cannot "
                      f"reach {target:g} (scan higher --sparsities in sensitivity.py)")
                continue
            points.append(record)
            write_json({"dense": dense, "budget": budget, "points": points}, out)
            print(f"[{i}/{len(todo)}] {method} {target:g}: sparsity {record['sparsity']:.4f} | val "
                  f"{record['val_acc']:.2f}% | test {record['test_acc']:.2f}% | {record['seconds']:.0f} s")
    except KeyboardInterrupt:
        raise Interrupted(f"{plural(len(points), 'point')} saved in {out}; rerun the same command to "
                          "continue") from None
    sweep = {"dense": dense, "budget": budget, "points": points}
    if not points:
        raise UserError("no point could be run: see the lines above")
    print_table(sweep)
    plot = plot_frontier(sweep, plot_dir / "frontier.png")
    print(f"saved {out} and {plot}")
    return sweep


if __name__ == "__main__":
    cli(main, get_args_parser())
