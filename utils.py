"""Shared helpers: device, seeding, autocast, evaluation with test-time augmentation, and
size / sparsity / MACs accounting, named as in the MIT HAN Lab EfficientML course."""
import functools
import os
import random
import re
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

MiB = 2**20  # bytes; get_model_size counts bits, as in the course: divide by 8 first


class UserError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""
    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C, reported with where the last good state was saved."""
    exit_code = 130


def plural(count, noun):
    """'1 epoch', '3 epochs'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# ---------------------------------------------------------------- device

def get_device(name="auto", cudnn_benchmark=True):
    """'auto' | 'cpu' | 'cuda' -> torch.device; 'cuda' without CUDA is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no CUDA GPU "
                        "(use --device cpu or --device auto)")
    if name.startswith("cuda"):
        # Batch shapes repeat from step to step, so cuDNN's one-off timing of its conv
        # algorithms pays for itself within the first epoch.
        torch.backends.cudnn.benchmark = cudnn_benchmark
    device = torch.device(name)
    compute_dtype(device)  # a bad PRUNING_AUTOCAST fails now, in one line, not mid-run
    return device


def set_seed(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AUTOCAST_ENV = "PRUNING_AUTOCAST"  # auto | fp32 | bf16: what the training and evaluation steps compute in


@functools.cache
def native_bf16_cpu():
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX) and oneDNN may use it. oneDNN
    also runs bf16 on plain AVX-512 by converting to fp32, but there the width-0.25 training
    step ran 2.4x slower than fp32 (bench.py on a Xeon Ice Lake)."""
    has = [getattr(torch.cpu, f"_is_{isa}_supported", lambda: False) for isa in ("avx512_bf16", "amx_tile")]
    return torch.ops.mkldnn._is_mkldnn_bf16_supported() and any(f() for f in has)  # torch < 2.3: fp32


def compute_dtype(device):
    """'bf16' on a GPU or a CPU with native bf16, else 'fp32'; the environment
    variable PRUNING_AUTOCAST=fp32 (or bf16) overrides the choice."""
    choice = os.environ.get(AUTOCAST_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "fp32", "bf16"):
        raise UserError(f"{AUTOCAST_ENV}={choice!r} is not a choice: use auto, fp32 or bf16")
    if choice != "auto":
        return choice
    if device.type == "cuda":  # Ampere (8.x) and later compute bf16; older GPUs only emulate it
        return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"


