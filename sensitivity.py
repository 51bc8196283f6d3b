"""Sensitivity scan: prune one layer at a time and measure validation accuracy.

    python sensitivity.py
    python sensitivity.py --sparsities 0.5,0.7,0.9,0.95 --scan-size 2000 --max-drop 0.5

For every prunable tensor and every sparsity, only that tensor is pruned, the
validation accuracy is measured, and the tensor is restored bit for bit. The
layers in front of the pruned one do not change, so their activations are computed
once per batch and only the rest of the network runs for each sparsity.

Writes checkpoints/sensitivity.json, checkpoints/sparsity_suggested.json,
plots/sensitivity.png and plots/parameters.png, and prints the suggested dict.
"""
import argparse
import sys

import torch

from checkpoint import ensure_writable, file_sha256, load_checkpoint, read_json, write_json
from cli import (add_common_args, cli, fraction_in, fraction_list, is_fraction, is_number, nonnegative_float,
                 positive_int)
from data import Loader, load_data_for
from model import build_model_from_checkpoint
from plots import plot_parameters, plot_sensitivity
from pruning import fine_grained_prune, get_prunable_names
from utils import (UserError, autocast, evaluate, format_table, get_device, get_model_size, progress, short_name,
                   size_line, tta_views)

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)  # the scripts' and the Makefile's


def stage_of(name, model):
    """Index in model.stages() of the stage that holds parameter `name`."""
    if name.startswith("backbone."):
        return list(model.backbone._modules).index(name.split(".")[1])
    return len(model.stages()) - 1


def run_stages(stages, x):
    for stage in stages:
        x = stage(x)
    return x


@torch.no_grad()
def sensitivity_scan(model, loader, sparsities=DEFAULT_SPARSITIES, names=None, show_progress=True):
    """{layer name: [val accuracy in % for each sparsity]}, pruning one layer at a time.

    Equal to naive_sensitivity_scan, but the unchanged prefix of the network runs once
    per batch instead of once per sparsity. The model is left bit for bit unchanged."""
    was_training = model.training
    model.eval()
    stages, params = model.stages(), dict(model.named_parameters())
    names = list(names or get_prunable_names(model))
    accuracies = {}
    bar = progress(total=len(names) * len(loader), desc="scan", disable=None if show_progress else True)
    for name in names:
        param, k = params[name], stage_of(name, model)
        original = param.detach().clone()
        pruned = [original.clone() for _ in sparsities]
        for w, sparsity in zip(pruned, sparsities):
            fine_grained_prune(w, sparsity)
        correct = torch.zeros(len(sparsities), dtype=torch.long, device=loader.device)
        bar.set_postfix_str(short_name(name))
        try:
            for x, y in loader:
                with autocast(loader.device):
                    prefixes = [run_stages(stages[:k], view) for view in tta_views(x, loader.views)]
                for i, w in enumerate(pruned):
                    param.copy_(w)
                    # A fresh autocast region per weight change: autocast caches the
                    # bf16 copy of each weight until its outermost region exits.
                    with autocast(loader.device):
                        logits = sum(run_stages(stages[k:], p) for p in prefixes)
                    correct[i] += (logits.argmax(1) == y).sum()
                bar.update()
        finally:
            param.copy_(original)
        accuracies[name] = (100.0 * correct.double() / loader.num_samples).tolist()
    bar.close()
    model.train(was_training)
    return accuracies


@torch.no_grad()
def naive_sensitivity_scan(model, loader, sparsities=DEFAULT_SPARSITIES, names=None):
    """The course's plain scan (a whole evaluation per layer and sparsity); the
    reference that tests and bench.py compare sensitivity_scan against."""
    params = dict(model.named_parameters())
    accuracies = {}
    for name in names or get_prunable_names(model):
        original = params[name].detach().clone()
        accuracies[name] = []
        for sparsity in sparsities:
            fine_grained_prune(params[name], sparsity)
            accuracies[name].append(evaluate(model, loader))
            params[name].copy_(original)
    return accuracies


def suggest_sparsity(dense_acc, sparsities, accuracies, max_drop):
    """Per layer, the highest scanned sparsity whose accuracy drop from `dense_acc`
    stays within `max_drop` points (0.0 when none does)."""
    return {name: max([s for s, acc in zip(sparsities, accs) if dense_acc - acc <= max_drop],
                      default=0.0)
            for name, accs in accuracies.items()}


def num_removed(suggestion, num_parameters):
    """How many weights a suggestion zeros (fine_grained_prune's count rule)."""
    return sum(round(s * num_parameters[n]) for n, s in suggestion.items())


def overall_sparsity(suggestion, num_parameters):
    """Fraction of all prunable weights a suggestion removes."""
    return num_removed(suggestion, num_parameters) / sum(num_parameters.values())


