"""Compressed export of a pruned model: nonzero values plus an entropy-coded mask.

A pruned tensor is stored as its kept values (fp32, or fp16 on request) and the
positions of its minority mask symbol, coded as Golomb-Rice gaps: for a mask with
density p this costs close to numel * H(p) bits, where a plain bitmask costs
numel bits (about 2x more at 90% sparsity). The quotient and remainder streams are
kept apart so that both code and decode are a few vectorized numpy calls.
With shared=True (a model whose kept weights take few distinct values, as after
quantize.py), a tensor's kept values are its codebook (the distinct values, fp32) and
each kept weight's index into it, ANS-coded (constriction) with the tensor's own index
histogram: close to nonzeros * H(indices) bits.
Every other tensor of the state dict is stored as it is.

    from export import load_sparse_export
    model = load_sparse_export("checkpoints/finetuned.sparse.pt")  # an ordinary dense nn.Module

`python bench.py --export --width 1.0` measures the export against its bound on a
randomly initialised model pruned with the real code (no training needed).
"""
import math
from pathlib import Path

import constriction
import numpy as np
import torch

from model import build_model
from utils import UserError, evaluate, get_model_size, load_checkpoint, save_checkpoint

FORMAT = "fine-grained-sparse/2"


def rice_encode(positions):
    """Strictly increasing int64 positions -> (k, unary bits, remainder bits) of their gaps."""
    gaps = np.diff(positions, prepend=-1) - 1
    # bits(k) = sum(gaps >> k) + n * (1 + k); pick the cheapest k outright
    k = min(range(33), key=lambda k: int((gaps >> k).sum()) + len(gaps) * (1 + k))
    quotients, remainders = gaps >> k, gaps & ((1 << k) - 1)
    unary = np.ones(int(quotients.sum()) + len(gaps), dtype=bool)  # q ones, then a zero
    unary[np.cumsum(quotients + 1) - 1] = False
    shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
    remainder_bits = ((remainders[:, None] >> shifts) & 1).astype(bool).ravel()
    return k, unary, remainder_bits


def rice_decode(k, count, unary, remainder_bits):
    """Inverse of rice_encode: -> the int64 positions."""
    ends = np.flatnonzero(~unary)[:count]
    quotients = np.diff(ends, prepend=-1) - 1
    weights = 1 << np.arange(k - 1, -1, -1, dtype=np.int64)
    remainders = remainder_bits[:count * k].reshape(count, k).astype(np.int64) @ weights
    return np.cumsum(((quotients << k) | remainders) + 1) - 1


def pack_bits(bits):
    return np.packbits(bits)


def unpack_bits(packed, length):
    return np.unpackbits(packed)[:length].astype(bool)


def ans_encode(symbols, counts):
    """int32 symbols in [0, len(counts)) -> uint32 words, ANS-coded with the histogram `counts`."""
    coder = constriction.stream.stack.AnsCoder()
    if len(symbols):
        coder.encode_reverse(symbols, constriction.stream.model.Categorical(counts / counts.sum(), perfect=False))
    return coder.get_compressed()


def ans_decode(words, counts):
    """Inverse of ans_encode: -> counts.sum() int32 symbols."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int32)
    model = constriction.stream.model.Categorical(counts / total, perfect=False)
    return constriction.stream.stack.AnsCoder(words).decode(model, total)


def as_bytes(*arrays):
    """numpy arrays -> one uint8 tensor of their bytes, and the byte length of each.
    One stored tensor per model tensor: each costs the container (zip + pickle) a few
    hundred bytes, as much as a small layer's whole mask."""
    raw = [np.ascontiguousarray(a).view(np.uint8).ravel() for a in arrays]
    return torch.from_numpy(np.concatenate(raw) if raw else np.zeros(0, np.uint8)), [len(r) for r in raw]


def split_bytes(data, sizes, dtypes):
    """Inverse of as_bytes: -> the numpy arrays, viewed as `dtypes`."""
    ends = np.cumsum(sizes)
    if ends[-1] != len(data):
        raise ValueError(f"{len(data)} bytes where the header says {ends[-1]}")
    raw = data.numpy()
    return [raw[e - n:e].view(t) for n, e, t in zip(sizes, ends, dtypes)]


def encode_tensor(tensor, mask, dtype, shared=False):
    """A pruned tensor and its bool mask (True = kept) -> a dict of ints and one byte tensor."""
    flat_mask = mask.flatten().numpy()
    minority = bool(flat_mask.mean() <= 0.5)  # code where the rarer symbol sits
    positions = np.flatnonzero(flat_mask == minority)
    k, unary, remainder_bits = rice_encode(positions)
    kept = tensor.flatten()[mask.flatten()]
    if shared:
        codebook, indices = torch.unique(kept, return_inverse=True)
        counts = np.bincount(indices.numpy(), minlength=len(codebook))
        values = [codebook.float().numpy(), counts.astype(np.int64),
                  ans_encode(indices.numpy().astype(np.int32), counts.astype(np.float64))]
    else:
        values = [kept.to(dtype).view(torch.int16 if dtype == torch.float16 else torch.int32).numpy()]
    data, sizes = as_bytes(pack_bits(unary), pack_bits(remainder_bits), *values)
    return {"minority": minority, "count": len(positions), "k": k, "unary_bits": len(unary),
            "shared": shared, "dtype": str(dtype).removeprefix("torch."), "sizes": sizes, "data": data}


