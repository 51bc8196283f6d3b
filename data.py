"""CIFAR-10 as uint8 tensors held on the device, with batched augmentation. As a script,
it decodes a copy once into the python version's layout, which later reads take in ~1 s:

    python data.py --data-dir cifar10-jpeg --out data/cifar10-decoded

`--data-dir DIR` is read in one of three ways:
  1. an image-folder tree: DIR/train/<class>/*.png|jpg and DIR/test/<class>/*,
     class folders named as CIFAR-10's classes (e.g. a PNG or JPEG copy of CIFAR-10);
  2. the standard python version: DIR/cifar-10-batches-py/ (or DIR itself);
  3. neither, and DIR missing or empty: torchvision's download into DIR, md5-checked.
"""
import argparse
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import atomic_write, ensure_writable, nearest_existing
from cli import DEFAULT_DATA_DIR, cli
from utils import TTA_VIEWS, UserError, plural, tta_label

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")  # CIFAR-10's label order
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
EVAL_BATCH_SIZE = 1000
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # what torchvision.io decodes and CIFAR copies use


# ---------------------------------------------------------------- reading

def read_pickle_folder(folder):
    """cifar-10-batches-py/ -> (train_x, train_y, test_x, test_y); x is (N, 3, 32, 32) uint8."""
    def read(names):
        images, labels = [], []
        for name in names:
            # The official format is a Python pickle; read only files you trust.
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        images, labels = torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)
        if len(labels) != len(images) or not ((labels >= 0) & (labels < len(CLASSES))).all():
            raise ValueError(f"{len(labels)} labels (each 0 to 9 expected) for {len(images)} images")
        return images, labels

    try:
        return (*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"]))
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, IndexError) as e:
        raise UserError(f"{folder} looks like cifar-10-batches-py but cannot be read "
                        f"({type(e).__name__}: {e}); download it again") from None


def read_image_folder(root):
    """root/{train,test}/<class>/* -> (train_x, train_y, test_x, test_y); x is (N, 3, 32, 32) uint8."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    def load(path):
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise UserError(f"{path} cannot be decoded as an image ({e})") from None
        if image.shape != (3, 32, 32):
            raise UserError(f"{path} is {image.shape[2]}x{image.shape[1]}, not a 32x32 CIFAR-10 image")
        if image.dtype != torch.uint8:
            raise UserError(f"{path} has {image.dtype} pixels, not the 8-bit ones of CIFAR-10")
        return image

    def read(split):
        classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if classes != sorted(CLASSES):
            raise UserError(f"{root / split} has class folders {classes}, but CIFAR-10 needs "
                            f"exactly {list(CLASSES)}")
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            files = sorted(p for p in (root / split / name).iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:  # a class missing from a split would skew every accuracy silently
                raise UserError(f"{root / split / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images += [load(p) for p in files]
            labels += [label] * len(files)
        if not images:
            raise UserError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return torch.stack(images), torch.tensor(labels)

    return (*read("train"), *read("test"))


def download(data_dir):
    """torchvision's download of the python version into data_dir, md5-checked."""
    from torchvision.datasets.utils import download_and_extract_archive

    data_dir = Path(data_dir)
    missing = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    before = set(data_dir.iterdir()) if data_dir.is_dir() else set()
    try:
        download_and_extract_archive(URL, download_root=str(data_dir), md5=MD5)
    except BaseException as e:  # Ctrl-C too: a partial archive would block every later try
        for path in ([missing[-1]] if missing else set(data_dir.iterdir()) - before):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise UserError(
            f"no CIFAR-10 in {data_dir} and the download failed ({type(e).__name__}); put the "
            f"extracted cifar-10-batches-py/ folder in {data_dir}/, or pass --data-dir to a copy "
            "(cifar-10-batches-py or train/<class>/ + test/<class>/ image folders)") from None


def load_cifar10(data_dir=DEFAULT_DATA_DIR, allow_download=True):
    """-> (train_x, train_y, test_x, test_y): x (N, 3, 32, 32) uint8, y (N,) int64 on the CPU."""
    root = Path(data_dir)
    existing = nearest_existing(root)
    if not existing.is_dir():
        raise UserError(f"--data-dir {root}: {existing} is a file, not a folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return read_image_folder(root)
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "data_batch_1").is_file():
            return read_pickle_folder(folder)
    if root.is_dir() and any(root.iterdir()):
        raise UserError(f"{root} is not a CIFAR-10 folder: expected {root}/cifar-10-batches-py/ "
                        f"or image folders {root}/train/<class>/ and {root}/test/<class>/")
    if not allow_download:
        raise UserError(f"no CIFAR-10 in {root}: pass --data-dir to a cifar-10-batches-py folder "
                        "or to train/<class>/ + test/<class>/ image folders")
    download(root)
    return read_pickle_folder(root / "cifar-10-batches-py")


