"""Speed of the repo's loops against a plain PyTorch baseline and the device's own matmul peak, in one run.

    python bench.py                          # widths 0.25 and 1.0
    python bench.py --width 0.25 --profile   # and each op's share of the training step
    python bench.py --export --width 1.0     # the export's size against its bound (no data)
    python bench.py --export --checkpoint checkpoints/finetuned.pt checkpoints/quantized.pt

Both sides run the same model, width, batch size and images, each phase in a fresh process so that its peak
memory (CPU RSS, CUDA allocated) is its own. Baseline: the textbook loop, a dataset like torchvision's CIFAR10 (a
PIL image per item) and a DataLoader with per-image crop, flip, ToTensor and Normalize, in fp32. Repo: data.Loader
(the split on the device, batched augmentation), channels_last, bf16 autocast where native (PRUNING_AUTOCAST=fp32
turns it off), train.train_one_epoch and utils.evaluate. Peak: the best square-matmul MAC/s on the same threads,
in fp32 and the repo's dtype; a training step costs 3 forwards, so its fraction is 3 x MACs x images/s / peak.
--jobs N also times N repo training processes side by side, 1/N of the threads each (frontier.py --jobs).
--export instead measures the export (export.py) against its information bound, on a random model pruned as
prune.py does, 90% everywhere and with 4-bit weight sharing (quantize.py), or on --checkpoint files.
"""
import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import data
from checkpoint import load_checkpoint, save_checkpoint
from cli import MAX_WIDTH, cli, comma_list, nonnegative_int, positive_int, resolve_jobs, seed_int, width
from export import export_with_report
from model import build_model, build_model_from_checkpoint
from prune import SPARSITY
from pruning import FineGrainedPruner
from quantize import BITS, KMeansQuantizer
from sensitivity import DEFAULT_SPARSITIES, naive_sensitivity_scan, sensitivity_scan
from train import build_optimizer, build_scheduler, train_one_epoch
from utils import (AUTOCAST_ENV, TTA, TTA_VIEWS, UserError, compute_dtype, evaluate, format_table, get_device,
                   get_model_macs, native_bf16_cpu)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_child(fn, *args):
    """Run fn(*args) in a fresh process (not a daemon: the baseline's DataLoader forks workers)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def peak_macs(device, dtype, budget=3.0):
    """The device's best square-matmul multiply-adds per second, found in about `budget` seconds."""
    # The side doubles while the next size's timing fits the budget, so a dtype the device only emulates stops early.
    n, largest = (256, 4096) if device.type == "cpu" else (1024, 16384)
    best, next_size, start = 0.0, 0.0, time.perf_counter()
    while n <= largest and time.perf_counter() - start + next_size <= budget:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b  # warm-up: kernels chosen, memory touched
        synchronize(device)
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < budget / 10:
            a @ b
            reps += 1
            if reps % 4 == 0:
                synchronize(device)
        synchronize(device)
        seconds = time.perf_counter() - t0
        best = max(best, reps * n ** 3 / seconds)
        n *= 2
        next_size = 3 * 8 * seconds / reps  # a warm-up and two products of twice the side
    return best


def peaks(args, dtypes):
    """Runs in a child process: -> {dtype name: MAC/s} for each of `dtypes` ("fp32", "bf16")."""
    device = get_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # as the baseline's fp32 convolutions
    return {name: peak_macs(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[name]) for name in dtypes}


class TensorImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR10 dataset: uint8 arrays in memory, a PIL image per item, per-image transforms."""

    def __init__(self, images, labels, train):
        from torchvision import transforms  # slow to import: only the baseline needs it
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(data.MEAN, data.STD)])
        self.arrays, self.labels = images.permute(0, 2, 3, 1).numpy(), labels.tolist()

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def baseline_epoch(model, batches, optimizer, device, train):
    """The textbook loop over (x, y) batches on the CPU: fp32, one view."""
    model.train(train)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if train:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(x).argmax(1).eq(y).sum().item()


def time_phase(phase, args, model_width, threads=None, barrier=None):
    """In a child process: -> {"images_per_s", "peak_mib", "start", "end" (wall-clock s), "report" (text or None)}."""
    torch.set_num_threads(threads or torch.get_num_threads())
    torch.manual_seed(0)
    device = get_device(args.device, cudnn_benchmark=not phase.endswith("+no-cudnn-benchmark"))
    images, labels = data.get_datasets(args.data_dir, val_size=0)[0]["train"]
    bs, n = args.batch_size, args.batch_size * (args.steps + 1)  # one warm-up batch, then the timed steps
    repo, train = phase.startswith("repo"), "train" in phase
    model = build_model(model_width).to(device, memory_format=torch.channels_last if repo else torch.preserve_format)
    optimizer = build_optimizer(model, 0.05, 0.9, 5e-4)
    if not repo:  # workers forked, Linux's default, as users get it
        batches = iter(torch.utils.data.DataLoader(TensorImages(images[:n], labels[:n], train), bs, shuffle=train,
                                                   drop_last=train, num_workers=args.workers,
                                                   multiprocessing_context="fork" if args.workers else None))
        warm, timed = [next(batches)], batches
        epoch = partial(baseline_epoch, model, optimizer=optimizer, device=device, train=train)
    else:
        warm, timed = (data.Loader(images[i:j], labels[i:j], bs, device, train=train) for i, j in ((0, bs), (bs, n)))
        epoch = partial(evaluate, model)
        if train:
            epoch = partial(train_one_epoch, model, optimizer=optimizer, label_smoothing=0.2,
                            scheduler=build_scheduler(optimizer, 10 * len(timed), 0.2),
                            forward=torch.compile(model) if phase.endswith("+compile") else None)
    t0 = time.perf_counter()
    epoch(warm)  # compiles, with --compile
    synchronize(device)
    report = f"compiling and the first step took {time.perf_counter() - t0:.1f} s" if "+compile" in phase else None
    if barrier is not None:
        barrier.wait(timeout=600)  # all the jobs start together; one that died breaks it: the others fail, not hang
    start = time.perf_counter()
    epoch(timed)
    synchronize(device)
    seconds, end = time.perf_counter() - start, time.time()
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    if args.profile and phase == "repo-train" and barrier is None:  # after the timing: the profiler slows it
        report = profile_table(lambda: epoch(timed), device)
    return {"images_per_s": args.batch_size * args.steps / seconds, "peak_mib": peak_mib, "start": end - seconds,
            "end": end, "report": report}


def profile_table(fn, device, rows=12):
    """Each op's share of fn()'s time, as text: self time, so no op counts twice; on CUDA its kernels' time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages() if "ProfilerStep" not in e.key), key=self_time, reverse=True)
    total = sum(map(self_time, events)) or 1
    table = [[e.key[:60], f"{self_time(e) / total:.1%}", e.count] for e in events[:rows]]
    return format_table(table, ["op", "share of the step", "calls"])


def time_jobs(args, model_width, jobs):
    """Images/s of `jobs` repo training processes side by side, each with its share of the threads."""
    # Their timed passes start together: all their images over the time from the first start to the last end.
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // jobs)
    with context.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=context) as pool:
        barrier = manager.Barrier(jobs)
        futures = [pool.submit(time_phase, "repo-train", args, model_width, threads, barrier) for _ in range(jobs)]
        failed = [f.exception() for f in wait(futures, return_when=FIRST_EXCEPTION).done if f.exception()]
        if failed:
            barrier.abort()  # the jobs waiting for the one that failed fail too, rather than hang
            raise UserError(f"a side-by-side training job failed: {failed[0]!r}") from failed[0]
    timings = [f.result() for f in futures]
    images = sum(t["images_per_s"] * (t["end"] - t["start"]) for t in timings)
    return images / (max(t["end"] for t in timings) - min(t["start"] for t in timings))


def time_scans(args, model_width):
    """Seconds of the naive and of the shared-prefix sensitivity scan on the same model."""
    device = get_device(args.device)
    loader = data.Loader(*data.get_datasets(args.data_dir, val_size=args.scan_images)[0]["val"], 1000, device)
    model = build_model(model_width).to(device, memory_format=torch.channels_last).eval()
    seconds, accuracies = {}, {}
    for name, scan in (("naive", naive_sensitivity_scan), ("shared", sensitivity_scan)):
        start = time.perf_counter()
        accuracies[name] = scan(model, loader, DEFAULT_SPARSITIES)
        seconds[name] = time.perf_counter() - start
    assert accuracies["naive"] == accuracies["shared"], "the scans disagree"
    return seconds["naive"], seconds["shared"]


