"""Speed of the repo's loops against a plain PyTorch baseline, measured in one run.

    python bench.py --width 0.25
    python bench.py --width 1.0 --steps 3
    python bench.py --export --width 1.0     # the export's size against its bound (no data)
    python bench.py --export --checkpoint checkpoints/finetuned.pt checkpoints/quantized.pt

Same model, width, batch size and images for both sides:
  baseline  a dataset over the uint8 images that works as torchvision's CIFAR10 does (a PIL
            image per item), a DataLoader applying per-image torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
            Normalize), fp32, contiguous memory;
  repo      data.Loader (whole split on the device, batched augmentation), channels_last,
            bf16 autocast where supported, train.train_one_epoch and utils.evaluate.
Each phase runs in a fresh process, so its peak memory (RSS on the CPU, allocated
memory on CUDA) is its own. It also times the shared-prefix sensitivity scan against
the naive one. Ratios are repo / baseline from this run only.

--export instead measures the compressed export (export.py) against its information
bound, on a randomly initialised model pruned with the real code: prune.py's SPARSITY,
90% everywhere, and SPARSITY plus quantize.py's 4-bit k-means weight sharing; with
--checkpoint, on trained pruned, finetuned or quantized checkpoints instead.
"""
import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import resource
import tempfile
import time
from pathlib import Path

import torch

import data
from model import build_model
from sensitivity import DEFAULT_SPARSITIES
from utils import (TTA, UserError, cli, format_table, get_device, load_checkpoint, nonnegative_int,
                   positive_int, save_checkpoint, seed_int, width)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TensorImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR10 dataset: uint8 arrays in memory, a PIL image per item."""

    def __init__(self, images, labels, transform):
        self.arrays, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def baseline_loader(images, labels, batch_size, train, workers):
    """The textbook pipeline: per-image PIL transforms and a DataLoader with workers."""
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
    steps += [transforms.ToTensor(), transforms.Normalize(data.MEAN, data.STD)]
    return torch.utils.data.DataLoader(
        TensorImages(images, labels, transforms.Compose(steps)), batch_size=batch_size, shuffle=train,
        drop_last=train, num_workers=workers,
        multiprocessing_context="fork" if workers else None)  # Linux's default, as users get it


def time_phase(phase, args):
    """Runs in a child process: -> (images per second, peak memory in MiB)."""
    import torch.nn.functional as F

    from train import build_optimizer, build_scheduler, train_one_epoch
    from utils import evaluate

    torch.manual_seed(0)
    device = get_device(args.device)
    datasets, _ = data.get_datasets(args.data_dir, val_size=0)
    images, labels = datasets["train"]
    n = args.batch_size * (args.steps + 1)  # one warm-up batch, then the timed steps
    images, labels = images[:n], labels[:n]
    model = build_model(args.width).to(device)
    repo = phase.startswith("repo")
    if repo:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, 0.05, 0.9, 5e-4)
    if repo:
        bs, train = args.batch_size, phase == "repo-train"
        warm = data.Loader(images[:bs], labels[:bs], bs, device, train=train)
        timed = data.Loader(images[bs:], labels[bs:], bs, device, train=train)
        if train:
            scheduler = build_scheduler(optimizer, 10 * len(timed), 0.2)
            train_one_epoch(model, warm, optimizer, scheduler, 0.2)
            start = time.perf_counter()
            train_one_epoch(model, timed, optimizer, scheduler, 0.2)
        else:
            evaluate(model, warm)
            start = time.perf_counter()
            evaluate(model, timed)
    else:
        train = phase == "baseline-train"
        loader = baseline_loader(images, labels, args.batch_size, train, args.workers)
        model.train(train)
        for i, (x, y) in enumerate(loader):
            if i == 1:
                start = time.perf_counter()
            x, y = x.to(device), y.to(device)
            if train:
                loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            else:
                with torch.no_grad():
                    model(x).argmax(1).eq(y).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return args.batch_size * args.steps / seconds, peak_memory_mib(device)


def time_scans(args):
    """Seconds of the shared-prefix and of the naive sensitivity scan on the same model."""
    from sensitivity import naive_sensitivity_scan, sensitivity_scan

    device = get_device(args.device)
    datasets, _ = data.get_datasets(args.data_dir, val_size=args.scan_images)
    loader = data.Loader(*datasets["val"], 1000, device)
    model = build_model(args.width).to(device, memory_format=torch.channels_last).eval()
    times = {}
    for name, scan in (("naive", naive_sensitivity_scan), ("shared", sensitivity_scan)):
        start = time.perf_counter()
        result = scan(model, loader, DEFAULT_SPARSITIES)
        times[name] = time.perf_counter() - start
        times[name + "_result"] = result
    assert times["naive_result"] == times["shared_result"], "the scans disagree"
    return times["naive"], times["shared"]


def bench_export(width, seed=0):
    """Prints the export's bytes against its bound for prune.py's SPARSITY, 90% everywhere,
    and SPARSITY with quantize.py's 4-bit weight sharing; -> {label: export / bound}."""
    from export import export_with_report
    from prune import SPARSITY, FineGrainedPruner
    from quantize import BITS, KMeansQuantizer

    config, ratios = {"width": width, "num_classes": 10}, {}
    cases = (("prune.py's SPARSITY", SPARSITY, False), ("90% everywhere", {n: 0.9 for n in SPARSITY}, False),
             ("prune.py's SPARSITY, 4-bit shared weights", SPARSITY, True))
    for label, sparsity, shared in cases:
        torch.manual_seed(seed)
        model = build_model(**config)
        with tempfile.TemporaryDirectory() as tmp:
            dense = save_checkpoint({"model": model.state_dict(), "stage": "dense", "config": config},
                                    Path(tmp) / "dense.pt").stat().st_size
            masks = FineGrainedPruner(model, sparsity).masks
            if shared:
                KMeansQuantizer(model, BITS)
            print(f"--- width {width:g}, random weights, {label}")
            figures = export_with_report(model, masks, config, Path(tmp) / "pruned.sparse.pt", dense, shared=shared)
            print(f"bound is {dense / figures['bound_bytes']:.2f}x smaller than dense.pt")
        ratios[label] = figures["export_bytes"] / figures["bound_bytes"]
    return ratios


