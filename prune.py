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

from data import check_views, load_data_for
from export import add_export_args, evaluate_export, export_with_report
from model import build_model_from_checkpoint
from checkpoint import ensure_writable, load_checkpoint, make_checkpoint, read_json, save_checkpoint
from cli import add_common_args, cli, fraction, fraction_in, is_fraction, positive_int, seed_int
from plots import plot_weights
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
METHODS = ("dict", "uniform", "global", "random")
# What uniform and global pruning keep dense by default: the first conv and the
# classifier hold 0.03% of the weights and are the most fragile (see the scan).
EXCLUDE = ("backbone.conv0.weight", "classifier.weight")


def magnitude_mask(scores, num_zeros):
    """Bool mask of `scores`' shape (True = kept) with its num_zeros lowest scores False.
    Among equal scores the lower flat index goes first, so ties are deterministic."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # logical (NCHW) order
    if num_zeros > 0:
        order = torch.argsort(scores.detach().flatten(), stable=True)
        mask.view(-1)[order[:num_zeros]] = False
    return mask


def fine_grained_prune(tensor, sparsity):
    """Zero the round(sparsity * numel) smallest-magnitude elements of `tensor` in
    place; returns the bool mask of the same shape (True = kept).

    The count rule is torch.nn.utils.prune.l1_unstructured's; ties go by flat index."""
    check_fraction(sparsity)
    mask = magnitude_mask(tensor.detach().abs(), round(sparsity * tensor.numel()))
    with torch.no_grad():
        tensor.masked_fill_(~mask, 0.0)  # +0.0: a product with False would keep -0.0
    return mask


