"""Finetune the pruned model with its masks held, and report the final results.

    python finetune.py                                         # checkpoints/pruned.pt, 10 epochs
    python finetune.py --epochs 5 --lr 0.02
    python finetune.py --gradual --method global --target 0.95 # prune dense.pt while finetuning

The masks are re-applied after every optimizer step, so neither momentum nor weight
decay brings a pruned weight back. With --gradual (until now a prune.py flag), pruning
happens here: the sparsity of --checkpoint (dense.pt, or a finetuned.pt to prune further)
rises along Zhu & Gupta's cubic schedule over the first --ramp of the steps, the masks
recomputed every --prune-every steps, then they freeze. --method, --target and
--sparsity choose the allocation as in prune.py. The epoch with the best validation
accuracy (among those at the final sparsity) is kept in checkpoints/finetuned.pt;
plots/summary.png compares the stages.
"""
import math
import time
from pathlib import Path

import torch

from checkpoint import ensure_writable, load_checkpoint, make_checkpoint, save_checkpoint
from cli import cli, run_args
from data import load_data_for
from export import add_export_args, export_with_report
from model import build_model_from_checkpoint
from plots import plot_summary
from prune import SPARSITY, add_pruning_args, check_allocation_args, load_sparsity_json, resolve_names
from pruning import FineGrainedPruner, GradualSchedule, get_prunable_names, prune_model
from train import FINETUNE, RECIPE_FLAGS, Recipe, fit, get_args_parser, load_resume
from utils import MiB, UserError, evaluate, get_device, measure, set_seed, size_line

# What defines a finetuning run: --resume takes these flags from the saved state.
FLAGS = (*RECIPE_FLAGS, "train_subset", "eval_views", "gradual", "method", "target", "sparsity", "exclude", "ramp",
         "prune_every")


def finetune_model(model, masks, schedule, loaders, recipe, state_path=None, resume=None, source=None, flags=None,
                   desc="finetune", compile=False):
    """Finetune `model` with `masks` held, raised along the gradual `schedule` record if
    there is one, and leave it at its best epoch by validation among those at the final
    sparsity -> (pruner, history, best epoch): the one finetuning path of finetune.py and
    frontier.py."""
    steps_per_epoch = len(loaders["train"])
    schedule = schedule and GradualSchedule(schedule, recipe.epochs * steps_per_epoch)
    pruner = FineGrainedPruner.from_masks(masks, loaders["train"].device, schedule)
    # Epochs that end before a gradual ramp does are not at the final sparsity: never "best".
    best_from = math.ceil(schedule.ramp_steps / steps_per_epoch) if schedule else 1
    set_seed(recipe.seed)
    history, best = fit(model, loaders, recipe, pruner, state_path, resume, source, flags, desc, best_from=best_from,
                        compile=compile)
    model.load_state_dict(best["model"])
    pruner.load_state_dict(best["after_step"], loaders["train"].device)
    return pruner, history, best["epoch"]


def gradual_start(model, ckpt, args):
    """--gradual: the masks to start from (a finetuned model's, held) and the schedule record."""
    device = next(model.parameters()).device
    held = {n: m.to(device) for n, m in ckpt.get("masks", {}).items()}
    sparsity = load_sparsity_json(args.sparsity) if args.sparsity else SPARSITY
    exclude = resolve_names(args.exclude, get_prunable_names(model))
    pruner, _, schedule = prune_model(model, args.method, args.target, sparsity, exclude, held, True, args.ramp,
                                      args.prune_every)
    return pruner.state_dict(), schedule