def autocast(device):
    """bf16 autocast where compute_dtype(device) says bf16; fp32 (no autocast) elsewhere."""
    if compute_dtype(device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def translate(x, dy, dx):
    """(N, C, H, W) with its content moved dy pixels down and dx right (|dy|, |dx| <= 1);
    the uncovered edge is filled by reflection."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    moved = padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return moved.contiguous(memory_format=torch.channels_last)  # the layout the convs run fastest in


# Test-time augmentation: the image, its mirror, the image moved one pixel down-right, and
# the image moved one pixel up-left then mirrored.
VIEWS = (lambda x: x, lambda x: x.flip(3), lambda x: translate(x, 1, 1), lambda x: translate(x, -1, -1).flip(3))
TTA_VIEWS = len(VIEWS)  # every accuracy the README gives uses all four


def tta_views(x, views=TTA_VIEWS):
    """The first `views` (1 to 4) test-time augmentation views of an (N, 3, H, W) batch."""
    return tuple(view(x) for view in VIEWS[:views])


def tta_label(views=TTA_VIEWS):
    """How an accuracy measured with `views` views is labelled: '4-view TTA', '1 view (no TTA)'."""
    return "1 view (no TTA)" if views == 1 else f"{views}-view TTA"


TTA = tta_label()


@torch.no_grad()
def predict(model, x, views=TTA_VIEWS):
    """(N, 3, H, W) -> (N, classes) logits summed over the TTA views."""
    return sum(model(view) for view in tta_views(x, views))


@torch.no_grad()
def evaluate(model, loader):
    """Top-1 accuracy in % over the loader, with its `views` test-time augmentation views."""
    if len(loader) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    with autocast(loader.device):
        for x, y in loader:
            correct += (predict(model, x, loader.views).argmax(1) == y).sum()
    model.train(was_training)
    return 100.0 * correct.item() / loader.num_samples


# ---------------------------------------------------------------- accounting

def get_sparsity(tensor):
    """Fraction of zeros in a tensor, in [0, 1]."""
    return 1.0 - float(tensor.count_nonzero()) / max(1, tensor.numel())


def get_model_sparsity(model):
    """Fraction of zeros over all of the model's parameters."""
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return 1.0 - nonzero / max(1, get_num_parameters(model))


def get_num_parameters(model, count_nonzero_only=False):
    """Number of parameters; with count_nonzero_only, pruned (zero) weights of the
    prunable tensors (dim > 1) are left out, while BatchNorm and bias vectors count
    in full: a sparse format stores them whole."""
    total = 0
    for p in model.parameters():
        total += int(p.count_nonzero()) if count_nonzero_only and p.dim() > 1 else p.numel()
    return total


def get_model_size(model, data_width=32, count_nonzero_only=False):
    """Model size in bits, as in the course; / 8 / MiB gives MiB."""
    return get_num_parameters(model, count_nonzero_only) * data_width


def get_model_macs(model, inputs):
    """Multiply-accumulates of one forward pass on `inputs`, counted by torchprofile."""
    from torchprofile import profile_macs

    was_training = model.training
    model.eval()
    try:
        return profile_macs(model, inputs)
    finally:
        model.train(was_training)


def get_prunable_sparsity(model):
    """Fraction of zeros over all prunable tensors (dim > 1) together."""
    prunable = [p for p in model.parameters() if p.dim() > 1]
    return 1.0 - sum(int(p.count_nonzero()) for p in prunable) / sum(p.numel() for p in prunable)


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


def measure(model, sparse=True):
    """The figures every checkpoint gives of its own model: the sparsity of the prunable
    weights, the computed size in bits (32 a stored parameter) and the MACs of one 32x32
    image. A sparse model stores and multiplies only its nonzero weights, a dense one all."""
    inputs = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
    return {"sparsity": get_prunable_sparsity(model),
            "size_bits": get_model_size(model, count_nonzero_only=sparse),
            "macs": get_sparse_macs(model, inputs) if sparse else get_model_macs(model, inputs)}


def size_line(what, num_bytes, dense_bytes):
    """The one way a size is printed: '<what> 0.573 MiB, 8.48x smaller than dense (4.86 MiB)'."""
    return (f"{what} {num_bytes / MiB:.3f} MiB, {dense_bytes / num_bytes:.2f}x smaller than dense "
            f"({dense_bytes / MiB:.2f} MiB)")


def progress(iterable=None, **kwargs):
    """A tqdm bar that stays off when stderr is not a terminal (a log file gets the
    per-epoch lines, not thousands of carriage-return updates)."""
    from tqdm import tqdm

    return tqdm(iterable, **{"disable": None, "dynamic_ncols": True, **kwargs})


def format_table(rows, headers):
    """A plain-text table: rows of values under headers, columns padded."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_summary(model, device):
    """One line: parameters, MACs of one 32x32 image, and fp32 size in MiB."""
    macs = get_model_macs(model, torch.zeros(1, 3, 32, 32, device=device))
    return (f"parameters {get_num_parameters(model):,} | MACs {macs / 1e6:,.1f} M per image | "
            f"size {get_model_size(model) / 8 / MiB:.2f} MiB (fp32)")


def short_name(name):
    """'backbone.conv1.weight' -> 'conv1', for plot labels."""
    return name.removeprefix("backbone.").removesuffix(".weight")
