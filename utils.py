"""Shared helpers: device, seeding, autocast, evaluation, size/sparsity/MACs
accounting (named as in the MIT HAN Lab EfficientML course), atomic checkpoints
and the command-line wrapper that turns user errors into one line on stderr."""
import json
import os
import random
import secrets
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Byte = 8
KiB = 1024 * Byte
MiB = 1024 * KiB  # in bits, as in the course: get_model_size(model) / MiB
DEFAULT_DATA_DIR = "data/cifar10"


class UserError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""
    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C, reported with where the last good state was saved."""
    exit_code = 130


# ---------------------------------------------------------------- device

def get_device(name="auto"):
    """'auto' | 'cpu' | 'cuda' -> torch.device; 'cuda' without CUDA is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no CUDA GPU "
                        "(use --device cpu or --device auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda"):
        # Batch shapes repeat from step to step, so cuDNN's one-off timing of its conv
        # algorithms pays for itself within the first epoch.
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def set_seed(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device):
    """bf16 autocast on a CUDA GPU or a CPU with native bf16; fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def translate(x, dy, dx):
    """(N, C, H, W) with its content moved dy pixels down and dx right (|dy|, |dx| <= 1);
    the uncovered edge is filled by reflection."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    moved = padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return moved.contiguous(memory_format=torch.channels_last)  # the layout the convs run fastest in


def tta_views(x):
    """Test-time augmentation, 4 views of an (N, 3, H, W) batch: the image, its mirror,
    the image moved one pixel down-right, and the image moved one pixel up-left then mirrored."""
    return x, x.flip(3), translate(x, 1, 1), translate(x, -1, -1).flip(3)


TTA = f"{len(tta_views(torch.zeros(1, 3, 2, 2)))}-view TTA"  # how every accuracy is labelled


@torch.no_grad()
def predict(model, x):
    """(N, 3, H, W) -> (N, classes) logits summed over the TTA views."""
    return sum(model(view) for view in tta_views(x))


@torch.no_grad()
def evaluate(model, loader):
    """Top-1 accuracy in % over the loader, with test-time augmentation (`tta_views`)."""
    if len(loader) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    with autocast(loader.device):
        for x, y in loader:
            correct += (predict(model, x).argmax(1) == y).sum()
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
    """Model size in bits; divide by MiB for MiB."""
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


# ---------------------------------------------------------------- files

def ensure_writable(folder):
    """Create `folder` and prove it can be written, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}/ ({e.strerror}): choose another folder "
                        "with --checkpoint-dir / --plot-dir") from None
    return folder


def atomic_write(path, write):
    """Call write(binary file) on a new file beside `path`, then os.replace it into place:
    a crash or Ctrl-C mid-write leaves the previous file intact. The file gets the
    permissions the umask gives any new file (mkstemp's would be 0600)."""
    path = Path(path)
    ensure_writable(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(obj, path):
    """torch.save, written atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    """JSON with an indent of 2, written atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


MADE_BY = {"dense": "train.py", "pruned": "prune.py", "finetuned": "finetune.py"}


def load_checkpoint(path, stages=("dense", "pruned", "finetuned")):
    """Load a checkpoint dict with weights_only=True (it cannot run code), checking
    that its stage is one of `stages`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run `python {MADE_BY[stages[0]]}` first, "
                        "or point --checkpoint at an existing file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupted, or holding "
                        f"code that weights_only loading refuses): {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "stage" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repo (no model/stage entries)")
    if ckpt["stage"] not in stages:
        wanted = " or ".join(repr(s) for s in stages)
        raise UserError(f"{path} is a {ckpt['stage']!r} checkpoint, but this script needs "
                        f"{wanted}: run `python {MADE_BY[stages[0]]}` first")
    return ckpt


def save_figure(fig, path):
    """Save a matplotlib figure atomically-enough (tight, 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    ensure_writable(path.parent)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def cli(main, parser, argv=None):
    """Run `main(parser.parse_args(argv))`; a UserError ends as one line on stderr and
    a non-zero exit, never as a traceback."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was saved from this run", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except UserError as e:
        prefix = "\ninterrupted" if isinstance(e, Interrupted) else "error"
        print(f"{prefix}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def add_common_args(parser, plots=False):
    """The flags every script shares: where data, checkpoints and plots live, and the device."""
    add = parser.add_argument
    add("--data-dir", default=DEFAULT_DATA_DIR,
        help="CIFAR-10 folder: cifar-10-batches-py, train/<class>/ image folders, or empty "
             "to download into (default: %(default)s)")
    add("--checkpoint-dir", default="checkpoints",
        help="where checkpoints are read and written (default: %(default)s)")
    if plots:
        add("--plot-dir", default="plots", help="where plots go (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return parser


def run_args(args):
    """The flags of a run, as a plain dict for checkpoints."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


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
            f"size {get_model_size(model) / MiB:.2f} MiB (fp32)")