def bench_export(width, seed=0):
    """Prints the export's bytes against its bound on a random model pruned three ways: -> {label: export / bound}."""
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
    """The same for a trained pruned, finetuned or quantized checkpoint: -> export / bound."""
    ckpt = load_checkpoint(path, stages=("pruned", "finetuned", "quantized"))
    shared, metrics = ckpt["stage"] == "quantized", ckpt["metrics"]
    print(f"--- {path}: {ckpt['stage']}, width {ckpt['config']['width']:g}, sparsity {metrics['sparsity']:.2%}, "
          f"{'shared' if shared else 'fp32'} values")
    with tempfile.TemporaryDirectory() as tmp:
        figures = export_with_report(build_model_from_checkpoint(ckpt), ckpt["masks"], ckpt["config"],
                                     Path(tmp, "m.sparse.pt"), metrics["dense"]["checkpoint_bytes"], shared=shared)
    return figures["export_bytes"] / figures["bound_bytes"]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default=data.DEFAULT_DATA_DIR, help="CIFAR-10 folder (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    add("--width", type=comma_list(width, f"widths (numbers above 0, at most {MAX_WIDTH})"), default=(0.25, 1.0),
        help="comma-separated model widths (default: 0.25,1.0)")
    add("--batch-size", type=positive_int, default=512, help="(default: %(default)s)")
    add("--steps", type=positive_int, default=5, help="timed batches per phase, after a warm-up (default: %(default)s)")
    add("--workers", type=nonnegative_int, default=2, help="baseline DataLoader workers (default: %(default)s)")
    add("--jobs", type=nonnegative_int, default=0,
        help="also time this many repo training processes side by side (frontier.py --jobs); 0 = 2, 1 skips it")
    add("--compile", action="store_true", help="also time the repo's training step under torch.compile")
    add("--no-cudnn-benchmark", action="store_true", help="also time it with cuDNN's autotuner off (CUDA only)")
    add("--profile", action="store_true", help="also print each op's share of the repo's training step")
    add("--scan-images", type=nonnegative_int, default=500,
        help="images to time the sensitivity scan on, shared prefix against naive; 0 skips it (default: %(default)s)")
    add("--export", action="store_true", help="measure only the export against its bound (needs no data)")
    add("--checkpoint", nargs="+", metavar="FILE", help="--export: these trained checkpoints, not a random model")
    add("--seed", type=seed_int, default=0, help="--export: seed of the random model (default: %(default)s)")
    return parser


def bench_width(args, w, peak, repo_dtype, levers, jobs):
    """Times and prints every phase at width `w` against the baseline: -> its figures."""
    macs = get_model_macs(build_model(w), torch.zeros(1, 3, 32, 32))
    lever_phases = [f"repo-train+{lever}" for lever in levers]
    results = {phase: in_child(time_phase, phase, args, w)
               for phase in ["baseline-train", "repo-train", "baseline-eval", "repo-eval", *lever_phases]}
    rate = {phase: r["images_per_s"] for phase, r in results.items()}
    # MACs per image: a training step costs 3 forwards, the repo's evaluation one per TTA view
    fraction = {phase: (TTA_VIEWS if phase == "repo-eval" else 1 if "eval" in phase else 3) * macs * rate[phase]
                / peak["fp32" if phase.startswith("baseline") else repo_dtype] for phase in results}
    rows = []
    for phase in ["repo-train", "repo-eval", *lever_phases]:
        base = "baseline-eval" if phase == "repo-eval" else "baseline-train"
        rows.append([phase.removeprefix("repo-").replace("+", ", "), f"{rate[base]:,.0f}", f"{rate[phase]:,.0f}",
                     f"{rate[phase] / rate[base]:.2f}x", f"{fraction[base]:.1%}", f"{fraction[phase]:.1%}",
                     f"{results[base]['peak_mib']:,.0f}", f"{results[phase]['peak_mib']:,.0f}"])
    print(f"--- width {w:g}: {macs / 1e6:,.1f} M multiply-adds per image forward")
    print(format_table(rows, ["images/s", "baseline", "repo", "ratio", "baseline of fp32 peak",
                              f"repo of {repo_dtype} peak", "baseline peak MiB", "repo peak MiB"]))
    alone = rate["repo-train"]
    figures = {"train_images_per_s": alone, "train_ratio": alone / rate["baseline-train"],
               "eval_ratio": rate["repo-eval"] / rate["baseline-eval"], "train_peak_fraction": fraction["repo-train"],
               "eval_peak_fraction": fraction["repo-eval"], "baseline_train_peak_fraction": fraction["baseline-train"]}
    for lever, phase in zip(levers, lever_phases):
        note = results[phase]["report"]
        print(f"{lever}: {rate[phase] / alone:.2f}x the repo's training step" + (f" ({note})" if note else ""))
        figures[f"{lever}_ratio"] = rate[phase] / alone
    if results["repo-train"]["report"]:
        print(f"the repo's training step, op by op (width {w:g}):\n{results['repo-train']['report']}")
    if jobs > 1:
        threads, together = torch.get_num_threads(), time_jobs(args, w, jobs)
        print(f"{jobs} training jobs side by side, {max(1, threads // jobs)} thread(s) each: {together:,.0f} "
              f"images/s in all ({3 * macs * together / peak[repo_dtype]:.1%} of peak), against "
              f"{alone:,.0f} for one job with {threads}: {together / alone:.2f}x")
        figures.update(jobs=jobs, jobs_images_per_s=together, jobs_ratio=together / alone)
    return figures