def bench_export_of(path):
    """The same for a trained checkpoint (pruned, finetuned or quantized): its export is
    written to a temporary folder; -> {path: export / bound}."""
    from export import export_with_report
    from model import build_model_from_checkpoint

    ckpt = load_checkpoint(path, stages=("pruned", "finetuned", "quantized"))
    if ckpt.get("schedule") and ckpt["stage"] == "pruned":
        raise UserError(f"{path} was pruned with --gradual: its masks are not applied yet; measure its finetuned.pt")
    model = build_model_from_checkpoint(ckpt)
    shared = ckpt["stage"] == "quantized"
    print(f"--- {path}: {ckpt['stage']}, width {ckpt['config']['width']:g}, sparsity "
          f"{ckpt['metrics']['sparsity']:.2%}, {'shared' if shared else 'fp32'} values")
    with tempfile.TemporaryDirectory() as tmp:
        figures = export_with_report(model, ckpt["masks"], ckpt["config"], Path(tmp) / "m.sparse.pt",
                                     ckpt["metrics"]["dense"]["checkpoint_bytes"], shared=shared)
    return {str(path): figures["export_bytes"] / figures["bound_bytes"]}


def in_child(fn, *args):
    """Run fn(*args) in a fresh process (not a daemon: the baseline's DataLoader forks workers)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default=data.DEFAULT_DATA_DIR, help="CIFAR-10 folder (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    add("--width", type=width, default=0.25, help="model width (default: %(default)s)")
    add("--batch-size", type=positive_int, default=512, help="(default: %(default)s)")
    add("--steps", type=positive_int, default=5,
        help="timed batches per phase, after one warm-up (default: %(default)s)")
    add("--workers", type=nonnegative_int, default=2, help="baseline DataLoader workers (default: %(default)s)")
    add("--scan-images", type=nonnegative_int, default=500,
        help="validation images for the scan timing; 0 skips it (default: %(default)s)")
    add("--export", action="store_true",
        help="measure only the export against its bound, on a random model or the --checkpoint "
             "files (needs no data)")
    add("--checkpoint", nargs="+", default=None, metavar="FILE",
        help="--export: measure these trained checkpoints (pruned, finetuned or quantized) "
             "instead of a random model")
    add("--seed", type=seed_int, default=0, help="--export: seed of the random model (default: %(default)s)")
    return parser


def main(args):
    if args.checkpoint and not args.export:
        raise UserError("--checkpoint goes with --export")
    if args.export:
        if args.checkpoint:
            return {k: v for path in args.checkpoint for k, v in bench_export_of(path).items()}
        return bench_export(args.width, args.seed)
    device = get_device(args.device)
    train_x = data.load_cifar10(args.data_dir)[0]  # bad data fails here, in one line, before any child starts
    if len(train_x) < args.batch_size * (args.steps + 1):
        raise UserError(f"{args.data_dir} has {len(train_x):,} training images, fewer than --batch-size x "
                        f"(--steps + 1) = {args.batch_size * (args.steps + 1):,}: lower either")
    if args.scan_images >= len(train_x):
        raise UserError(f"--scan-images must be below the {len(train_x):,} training images")
    print(f"bench: width {args.width}, batch {args.batch_size}, {args.steps} timed steps, device {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}")
    results = {phase: in_child(time_phase, phase, args)
               for phase in ("baseline-train", "repo-train", "baseline-eval", "repo-eval")}
    rows = []
    for kind in ("train", "eval"):
        (base, base_mem), (repo, repo_mem) = results[f"baseline-{kind}"], results[f"repo-{kind}"]
        rows.append([kind, f"{base:,.0f}", f"{repo:,.0f}", f"{repo / base:.2f}x",
                     f"{base_mem:,.0f}", f"{repo_mem:,.0f}"])
    print(format_table(rows, ["images/s", "baseline", "repo", "ratio", "baseline peak MiB", "repo peak MiB"]))
    print(f"(repo eval uses {TTA}, a forward pass per view; the baseline one view)")
    out = {"train_ratio": results["repo-train"][0] / results["baseline-train"][0],
           "eval_ratio": results["repo-eval"][0] / results["baseline-eval"][0]}
    if args.scan_images:
        naive, shared = in_child(time_scans, args)
        print(f"sensitivity scan, 17 layers x {len(DEFAULT_SPARSITIES)} sparsities on {args.scan_images} images: "
              f"naive {naive:.1f} s, "
              f"shared prefix {shared:.1f} s ({naive / shared:.2f}x faster, identical accuracies)")
        out["scan_ratio"] = naive / shared
    return out


if __name__ == "__main__":
    cli(main, get_args_parser())
