"""Speed of the repo's loops against a plain PyTorch baseline and against the machine's
own matmul peak, measured in one run.

    python bench.py                          # widths 0.25 and 1.0
    python bench.py --width 0.25 --profile   # and each op's share of the training step
    python bench.py --export --width 1.0     # the export's size against its bound (no data)
    python bench.py --export --checkpoint checkpoints/finetuned.pt checkpoints/quantized.pt

Same model, width, batch size and images for both sides:
  baseline  a dataset over the uint8 images that works as torchvision's CIFAR10 does (a PIL
            image per item), a DataLoader applying per-image torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
            Normalize), fp32, contiguous memory;
  repo      data.Loader (whole split on the device, batched augmentation), channels_last,
            bf16 autocast where the device has native bf16 (utils.compute_dtype; set
            PRUNING_AUTOCAST=fp32 to turn it off), train.train_one_epoch and utils.evaluate.
Each phase runs in a fresh process, so its peak memory (RSS on the CPU, allocated
memory on CUDA) is its own. Ratios are repo / baseline from this run only.

Peak: the best square matmul throughput of the device, on the same threads, measured
first in a few seconds, in fp32 and, where the repo's step computes in bf16, in bf16. A
training step costs 3x the forward pass's multiply-adds (forward, and the backward's two
products); the fraction of peak is 3 x MACs x images/s over the peak MAC/s of the dtype
the side computes in (the repo's as printed, the baseline's fp32). --jobs N then times N
repo training processes side by side, each with 1/N of the threads (frontier.py --jobs),
against the one with all of them. The scan
timing (shared-prefix sensitivity scan against the naive one) runs at the smallest width.

--export instead measures the compressed export (export.py) against its information
bound, on a randomly initialised model pruned with the real code: prune.py's SPARSITY,
90% everywhere, and SPARSITY plus quantize.py's 4-bit k-means weight sharing; with
--checkpoint, on trained pruned, finetuned or quantized checkpoints instead.
"""
import argparse
import multiprocessing
import queue
from concurrent.futures import ProcessPoolExecutor
import resource
import tempfile
import time
from pathlib import Path

import torch

import data
from checkpoint import load_checkpoint, save_checkpoint
from cli import MAX_WIDTH, cli, comma_list, nonnegative_int, positive_int, seed_int, width
from model import build_model
from sensitivity import DEFAULT_SPARSITIES
from utils import (AUTOCAST_ENV, TTA, TTA_VIEWS, UserError, compute_dtype, format_table, get_device, get_model_macs,
                   native_bf16_cpu, resolve_jobs)

width_list = comma_list(width, f"widths (numbers above 0, at most {MAX_WIDTH})")


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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_macs(device, dtype, budget=3.0):
    """The device's best square-matmul throughput in multiply-adds per second, found in about
    `budget` seconds whatever the device: the side doubles from 256 (1024 on CUDA) for as long
    as the next size's timing still fits, so a dtype the device only emulates stops early."""
    n, largest = (256, 4096) if device.type == "cpu" else (1024, 16384)
    best, start = 0.0, time.perf_counter()
    while n <= largest:
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
        if time.perf_counter() - start + next_size > budget:
            break
    return best


def peaks(args, dtypes):
    """Runs in a child process: -> {dtype name: MAC/s} for each of `dtypes` ("fp32", "bf16").
    On CUDA the fp32 matmul may use TF32, as cuDNN's fp32 convolutions (the baseline's) do by
    default."""
    device = get_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    return {name: peak_macs(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[name]) for name in dtypes}