def main(args):
    if args.checkpoint and not args.export:
        raise UserError("--checkpoint goes with --export")
    if args.export and (args.profile or args.compile or args.no_cudnn_benchmark):
        raise UserError("--export measures file sizes only: drop --profile, --compile and --no-cudnn-benchmark")
    if args.export:  # each checkpoint's export / bound, or each width's for a random model
        return ({str(path): bench_export_of(path) for path in args.checkpoint} if args.checkpoint
                else {w: bench_export(w, args.seed) for w in args.width})
    device = get_device(args.device)
    images = len(data.load_cifar10(args.data_dir)[0])  # bad data fails here, in one line, before any child starts
    if images < args.batch_size * (args.steps + 1):
        raise UserError(f"{args.data_dir} has {images:,} training images, fewer than --batch-size x "
                        f"(--steps + 1) = {args.batch_size * (args.steps + 1):,}: lower either")
    if args.scan_images >= images:
        raise UserError(f"--scan-images must be below the {images:,} training images")
    jobs, cuda = resolve_jobs(args.jobs, 2), device.type == "cuda"
    print(f"bench: batch {args.batch_size}, {args.steps} timed steps, device "
          f"{torch.cuda.get_device_name(device) if cuda else f'cpu, {torch.get_num_threads()} threads'}")
    repo_dtype = compute_dtype(device)  # only the dtypes the steps compute in have a peak worth measuring
    t0 = time.perf_counter()
    peak = in_child(peaks, args, sorted({"fp32", repo_dtype}))
    print(f"peak matmul: {', '.join(f'{k} {v / 1e9:,.0f} GMAC/s' for k, v in peak.items())}, measured in "
          f"{time.perf_counter() - t0:.1f} s | the repo's step computes in {repo_dtype} ({AUTOCAST_ENV} overrides), "
          "the baseline's in fp32")
    if not cuda and repo_dtype == "bf16" and not native_bf16_cpu():
        print("this CPU has no native bf16: oneDNN converts to fp32 and back, slower than plain fp32, and the "
              "step's fraction of that bf16 'peak' can pass 100%")
    if args.no_cudnn_benchmark and not cuda:
        print("--no-cudnn-benchmark: cuDNN is CUDA's, so there is nothing to time on the CPU; skipped")
    levers = ["compile"] * args.compile + ["no-cudnn-benchmark"] * (args.no_cudnn_benchmark and cuda)
    out = {"peak_macs": peak, "widths": {w: bench_width(args, w, peak, repo_dtype, levers, jobs) for w in args.width}}
    print(f"(repo eval uses {TTA}, a forward pass per view; the baseline one view)")
    if args.scan_images:
        w = min(args.width)
        naive, shared = in_child(time_scans, args, w)
        print(f"sensitivity scan at width {w:g}, 17 layers x {len(DEFAULT_SPARSITIES)} sparsities on "
              f"{args.scan_images} images: naive {naive:.1f} s, shared prefix {shared:.1f} s "
              f"({naive / shared:.2f}x faster, identical accuracies)")
        out["scan_ratio"] = naive / shared
    return out


if __name__ == "__main__":
    cli(main, get_args_parser())
