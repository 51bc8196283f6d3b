"""Finetune the pruned model with its masks held, and report the final results.

    python finetune.py
    python finetune.py --epochs 5 --lr 0.02

The masks are re-applied after every optimizer step, so neither momentum nor weight
decay brings a pruned weight back. When prune.py ran with --gradual, the sparsity
rises on its schedule during the first --ramp of the steps, then the masks freeze.
The epoch with the best validation accuracy (among those at the final sparsity) is
kept in checkpoints/finetuned.pt; plots/summary.png compares the three stages.
"""
import math
import time

import torch
from tqdm import tqdm

from data import load_data_for
from export import add_export_args, evaluate_export, export_with_report
from model import build_model_from_checkpoint
from prune import FineGrainedPruner, GradualSchedule
from train import FINETUNE, fit, get_args_parser, resumed_args
from checkpoint import ensure_writable, load_checkpoint, make_checkpoint, save_checkpoint
from cli import cli
from plots import plot_summary
from utils import evaluate, get_device, measure, MiB, set_seed


def finetune_model(model, masks, schedule, loaders, args, keep_best, state_path=None, source=None,
                   desc="finetune"):
    """Finetune `model` for args.epochs with `masks` held, raised along the gradual
    `schedule` record if there is one -> (pruner, history): the one finetuning path of
    finetune.py and frontier.py. keep_best(pruner, history) runs after each epoch that
    is the best so far by validation among those at the final sparsity."""
    steps_per_epoch = len(loaders["train"])
    schedule = schedule and GradualSchedule(schedule, args.epochs * steps_per_epoch)
    pruner = FineGrainedPruner.from_masks(masks, loaders["train"].device, schedule)
    # Epochs that end before a gradual ramp does are not at the final sparsity: never "best".
    first_final_epoch = math.ceil(schedule.ramp_steps / steps_per_epoch) if schedule else 1

    def on_epoch(history):
        final = history[first_final_epoch - 1:]
        entry, best = history[-1], max((h["val_acc"] for h in final), default=float("nan"))
        tqdm.write(f"{desc} epoch {entry['epoch']} Accuracy {entry['val_acc']:.2f}% / Best Accuracy: {best:.2f}%"
                   f"  ({entry['seconds']:.0f} s)" + ("" if final else " (still pruning)"))
        if final and not entry["val_acc"] < best:  # NaN (no val split) keeps the latest
            keep_best(pruner, history)

    set_seed(args.seed)
    loaders["train"].seed = args.seed  # the run's shuffle and augmentation, also on shared loaders
    history = fit(model, loaders, args, state_path, on_epoch=on_epoch, pruner=pruner, desc=desc, source=source)
    return pruner, history


def main(args):
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("finetuned.pt", "finetuned.best.pt", "finetuned.resume.pt",
                                                     "finetuned.sparse.pt"))
    plot_dir = ensure_writable(args.plot_dir, ("summary.png",))
    # The best epoch so far waits in finetuned.best.pt: finetuned.pt is written once, complete.
    state_path, best_path = ckpt_dir / "finetuned.resume.pt", ckpt_dir / "finetuned.best.pt"
    args = resumed_args(args, state_path)
    source = args.checkpoint or ckpt_dir / "pruned.pt"
    ckpt = load_checkpoint(source, stages=("pruned",))
    device = get_device(args.device)
    loaders = load_data_for(ckpt, args, device, train=True)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    pruned, dense = ckpt["metrics"], ckpt["metrics"]["dense"]
    schedule = ckpt.get("schedule")  # prune.py --gradual: the sparsity rises during finetuning

    def finetuned_checkpoint(metrics, history, pruner):
        return make_checkpoint("finetuned", model, metrics, args, source=ckpt, history=history,
                               masks=pruner.state_dict(), sparsity=pruner.sparsity, schedule=schedule)

    def keep_best(pruner, history):
        # test_acc is measured once, on the best epoch, when the run ends
        save_checkpoint(finetuned_checkpoint({"val_acc": history[-1]["val_acc"], "test_acc": float("nan"),
                                              **measure(model), "best_epoch": history[-1]["epoch"]},
                                             history, pruner), best_path)

    t0 = time.perf_counter()
    pruner, history = finetune_model(model, ckpt["masks"], schedule, loaders, args, keep_best,
                                     state_path, source)
    best = load_checkpoint(best_path, stages=("finetuned",))
    model.load_state_dict(best["model"])
    pruner.load_state_dict(best["masks"], device)
    best_epoch = best["metrics"]["best_epoch"]
    metrics = {"val_acc": history[best_epoch - 1]["val_acc"], "test_acc": evaluate(model, loaders["test"]),
               **measure(model), "best_epoch": best_epoch,
               "train_seconds": sum(h["seconds"] for h in history), "wall_seconds": time.perf_counter() - t0,
               # in all since the dense model: an iterative chain adds up its rounds
               "finetune_epochs": args.epochs + ckpt["metrics"].get("finetuned", {}).get("finetune_epochs", 0)}
    export_path = ckpt_dir / "finetuned.sparse.pt"
    metrics.update(export_with_report(model, pruner.masks, ckpt["config"], export_path,
                                      dense["checkpoint_bytes"], args.export_dtype))
    if args.export_dtype != "float32":
        metrics["export_test_acc"] = evaluate_export(export_path, loaders["test"], metrics["test_acc"])
    out = finetuned_checkpoint(metrics, history, pruner)
    path = save_checkpoint(out, ckpt_dir / "finetuned.pt")
    best_path.unlink()
    state_path.unlink(missing_ok=True)

    dense_mib, sparse_mib = dense["size_bits"] / MiB, metrics["size_bits"] / MiB
    print(f"\nOriginal model size: {dense_mib:.2f} MiB | test accuracy {dense['test_acc']:.2f}%")
    print(f"Sparse model size: {sparse_mib:.2f} MiB = {100 * sparse_mib / dense_mib:.2f}% of the original "
          f"({dense_mib / sparse_mib:.2f}x smaller)")
    before = "pruned during finetuning" if schedule else f"{pruned['test_acc']:.2f}% before finetuning"
    print(f"Sparse model test accuracy: {before}, {metrics['test_acc']:.2f}% after "
          f"(best epoch {best_epoch} by validation)")
    print(f"Overall sparsity of the prunable weights: {metrics['sparsity']:.2%} | MACs per image: "
          f"{dense['macs'] / 1e6:,.1f} M dense, {metrics['macs'] / 1e6:,.1f} M on nonzero weights")
    stages = {"dense": {"size_mib": dense_mib, "test_acc": dense["test_acc"]},
              "pruned": {"size_mib": pruned["size_bits"] / MiB, "test_acc": pruned["test_acc"]},
              "finetuned": {"size_mib": sparse_mib, "test_acc": metrics["test_acc"]}}
    if schedule:  # no one-shot pruned model to show
        del stages["pruned"]
    plot = plot_summary(stages, plot_dir / "summary.png")
    print(f"saved {path}, {export_path} and {plot}")
    return out["metrics"]


def get_finetune_args_parser():
    parser = get_args_parser(__doc__, plots=True)
    parser.set_defaults(**FINETUNE)
    add_export_args(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="pruned model to finetune (default: <checkpoint-dir>/pruned.pt)")
    return parser


if __name__ == "__main__":
    cli(main, get_finetune_args_parser())
