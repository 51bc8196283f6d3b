"""Shared helpers: device, seeding, autocast, evaluation, size/sparsity/MACs
accounting (named as in the MIT HAN Lab EfficientML course), atomic checkpoints
and the command-line wrapper that turns user errors into one line on stderr."""
import argparse
import errno
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import tempfile
import zipfile
import zlib
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


# ---------------------------------------------------------------- flags

def _number(kind, text, ok, allowed):
    """argparse type helper: parse `text` as `kind`, refuse it unless ok(value)."""
    try:
        value = kind(text)
        if not (math.isfinite(value) and ok(value)):
            raise ValueError
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    return value


def positive_int(text):
    return _number(int, text, lambda v: v >= 1, "an integer of 1 or more")


def nonnegative_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer of 0 or more")


def seed_int(text):
    return _number(int, text, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")


def positive_float(text):
    return _number(float, text, lambda v: v > 0, "a finite number above 0")


def nonnegative_float(text):
    return _number(float, text, lambda v: v >= 0, "a finite number of 0 or more")


MAX_WIDTH = 8  # already a 1.3-billion-parameter model


def width(text):
    """The channel multiplier, in (0, MAX_WIDTH]."""
    return _number(float, text, lambda v: 0 < v <= MAX_WIDTH, f"a number above 0 and at most {MAX_WIDTH}")


def fraction_in(low_open, high_open):
    """An argparse type for a fraction in [0, 1], either end open when asked."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text):
        return _number(float, text, lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1),
                       f"a fraction in {left}0, 1{right}")
    return parse


def is_fraction(value):
    """True for a real number (not a bool) in [0, 1], such as a sparsity."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


fraction = fraction_in(False, False)  # a number in [0, 1], such as a sparsity


def comma_list(parse, what):
    """An argparse type: comma-separated values of `parse`'s kind ('0.9,0.5,0.9' ->
    (0.5, 0.9)), sorted, each once."""
    def parse_list(text):
        try:
            values = tuple(parse(v.strip()) for v in text.split(",") if v.strip())
        except argparse.ArgumentTypeError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        return tuple(sorted(set(values)))
    return parse_list


fraction_list = comma_list(fraction, "fractions in [0, 1]")
seed_list = comma_list(seed_int, "seeds (integers from 0)")


def int_in(low, high):
    """An argparse type for an integer in [low, high]."""
    def parse(text):
        return _number(int, text, lambda v: low <= v <= high, f"an integer from {low} to {high}")
    return parse


def plural(count, noun):
    """'1 epoch', '3 epochs'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# ---------------------------------------------------------------- device

def get_device(name="auto"):
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
        torch.backends.cudnn.benchmark = True
    device = torch.device(name)
    compute_dtype(device)  # a bad PRUNING_AUTOCAST fails now, in one line, not mid-run
    return device


def resolve_jobs(jobs, auto):
    """--jobs N: processes at once, 0 meaning `auto`. Each needs a CPU core of its own (on
    CUDA too, to drive the GPU): more is refused rather than left to thrash."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs > cores:
        raise UserError(f"--jobs {jobs} is more than the {plural(cores, 'CPU core')} this process may use: "
                        f"pass at most {cores}")
    return jobs or max(1, min(auto, cores))


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


# ---------------------------------------------------------------- files

def nearest_existing(path):
    """`path` itself or its nearest ancestor that exists."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists() or p == p.parent)


HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # a folder may be shared between machines


def temp_name(name, tag=f"{HOST}-4194304-12345678"):
    """The name atomic_write gives its file before the rename; tag: this machine's HOST, the
    writer's process id and 8 random hex digits (the default is the longest, for length checks)."""
    return f".{name}.{tag}.tmp"


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d{1,7})-[0-9a-f]{8}\.tmp")


def process_alive(pid):
    if pid <= 0:  # os.kill(0, 0) would ask about our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        pass
    return True