def check_fraction(sparsity):
    if not is_fraction(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")


def importance(param, mask=None, generator=None):
    """|weight| (or, with a generator, a random score: the control that shows what choosing
    by magnitude buys), with the weights `mask` has already pruned at -1: they go first
    again, so a mask recomputed at the same or a higher sparsity never lets one grow back."""
    if generator is None:
        scores = param.detach().abs()
    else:
        scores = torch.rand(param.shape, generator=generator).to(param.device)
    return scores if mask is None else scores.masked_fill(~mask, -1.0)


def get_prunable_names(model):
    """Names of the tensors that pruning may touch: every weight with dim > 1."""
    return [name for name, p in model.named_parameters() if p.dim() > 1]


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
        if not is_fraction(value):
            raise UserError(f"sparsity of {name} must be a number in [0, 1], got {value!r}")


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


def uniform_allocation(names, target):
    """{name: target} for each named tensor."""
    check_fraction(target)
    return {name: target for name in names}


@torch.no_grad()
def global_allocation(model, names, target, masks=None):
    """{name: sparsity} from one magnitude threshold over all the named tensors together.

    round(target * total) weights go in all, the count rule of torch.nn.utils.prune.
    global_unstructured; ties go by tensor order, then flat index, the order in which
    fine_grained_prune breaks them within one tensor. Weights already pruned in
    `masks` go first."""
    check_fraction(target)
    params, masks = dict(model.named_parameters()), masks or {}
    scores = [importance(params[n], masks.get(n)).flatten() for n in names]
    numels = torch.tensor([len(s) for s in scores], device=scores[0].device)
    pruned = torch.argsort(torch.cat(scores), stable=True)[:round(target * int(numels.sum()))]
    counts = torch.bincount(torch.bucketize(pruned, numels.cumsum(0), right=True), minlength=len(names))
    return {n: int(c) / int(k) for n, c, k in zip(names, counts, numels)}


def allocate(model, method, target=None, sparsity_dict=None, exclude=EXCLUDE, masks=None):
    """-> {name: sparsity}: `sparsity_dict` as it is ('dict'), `target` for every tensor
    but the excluded ('uniform'), or one threshold over those ('global')."""
    if method == "dict":
        check_sparsity_dict(sparsity_dict, get_prunable_names(model))
        return dict(sparsity_dict)
    if not is_fraction(target):
        raise UserError(f"--method {method} needs --target FRACTION, the sparsity to reach, e.g. --target 0.9")
    names = [n for n in get_prunable_names(model) if n not in exclude]
    if not names:
        raise UserError("--exclude leaves no tensor to prune")
    if method in ("uniform", "random"):  # random: the uniform sparsities, random masks
        return uniform_allocation(names, target)
    if method == "global":
        return global_allocation(model, names, target, masks)
    raise UserError(f"unknown --method {method!r}: use {', '.join(METHODS)}")


def prune_model(model, method, target=None, sparsity_dict=None, exclude=EXCLUDE, held=None, gradual=False,
                ramp=0.5, every=10, seed=0):
    """Prune `model` in place -> (FineGrainedPruner, plan {name: sparsity}, gradual schedule
    record or None): the one pruning path of prune.py and frontier.py.

    `held` masks (of a finetuned model pruned again: iterative pruning) only shrink. With
    gradual, only the weights that are zero already are masked now (a no-op on a dense
    model): finetuning raises the sparsity along the schedule."""
    held = held or {}
    plan = allocate(model, method, target, sparsity_dict, exclude, held)
    schedule = gradual_schedule(model, method, plan, target, ramp, every) if gradual else None
    pruner = FineGrainedPruner(model, schedule["initial"] if schedule else plan, masks=held,
                               random_seed=seed if method == "random" else None)
    return pruner, plan, schedule


def cubic_sparsity(initial, final, step, ramp_steps):
    """Zhu & Gupta's gradual schedule: s_t = s_f + (s_i - s_f)(1 - t/T)^3 for step t of
    a ramp of T steps; s_f from step T on."""
    done = min(1.0, step / ramp_steps)
    return final + (initial - final) * (1.0 - done) ** 3


def gradual_schedule(model, method, plan, target=None, ramp=0.5, every=10):
    """The record of a gradual schedule (plain values, for checkpoints): each tensor of
    `plan` ramps from its current sparsity to its planned one, or, for 'global', the
    threshold over them ramps to `target`, over `ramp` of the finetuning steps, with
    masks recomputed every `every` steps."""
    params = dict(model.named_parameters())
    initial = {n: get_sparsity(params[n]) for n in plan}
    if method == "global":
        now = {"all of them": global_start(initial, params)}
        goal = {"all of them": target}
    else:
        now, goal = initial, plan
    grows = [n for n in goal if goal[n] < now[n]]
    if method == "random":
        raise UserError("--method random is the one-shot control: drop --gradual")
    if grows:
        what = "the tensors pruned together are" if method == "global" else f"{grows[0]} is"
        raise UserError(f"gradual pruning only raises sparsity, but {what} already at "
                        f"{now[grows[0]]:.3f}, above the target {goal[grows[0]]}")
    if not 0 < ramp <= 1 or every < 1:
        raise UserError(f"--ramp must be in (0, 1] and --prune-every at least 1 step, got {ramp} and {every}")
    return {"method": method, "target": target, "final": dict(plan), "initial": initial,
            "ramp": ramp, "every": every}


def global_start(initial, params):
    """The sparsity of the tensors in `initial` ({name: sparsity}) taken together."""
    numel = {n: params[n].numel() for n in initial}
    return sum(initial[n] * numel[n] for n in numel) / sum(numel.values())


class GradualSchedule:
    """A gradual_schedule record bound to a run of `total_steps` optimizer steps."""

    def __init__(self, record, total_steps):
        self.record = record
        self.ramp_steps = max(1, round(record["ramp"] * total_steps))

    def due(self, step):
        """Whether the masks are recomputed after optimizer step `step` (1-based)."""
        return step <= self.ramp_steps and (step % self.record["every"] == 0 or step == self.ramp_steps)

    def sparsity_at(self, model, step, masks):
        """{name: sparsity} at step `step`: the final plan from step ramp_steps on."""
        r = self.record
        if r["method"] == "global":
            start = global_start(r["initial"], dict(model.named_parameters()))
            return global_allocation(model, list(r["final"]),
                                     cubic_sparsity(start, r["target"], step, self.ramp_steps), masks)
        return {n: cubic_sparsity(r["initial"][n], s, step, self.ramp_steps) for n, s in r["final"].items()}


class FineGrainedPruner:
    """Prunes the named tensors of a model and keeps their masks.

    `.masks` maps name -> bool mask (True = kept); `.apply(model, step)` zeros the pruned
    weights again after every optimizer step while finetuning. With a GradualSchedule,
    it also re-prunes to the schedule's sparsity when a step is due."""

    def __init__(self, model, sparsity_dict, schedule=None, masks=None, random_seed=None):
        check_sparsity_dict(sparsity_dict, get_prunable_names(model))
        self.schedule, self.random_seed = schedule, random_seed
        self.load_state_dict(masks or {})
        self.prune(model, sparsity_dict)

    @classmethod
    def from_masks(cls, masks, device=None, schedule=None):
        """A pruner that re-applies saved masks (from a checkpoint)."""
        pruner = cls.__new__(cls)
        pruner.load_state_dict(masks, device)
        pruner.schedule, pruner.random_seed = schedule, None
        return pruner

    @torch.no_grad()
    def prune(self, model, sparsity_dict):
        """Prune each named tensor to exactly round(sparsity * numel) zeros, by magnitude;
        weights this pruner pruned before stay pruned (also when that is more zeros)."""
        for i, (name, param) in enumerate(model.named_parameters()):
            if name in sparsity_dict:
                check_fraction(sparsity_dict[name])
                held = self.masks.get(name)
                num_zeros = round(sparsity_dict[name] * param.numel())
                if held is not None:
                    num_zeros = max(num_zeros, int((~held).sum()))
                generator = None if self.random_seed is None else torch.Generator().manual_seed(
                    self.random_seed * 1009 + i)  # a stream of its own per tensor
                self.masks[name] = magnitude_mask(importance(param, held, generator), num_zeros)
                self.sparsity[name] = num_zeros / param.numel()
                param.masked_fill_(~self.masks[name], 0.0)
        self.factors = None  # apply() rebuilds them from the new masks

    def state_dict(self):
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, masks, device=None):
        self.masks = {name: mask.to(device) for name, mask in masks.items()}
        self.sparsity = {name: get_sparsity(m.float()) for name, m in self.masks.items()}
        self.factors = None

    @torch.no_grad()
    def apply(self, model, step=None):
        if self.schedule is not None and step is not None and self.schedule.due(step):
            self.prune(model, self.schedule.sparsity_at(model, step, self.masks))
        params = dict(model.named_parameters())
        if self.factors is None:  # 1.0 kept, 0.0 pruned, laid out as each weight (channels_last)
            self.factors = [torch.zeros_like(params[name]).masked_fill_(mask, 1.0) for name, mask in self.masks.items()]
        if self.factors:  # one multi-tensor multiply instead of a masked_fill_ per tensor
            torch._foreach_mul_([params[name] for name in self.masks], self.factors)


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


def check_allocation_args(args, where="prune.py"):
    """The allocation flags fit together; `where` None: no pruning happens, so none is given."""
    if where is None:
        if args.method != "dict" or args.sparsity or args.target is not None:
            raise UserError("--method, --target and --sparsity choose how to prune: with finetune.py they go "
                            "with --gradual (or prune first with prune.py)")
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
                                      dense["checkpoint_bytes"], args.export_dtype))
    if args.export_dtype != "float32":
        metrics["export_test_acc"] = evaluate_export(export_path, loaders["test"], metrics["test_acc"])
    plot = plot_weights(model, plot_dir / "weights.png")
    out = make_checkpoint("pruned", model, metrics, args, source=ckpt, carry=carry, masks=pruner.state_dict(),
                          sparsity=plan)
    path = save_checkpoint(out, ckpt_dir / "pruned.pt")
    print(f"overall sparsity of the prunable weights {metrics['sparsity']:.2%} | saved {path} and {plot}")
    return out["metrics"]


if __name__ == "__main__":
    cli(main, get_args_parser())
