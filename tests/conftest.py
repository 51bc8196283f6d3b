"""Tiny CIFAR-10 look-alikes, written in both on-disk formats the repo reads."""
import pickle

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from data import CLASSES

TINY = {"width": "0.0625", "batch_size": "16"}  # 4..32 channels: a forward pass takes milliseconds


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