def write_pickle_folder(train_x, train_y, test_x, test_y, folder):
    """Write the four arrays in the layout of CIFAR-10's python version (data_batch_1..5,
    test_batch) in `folder`, each file atomically: read_pickle_folder reads them back
    exactly (torchvision's CIFAR10 does not: it checks the official files' md5)."""
    def write(name, images, labels):
        batch = {"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist()}
        atomic_write(Path(folder) / name, lambda f: pickle.dump(batch, f, protocol=4))

    for i, part in enumerate(torch.arange(len(train_x)).tensor_split(5), 1):
        write(f"data_batch_{i}", train_x[part], train_y[part])
    write("test_batch", test_x, test_y)
    return Path(folder)


# ---------------------------------------------------------------- splits

def split_indices(num_images, val_size, seed):
    """A seeded permutation -> (train_idx, val_idx); the same seed gives the same split."""
    if not 0 <= val_size < num_images:
        raise UserError(f"--val-size {val_size} must be between 0 and {num_images - 1}")
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    # Both stay in shuffled order, so that the first N of either (--train-subset,
    # --scan-size) are a random sample even when the files are sorted by class.
    return perm[val_size:], perm[:val_size]


def get_datasets(data_dir, val_size=5000, split_seed=0, train_subset=None, allow_download=True):
    """-> {"train", "val", "test"} of (images, labels), and the split record for checkpoints.

    The validation images are held out of the training set; `train_subset` keeps the
    first N of the remaining training images."""
    train_x, train_y, test_x, test_y = load_cifar10(data_dir, allow_download)
    train_idx, val_idx = split_indices(len(train_x), val_size, split_seed)
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    datasets = {"train": (train_x[train_idx], train_y[train_idx]),
                "val": (train_x[val_idx], train_y[val_idx]),
                "test": (test_x, test_y)}
    split = {"val_size": val_size, "split_seed": split_seed, "num_train_images": len(train_x)}
    return datasets, split


# ---------------------------------------------------------------- batches

def reflect(index, size):
    """Indices in [-(size - 1), 2 * (size - 1)] folded back into [0, size) as by a mirror at
    the edges (the edge pixel itself is not repeated, as F.pad's 'reflect')."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def augment(images, shifts, flips, translate=2):
    """Random translation by up to `translate` pixels (edges filled by reflection), then an
    optional mirror.

    images (B, 3, 32, 32) uint8, shifts (B, 2) in [0, 2 * translate], flips (B,) bool
    -> (B, 3, 32, 32) uint8. One gather does both: each output pixel reads its source
    row and column, reflected at the edges, and a mirror reads the columns reversed.
    Reflection, unlike zero fill, adds no black border that the network must learn to ignore."""
    b, c, h, w = images.shape
    rows = reflect(shifts[:, :1] - translate + torch.arange(h, device=images.device), h)  # (B, H)
    cols = reflect(shifts[:, 1:] - translate + torch.arange(w, device=images.device), w)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class Loader:
    """Yields (B, 3, 32, 32) normalized float channels_last images and (B,) labels.

    The whole split lives on `device` as uint8. A training loader's batches(epoch, seed)
    shuffle, augment and drop the last partial batch, their randomness fixed by (seed,
    epoch); in its first `low_res_epochs` epochs the images are (B, 3, low_res, low_res).
    An evaluation loader's `views` is how many test-time augmentation views
    utils.evaluate sums per image."""

    def __init__(self, images, labels, batch_size, device, train=False, translate=2, low_res_epochs=0, low_res=24,
                 views=TTA_VIEWS):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        if train and batch_size > len(images):
            raise UserError(f"--batch-size {batch_size} is larger than the {plural(len(images), 'training image')}: "
                            "lower it or train on more images")
        if not 0 <= translate < images.shape[-1]:
            raise UserError(f"--translate must be 0 or more pixels and less than the image side "
                            f"({images.shape[-1]}), got {translate}")
        if not 1 <= views <= TTA_VIEWS:
            raise UserError(f"--eval-views must be 1 to {TTA_VIEWS}, got {views}")
        if low_res_epochs < 0 or not 8 <= low_res <= images.shape[-1]:
            raise UserError(f"--low-res-epochs must be 0 or more and --low-res between 8 and "
                            f"{images.shape[-1]} pixels, got {low_res_epochs} and {low_res}")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.train, self.views = batch_size, train, views
        self.translate, self.low_res_epochs, self.low_res = translate, low_res_epochs, low_res
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(MEAN, device=self.device).view(shape) * 255
        self.std = torch.tensor(STD, device=self.device).view(shape) * 255

    @property
    def num_samples(self):
        return len(self) * self.batch_size if self.train else len(self.images)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def normalize(self, images):
        """uint8 (B, 3, H, W) -> float32, zero mean and unit variance per channel, channels_last."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def __iter__(self):
        return self.batches()

    def batches(self, epoch=0, seed=0):
        """One pass: in order for evaluation; for training, the shuffle and augmentation of
        (seed, epoch)."""
        n = len(self.images)
        order = torch.arange(n, device=self.device)
        if self.train:
            # All of an epoch's random numbers are drawn at once on the CPU from
            # (seed, epoch), so runs repeat exactly, also after a resume.
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).to(self.device)
            shifts = torch.randint(0, 2 * self.translate + 1, (n, 2), generator=g).to(self.device)
            # Each image is mirrored in every other epoch, from a random start of its own,
            # so any two epochs in a row show both versions (airbench's alternating flip).
            first_flip = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
            flips = (first_flip ^ bool(epoch % 2)).to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[idx]
            if self.train:
                images = augment(images, shifts[idx], flips[idx], self.translate)
            x = self.normalize(images)
            if self.train and epoch < self.low_res_epochs:
                # The early epochs learn coarse features, which small images still carry,
                # at about (low_res / 32)**2 of the cost.
                x = F.interpolate(x, size=self.low_res, mode="bilinear", antialias=True)
            yield x, self.labels[idx]


