"""Compressed export of a pruned model: a short JSON header, then entropy-coded streams.

    python export.py checkpoints/finetuned.sparse.pt             # what the file holds, tensor by tensor
    python export.py checkpoints/quantized.sparse.pt --evaluate  # and its test accuracy

    from export import load_sparse_export
    model = load_sparse_export("checkpoints/finetuned.sparse.pt")  # an ordinary dense nn.Module

Each pruned tensor is coded weight by weight as one symbol: 0 for a pruned weight, 1 for
a kept one, or, with shared values (after quantize.py), 1 + the index of its value in the
tensor's codebook. The symbols are ANS-coded (constriction) with the tensor's own
histogram, so a tensor costs close to numel x H(histogram) bits, which is its mask's
entropy plus its kept weights' index entropy: `information_bound`. Unshared kept
values follow as raw fp32 (or fp16 on request). Every other tensor of the state dict
(BatchNorm, biases, unpruned layers) is stored raw, at its own width, or at 16 bits when
each of its values is an fp16 value (quantize.py rounds BatchNorm's to them), losslessly.

The file: MAGIC; the header's length (uint32, little-endian); the header (JSON: format,
config, how values are stored, a CRC-32 of the rest, per coded tensor its place in
the state dict, codebook size, ANS word count and histogram, and the places of the other
tensors stored at 16 bits); then per coded tensor its
codebook (fp32), ANS words (uint32) and raw kept values; then the other tensors, in
state-dict order. Names, shapes and dtypes are not stored: the loader takes them from
the model that `config` builds. There is no pickle in it, so loading runs no code.

`python bench.py --export` measures the export against its bound.
"""
import argparse
import json
import math
import zlib
from pathlib import Path

import constriction
import numpy as np
import torch

from checkpoint import MADE_BY, atomic_write
from cli import MAX_WIDTH, add_common_args, cli
from data import EVAL_BATCH_SIZE, Loader, get_datasets
from model import build_model
from utils import (MiB, UserError, evaluate, format_table, get_device, get_model_size, short_name, size_line,
                   tta_label)

MAGIC = b"FGSPARSE"
FORMAT = "fine-grained-sparse/4"
READS = ("fine-grained-sparse/3", FORMAT)  # 3: the same without 16-bit other tensors
VALUES = ("float32", "float16", "shared")  # how a coded tensor's kept values are stored


def categorical(counts):
    """The fixed ANS model of a histogram (the decoder rebuilds it from the same counts)."""
    counts = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def alphabet_size(codebook_size):
    """Symbols of a coded tensor: pruned, then kept (or one per shared value); at least
    two, as ANS needs, also for a fully pruned tensor."""
    return max(2, codebook_size + 1)


def encode_tensor(tensor, mask, values):
    """A pruned fp32 tensor and its bool mask (True = kept) -> ([codebook size, ANS words,
    histogram], [codebook, words, raw values] as numpy arrays)."""
    flat, kept = tensor.detach().cpu().float().flatten(), mask.cpu().flatten()
    if flat[~kept].count_nonzero():
        raise ValueError("a pruned weight is not zero: apply the masks before exporting")
    symbols = kept.to(torch.int32)
    codebook = np.zeros(0, np.float32)
    raw = np.zeros(0, np.float32)
    if values == "shared":
        unique, indices = torch.unique(flat[kept], return_inverse=True)
        codebook = unique.numpy()
        symbols[kept] = indices.to(torch.int32) + 1
    else:
        raw = flat[kept].to(getattr(torch, values)).numpy()
    symbols = symbols.numpy()
    counts = np.bincount(symbols, minlength=alphabet_size(len(codebook)))
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, categorical(counts))
    words = coder.get_compressed()
    return [len(codebook), len(words), counts.tolist()], [codebook, words, raw]


def stored_dtype(tensor):
    """The dtype a tensor that is not coded is stored at: float16 when that loses nothing."""
    if tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor):
        return torch.float16
    return tensor.dtype