def remove_stale_temps(folder, names):
    """Delete the temporary files that a killed atomic_write on this machine left for any of
    `names` in `folder` (a live writer's file, or another machine's, is kept) -> the names removed."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")) if names and Path(folder).is_dir() else ():
        match = TEMP_NAME.fullmatch(path.name)
        if match and match["name"] in names and match["host"] == HOST and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        print(f"removed {plural(len(removed), 'temporary file')} that a killed save left in {folder}/: "
              f"{', '.join(removed)}")
    return removed


def ensure_writable(folder, outputs=()):
    """Prove `folder` can be written, before any long work starts, without creating it: a
    run that fails leaves no empty folder behind (files make their folders when written).
    Each of `outputs`, file names in it, must be a name the file system takes and no folder."""
    folder = Path(folder)
    try:
        existing = nearest_existing(folder)
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}/ ({e.strerror}): choose another folder with "
                        "--checkpoint-dir / --plot-dir / --out") from None
    for name in outputs:
        if len(temp_name(name).encode()) > 255:
            raise UserError(f"{folder / name}: the file name is too long, choose a shorter one")
        if (folder / name).is_dir():
            raise UserError(f"{folder / name} is a folder, but this run writes a file there: move it away")
    remove_stale_temps(folder, set(outputs))
    return folder


def write_failed(path, error):
    """The one line for an OSError met while writing `path`: what happened and what to do."""
    reason, action = {errno.ENOSPC: ("the disk is full", "free some space"),
                      errno.EDQUOT: ("the disk quota is used up", "free some space"),
                      errno.EROFS: ("the file system is read-only", "make it writable"),
                      errno.EACCES: ("permission denied", "make the folder writable"),
                      errno.EPERM: ("permission denied", "make the folder writable")}.get(
        error.errno, (error.strerror or str(error), "check the disk"))
    return (f"cannot write {path} ({reason}): {action}, or choose another --checkpoint-dir / --plot-dir / --out; "
            f"the previous {path.name}, if any, is unchanged")


def atomic_write(path, write):
    """Call write(binary file) on a new file beside `path`, then os.replace it into place:
    a crash or Ctrl-C mid-write leaves the previous file intact. The file gets the
    permissions the umask gives any new file (mkstemp's would be 0600)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name, f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}"))
    try:
        ensure_writable(path.parent).mkdir(parents=True, exist_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a lost permission, an I/O error
            raise UserError(write_failed(path, e)) from None
        raise
    return path


def save_checkpoint(obj, path):
    """torch.save, written atomically (`atomic_write`). The bytes are made in memory first:
    torch.save meeting a full disk says only "unexpected pos", a plain write says ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def write_json(obj, path):
    """JSON with an indent of 2, written atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def file_sha256(path):
    """Hex SHA-256 of a file's bytes: which checkpoint a derived file was made from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_json(path, what, fix):
    """A JSON file -> its value; a missing, unreadable or invalid file is one UserError
    naming `what` it should be and how to `fix` it."""
    path = Path(path)
    try:
        text = path.read_text()
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not {what}: {fix}") from None
    except FileNotFoundError:
        raise UserError(f"{path} not found ({what}): {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({what}): {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        empty = "is empty" if not text.strip() else f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        raise UserError(f"{path} {empty}; it should be {what}: {fix}") from None


# What makes each stage's checkpoint, as advice to a user who lacks one.
MADE_BY = {"dense": "run `python train.py` first", "pruned": "run `python prune.py` first",
           "finetuned": "run `python finetune.py` first", "quantized": "run `python quantize.py` first",
           "export": "run `python finetune.py` or `python quantize.py` first",
           "resume": "start the run without --resume"}
STAGES = ("dense", "pruned", "finetuned", "quantized")  # the chain, in order


def describe_load_error(path, error):
    """Why torch.load could not read `path`, in words."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04":
        return "it is not a file written by torch.save (no zip archive at its start)"
    text = str(error)
    if "Weights only load failed" in text:
        return "it holds objects other than tensors and plain values, which weights_only loading refuses"
    return "it is truncated or corrupted (its zip archive cannot be read): write it again"


def damage(path):
    """What is wrong with a torch.save zip, in words, or None when every entry's bytes match
    the CRC-32 torch.save wrote beside them (torch.load never checks it). A file that is no
    zip at all, or cannot be opened, is left to torch.load's error, which says which."""
    try:
        with zipfile.ZipFile(path) as archive:
            folder = next((i.filename for i in archive.infolist() if i.external_attr & 0x10), None)
            if folder:  # torch.load would read that entry as an empty folder: garbage weights
                return f"its zip directory marks the part {folder!r} as a folder"
            bad = archive.testzip()
            return bad and f"its part {bad!r} fails the CRC-32 checksum written with it"
    except (zipfile.BadZipFile, PermissionError):
        return None
    except (zlib.error, NotImplementedError, RuntimeError, OSError, EOFError, ValueError):
        # A flipped bit in the zip's directory: an entry marked compressed or encrypted (torch.save
        # stores all plain), or an offset out of range. torch.load could read such a file wrong.
        return "its zip directory cannot be read"


def load_checkpoint(path, stages=("dense", "pruned", "finetuned")):
    """Load a checkpoint dict with weights_only=True (it cannot run code), checking
    that its stage is one of `stages`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint: point --checkpoint at a .pt file")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file: point --checkpoint at a .pt file")
    if not path.is_file():
        raise UserError(f"{path} not found: {MADE_BY[stages[0]]}, or point --checkpoint at an existing file")
    damaged = damage(path)
    if damaged:
        raise UserError(f"{path} is damaged: {damaged} (a flipped bit, a bad disk or copy); restore a good copy "
                        "or rerun the stage that wrote it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint: {describe_load_error(path, e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "stage" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repo (no model/stage entries)")
    if ckpt["stage"] not in stages:
        wanted = " or ".join(repr(s) for s in stages)
        raise UserError(f"{path} is a {ckpt['stage']!r} checkpoint, but this script needs "
                        f"{wanted}: {MADE_BY[stages[0]]}")
    metrics = ckpt.get("metrics")
    dense = metrics.get("dense") if isinstance(metrics, dict) else None
    current = (isinstance(metrics, dict) and {"val_acc", "test_acc", "size_bits", "macs"} <= set(metrics)
               and (ckpt["stage"] == "dense" or isinstance(dense, dict) and "checkpoint_bytes" in dense))
    if ckpt["stage"] in STAGES and not current:
        raise UserError(f"{path} was written by an older version of this repo (its metrics lack "
                        "this version's fields): run the chain again from train.py")
    return ckpt


def earlier_metrics(ckpt, **extra):
    """What a later stage carries forward of `ckpt`: {stage: that stage's own figures} for
    `ckpt`'s stage (with `extra` added) and each stage before it."""
    metrics = ckpt.get("metrics", {})
    own = {k: v for k, v in metrics.items() if k not in STAGES}
    return {**{k: v for k, v in metrics.items() if k in STAGES}, ckpt["stage"]: {**own, **extra}}


def make_checkpoint(stage, model, metrics, args, source=None, carry=None, config=None, split=None,
                    history=None, **fields):
    """The one way a checkpoint dict is built (docs/checkpoints.md): `metrics` describe the
    model saved here; each earlier stage's figures come from `source` (the checkpoint this
    one was made from) under that stage's name, the source's own with `carry` added.
    config, split and history default to the source's; `fields` are stage-specific
    entries (masks, sparsity, schedule, bits)."""
    earlier = earlier_metrics(source, **(carry or {})) if source is not None else {}
    return {"stage": stage, "model": model.state_dict(),
            "config": config if config is not None else source["config"],
            "metrics": {**metrics, **earlier},
            "history": history if history is not None else source["history"],
            "args": run_args(args), "split": split if split is not None else source["split"], **fields}


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots are files, no window is opened."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def short_name(name):
    """'backbone.conv1.weight' -> 'conv1', for plot labels."""
    return name.removeprefix("backbone.").removesuffix(".weight")


def save_figure(fig, path):
    """Save a matplotlib figure atomically (tight, 120 dpi; the format from the suffix) and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=120,
                                                        bbox_inches="tight"))
    finally:
        plt.close(fig)


def cli(main, parser, argv=None):
    """Run `main(parser.parse_args(argv))`; a UserError ends as one line on stderr and
    a non-zero exit, never as a traceback; so does a flag that fails its parse-time check."""
    def one_line(message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line  # argparse's own would print the whole usage text first
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the run did not finish: run it again (an output it had already replaced may not "
              "match the others until then)", file=sys.stderr)
        sys.exit(Interrupted.exit_code)
    except UserError as e:
        prefix = "\ninterrupted" if isinstance(e, Interrupted) else "error"
        print(f"{prefix}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # a read or write that no check could foresee: an I/O error, a vanished file
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def terminate_as_interrupt(signum, frame):
    """SIGTERM (a batch scheduler's or `timeout`'s stop, a preemption) ends a run as Ctrl-C
    does, with its exit code 130: each training loop names its last saved state, and --resume
    goes on from it. A second SIGTERM ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def add_common_args(parser, plots=False, checkpoints=True):
    """The flags every script shares: where data, checkpoints and plots live, and the device."""
    add = parser.add_argument
    add("--data-dir", default=DEFAULT_DATA_DIR,
        help="CIFAR-10 folder: cifar-10-batches-py, train/<class>/ image folders, or empty "
             "to download into (default: %(default)s)")
    if checkpoints:
        add("--checkpoint-dir", default="checkpoints",
            help="where checkpoints are read and written (default: %(default)s)")
    if plots:
        add("--plot-dir", default="plots", help="where plots go (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    add("--eval-views", type=int_in(1, TTA_VIEWS), default=TTA_VIEWS, metavar="N",
        help="test-time augmentation views per evaluated image, 1 to 4: one forward pass each, so "
             "at 4 evaluating an image costs more than a training step on it (3 passes); 1 makes "
             "quick tries quick. Compare accuracies only at equal views (default: %(default)s)")
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
