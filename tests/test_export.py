"""The compressed export: bit-exact, within a few hundred bytes of its information bound,
and every bad file one clear error."""
import json

import pytest
import torch

from checkpoint import save_checkpoint
from export import MAGIC, information_bound, load_sparse_export, save_sparse_export, stored_dtype
from model import build_model
from prune import SPARSITY
from pruning import FineGrainedPruner, allocate
from quantize import BITS, KMeansQuantizer
from utils import UserError

CONFIG = {"width": 0.25, "num_classes": 10}


def pruned_model(sparsity, seed=0, width=0.25):
    """A random model with trained-looking BatchNorm, pruned to `sparsity` ({name: s} or a
    global target), -> (model, masks)."""
    torch.manual_seed(seed)
    model = build_model(width)
    with torch.no_grad():  # BatchNorm statistics that are not the init values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_()
    if not isinstance(sparsity, dict):
        sparsity = allocate(model, "global", sparsity)
    return model.eval(), FineGrainedPruner(model, sparsity).masks


def assert_same(model, loaded):
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("sparsity", [SPARSITY, {name: 0.9 for name in SPARSITY}, {}])
def test_round_trip_is_bit_exact_and_near_the_bound(tmp_path, sparsity):
    model, masks = pruned_model(sparsity)
    path = tmp_path / "m.sparse.pt"
    size = save_sparse_export(model.state_dict(), masks, CONFIG, path)
    assert_same(model, load_sparse_export(path))
    bound_bytes = information_bound(model, masks) / 8
    assert 0.999 * bound_bytes <= size <= 1.01 * bound_bytes  # nobody beats the bound: the figure is honest


@pytest.mark.parametrize("target,shared", [(0.9, False), (0.95, False), (0.9, True), (0.95, True), (0.98, True)])
def test_global_pruned_exports_stay_within_3_percent_of_their_bound(tmp_path, target, shared):
    """The README's chain at width 0.25: one global threshold, then optionally 4-bit sharing."""
    model, masks = pruned_model(target)
    if shared:
        KMeansQuantizer(model, BITS)
        masks = {n: model.state_dict()[n] != 0 for n in BITS}
    size = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "m.pt", shared=shared)
    bound = information_bound(model, masks, shared=shared) / 8
    assert bound <= size <= 1.03 * bound
    assert_same(model, load_sparse_export(tmp_path / "m.pt"))


def test_float16_export_halves_the_values(tmp_path):
    model, masks = pruned_model({name: 0.5 for name in SPARSITY})
    full = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "a.pt")
    half = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "b.pt", dtype=torch.float16)
    assert half < 0.7 * full
    loaded = load_sparse_export(tmp_path / "b.pt")
    w = model.state_dict()["backbone.conv5.weight"]
    assert torch.allclose(loaded.state_dict()["backbone.conv5.weight"], w, rtol=1e-3, atol=1e-4)


@pytest.fixture(params=[False, True], ids=["fp32", "shared"])
def export_file(tmp_path, request):
    model, masks = pruned_model(SPARSITY, width=0.0625)
    if request.param:
        KMeansQuantizer(model, BITS)
    path = tmp_path / "m.sparse.pt"
    save_sparse_export(model.state_dict(), masks, {"width": 0.0625, "num_classes": 10}, path, shared=request.param)
    return path


def header_of(data):
    length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    return json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length]), len(MAGIC) + 4 + length


def rewrite_header(data, change):
    """The same file with its JSON header changed by change(header) and its checksum kept valid."""
    header, start = header_of(data)
    change(header)
    text = json.dumps(header).encode()
    return MAGIC + len(text).to_bytes(4, "little") + text + data[start:]


def flip_a_payload_byte(data):
    _, start = header_of(data)
    middle = (start + len(data)) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:]


def more_kept_weights(header):
    counts = header["tensors"][3][3]
    counts[0], counts[1] = counts[0] - 7, counts[1] + 7


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:len(d) // 2], "truncated or corrupted"),
    (lambda d: d[:len(MAGIC) + 2], "truncated or corrupted"),
    (lambda d: d[:-1], "truncated or corrupted"),
    (lambda d: d + b"\0", "truncated or corrupted"),
    (flip_a_payload_byte, "checksum"),
    (lambda d: rewrite_header(d, more_kept_weights), "corrupted export"),
    (lambda d: rewrite_header(d, lambda h: h.update(format="fine-grained-sparse/9")), "this code reads"),
    (lambda d: rewrite_header(d, lambda h: h["config"].update(width=0.25)), "corrupted export"),
    (lambda d: rewrite_header(d, lambda h: h["config"].update(num_classes=0)), "a config of"),
    (lambda d: rewrite_header(d, lambda h: h["tensors"][0].__setitem__(2, -1)), "corrupted export"),
    (lambda d: b"", "is empty"),
    (lambda d: b"hello world", "not a compressed export"),
])
def test_damaged_exports_are_one_clear_error(export_file, damage, message):
    export_file.write_bytes(damage(export_file.read_bytes()))
    with pytest.raises(UserError, match=message) as error:
        load_sparse_export(export_file)
    assert str(export_file) in str(error.value) and "\n" not in str(error.value)


def test_loader_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(UserError, match="not found: run `python finetune.py`"):
        load_sparse_export(tmp_path / "missing.sparse.pt")
    with pytest.raises(UserError, match="is a directory"):
        load_sparse_export(tmp_path)
    dense = save_checkpoint({"model": {}, "stage": "dense"}, tmp_path / "dense.pt")
    with pytest.raises(UserError, match="a torch checkpoint, not a compressed export"):
        load_sparse_export(dense)


def test_rounded_rest_is_stored_at_16_bits_losslessly(tmp_path):
    from quantize import round_rest

    model, masks = pruned_model(0.95)
    quantizer = KMeansQuantizer(model, BITS)
    coded = {n: p.detach().clone() for n, p in model.named_parameters() if n in BITS}
    rest = [n for n, t in model.state_dict().items() if n not in BITS and t.is_floating_point()]
    wide = [n for n in rest if stored_dtype(model.state_dict()[n]) == torch.float32]  # not fp16 values yet
    before = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "a.pt", shared=True)
    bound_before = information_bound(model, masks, shared=True)
    round_rest(model, quantizer.codebooks)
    state = model.state_dict()
    assert all(torch.equal(state[n], coded[n]) for n in coded)  # the codebook tensors are left alone
    assert all(torch.equal(state[n].half().float(), state[n]) for n in rest)
    assert wide
    after = save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "b.pt", shared=True)
    rest_bytes = sum(state[n].numel() * 2 for n in wide)
    assert before - after == pytest.approx(rest_bytes, abs=100)  # 16 of each 32 bits gone; the header grows
    assert bound_before - information_bound(model, masks, shared=True) == rest_bytes * 8
    assert_same(model, load_sparse_export(tmp_path / "b.pt"))


def test_format_3_files_are_still_read(tmp_path):
    model, masks = pruned_model(SPARSITY)
    with torch.no_grad():  # no fp16 values left among the other tensors: all stored at 32 bits, as format 3 did
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.running_mean.normal_()
    save_sparse_export(model.state_dict(), masks, CONFIG, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    assert header_of(data)[0]["float16"] == []

    def as_format_3(header):
        header["format"] = "fine-grained-sparse/3"
        del header["float16"]

    (tmp_path / "m.pt").write_bytes(rewrite_header(data, as_format_3))
    assert_same(model, load_sparse_export(tmp_path / "m.pt"))