def save_sparse_export(state_dict, masks, config, path, dtype=torch.float32, shared=False):
    """Write the compressed export of a pruned state dict (`encode_export`) -> its bytes on disk."""
    data = encode_export(state_dict, masks, config, dtype, shared)
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def encode_export(state_dict, masks, config, dtype=torch.float32, shared=False):
    """The compressed export of a pruned state dict, as bytes. shared: store each masked
    tensor's kept values as a codebook plus coded indices."""
    values = "shared" if shared else str(dtype).removeprefix("torch.")
    if values not in VALUES:
        raise ValueError(f"the export stores values as {', '.join(VALUES)}, not {values}")
    names = list(state_dict)
    entries, arrays = [], []
    for name in masks:
        entry, streams = encode_tensor(state_dict[name], masks[name], values)
        entries.append([names.index(name), *entry])
        arrays += streams
    rest = {i: v.detach().cpu() for i, (name, v) in enumerate(state_dict.items()) if name not in masks}
    stored = {i: v.to(stored_dtype(v)) for i, v in rest.items()}
    half = [i for i, v in stored.items() if v.dtype == torch.float16]
    arrays += [v.contiguous().numpy() for v in stored.values()]
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    header = json.dumps({"format": FORMAT, "config": config, "values": values, "crc32": zlib.crc32(payload),
                         "tensors": entries, "float16": half}, separators=(",", ":")).encode()
    return MAGIC + len(header).to_bytes(4, "little") + header + payload


def read_export(path):
    """An export file -> (header dict, payload bytes), its header and checksum checked."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a compressed export (a *.sparse.pt file)")
    if not path.is_file():
        raise UserError(f"{path} not found: {MADE_BY['export']}, or pass the path of a *.sparse.pt file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror})") from None
    if not data:
        raise UserError(f"{path} is empty: {MADE_BY['export']}")
    return parse_export(data, path)


def parse_export(data, path):
    """An export's bytes (read from `path`, for messages) -> (header dict, payload bytes),
    its header and checksum checked."""
    if not data.startswith(MAGIC):
        what = ("a torch checkpoint, not a compressed export (an export from before "
                f"{READS[0]} is one too: write it again)") if data.startswith(b"PK\x03\x04") else (
                "not a compressed export of this repo: exports are the *.sparse.pt files that "
                "prune.py, finetune.py and quantize.py write")
        raise UserError(f"{path} is {what}")
    try:
        length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
        start = len(MAGIC) + 4 + length
        header = json.loads(data[len(MAGIC) + 4:start])
        if header.get("format") not in READS:
            raise ValueError(f"format {header.get('format')!r}, this code reads {' and '.join(READS)}")
        config = header["config"]
        if set(config) != {"width", "num_classes"} or not (0 < config["width"] <= MAX_WIDTH and config["num_classes"] >= 1):
            raise ValueError(f"a config of {config}")
        payload = data[start:]
        if zlib.crc32(payload) != header["crc32"]:
            raise ValueError("its checksum does not match")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is a truncated or corrupted export ({e})") from None
    return header, payload


class Reader:
    """Numpy arrays read one after another from a byte string."""

    def __init__(self, data):
        self.data, self.offset = data, 0

    def take(self, dtype, count):
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += array.nbytes
        return array


def decode_tensor(reader, entry, values, shape):
    """The inverse of encode_tensor, reading its streams: -> fp32 tensor of `shape` and its
    bool mask (True = kept)."""
    codebook_size, num_words, counts = entry
    numel = math.prod(shape)
    if min(codebook_size, num_words, *counts) < 0:
        raise ValueError("negative sizes in the header")
    if sum(counts) != numel or len(counts) != alphabet_size(codebook_size):
        raise ValueError(f"a histogram of {sum(counts)} symbols for {numel} weights")
    codebook = reader.take(np.float32, codebook_size)
    words = reader.take(np.uint32, num_words)
    symbols = constriction.stream.stack.AnsCoder(words.copy()).decode(categorical(counts), numel)
    if not np.array_equal(np.bincount(symbols, minlength=len(counts)), counts):
        raise ValueError("the decoded weights do not match their histogram")
    kept = symbols > 0
    tensor = np.zeros(numel, np.float32)
    if values == "shared":
        tensor[kept] = codebook[symbols[kept] - 1]
    else:
        tensor[kept] = reader.take(np.dtype(values), counts[1]).astype(np.float32)
    return torch.from_numpy(tensor).view(shape), torch.from_numpy(kept).view(shape)


def load_sparse_export(path, with_masks=False, data=None):
    """The compressed export at `path` (or its bytes, `data`) -> an ordinary dense model
    (eval mode, fp32, CPU), and with with_masks its masks {name: bool tensor, True = kept} too."""
    header, payload = read_export(path) if data is None else parse_export(data, path)
    try:
        model = build_model(**header["config"])
        template = model.state_dict()
        names = list(template)
        reader = Reader(payload)
        state, masks = {}, {}
        for index, *entry in header["tensors"]:
            name = names[index]
            state[name], masks[name] = decode_tensor(reader, entry, header["values"], template[name].shape)
        half = set(header.get("float16", []))
        for i, (name, t) in enumerate(template.items()):
            if name not in state:
                dtype = np.float16 if i in half else t.numpy().dtype
                state[name] = torch.from_numpy(reader.take(dtype, t.numel()).astype(t.numpy().dtype)).view(t.shape)
        if reader.offset != len(payload):
            raise ValueError(f"{len(payload) - reader.offset} bytes left over")
        model.load_state_dict(state)
    except (KeyError, ValueError, IndexError, RuntimeError, TypeError, OverflowError) as e:
        raise UserError(f"{path} is a corrupted export ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return (model.eval(), masks) if with_masks else model.eval()


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
    (BatchNorm's statistics too) at the width the export stores it (`stored_dtype`)."""
    bits = 0.0
    for name, p in model.state_dict().items():
        if name not in masks:
            bits += p.numel() * stored_dtype(p).itemsize * 8
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


