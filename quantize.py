"""K-means weight sharing of the pruned, finetuned model (Deep Compression's second step).

    python quantize.py                       # 4 bits for every layer (BITS in quantize.py)
    python quantize.py --bits 3 --epochs 3

Per prunable tensor, the nonzero weights are clustered into at most 2^bits shared
values by k-means (exact 1-D, or with --init linear Deep Compression's linearly spaced
start and Lloyd's iterations); pruned weights stay exactly zero and are no cluster.
Then the codebook trains: a few epochs through train.fit
where, after every optimizer step, each centroid becomes the mean of its members and
each member takes its centroid's value (the labels stay fixed), as in the course.
Writes checkpoints/quantized.pt and quantized.sparse.pt, where each kept weight is an
ANS-coded index into its tensor's codebook.
"""
from collections import namedtuple

import ckwrap
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import ensure_writable, load_checkpoint, make_checkpoint, save_checkpoint
from cli import cli, int_in, run_args
from data import load_data_for
from export import export_with_report
from model import build_model_from_checkpoint
from prune import SPARSITY
from pruning import get_prunable_names
from train import RECIPE_FLAGS, Recipe, fit, get_args_parser, load_resume
from utils import UserError, evaluate, get_device, measure, plural, set_seed, size_line

# Bits per shared value, layer by layer: at most 2**bits distinct nonzero weights.
BITS = {name: 4 for name in SPARSITY}

Codebook = namedtuple("Codebook", ["centroids", "labels"])  # (K,) float32, (numel,) int64, -1 = pruned


def assign(values, centroids):
    """Index of the nearest centroid for each value (1-D: cut at the midpoints)."""
    order = centroids.argsort()
    ordered = centroids[order]
    return order[torch.bucketize(values, (ordered[1:] + ordered[:-1]) / 2)]


