"""Fine-grained (unstructured) magnitude pruning of the trained model.

    python prune.py                                            # the seed's per-layer dict
    python prune.py --sparsity checkpoints/sparsity_suggested.json
    python prune.py --method global --target 0.9               # one threshold for all layers
    python finetune.py --gradual --method global --target 0.95 # prune while finetuning (moved there)

How the sparsity is spread over the prunable tensors (--method):
  dict     a per-layer dict: the original run's (SPARSITY in prune.py, 60% to 90% per
           layer), or --sparsity FILE.json such as the scan's suggestion.
           A layer the dict leaves out stays dense;
  uniform  --target for every tensor but the --exclude ones;
  global   one magnitude threshold over those tensors, removing round(target * total)
           weights in all (torch.nn.utils.prune.global_unstructured's rule);
  random   uniform's sparsities, but random masks (--seed): the control.
One-shot pruning happens here, and pruned.pt always holds the pruned model. Gradual
pruning (Zhu & Gupta's cubic schedule) happens while finetuning: finetune.py --gradual.
Iterative pruning (Han et al. 2015): prune a finetuned model further, then finetune again;
its pruned weights stay pruned:
    python prune.py --checkpoint checkpoints/finetuned.pt --method global --target 0.98
Writes checkpoints/pruned.pt, pruned.sparse.pt and plots/weights.png.
"""
import argparse
from pathlib import Path

import torch

from checkpoint import ensure_writable, load_checkpoint, make_checkpoint, read_json, save_checkpoint
from cli import add_common_args, cli, fraction, fraction_in, positive_int, seed_int
from data import check_views, load_data_for
from export import add_export_args, export_with_report
from model import build_model_from_checkpoint
from plots import plot_weights
from pruning import EXCLUDE, METHODS, get_prunable_names, prune_model
from utils import UserError, evaluate, format_table, get_device, get_sparsity, measure, size_line

# The original run's per-layer sparsities (fraction of weights set to zero).
SPARSITY = {
    "backbone.conv0.weight": 0.0,
    "backbone.conv1.weight": 0.6,
    "backbone.residual_block0.conv1.weight": 0.8,
    "backbone.residual_block0.conv2.weight": 0.8,
    "backbone.conv2.weight": 0.6,
    "backbone.conv3.weight": 0.7,
    "backbone.residual_block1.conv1.weight": 0.8,
    "backbone.residual_block1.conv2.weight": 0.9,
    "backbone.conv4.weight": 0.7,
    "backbone.conv5.weight": 0.7,
    "backbone.residual_block2.conv1.weight": 0.9,
    "backbone.residual_block2.conv2.weight": 0.9,
    "backbone.conv6.weight": 0.7,
    "backbone.conv7.weight": 0.8,
    "backbone.residual_block3.conv1.weight": 0.8,
    "backbone.residual_block3.conv2.weight": 0.8,
    "classifier.weight": 0.0,
}
def load_sparsity_json(path):
    """A JSON file {layer name: sparsity} -> dict; a bad file is a UserError."""
    return read_json(path, "the --sparsity dict, JSON {layer name: sparsity}",
                     "pass a file such as checkpoints/sparsity_suggested.json")


def resolve_names(text, valid_names):
    """'conv0,classifier' or full names, comma-separated -> full tensor names."""
    names = []
    for short in filter(None, (t.strip() for t in text.split(","))):
        matches = [n for n in valid_names if n in (short, f"backbone.{short}.weight", f"{short}.weight")]
        if not matches:
            raise UserError(f"--exclude: no prunable tensor named {short!r}; valid names: "
                            f"{', '.join(valid_names)}")
        names += matches
    return names


def layer_table(model, sparsity_dict):
    """Rows of name, shape, parameters, target and actual sparsity, nonzeros."""
    rows = []
    for name, p in model.named_parameters():
        if p.dim() > 1:
            target = sparsity_dict.get(name)
            rows.append([name, "x".join(map(str, p.shape)), f"{p.numel():,}",
                         "dense" if target is None else f"{target:.2f}",
                         f"{get_sparsity(p):.4f}", f"{int(p.count_nonzero()):,}"])
    return format_table(rows, ["layer", "shape", "params", "target", "sparsity", "nonzeros"])


def add_pruning_args(parser, choose=True, schedule=False):
    """How to prune: with `choose`, the allocation (prune.py, finetune.py --gradual); the
    tensors kept dense; with `schedule`, gradual pruning's (finetune.py, frontier.py)."""
    add = parser.add_argument
    if choose:
        add("--method", default="dict", choices=METHODS,
            help="how the sparsity is spread over the layers, see prune.py --help (default: %(default)s)")
        add("--sparsity", default=None, metavar="FILE.json",
            help="dict method: JSON {layer name: sparsity} in place of the original run's dict, e.g. "
                 "checkpoints/sparsity_suggested.json (default: SPARSITY in prune.py)")
        add("--target", type=fraction, default=None, metavar="FRACTION",
            help="uniform, global and random methods: the sparsity to reach, e.g. 0.9 (default: none)")
    add("--exclude", default=",".join(EXCLUDE),
        help="tensors that uniform and global pruning keep dense, comma-separated, full or short "
             "names such as conv0 (default: %(default)s)")
    if schedule:
        add("--ramp", type=fraction_in(True, False), default=0.5,
            help="gradual pruning: the fraction of the finetuning steps over which the sparsity "
                 "rises; the masks are frozen after it (default: %(default)s)")
        add("--prune-every", type=positive_int, default=10, metavar="STEPS",
            help="gradual pruning: recompute the masks every this many optimizer steps (default: %(default)s)")
    return parser


