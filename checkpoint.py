"""Files: written atomically (a crash leaves the previous version), read back with one
clear line when they are missing, damaged or from another version, and the one
checkpoint schema (docs/checkpoints.md)."""
import errno
import hashlib
import io
import json
import os
import re
import secrets
import socket
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch

from cli import run_args
from utils import UserError, plural


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
CHAIN = ("dense", "pruned", "finetuned", "quantized")  # the chain, in order


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
    if ckpt["stage"] == "pruned" and ckpt.get("schedule"):
        raise UserError(f"{path} is a gradual pruning plan from an older version (its model is not pruned yet): "
                        "gradual pruning now happens in `python finetune.py --gradual`; run that on the dense model")
    metrics = ckpt.get("metrics")
    dense = metrics.get("dense") if isinstance(metrics, dict) else None
    current = (isinstance(metrics, dict) and {"val_acc", "test_acc", "size_bits", "macs"} <= set(metrics)
               and (ckpt["stage"] == "dense" or isinstance(dense, dict) and "checkpoint_bytes" in dense))
    if ckpt["stage"] in CHAIN and not current:
        raise UserError(f"{path} was written by an older version of this repo (its metrics lack "
                        "this version's fields): run the chain again from train.py")
    return ckpt


def earlier_metrics(ckpt, **extra):
    """What a later stage carries forward of `ckpt`: {stage: that stage's own figures} for
    `ckpt`'s stage (with `extra` added) and each stage before it."""
    metrics = ckpt.get("metrics", {})
    own = {k: v for k, v in metrics.items() if k not in CHAIN}
    return {**{k: v for k, v in metrics.items() if k in CHAIN}, ckpt["stage"]: {**own, **extra}}


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