def decode_tensor(entry, shape):
    """Inverse of encode_tensor, for a tensor of `shape`: -> (float32 tensor, bool mask)."""
    numel = math.prod(shape)
    value_dtypes = [np.float32, np.int64, np.uint32] if entry["shared"] else [
        np.float16 if entry["dtype"] == "float16" else np.float32]
    unary, remainder, *values = split_bytes(entry["data"], entry["sizes"], [np.uint8, np.uint8, *value_dtypes])
    positions = rice_decode(entry["k"], entry["count"], unpack_bits(unary, entry["unary_bits"]),
                            unpack_bits(remainder, entry["count"] * entry["k"]))
    mask = np.full(numel, not entry["minority"])
    mask[positions] = entry["minority"]
    mask = torch.from_numpy(mask)
    tensor = torch.zeros(numel, dtype=torch.float32)
    if entry["shared"]:
        codebook, counts, words = values
        indices = ans_decode(words, counts.astype(np.float64)).astype(np.int64)
        tensor[mask] = torch.from_numpy(codebook.copy())[torch.from_numpy(indices)]
    else:
        tensor[mask] = torch.from_numpy(values[0].astype(np.float32))
    return tensor.view(shape), mask.view(shape)


def save_sparse_export(state_dict, masks, config, path, dtype=torch.float32, shared=False):
    """Write the compressed export of a pruned state dict; returns its bytes on disk.
    shared: store each masked tensor's kept values as a codebook plus coded indices.
    Names, shapes and dtypes are not stored: the loader takes them from the model
    that `config` builds."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    sparse = {name: encode_tensor(state[name].float(), masks[name].cpu(), dtype, shared) for name in masks}
    dense, _ = as_bytes(*(v.contiguous().numpy() for name, v in state.items() if name not in masks))
    save_checkpoint({"stage": "export", "model": {}, "format": FORMAT, "config": config,
                     "sparse": sparse, "dense": dense}, path)
    return Path(path).stat().st_size


def load_sparse_export(path):
    """The compressed export -> an ordinary dense model (eval mode, fp32, CPU)."""
    ckpt = load_checkpoint(path, stages=("export",))
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} export")
    try:
        model = build_model(**ckpt["config"])
        template = model.state_dict()
        state = {name: decode_tensor(entry, template[name].shape)[0] for name, entry in ckpt["sparse"].items()}
        rest = {name: t for name, t in template.items() if name not in state}
        arrays = split_bytes(ckpt["dense"], [t.numel() * t.element_size() for t in rest.values()],
                             [t.numpy().dtype for t in rest.values()])
        state.update({name: torch.from_numpy(a.copy()).view(t.shape) for (name, t), a in zip(rest.items(), arrays)})
        model.load_state_dict(state)
    except (KeyError, ValueError, IndexError, RuntimeError, TypeError, AssertionError, OverflowError) as e:
        raise UserError(f"{path} is a corrupted sparse export ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return model.eval()


def binary_entropy(p):
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy(counts):
    """Empirical entropy in bits per symbol of a histogram."""
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum()) if len(p) else 0.0


def information_bound(model, masks, value_bits=32, shared=False):
    """Bits no lossless format can beat (with iid masks and indices): numel x H(density)
    per mask, plus the kept values: x value_bits each, or, shared, nonzeros x H(index
    histogram) plus the fp32 codebook; plus every other tensor of the state dict
    (BatchNorm's statistics too) at its own width."""
    bits = 0.0
    for name, p in model.state_dict().items():
        if name not in masks:
            bits += p.numel() * p.element_size() * 8
            continue
        mask = masks[name].to(p.device)
        bits += p.numel() * binary_entropy(float(mask.float().mean()))
        kept = p.detach()[mask]
        if shared:
            _, counts = torch.unique(kept, return_counts=True)
            bits += len(kept) * entropy(counts) + len(counts) * 32
        else:
            bits += len(kept) * value_bits
    return bits


def export_with_report(model, masks, config, path, dense_bytes, dtype="float32", shared=False):
    """Write the export and print the four size figures; returns them in bytes."""
    export_bytes = save_sparse_export(model.state_dict(), masks, config, path, getattr(torch, dtype), shared)
    value_bits = torch.finfo(getattr(torch, dtype)).bits
    figures = {"dense_checkpoint_bytes": dense_bytes, "export_bytes": export_bytes,
               "sparse_size_bytes": get_model_size(model, count_nonzero_only=True) / 8,
               "bound_bytes": information_bound(model, masks, value_bits, shared) / 8}
    values = "codebook + H(indices)" if shared else f"nonzeros x {value_bits} bits"
    mib = 2 ** 20
    print(f"On disk: dense checkpoint {dense_bytes / mib:.2f} MiB -> {Path(path).name} "
          f"{export_bytes / mib:.3f} MiB ({dense_bytes / export_bytes:.2f}x smaller, "
          f"{'shared' if shared else dtype} values)\n"
          f"Computed: sparse size {figures['sparse_size_bytes'] / mib:.2f} MiB (nonzeros x 32 bits) | "
          f"information bound {figures['bound_bytes'] / mib:.3f} MiB ({values} "
          f"+ mask entropy); the export is {export_bytes / figures['bound_bytes']:.3f}x the bound")
    return figures


def add_export_args(parser):
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "float16"),
                        help="precision of the kept values in the compressed export; float16 "
                             "halves it and reports the accuracy it costs (default: %(default)s)")


def evaluate_export(path, loader, reference_acc):
    """Test accuracy of the model loaded back from a (reduced-precision) export, printed
    beside the full-precision one."""
    model = load_sparse_export(path).to(loader.device, memory_format=torch.channels_last)
    acc = evaluate(model, loader)
    print(f"test accuracy: {reference_acc:.2f}% in fp32, {acc:.2f}% from {path.name} "
          f"({acc - reference_acc:+.2f} points)")
    return acc