def time_phase(phase, args, model_width, threads=None, barrier=None):
    """Runs in a child process: -> {"images_per_s", "peak_mib", "start", "end" (wall-clock
    seconds of the timed pass), "report" (a note or the --profile table, or None)}. With
    a barrier, the timed pass starts when every job sharing it is ready."""
    import torch.nn.functional as F

    from train import build_optimizer, build_scheduler, train_one_epoch
    from utils import evaluate

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = get_device(args.device)  # turns cuDNN's autotuner on, as for every script
    torch.backends.cudnn.benchmark = not phase.endswith("+no-cudnn-benchmark")
    datasets, _ = data.get_datasets(args.data_dir, val_size=0)
    images, labels = datasets["train"]
    n = args.batch_size * (args.steps + 1)  # one warm-up batch, then the timed steps
    images, labels = images[:n], labels[:n]
    model = build_model(model_width).to(device)
    repo = phase.startswith("repo")
    report = None
    if repo:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, 0.05, 0.9, 5e-4)
    if repo:
        bs, train = args.batch_size, phase.startswith("repo-train")
        forward = torch.compile(model) if phase.endswith("+compile") else None
        warm = data.Loader(images[:bs], labels[:bs], bs, device, train=train)
        timed = data.Loader(images[bs:], labels[bs:], bs, device, train=train)
        if train:
            scheduler = build_scheduler(optimizer, 10 * len(timed), 0.2)
            t0 = time.perf_counter()
            train_one_epoch(model, warm, optimizer, scheduler, 0.2, forward=forward)  # compiles, with --compile
            synchronize(device)
            if forward is not None:
                report = f"compiling and the first step took {time.perf_counter() - t0:.1f} s"
            if barrier is not None:
                barrier.wait(timeout=600)  # a job that died breaks it: the others fail too, not hang
            start = time.perf_counter()
            train_one_epoch(model, timed, optimizer, scheduler, 0.2, forward=forward)
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
    synchronize(device)
    seconds, end = time.perf_counter() - start, time.time()
    result = {"images_per_s": args.batch_size * args.steps / seconds, "peak_mib": peak_memory_mib(device),
              "start": end - seconds, "end": end, "report": report}
    if args.profile and phase == "repo-train" and barrier is None:  # after the timing: the profiler slows it
        result["report"] = profile_table(lambda: train_one_epoch(model, timed, optimizer, scheduler, 0.2), device)
    return result