def main(args):
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("finetuned.pt", "finetuned.resume.pt", "finetuned.sparse.pt"))
    plot_dir = ensure_writable(args.plot_dir, ("summary.png",))
    state_path = ckpt_dir / "finetuned.resume.pt"
    args, state = load_resume(args, state_path, FLAGS)
    check_allocation_args(args, pruning=args.gradual)
    recipe = Recipe.from_args(args)
    source = Path(args.checkpoint or ckpt_dir / ("dense.pt" if args.gradual else "pruned.pt"))
    ckpt = load_checkpoint(source, stages=("dense", "finetuned", "pruned") if args.gradual else ("pruned",))
    if args.gradual and ckpt["stage"] == "pruned":
        raise UserError(f"{source} is a 'pruned' checkpoint, pruned already: finetune it without --gradual, or "
                        "prune gradually from --checkpoint checkpoints/dense.pt (or a finetuned.pt)")
    device = get_device(args.device, args.cudnn_benchmark)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    masks, schedule = gradual_start(model, ckpt, args) if args.gradual else (ckpt["masks"], None)
    loaders = load_data_for(ckpt, args.data_dir, device, args.eval_views, recipe, args.train_subset)

    t0 = time.perf_counter()
    pruner, history, best_epoch = finetune_model(model, masks, schedule, loaders, recipe, state_path, state, source,
                                                 run_args(args), compile=args.compile)
    carry = {"checkpoint_bytes": source.stat().st_size} if ckpt["stage"] == "dense" else {}
    dense = {**ckpt["metrics"], **carry} if ckpt["stage"] == "dense" else ckpt["metrics"]["dense"]
    before = ckpt["metrics"] if ckpt["stage"] == "finetuned" else ckpt["metrics"].get("finetuned", {})
    metrics = {"val_acc": history[best_epoch - 1]["val_acc"], "test_acc": evaluate(model, loaders["test"]),
               **measure(model), "best_epoch": best_epoch,
               "train_seconds": sum(h["seconds"] for h in history), "wall_seconds": time.perf_counter() - t0,
               # in all since the dense model: an iterative chain adds up its rounds
               "finetune_epochs": recipe.epochs + before.get("finetune_epochs", 0)}
    export_path = ckpt_dir / "finetuned.sparse.pt"
    metrics.update(export_with_report(model, pruner.masks, ckpt["config"], export_path,
                                      dense["checkpoint_bytes"], args.export_dtype,
                                      test=(loaders["test"], metrics["test_acc"])))
    out = make_checkpoint("finetuned", model, metrics, args, source=ckpt, carry=carry, history=history,
                          masks=pruner.state_dict(), sparsity=pruner.sparsity, schedule=schedule)
    path = save_checkpoint(out, ckpt_dir / "finetuned.pt")
    state_path.unlink(missing_ok=True)

    print(size_line("\nSparse model size (nonzeros x 32 bits):", metrics["size_bits"] / 8, dense["size_bits"] / 8))
    pruned = "pruned during finetuning" if schedule else f"{ckpt['metrics']['test_acc']:.2f}% before finetuning"
    print(f"Sparse model test accuracy: {pruned}, {metrics['test_acc']:.2f}% after (best epoch {best_epoch} by "
          f"validation); dense {dense['test_acc']:.2f}%")
    print(f"Overall sparsity of the prunable weights: {metrics['sparsity']:.2%} | MACs per image: "
          f"{dense['macs'] / 1e6:,.1f} M dense, {metrics['macs'] / 1e6:,.1f} M on nonzero weights")
    stages = {"dense": dense, ckpt["stage"]: ckpt["metrics"], "finetuned": metrics}
    plot = plot_summary({name: {"size_mib": m["size_bits"] / 8 / MiB, "test_acc": m["test_acc"]}
                         for name, m in stages.items()}, plot_dir / "summary.png")
    print(f"saved {path}, {export_path} and {plot}")
    return out["metrics"]


def get_finetune_args_parser():
    parser = get_args_parser(__doc__, plots=True)
    parser.set_defaults(**FINETUNE)
    add = parser.add_argument
    add("--checkpoint", default=None,
        help="model to finetune (default: <checkpoint-dir>/pruned.pt; with --gradual, <checkpoint-dir>/dense.pt)")
    add("--gradual", action="store_true",
        help="prune gradually during finetuning (cubic schedule), from a dense or finetuned --checkpoint")
    add_pruning_args(parser, choose=True, schedule=True)
    add_export_args(parser)
    return parser


if __name__ == "__main__":
    cli(main, get_finetune_args_parser())