def drop_for_target(dense_acc, sparsities, accuracies, num_parameters, target):
    """The smallest max-drop whose suggestion removes at least `target` of the prunable
    weights (None when even the highest scanned sparsities fall short)."""
    for drop in sorted({max(0.0, dense_acc - a) for accs in accuracies.values() for a in accs}):
        suggestion = suggest_sparsity(dense_acc, sparsities, accuracies, drop)
        if overall_sparsity(suggestion, num_parameters) >= target:
            return drop
    return None


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, plots=True)
    add = parser.add_argument
    add("--checkpoint", default=None, help="model to scan (default: <checkpoint-dir>/dense.pt)")
    add("--sparsities", type=fraction_list, default=DEFAULT_SPARSITIES,
        help="comma-separated sparsities to try per layer (default: %s)" % ",".join(map(str, DEFAULT_SPARSITIES)))
    add("--scan-size", type=positive_int, default=None, metavar="N",
        help="use only N validation images: faster, noisier (default: all)")
    add("--max-drop", type=nonnegative_float, default=1.0,
        help="accuracy points a layer may lose at its suggested sparsity. Layers are scanned "
             "one at a time, so the drops add up when all are pruned together; finetuning wins "
             "most of it back (default: %(default)s)")
    add("--target-sparsity", type=fraction_in(True, False), default=None, metavar="FRACTION",
        help="instead of --max-drop, use the smallest drop whose suggestion removes at least "
             "this fraction of all prunable weights, e.g. 0.8 (default: off)")
    return parser


def main(args):
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("sensitivity.json", "sparsity_suggested.json"))
    plot_dir = ensure_writable(args.plot_dir, ("sensitivity.png", "parameters.png"))
    sparsities = args.sparsities
    source = args.checkpoint or ckpt_dir / "dense.pt"
    ckpt = load_checkpoint(source, stages=("dense", "finetuned"))
    sha256 = file_sha256(source)  # now: the scan takes minutes, the file may change meanwhile
    device = get_device(args.device)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    loaders = load_data_for(ckpt, args.data_dir, device, args.eval_views)
    split = "val"
    if len(loaders["val"].images) == 0:
        print("warning: the checkpoint was trained with --val-size 0, so there is no validation "
              "split: the scan uses the TEST set, and the suggestion is tuned on test data",
              file=sys.stderr)
        split = "test"
    loader = loaders[split]
    if args.scan_size is not None:  # the split is in shuffled order: its first N are a random sample
        loader = Loader(loader.images[:args.scan_size], loader.labels[:args.scan_size],
                        loader.batch_size, device, views=loader.views)

    dense_acc = evaluate(model, loader)
    print(f"dense accuracy on {len(loader.images):,} {split} images: {dense_acc:.2f}%")
    accuracies = sensitivity_scan(model, loader, sparsities)
    params = dict(model.named_parameters())
    num_parameters = {n: params[n].numel() for n in accuracies}
    max_drop = args.max_drop
    if args.target_sparsity is not None:
        max_drop = drop_for_target(dense_acc, sparsities, accuracies, num_parameters, args.target_sparsity)
        if max_drop is None:
            max_drop = max(dense_acc - min(accs) for accs in accuracies.values())
            print(f"warning: the scanned sparsities cannot reach {args.target_sparsity:.0%} overall; "
                  "suggesting the highest of each layer (scan higher --sparsities)", file=sys.stderr)
        print(f"--target-sparsity {args.target_sparsity:g}: allowed drop per layer {max_drop:.2f} points")
    result = {"dense_acc": dense_acc, "sparsities": list(sparsities), "accuracy": accuracies,
              "num_parameters": num_parameters, "max_drop": max_drop, "split": split,
              "num_images": len(loader.images), "checkpoint": str(source), "checkpoint_sha256": sha256}
    suggestion = suggest_sparsity(dense_acc, sparsities, accuracies, max_drop)

    rows = [[n, f"{result['num_parameters'][n]:,}", *(f"{a:.2f}" for a in accs), f"{suggestion[n]:.2f}"]
            for n, accs in accuracies.items()]
    print(format_table(rows, ["layer", "params", *(f"s={s:g}" for s in sparsities), "suggested"]))
    write_json(result, ckpt_dir / "sensitivity.json")
    write_json(suggestion, ckpt_dir / "sparsity_suggested.json")
    plots = [plot_sensitivity(result, suggestion, plot_dir / "sensitivity.png"),
             plot_parameters(result["num_parameters"], plot_dir / "parameters.png")]
    dense_bits = get_model_size(model)
    sparse_bits = dense_bits - 32 * num_removed(suggestion, num_parameters)
    print(f"\nSuggested sparsity dict (max drop {max_drop:.2f} points per layer, "
          f"{overall_sparsity(suggestion, num_parameters):.1%} of the prunable weights); paste it "
          f"into prune.py or pass --sparsity {ckpt_dir / 'sparsity_suggested.json'}:")
    print("SPARSITY = {\n" + "".join(f"    {n!r}: {s},\n" for n, s in suggestion.items()) + "}")
    print(size_line("It would give a sparse model (nonzeros x 32 bits) of", sparse_bits / 8, dense_bits / 8))
    print(f"plots: {', '.join(map(str, plots))}")
    return {"dense_acc": dense_acc, "suggestion": suggestion, "size_bits": sparse_bits}


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


if __name__ == "__main__":
    cli(main, get_args_parser())
