"""The pruning rules, as in the MIT HAN Lab course (`fine_grained_prune`, `FineGrainedPruner`):
which weights go (magnitude, or random for the control), how a target is spread over the
layers (a dict, uniform, one global threshold), and when (at once, or along Zhu & Gupta's
cubic schedule). Each rule maps weights and the masks held so far to new masks (True = kept);
a pruned weight never grows back. prune.py, finetune.py and frontier.py all call these."""
import torch

from cli import is_fraction
from utils import UserError, get_sparsity


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
    record or None): the one pruning path of prune.py, finetune.py --gradual and frontier.py.

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
