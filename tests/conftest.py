"""Tiny CIFAR-10 look-alikes, written in both on-disk formats the repo reads, and the
tiny train -> scan -> prune -> finetune chain that the script tests start from."""
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from data import CLASSES

# Ray, in the sweep tests, stays on this machine's loopback address and reports nothing home.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")

# 4..32 channels: a forward pass takes milliseconds; 160 training images, 5 steps an epoch
TINY_TRAIN = ["--width", "0.0625", "--val-size", "40", "--batch-size", "32"]


def make_images(n, seed):
    """(n, 3, 32, 32) uint8 images whose mean colour depends on the label, and labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    base = (labels * 25).view(-1, 1, 1, 1).expand(n, 3, 32, 32)
    noise = torch.randint(0, 40, (n, 3, 32, 32), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="session")
def tiny_arrays():
    return {"train": make_images(200, 0), "test": make_images(50, 1)}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, tiny_arrays):
    """root/{train,test}/<class>/NNNN.png, as the public image-folder mirrors lay it out."""
    root = tmp_path_factory.mktemp("cifar_png")
    for split, (images, labels) in tiny_arrays.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            write_png(image, str(root / split / CLASSES[label] / f"{i:04d}.png"))
    return root


@pytest.fixture(scope="session")
def pickle_folder(tmp_path_factory, tiny_arrays):
    """root/cifar-10-batches-py/ in the official python format (5 train batches + test)."""
    root = tmp_path_factory.mktemp("cifar_pickle")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = tiny_arrays["train"]
    chunks = zip(np.array_split(images.reshape(len(images), -1).numpy(), 5), np.array_split(labels.numpy(), 5))
    for i, (x, y) in enumerate(chunks, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x, "labels": y.tolist()}, f)
    x, y = tiny_arrays["test"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist()}, f)
    return root


def script_args(parser, data_dir, ckpt_dir, *extra):
    """A script's parsed flags on tiny data: its data, checkpoint and plot folders, the CPU."""
    common = ["--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt_dir), "--device", "cpu"]
    if "--plot-dir" in parser.format_help():
        common += ["--plot-dir", str(ckpt_dir.parent / "plots")]
    return parser.parse_args([*common, *extra])


@pytest.fixture(scope="session")
def chain_dir(image_folder, tmp_path_factory):
    """ckpt/ with dense.pt (2 epochs), sensitivity.json (0.5, 0.9), pruned.pt (global 0.8,
    one-shot) and finetuned.pt (2 epochs), made by the scripts themselves. Read it only:
    a test that writes next to it uses the `chain` fixture's copy."""
    import finetune
    import prune
    import sensitivity
    import train

    ckpt = tmp_path_factory.mktemp("chain") / "ckpt"
    train.main(script_args(train.get_train_args_parser(), image_folder, ckpt, *TINY_TRAIN, "--epochs", "2"))
    sensitivity.main(script_args(sensitivity.get_args_parser(), image_folder, ckpt, "--sparsities", "0.5,0.9",
                                 "--max-drop", "5"))
    prune.main(script_args(prune.get_args_parser(), image_folder, ckpt, "--method", "global", "--target", "0.8"))
    finetune.main(script_args(finetune.get_finetune_args_parser(), image_folder, ckpt, "--epochs", "2",
                              "--batch-size", "32"))
    return ckpt


@pytest.fixture
def chain(chain_dir, tmp_path):
    """A fresh copy of the tiny chain's checkpoint folder, tmp_path/ckpt, to write next to."""
    return Path(shutil.copytree(chain_dir, tmp_path / "ckpt"))


def interrupt_in_epoch(monkeypatch, epoch):
    """Make train.train_one_epoch raise KeyboardInterrupt, as Ctrl-C would, in its `epoch`-th
    call; monkeypatch.undo() puts the real one back."""
    import train

    calls, real = [], train.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
