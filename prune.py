"""Fine-grained (unstructured) magnitude pruning of the trained model.

    python prune.py                                            # the SPARSITY dict below
    python prune.py --sparsity checkpoints/sparsity_suggested.json

Edit SPARSITY (or pass a JSON file of the same form) and run again. A layer the
dict leaves out stays dense. Writes checkpoints/pruned.pt and plots/weights.png.
"""
import argparse
import json
import math
from pathlib import Path

import torch

from export import add_export_args, evaluate_export, export_with_report
from model import build_model_from_checkpoint
from train import add_common_args, load_data_for, run_args
from utils import (MiB, UserError, cli, ensure_writable, evaluate, format_table, get_device,
                   get_model_macs, get_model_size, get_sparsity, load_checkpoint, save_checkpoint,
                   save_figure)

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


def fine_grained_prune(tensor, sparsity):
    """Zero the round(sparsity * numel) smallest-magnitude elements of `tensor` in
    place; returns the bool mask of the same shape (True = kept).

    The count rule is torch.nn.utils.prune.l1_unstructured's. Among equal magnitudes
    the element with the lower flat index goes first, so ties are deterministic."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    num_zeros = round(sparsity * tensor.numel())
    mask = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)  # logical (NCHW) order
    if num_zeros > 0:
        order = torch.argsort(tensor.detach().abs().flatten(), stable=True)
        mask.view(-1)[order[:num_zeros]] = False
    with torch.no_grad():
        tensor.mul_(mask)
    return mask


def get_prunable_names(model):
    """Names of the tensors that pruning may touch: every weight with dim > 1."""
    return [name for name, p in model.named_parameters() if p.dim() > 1]


def get_prunable_sparsity(model):
    """Fraction of zeros over all prunable tensors (dim > 1) together."""
    prunable = [p for p in model.parameters() if p.dim() > 1]
    return 1.0 - sum(int(p.count_nonzero()) for p in prunable) / sum(p.numel() for p in prunable)


def check_sparsity_dict(sparsity_dict, valid_names):
    """Refuse unknown layer names and values that are not numbers in [0, 1]."""
    if not isinstance(sparsity_dict, dict):
        raise UserError("a sparsity dict maps layer names to numbers in [0, 1], e.g. "
                        '{"backbone.conv1.weight": 0.6}')
    unknown = [name for name in sparsity_dict if name not in valid_names]
    if unknown:
        raise UserError(f"unknown layer(s) {unknown} in the sparsity dict; valid names: "
                        f"{', '.join(valid_names)}")
    for name, value in sparsity_dict.items():
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 <= value <= 1):
            raise UserError(f"sparsity of {name} must be a number in [0, 1], got {value!r}")


def load_sparsity_json(path):
    """A JSON file {layer name: sparsity} -> dict; a bad file is a UserError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read --sparsity {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--sparsity {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                        f"column {e.colno})") from None


class FineGrainedPruner:
    """Prunes the named tensors of a model and keeps their masks.

    `.masks` maps name -> bool mask (True = kept); `.apply(model)` zeros the pruned
    weights again, e.g. after every optimizer step while finetuning."""

    def __init__(self, model, sparsity_dict):
        check_sparsity_dict(sparsity_dict, get_prunable_names(model))
        self.sparsity = dict(sparsity_dict)
        self.masks = {name: fine_grained_prune(param, sparsity_dict[name])
                      for name, param in model.named_parameters() if name in sparsity_dict}

    @classmethod
    def from_masks(cls, masks, device=None):
        """A pruner that re-applies saved masks (from a checkpoint)."""
        pruner = cls.__new__(cls)
        pruner.masks = {name: m.to(device) for name, m in masks.items()}
        pruner.sparsity = {name: get_sparsity(m.float()) for name, m in masks.items()}
        return pruner

    @torch.no_grad()
    def apply(self, model):
        for name, param in model.named_parameters():
            if name in self.masks:
                param.mul_(self.masks[name])


def get_sparse_macs(model, inputs):
    """MACs of one forward pass that fall on nonzero weights (the dense count minus
    the products with pruned weights)."""
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: positions.__setitem__(
        name, o[0].numel() // o.shape[1]))  # output positions per sample, per filter
        for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # A plain forward pass: under torchprofile's trace the shapes would be tensors.
    was_training = model.training
    with torch.no_grad():
        model.eval()(inputs)
    model.train(was_training)
    for h in hooks:
        h.remove()
    macs = get_model_macs(model, inputs)
    for name, m in model.named_modules():
        if name in positions:
            macs -= (m.weight.numel() - int(m.weight.count_nonzero())) * positions[name]
    return macs


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


def size_report(model, dense_bits):
    """The seed's two size lines, from get_model_size counting nonzero weights."""
    sparse_bits = get_model_size(model, count_nonzero_only=True)
    return (f"Original model size: {dense_bits / MiB:.2f} MiB\n"
            f"Sparse model size: {sparse_bits / MiB:.2f} MiB ({dense_bits / sparse_bits:.2f}x smaller)")


def plot_weights(model, path, bins=256):
    """Histograms of each prunable tensor's nonzero weights (one panel per layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = get_prunable_names(model)
    params = dict(model.named_parameters())
    cols = 6
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(3 * cols, 2.4 * math.ceil(len(names) / cols)))
    for ax, name in zip(axes.flat, names):
        w = params[name].detach().float().flatten().cpu()
        ax.hist(w[w != 0].numpy(), bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(f"{name.replace('backbone.', '').replace('.weight', '')}\n"
                     f"sparsity {get_sparsity(w):.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Distribution of the remaining (nonzero) weights per layer")
    fig.tight_layout()
    return save_figure(fig, path)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, plots=True)
    parser.add_argument("--checkpoint", default=None,
                        help="model to prune (default: <checkpoint-dir>/dense.pt)")
    add_export_args(parser)
    parser.add_argument("--sparsity", default=None, metavar="FILE.json",
                        help="JSON {layer name: sparsity} that replaces the SPARSITY dict, e.g. "
                             "checkpoints/sparsity_suggested.json (default: the dict in prune.py)")
    return parser


def main(args):
    ckpt_dir, plot_dir = ensure_writable(args.checkpoint_dir), ensure_writable(args.plot_dir)
    sparsity = load_sparsity_json(args.sparsity) if args.sparsity else SPARSITY
    source = Path(args.checkpoint or ckpt_dir / "dense.pt")
    ckpt = load_checkpoint(source, stages=("dense", "finetuned"))
    device = get_device(args.device)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    check_sparsity_dict(sparsity, get_prunable_names(model))
    loaders = load_data_for(ckpt, args, device)
    inputs = torch.zeros(1, 3, 32, 32, device=device)
    dense_bits, dense_macs = get_model_size(model), get_model_macs(model, inputs)
    dense = [n for n in get_prunable_names(model) if n not in sparsity]
    if dense:
        print(f"not in the sparsity dict, kept dense: {', '.join(dense)}")

    pruner = FineGrainedPruner(model, sparsity)
    print(layer_table(model, sparsity))
    print(size_report(model, dense_bits))
    sparse_macs = get_sparse_macs(model, inputs)
    overall = get_prunable_sparsity(model)
    print(f"MACs per image: dense {dense_macs / 1e6:,.1f} M, on nonzero weights "
          f"{sparse_macs / 1e6:,.1f} M ({dense_macs / sparse_macs:.2f}x fewer)")
    val_acc, test_acc = evaluate(model, loaders["val"]), evaluate(model, loaders["test"])
    print(f"before finetuning: val {val_acc:.2f}% | test {test_acc:.2f}% "
          f"(dense: val {ckpt['metrics']['val_acc']:.2f}% | test {ckpt['metrics']['test_acc']:.2f}%)")

    export_path = ckpt_dir / "pruned.sparse.pt"
    export = export_with_report(model, pruner.masks, ckpt["config"], export_path,
                                ckpt["metrics"].get("dense_checkpoint_bytes", source.stat().st_size),
                                args.export_dtype)
    if args.export_dtype != "float32":
        export["export_test_acc"] = evaluate_export(export_path, loaders["test"], test_acc)
    metrics = {**export, "val_acc": val_acc, "test_acc": test_acc,
               "dense_val_acc": ckpt["metrics"].get("dense_val_acc", ckpt["metrics"]["val_acc"]),
               "dense_test_acc": ckpt["metrics"].get("dense_test_acc", ckpt["metrics"]["test_acc"]),
               "dense_size_bits": dense_bits,
               "sparse_size_bits": get_model_size(model, count_nonzero_only=True),
               "dense_macs": dense_macs, "sparse_macs": sparse_macs, "sparsity": overall}
    plot = plot_weights(model, plot_dir / "weights.png")
    path = save_checkpoint({"model": model.state_dict(), "stage": "pruned", "config": ckpt["config"],
                            "metrics": metrics, "history": ckpt["history"], "args": run_args(args),
                            "split": ckpt["split"], "masks": {k: v.cpu() for k, v in pruner.masks.items()},
                            "sparsity": pruner.sparsity}, ckpt_dir / "pruned.pt")
    print(f"overall sparsity of the prunable weights {overall:.2%} | saved {path} and {plot}")
    return metrics


if __name__ == "__main__":
    cli(main, get_args_parser())