def export_with_report(model, masks, config, path, dense_bytes, dtype="float32", shared=False, test=None):
    """Write the export and print its size against dense.pt and its information bound ->
    {"export_bytes", "bound_bytes"}; with `test` (a loader, the model's test accuracy) and
    reduced-precision values, also "export_test_acc", the accuracy of the file loaded back."""
    export_bytes = save_sparse_export(model.state_dict(), masks, config, path, getattr(torch, dtype), shared)
    value_bits = torch.finfo(getattr(torch, dtype)).bits
    figures = {"export_bytes": export_bytes, "bound_bytes": information_bound(model, masks, value_bits, shared) / 8}
    values = "codebook + H(indices)" if shared else f"nonzeros x {value_bits} bits"
    print(size_line(f"On disk: {Path(path).name} ({'shared' if shared else dtype} values)", export_bytes, dense_bytes))
    print(f"Information bound ({values} + mask entropy): {figures['bound_bytes'] / MiB:.3f} MiB; the export is "
          f"{export_bytes / figures['bound_bytes']:.3f}x the bound")
    if test is not None and dtype != "float32":
        figures["export_test_acc"] = evaluate_export(path, *test)
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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", metavar="FILE", help="a compressed export, e.g. checkpoints/finetuned.sparse.pt")
    parser.add_argument("--evaluate", action="store_true",
                        help="also load it into a model and measure its test accuracy (reads --data-dir)")
    add_common_args(parser, checkpoints=False)
    return parser


def main(args):
    header, payload = read_export(args.export)
    model = load_sparse_export(args.export)  # decodes every stream: a corrupted file fails here
    names, state = list(model.state_dict()), model.state_dict()
    rows, coded = [], 0
    for index, codebook_size, words, counts in header["tensors"]:
        p = state[names[index]]
        kept = int(sum(counts[1:]))
        raw = 0 if header["values"] == "shared" else kept * np.dtype(header["values"]).itemsize
        coded += 4 * (codebook_size + words) + raw
        rows.append([short_name(names[index]), "x".join(map(str, p.shape)), f"{p.numel():,}",
                     f"{1 - kept / p.numel():.4f}", codebook_size or "-", f"{4 * (codebook_size + words) + raw:,}"])
    print(format_table(rows, ["tensor", "shape", "weights", "sparsity", "codebook", "bytes"]))
    size = Path(args.export).stat().st_size
    print(f"{args.export}: {header['format']}, width {header['config']['width']:g}, {header['values']} values | "
          f"{size:,} bytes: header {size - len(payload):,}, coded tensors {coded:,}, the other tensors "
          f"{len(payload) - coded:,} | computed sparse size {get_model_size(model, count_nonzero_only=True) / 8:,.0f} B")
    out = {"export_bytes": size}
    if args.evaluate:
        device = get_device(args.device)
        datasets, _ = get_datasets(args.data_dir, val_size=0)
        model = model.to(device, memory_format=torch.channels_last)
        out["test_acc"] = evaluate(model, Loader(*datasets["test"], EVAL_BATCH_SIZE, device, views=args.eval_views))
        print(f"test accuracy {out['test_acc']:.2f}% ({tta_label(args.eval_views)})")
    return out


if __name__ == "__main__":
    cli(main, get_args_parser())
