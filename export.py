"""Compressed export of a pruned model: nonzero values plus an entropy-coded mask.

A pruned tensor is stored as its kept values (fp32, or fp16 on request) and the
positions of its minority mask symbol, coded as Golomb-Rice gaps: for a mask with
density p this costs close to numel * H(p) bits, where a plain bitmask costs
numel bits (about 2x more at 90% sparsity). The quotient and remainder streams are
kept apart so that both code and decode are a few vectorized numpy calls.
Every other tensor of the state dict is stored as it is.

    from export import load_sparse_export
    model = load_sparse_export("checkpoints/finetuned.sparse.pt")  # an ordinary dense nn.Module

    python export.py --width 1.0   # the export against the bound, on a randomly initialised
                                   # model pruned with the real code (no training needed)
"""
import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import build_model
from utils import UserError, evaluate, get_model_size, load_checkpoint, save_checkpoint

FORMAT = "fine-grained-sparse/1"


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
    return torch.from_numpy(np.packbits(bits))


def unpack_bits(packed, length):
    return np.unpackbits(packed.numpy())[:length].astype(bool)


def encode_tensor(tensor, mask, dtype):
    """A pruned tensor and its bool mask (True = kept) -> a dict of small tensors and ints."""
    flat_mask = mask.flatten().numpy()
    minority = bool(flat_mask.mean() <= 0.5)  # code where the rarer symbol sits
    positions = np.flatnonzero(flat_mask == minority)
    k, unary, remainder_bits = rice_encode(positions)
    return {"shape": list(tensor.shape), "minority": minority, "count": len(positions), "k": k,
            "unary_bits": len(unary), "unary": pack_bits(unary), "remainder": pack_bits(remainder_bits),
            "values": tensor.flatten()[mask.flatten()].to(dtype).clone()}


def decode_tensor(entry):
    """Inverse of encode_tensor: -> (float32 tensor, bool mask)."""
    numel = math.prod(entry["shape"])
    positions = rice_decode(entry["k"], entry["count"], unpack_bits(entry["unary"], entry["unary_bits"]),
                            unpack_bits(entry["remainder"], entry["count"] * entry["k"]))
    mask = np.full(numel, not entry["minority"])
    mask[positions] = entry["minority"]
    mask = torch.from_numpy(mask)
    tensor = torch.zeros(numel, dtype=torch.float32)
    tensor[mask] = entry["values"].float()
    return tensor.view(entry["shape"]), mask.view(entry["shape"])


def save_sparse_export(state_dict, masks, config, path, dtype=torch.float32):
    """Write the compressed export of a pruned state dict; returns its bytes on disk."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    sparse = {name: encode_tensor(state[name].float(), masks[name].cpu(), dtype) for name in masks}
    dense = {name: v for name, v in state.items() if name not in masks}
    save_checkpoint({"stage": "export", "model": {}, "format": FORMAT, "config": config,
                     "sparse": sparse, "dense": dense}, path)
    return Path(path).stat().st_size


def load_sparse_export(path):
    """The compressed export -> an ordinary dense model (eval mode, fp32, CPU)."""
    ckpt = load_checkpoint(path, stages=("export",))
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} export")
    try:
        state = dict(ckpt["dense"])
        for name, entry in ckpt["sparse"].items():
            state[name], _ = decode_tensor(entry)
        model = build_model(**ckpt["config"])
        model.load_state_dict(state)
    except (KeyError, ValueError, IndexError, RuntimeError, TypeError) as e:
        raise UserError(f"{path} is a corrupted sparse export ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return model.eval()


def binary_entropy(p):
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def information_bound(model, masks, value_bits=32):
    """Bits no lossless format can beat (with iid masks): kept values x value_bits, plus
    numel x H(density) per mask, plus every other parameter at 32 bits."""
    bits = 0.0
    for name, p in model.named_parameters():
        if name in masks:
            density = float(masks[name].float().mean())
            bits += int(masks[name].sum()) * value_bits + p.numel() * binary_entropy(density)
        else:
            bits += p.numel() * 32
    return bits


def export_with_report(model, masks, config, path, dense_bytes, dtype="float32"):
    """Write the export and print the four size figures; returns them in bytes."""
    export_bytes = save_sparse_export(model.state_dict(), masks, config, path, getattr(torch, dtype))
    value_bits = torch.finfo(getattr(torch, dtype)).bits
    figures = {"dense_checkpoint_bytes": dense_bytes, "export_bytes": export_bytes,
               "sparse_size_bytes": get_model_size(model, count_nonzero_only=True) / 8,
               "bound_bytes": information_bound(model, masks, value_bits) / 8}
    mib = 2 ** 20
    print(f"On disk: dense checkpoint {dense_bytes / mib:.2f} MiB -> {Path(path).name} "
          f"{export_bytes / mib:.2f} MiB ({dense_bytes / export_bytes:.2f}x smaller, {dtype} values)\n"
          f"Computed: sparse size {figures['sparse_size_bytes'] / mib:.2f} MiB (nonzeros x 32 bits) | "
          f"information bound {figures['bound_bytes'] / mib:.2f} MiB (nonzeros x {value_bits} bits "
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


def main():
    from prune import SPARSITY, FineGrainedPruner

    parser = argparse.ArgumentParser(description="Measure the compressed export against the "
                                     "information bound on a random model pruned with the real code.")
    parser.add_argument("--width", type=float, default=1.0, help="model width (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args()
    config = {"width": args.width, "num_classes": 10}
    for label, sparsity in (("prune.py's SPARSITY", SPARSITY), ("90% everywhere", {n: 0.9 for n in SPARSITY})):
        torch.manual_seed(args.seed)
        model = build_model(**config)
        with tempfile.TemporaryDirectory() as tmp:
            dense = save_checkpoint({"model": model.state_dict(), "stage": "dense", "config": config},
                                    Path(tmp) / "dense.pt").stat().st_size
            masks = FineGrainedPruner(model, sparsity).masks
            print(f"--- width {args.width}, {label}")
            figures = export_with_report(model, masks, config, Path(tmp) / "pruned.sparse.pt", dense)
            print(f"bound is {dense / figures['bound_bytes']:.2f}x smaller than dense.pt")


if __name__ == "__main__":
    main()