def profile_table(fn, device, rows=12):
    """Each op's share of the time of fn() (self time, so no op is counted twice; on CUDA
    the time of the kernels each op launched), as text."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(map(self_time, events)) or 1
    events.sort(key=self_time, reverse=True)
    table = [[e.key[:60], f"{self_time(e) / total:.1%}", e.count] for e in events[:rows]]
    return format_table(table, ["op", "share of the step", "calls"])


def job(args, model_width, threads, barrier, results):
    """One of --jobs side-by-side training processes: puts its timing on `results`."""
    results.put(time_phase("repo-train", args, model_width, threads, barrier))


def time_jobs(args, model_width, jobs):
    """Images/s of `jobs` repo training processes side by side, each with its share of the
    threads, their timed passes started together: all their images over the time from the
    first start to the last end."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    threads = max(1, torch.get_num_threads() // jobs)
    processes = [context.Process(target=job, args=(args, model_width, threads, barrier, results))
                 for _ in range(jobs)]
    for p in processes:
        p.start()
    timings = []
    try:
        while len(timings) < jobs:
            try:
                timings.append(results.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    raise UserError(f"a side-by-side training job failed (exit {failed[0]}); its error is "
                                    "above") from None
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    images = sum(t["images_per_s"] * (t["end"] - t["start"]) for t in timings)
    return images / (max(t["end"] for t in timings) - min(t["start"] for t in timings))


def time_scans(args, model_width):
    """Seconds of the shared-prefix and of the naive sensitivity scan on the same model."""
    from sensitivity import naive_sensitivity_scan, sensitivity_scan

    device = get_device(args.device)
    datasets, _ = data.get_datasets(args.data_dir, val_size=args.scan_images)
    loader = data.Loader(*datasets["val"], 1000, device)
    model = build_model(model_width).to(device, memory_format=torch.channels_last).eval()
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
    from prune import SPARSITY
    from pruning import FineGrainedPruner
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
    add("--width", type=width_list, default=(0.25, 1.0),
        help="comma-separated model widths (default: 0.25,1.0)")
    add("--batch-size", type=positive_int, default=512, help="(default: %(default)s)")
    add("--steps", type=positive_int, default=5,
        help="timed batches per phase, after one warm-up (default: %(default)s)")
    add("--workers", type=nonnegative_int, default=2, help="baseline DataLoader workers (default: %(default)s)")
    add("--jobs", type=nonnegative_int, default=0,
        help="also time this many repo training processes side by side, each with its share of "
             "the threads (frontier.py --jobs); 0 = 2; 1 skips it (default: %(default)s)")
    add("--compile", action="store_true", help="also time the repo's training step under torch.compile")
    add("--no-cudnn-benchmark", action="store_true",
        help="also time it with cuDNN's autotuner off (CUDA only; the scripts turn it on)")
    add("--profile", action="store_true",
        help="also print each op's share of the repo's training step (torch.profiler)")
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
    if args.export and (args.profile or args.compile or args.no_cudnn_benchmark):
        raise UserError("--export measures file sizes only: drop --profile, --compile and --no-cudnn-benchmark")
    if args.export:
        if args.checkpoint:
            return {k: v for path in args.checkpoint for k, v in bench_export_of(path).items()}
        return {w: bench_export(w, args.seed) for w in args.width}
    device = get_device(args.device)
    train_x = data.load_cifar10(args.data_dir)[0]  # bad data fails here, in one line, before any child starts
    if len(train_x) < args.batch_size * (args.steps + 1):
        raise UserError(f"{args.data_dir} has {len(train_x):,} training images, fewer than --batch-size x "
                        f"(--steps + 1) = {args.batch_size * (args.steps + 1):,}: lower either")
    if args.scan_images >= len(train_x):
        raise UserError(f"--scan-images must be below the {len(train_x):,} training images")
    threads = torch.get_num_threads()
    jobs = resolve_jobs(args.jobs, 2)
    print(f"bench: batch {args.batch_size}, {args.steps} timed steps, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {threads} threads'}")
    repo_dtype = compute_dtype(device)  # only the dtypes the steps compute in have a peak worth measuring
    t0 = time.perf_counter()
    peak = in_child(peaks, args, sorted({"fp32", repo_dtype}))
    print(f"peak matmul: {', '.join(f'{k} {v / 1e9:,.0f} GMAC/s' for k, v in peak.items())}, measured in "
          f"{time.perf_counter() - t0:.1f} s | the repo's step computes in {repo_dtype} ({AUTOCAST_ENV} overrides), "
          "the baseline's in fp32")
    if device.type == "cpu" and repo_dtype == "bf16" and not native_bf16_cpu():
        print("this CPU has no native bf16: oneDNN converts to fp32 and back, slower than plain fp32, and the "
              "step's fraction of that bf16 'peak' can pass 100%")
    levers = [lever for lever, on in (("compile", args.compile),
                                      ("no-cudnn-benchmark", args.no_cudnn_benchmark and device.type == "cuda")) if on]
    if args.no_cudnn_benchmark and device.type != "cuda":
        print("--no-cudnn-benchmark: cuDNN is CUDA's, so there is nothing to time on the CPU; skipped")
    out = {"peak_macs": peak, "widths": {}}
    for w in args.width:
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
            baseline = "baseline-eval" if phase == "repo-eval" else "baseline-train"
            rows.append([phase.removeprefix("repo-").replace("+", ", "), f"{rate[baseline]:,.0f}", f"{rate[phase]:,.0f}",
                         f"{rate[phase] / rate[baseline]:.2f}x", f"{fraction[baseline]:.1%}", f"{fraction[phase]:.1%}",
                         f"{results[baseline]['peak_mib']:,.0f}", f"{results[phase]['peak_mib']:,.0f}"])
        print(f"--- width {w:g}: {macs / 1e6:,.1f} M multiply-adds per image forward")
        print(format_table(rows, ["images/s", "baseline", "repo", "ratio", "baseline of fp32 peak",
                                  f"repo of {repo_dtype} peak", "baseline peak MiB", "repo peak MiB"]))
        figures = {"train_images_per_s": rate["repo-train"],
                   "train_ratio": rate["repo-train"] / rate["baseline-train"],
                   "eval_ratio": rate["repo-eval"] / rate["baseline-eval"],
                   "train_peak_fraction": fraction["repo-train"], "eval_peak_fraction": fraction["repo-eval"],
                   "baseline_train_peak_fraction": fraction["baseline-train"]}
        for lever, phase in zip(levers, lever_phases):
            note = results[phase]["report"]
            print(f"{lever}: {rate[phase] / rate['repo-train']:.2f}x the repo's training step" + (f" ({note})" if note else ""))
            figures[f"{lever}_ratio"] = rate[phase] / rate["repo-train"]
        if results["repo-train"]["report"]:
            print(f"the repo's training step, op by op (width {w:g}):\n{results['repo-train']['report']}")
        if jobs > 1:
            together = time_jobs(args, w, jobs)
            alone = rate["repo-train"]
            print(f"{jobs} training jobs side by side, {max(1, threads // jobs)} thread(s) each: {together:,.0f} "
                  f"images/s in all ({3 * macs * together / peak[repo_dtype]:.1%} of peak), against "
                  f"{alone:,.0f} for one job with {threads}: {together / alone:.2f}x")
            figures.update(jobs=jobs, jobs_images_per_s=together, jobs_ratio=together / alone)
        out["widths"][w] = figures
    print(f"(repo eval uses {TTA}, a forward pass per view; the baseline one view)")
    if args.scan_images:
        w = min(args.width)
        naive, shared = in_child(time_scans, args, w)
        print(f"sensitivity scan at width {w:g}, 17 layers x {len(DEFAULT_SPARSITIES)} sparsities on "
              f"{args.scan_images} images: naive {naive:.1f} s, "
              f"shared prefix {shared:.1f} s ({naive / shared:.2f}x faster, identical accuracies)")
        out["scan_ratio"] = naive / shared
    return out


if __name__ == "__main__":
    cli(main, get_args_parser())