def lloyd_linear(values, k, iterations=50):
    """Deep Compression's k-means: centroids linearly spaced over the values' range, then
    Lloyd's iterations. (N,) float -> (k,) centroids, (N,) labels."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k, device=values.device)
    for _ in range(iterations):  # assign to the nearest, move to the mean
        labels = assign(values, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, values)
        counts = torch.bincount(labels, minlength=k)
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids, assign(values, centroids)


def exact_k_means(values, k):
    """Optimal 1-D k-means (Ckmeans.1d.dp, through ckwrap). (N,) float -> (k,) centroids, (N,) labels."""
    result = ckwrap.ckmeans(values.double().cpu().numpy(), k)
    return (torch.from_numpy(result.centers).float().to(values.device),
            torch.from_numpy(result.labels.astype(np.int64)).to(values.device))


@torch.no_grad()
def k_means_quantize(tensor, bitwidth=4, codebook=None, init="exact"):
    """Replace `tensor`'s nonzero entries, in place, by at most 2**bitwidth shared values;
    returns the Codebook. Zeros stay zero (label -1). With a codebook given, only
    writes its centroids into the tensor.

    init 'exact' is optimal 1-D k-means; 'linear' is Deep Compression's (linearly spaced
    start, Lloyd's iterations). On this repo's finetuned models exact kept about a point
    more accuracy before codebook training, and linear used its outer centroids less, so
    its indices code 5% to 8% smaller (README)."""
    if codebook is None:
        flat = tensor.detach().flatten()
        kept = flat != 0
        values = flat[kept].float()
        labels = torch.full(flat.shape, -1, dtype=torch.long, device=flat.device)
        distinct = torch.unique(values)
        k = min(2 ** bitwidth, len(distinct))
        if k > 1:
            centroids, labels[kept] = (exact_k_means if init == "exact" else lloyd_linear)(values, k)
        else:  # one distinct value (or none: a fully pruned tensor) is its own codebook
            centroids, labels[kept] = (distinct if len(distinct) else values.new_zeros(1)), 0
        codebook = Codebook(centroids, labels.view(tensor.shape))
    bins = codebook.labels + 1  # bin 0 (pruned) reads the 0.0 in front of the centroids
    tensor.copy_(F.pad(codebook.centroids, (1, 0))[bins].to(tensor.dtype))
    return codebook


@torch.no_grad()
def update_codebook(tensor, codebook, bins=None, counts=None):
    """Each centroid becomes the mean of its members' current values (empty ones stay).
    bins (labels + 1, flat) and counts (members per bin), fixed while the labels are, can
    be passed to save recomputing them at every step."""
    bins = codebook.labels.flatten() + 1 if bins is None else bins  # bin 0: the pruned weights
    k = len(codebook.centroids)
    counts = torch.bincount(bins, minlength=k + 1)[1:] if counts is None else counts
    sums = torch.zeros(k + 1, device=bins.device).index_add_(0, bins, tensor.detach().flatten().float())[1:]
    codebook.centroids.copy_(torch.where(counts > 0, sums / counts.clamp(min=1), codebook.centroids))


class KMeansQuantizer:
    """k-means weight sharing of the named tensors, keeping one Codebook per tensor.

    `.apply(model, step)` after every optimizer step re-centres each centroid on its
    members and sets every member to it, so the model keeps at most 2**bits distinct
    nonzero values per tensor and its zeros (fit's after-step hook, as a pruner's)."""

    def __init__(self, model, bits, init="exact"):
        params = dict(model.named_parameters())
        self.set_codebooks({name: k_means_quantize(params[name], b, init=init) for name, b in bits.items()})

    def set_codebooks(self, codebooks):
        """Hold every tensor's codebook in one flat one (labels offset, centroids end to end,
        the per-tensor centroids views of it), and its bins and counts, which stay fixed while
        the labels do: a training step's update is then a few ops over all tensors at once
        instead of a few per tensor, plus a copy back into each."""
        self.codebooks = dict(codebooks)
        if not codebooks:
            return
        sizes = [len(c.centroids) for c in codebooks.values()]
        offsets = np.cumsum([0, *sizes]).tolist()
        centroids = torch.cat([c.centroids for c in codebooks.values()])
        labels = torch.cat([torch.where(c.labels >= 0, c.labels + off, -1).flatten()
                            for c, off in zip(codebooks.values(), offsets)])
        self.packed = Codebook(centroids, labels)
        self.bins = labels + 1
        self.counts = torch.bincount(self.bins, minlength=len(centroids) + 1)[1:]
        self.codebooks = {name: Codebook(centroids[a:b], c.labels)
                          for (name, c), a, b in zip(codebooks.items(), offsets, offsets[1:])}

    @torch.no_grad()
    def apply(self, model, step=None):
        if not self.codebooks:
            return
        params = dict(model.named_parameters())
        tensors = [params[name] for name in self.codebooks]
        if step is not None:  # during training: the codebook learns
            update_codebook(torch.cat([t.detach().flatten() for t in tensors]), self.packed, self.bins, self.counts)
        shared = F.pad(self.packed.centroids, (1, 0))[self.bins]  # k_means_quantize's write, bins kept
        torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(shared.split([t.numel() for t in tensors]), tensors)])

    def state_dict(self):
        return {name: {"centroids": c.centroids.cpu().clone(), "labels": c.labels.cpu()}
                for name, c in self.codebooks.items()}

    def load_state_dict(self, state, device=None):
        self.set_codebooks({name: Codebook(s["centroids"].to(device), s["labels"].to(device))
                            for name, s in state.items()})


def check_bits(bits, valid_names):
    """Refuse unknown layer names and bit widths that are not integers in 1..8."""
    unknown = [name for name in bits if name not in valid_names]
    if unknown:
        raise UserError(f"unknown layer(s) {unknown} in BITS; valid names: {', '.join(valid_names)}")
    for name, b in bits.items():
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise UserError(f"bits of {name} must be an integer from 1 to 8, got {b!r}")


def quantized_size(model, bits):
    """Model size in bits with weight sharing: each nonzero shared weight as a bits-wide
    index, plus each codebook at 32 bits a value, plus every other parameter at 32 bits."""
    total = 0
    for name, p in model.named_parameters():
        if name in bits:
            distinct = len(torch.unique(p.detach()[p.detach() != 0]))
            total += int(p.count_nonzero()) * bits[name] + distinct * 32
        else:
            total += p.numel() * 32
    return total


@torch.no_grad()
def round_rest(model, names, dtype=torch.float16):
    """Round every floating tensor of the state dict but the `names` ones (BatchNorm's
    parameters and statistics, the classifier's bias) to `dtype`'s values, in place, where
    they fit it; the export then stores them at that width, losslessly."""
    for name, t in model.state_dict().items():
        if name not in names and t.is_floating_point():
            rounded = t.to(dtype).to(t.dtype)
            t.copy_(torch.where(rounded.isfinite(), rounded, t))


def quantize_model(model, bits, init, loaders, recipe, rest_dtype="float16", state_path=None, resume=None,
                   source=None, flags=None, desc="codebook", measure_shared=True, compile=False):
    """k-means weight sharing of `model` in place, then recipe.epochs of codebook training,
    then the other tensors rounded to `rest_dtype` -> (masks {name: bool}, history,
    figures): the one quantizing path of quantize.py and frontier.py. figures: the final
    model's val_acc and, with measure_shared, shared_val_acc and shared_test_acc right
    after the k-means step."""
    quantizer = KMeansQuantizer(model, bits, init)
    figures = {}
    if measure_shared:
        figures = {"shared_val_acc": evaluate(model, loaders["val"]), "shared_test_acc": evaluate(model, loaders["test"])}
        tqdm.write(f"{desc}: k-means weight sharing ({min(bits.values())} to {max(bits.values())} bits): val "
                   f"{figures['shared_val_acc']:.2f}% | test {figures['shared_test_acc']:.2f}%; now training the "
                   f"codebooks for {plural(recipe.epochs, 'epoch')}")
    set_seed(recipe.seed)
    history, _ = fit(model, loaders, recipe, quantizer, state_path, resume, source, flags, desc, compile=compile)
    figures["val_acc"] = history[-1]["val_acc"]
    if rest_dtype != "float32":
        round_rest(model, bits, getattr(torch, rest_dtype))
        figures["val_acc"] = evaluate(model, loaders["val"])  # the last epoch's was before the rounding
        tqdm.write(f"{desc}: the tensors with no codebook rounded to {rest_dtype}: val "
                   f"{history[-1]['val_acc']:.2f}% -> {figures['val_acc']:.2f}%")
    return {name: c.labels >= 0 for name, c in quantizer.codebooks.items()}, history, figures


def get_quantize_args_parser():
    parser = get_args_parser(__doc__, epochs=3, lr=0.01, plots=False)
    parser.set_defaults(batch_size=256)
    add = parser.add_argument
    add("--checkpoint", default=None, help="model to quantize (default: <checkpoint-dir>/finetuned.pt)")
    add("--bits", type=int_in(1, 8), default=None, metavar="N",
        help="bits per shared value for every prunable layer, 1 to 8 (default: the BITS dict, 4 bits)")
    add("--init", default="exact", choices=("exact", "linear"),
        help="k-means: exact 1-D (better accuracy), or Deep Compression's linearly spaced start "
             "and Lloyd's iterations (a smaller file) (default: %(default)s)")
    add("--rest-dtype", default="float16", choices=("float16", "float32"),
        help="the tensors with no codebook (BatchNorm's parameters and statistics, the classifier's "
             "bias), rounded to this after the codebook training, stored at its width; float16 "
             "halves a fifth of a 98%%-sparse file (default: %(default)s)")
    return parser


def main(args):
    ckpt_dir = ensure_writable(args.checkpoint_dir, ("quantized.pt", "quantized.resume.pt", "quantized.sparse.pt"))
    state_path = ckpt_dir / "quantized.resume.pt"
    args, state = load_resume(args, state_path, (*RECIPE_FLAGS, "train_subset", "eval_views", "bits", "init",
                                                 "rest_dtype"))
    recipe = Recipe.from_args(args)
    source = args.checkpoint or ckpt_dir / "finetuned.pt"
    ckpt = load_checkpoint(source, stages=("finetuned", "pruned"))
    device = get_device(args.device, args.cudnn_benchmark)
    model = build_model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    names = get_prunable_names(model)
    bits = {name: args.bits for name in names} if args.bits is not None else BITS
    check_bits(bits, names)
    loaders = load_data_for(ckpt, args.data_dir, device, args.eval_views, recipe, args.train_subset)
    before, dense = ckpt["metrics"], ckpt["metrics"]["dense"]

    masks, history, figures = quantize_model(model, bits, args.init, loaders, recipe, args.rest_dtype, state_path,
                                             state, source, run_args(args), compile=args.compile)
    export_path = ckpt_dir / "quantized.sparse.pt"
    metrics = {**figures, "test_acc": evaluate(model, loaders["test"]), **measure(model),
               "size_bits": quantized_size(model, bits),
               **export_with_report(model, masks, ckpt["config"], export_path, dense["checkpoint_bytes"],
                                    shared=True)}
    out = make_checkpoint("quantized", model, metrics, args, source=ckpt, history=history,
                          masks={k: v.cpu() for k, v in masks.items()}, sparsity=ckpt["sparsity"], bits=bits)
    path = save_checkpoint(out, ckpt_dir / "quantized.pt")
    state_path.unlink(missing_ok=True)
    print(size_line("\nQuantized model size (nonzeros x bits + codebooks + the rest):", metrics["size_bits"] / 8,
                    dense["size_bits"] / 8))
    print(f"Test accuracy: dense {dense['test_acc']:.2f}% | {ckpt['stage']} {before['test_acc']:.2f}% | "
          f"shared {metrics['shared_test_acc']:.2f}% | codebook trained {metrics['test_acc']:.2f}% "
          f"(val {metrics['val_acc']:.2f}%) | saved {path}")
    return out["metrics"]


if __name__ == "__main__":
    cli(main, get_quantize_args_parser())
