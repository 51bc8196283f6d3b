import contextlib
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from data import Loader
from model import build_model
from prune import SPARSITY
from pruning import FineGrainedPruner
from utils import (MiB, UserError, autocast, compute_dtype, evaluate, get_device, get_model_size, get_model_sparsity,
                   get_num_parameters, get_sparsity, native_bf16_cpu, translate, tta_views)


def test_size_accounting_matches_the_seed():
    model = build_model()
    assert get_num_parameters(model) == 20_145_738
    assert f"{get_model_size(model) / 8 / MiB:.2f}" == "76.85"
    FineGrainedPruner(model, SPARSITY)
    sparse = get_model_size(model, count_nonzero_only=True)
    assert f"{sparse / 8 / MiB:.2f}" == "16.16"
    assert 0.75 < get_model_sparsity(model) < 0.8


def test_get_sparsity():
    assert get_sparsity(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert get_sparsity(torch.zeros(3)) == 1.0


def test_checkpoint_round_trip(tmp_path):
    model = build_model(width=0.0625)
    ckpt = {"model": model.state_dict(), "stage": "dense", "config": {"width": 0.0625, "num_classes": 10},
            "metrics": {"val_acc": 12.5, "test_acc": 10.0, "size_bits": 32, "macs": 1},
            "history": [{"epoch": 1}], "split": {"val_size": 5}}
    path = save_checkpoint(ckpt, tmp_path / "dense.pt")
    loaded = load_checkpoint(path)
    assert loaded["metrics"] == ckpt["metrics"] and loaded["config"]["width"] == 0.0625
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["dense.pt"]  # no temporary left behind


class Boom:
    def __reduce__(self):
        raise KeyboardInterrupt  # an interrupt in the middle of writing


def test_interrupted_save_keeps_the_old_file(tmp_path):
    path = save_checkpoint({"model": {}, "stage": "dense", "value": torch.arange(1000)}, tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "stage": "dense", "big": torch.zeros(10_000), "x": Boom()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_a_payload_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"model": {}, "stage": "dense", "x": Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps([1, 2, 3])])
def test_garbage_and_truncated_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="bad.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint({"model": build_model(width=0.0625).state_dict(), "stage": "dense"}, tmp_path / "t.pt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_missing_and_wrong_stage_name_the_script_to_run(tmp_path):
    with pytest.raises(UserError, match="run `python train.py` first"):
        load_checkpoint(tmp_path / "dense.pt")
    path = save_checkpoint({"model": {}, "stage": "dense"}, tmp_path / "dense.pt")
    with pytest.raises(UserError, match="'dense' checkpoint.*run `python prune.py` first"):
        load_checkpoint(path, stages=("pruned",))


def test_device_choice():
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            get_device("cuda")
    with pytest.raises(UserError, match="unknown --device"):
        get_device("tpu")


@pytest.mark.parametrize("onednn,avx512_bf16,amx,expected", [
    (True, False, False, "fp32"),  # AVX-512 without bf16 (Ice Lake): oneDNN would emulate it
    (False, False, False, "fp32"),  # AVX2
    (True, True, False, "bf16"), (True, False, True, "bf16"),
    (False, True, True, "fp32")])  # oneDNN held below bf16 (ONEDNN_MAX_CPU_ISA)
def test_bf16_only_where_the_cpu_computes_it(onednn, avx512_bf16, amx, expected, monkeypatch):
    monkeypatch.delenv("PRUNING_AUTOCAST", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    native_bf16_cpu.cache_clear()
    try:
        assert compute_dtype(torch.device("cpu")) == expected
    finally:
        native_bf16_cpu.cache_clear()


def test_the_environment_overrides_the_dtype(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("PRUNING_AUTOCAST", "fp32")
    assert compute_dtype(cpu) == "fp32" and isinstance(autocast(cpu), contextlib.nullcontext)
    monkeypatch.setenv("PRUNING_AUTOCAST", "bf16")
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setenv("PRUNING_AUTOCAST", "fp16")
    with pytest.raises(UserError, match="PRUNING_AUTOCAST='fp16' is not a choice"):
        get_device("cpu")


def test_translate_moves_content_and_reflects_the_edge():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    down_right = translate(x, 1, 1)
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # row -1 reflects row 1
    up_left = translate(x, -1, -1)
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(translate(x, 0, 0), x)


def test_evaluate_sums_the_tta_views_and_counts_correct_labels():
    x = torch.randn(6, 3, 8, 8)
    views = tta_views(x)
    assert len(views) == 4 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(3)) and torch.equal(views[3], translate(x, -1, -1).flip(3))

    class MeanColour(torch.nn.Module):
        """Logits of classes 0-2 are the channel means, which every view keeps."""
        def forward(self, images):
            return torch.nn.functional.pad(images.mean((2, 3)), (0, 7), value=-100.0)

    images = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(20) % 3
    images[torch.arange(20), labels] = 200  # class c: channel c bright
    loader = Loader(images, labels, batch_size=8, device="cpu")
    assert evaluate(MeanColour(), loader) == 100.0
    assert evaluate(MeanColour(), Loader(images, (labels + 1) % 3, 8, "cpu")) == 0.0


@pytest.mark.parametrize("views", [1, 2, 3, 4])
def test_evaluate_uses_the_loaders_views(views):
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return torch.zeros(len(images), 10)

    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    loader = Loader(x, torch.zeros(5, dtype=torch.long), 5, "cpu", views=views)
    evaluate(Recorder(), loader)
    expected = tta_views(loader.normalize(x))
    assert len(seen) == views and all(torch.equal(s, e) for s, e in zip(seen, expected[:views]))


def test_progress_bars_stay_out_of_a_log_file(tmp_path):
    code = "from utils import progress\nfor _ in progress(range(500), desc='x'): pass\nprint('done')"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # stdout and stderr to a file, as `python train.py > log.txt 2>&1`
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                       stdout=f, stderr=subprocess.STDOUT, check=True, timeout=60)
    assert log.read_text() == "done\n"