# ---------------------------------------------------------------- loaders of a run

def make_loaders(datasets, recipe, device, views=TTA_VIEWS):
    """Training loader (shuffled, augmented as the recipe says) and evaluation loaders for
    val and test, at `views` TTA views."""
    return {"train": Loader(*datasets["train"], recipe.batch_size, device, train=True, translate=recipe.translate,
                            low_res_epochs=recipe.low_res_epochs, low_res=recipe.low_res),
            **eval_loaders(datasets, device, views)}


def eval_loaders(datasets, device, views):
    return {k: Loader(*datasets[k], EVAL_BATCH_SIZE, device, views=views) for k in ("val", "test")}


def check_views(ckpt, views):
    """A chain evaluates at its dense model's number of TTA views throughout: every stage
    prints its accuracies beside the earlier ones."""
    measured = (ckpt.get("args") or {}).get("eval_views", TTA_VIEWS)  # older checkpoints: all four
    if measured != views:
        raise UserError(f"the checkpoint's accuracies were measured with {tta_label(measured)}, this run's would "
                        f"be with {tta_label(views)}: pass --eval-views {measured}, or train again with {views}")


def load_data_for(ckpt, data_dir, device, views, recipe=None, train_subset=None):
    """Loaders over the very split the checkpoint was trained with, evaluating at its number
    of views: val and test, and with a recipe a training loader (of `train_subset` images)."""
    check_views(ckpt, views)
    datasets = datasets_for(ckpt, data_dir, train_subset)
    return make_loaders(datasets, recipe, device, views) if recipe else eval_loaders(datasets, device, views)


def datasets_for(ckpt, data_dir, train_subset=None):
    """get_datasets of the split the checkpoint records, checked against the data found."""
    split = ckpt["split"]
    datasets, found = get_datasets(data_dir, split["val_size"], split["split_seed"], train_subset)
    if found["num_train_images"] != split["num_train_images"]:
        raise UserError(f"{data_dir} has {found['num_train_images']} training images, but the "
                        f"checkpoint's split was drawn from {split['num_train_images']}: pass the "
                        "--data-dir it was trained on")
    return datasets


# ---------------------------------------------------------------- decode once

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="CIFAR-10 in any form the scripts read (default: %(default)s)")
    parser.add_argument("--out", required=True,
                        help="folder for its decoded copy, <out>/cifar-10-batches-py/: pass it as --data-dir")
    return parser


def main(args):
    if not args.out.strip():
        raise UserError("--out is empty: name the folder for the decoded copy")
    folder = Path(args.out) / "cifar-10-batches-py"
    ensure_writable(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    source, out = Path(args.data_dir).resolve(), Path(args.out).resolve()
    if out == source or source in out.parents or source == folder.resolve():
        raise UserError(f"--out {args.out} and --data-dir {args.data_dir} overlap: the copy would change the data "
                        "it is read from; choose an --out outside the data")
    arrays = load_cifar10(args.data_dir, allow_download=False)
    write_pickle_folder(*arrays, folder)
    print(f"decoded {len(arrays[0]):,} training and {len(arrays[2]):,} test images from {args.data_dir} "
          f"into {folder}/: pass --data-dir {args.out}")
    return folder


if __name__ == "__main__":
    cli(main, get_args_parser())