def check_allocation_args(args, pruning=True):
    """The allocation flags fit together; with pruning False (finetune.py without --gradual)
    none of the pruning flags may be given, since nothing would read them."""
    if not pruning:
        defaults = vars(add_pruning_args(argparse.ArgumentParser(), schedule=True).parse_args([]))
        given = [f"--{name.replace('_', '-')}" for name, value in defaults.items() if getattr(args, name) != value]
        if given:
            raise UserError(f"{', '.join(given)}: pruning flags, which with finetune.py go with --gradual "
                            "(or prune first with prune.py)")
        return
    if args.method != "dict" and args.sparsity:
        raise UserError(f"--sparsity is a dict for --method dict; --method {args.method} takes --target")
    if args.method == "dict" and args.target is not None:
        raise UserError("--target is for --method uniform, global or random; for a dict that reaches a "
                        "target, run `python sensitivity.py --target-sparsity FRACTION`")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, plots=True)
    add = parser.add_argument
    add("--checkpoint", default=None, help="model to prune (default: <checkpoint-dir>/dense.pt)")
    add("--seed", type=seed_int, default=0, help="random method: seed of the masks (default: %(default)s)")
    add("--gradual", action="store_true", help="moved: gradual pruning happens in finetune.py --gradual")
    add_pruning_args(parser)
    add_export_args(parser)
    return parser


def main(args):
    if args.gradual:
        raise UserError("gradual pruning happens while finetuning: run `python finetune.py --gradual` with the same "
                        "--method, --target or --sparsity (and --checkpoint, --ramp, --prune-every)")
    check_allocation_args(args)
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("pruned.pt", "pruned.sparse.pt"))
    plot_dir = ensure_writable(args.plot_dir, ("weights.png",))
    source = Path(args.checkpoint or ckpt_dir / "dense.pt")
    ckpt = load_checkpoint(source, stages=("dense", "finetuned"))
    check_views(ckpt, args.eval_views)  # now, before the pruning work
    device = get_device(args.device)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    exclude = resolve_names(args.exclude, get_prunable_names(model))
    sparsity = load_sparsity_json(args.sparsity) if args.sparsity else SPARSITY
    # Pruning a finetuned model again (iterative pruning) holds its masks: they only shrink.
    held = {n: m.to(device) for n, m in ckpt.get("masks", {}).items()}
    pruner, plan, _ = prune_model(model, args.method, args.target, sparsity, exclude, held, seed=args.seed)
    carry = {"checkpoint_bytes": source.stat().st_size} if ckpt["stage"] == "dense" else {}
    dense = {**ckpt["metrics"], **carry} if ckpt["stage"] == "dense" else ckpt["metrics"]["dense"]
    kept_dense = [n for n in get_prunable_names(model) if n not in plan and n not in held]
    if kept_dense:
        print(f"kept dense: {', '.join(kept_dense)}")

    print(layer_table(model, {**pruner.sparsity, **plan}))  # held layers show their sparsity too
    metrics = {**measure(model), "method": args.method, "target": args.target}
    print(size_line("Sparse model size (nonzeros x 32 bits):", metrics["size_bits"] / 8, dense["size_bits"] / 8))
    print(f"MACs per image: dense {dense['macs'] / 1e6:,.1f} M, on nonzero weights "
          f"{metrics['macs'] / 1e6:,.1f} M ({dense['macs'] / metrics['macs']:.2f}x fewer)")
    loaders = load_data_for(ckpt, args.data_dir, device, args.eval_views)
    metrics.update(val_acc=evaluate(model, loaders["val"]), test_acc=evaluate(model, loaders["test"]))
    print(f"before finetuning: val {metrics['val_acc']:.2f}% | test {metrics['test_acc']:.2f}% "
          f"(dense: val {dense['val_acc']:.2f}% | test {dense['test_acc']:.2f}%)")
    export_path = ckpt_dir / "pruned.sparse.pt"
    metrics.update(export_with_report(model, pruner.masks, ckpt["config"], export_path,
                                      dense["checkpoint_bytes"], args.export_dtype,
                                      test=(loaders["test"], metrics["test_acc"])))
    plot = plot_weights(model, plot_dir / "weights.png")
    out = make_checkpoint("pruned", model, metrics, args, source=ckpt, carry=carry, masks=pruner.state_dict(),
                          sparsity=plan)
    path = save_checkpoint(out, ckpt_dir / "pruned.pt")
    print(f"overall sparsity of the prunable weights {metrics['sparsity']:.2%} | saved {path} and {plot}")
    return out["metrics"]


if __name__ == "__main__":
    cli(main, get_args_parser())
