"""A sweep's runs as Ray tasks, on N local workers (frontier.py --jobs N) or on a running Ray
cluster (--address, or RAY_ADDRESS). Each run is one task; the next run of an iterative
chain takes the task of the run below it as its input, so Ray hands that run's export
along. The driver puts the data and the dense model in Ray's object store once: a worker
needs no data folder and no shared file system. Workers return each run's record and its
exports' bytes; the driver alone writes them. A worker that dies (killed, out of memory,
a lost node) has its run retried `retries` times; any other failure stops the sweep.
"""
import logging
import signal
import socket
import sys
from pathlib import Path

import torch

from sweep import BELOW, run_label
from utils import UserError, get_device, plural

REPO = Path(__file__).resolve().parent
# What a worker on another node gets of the repo: the code, not the runs or the data.
EXCLUDES = ["/.git", "/data", "/checkpoints", "/plots", "/runs", "/tests", "/docs", "*.pt", "__pycache__"]


def check_reachable(address):
    """Fail in one line, within seconds, when nothing listens at HOST:PORT (Ray would retry for a minute)."""
    if address == "auto":  # Ray's own: the cluster this machine is a node of
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise UserError(f"no Ray cluster answers at {address} (--address or RAY_ADDRESS): start one with "
                        "`ray start --head` (it prints HOST:6379), or leave --address out to run here") from None


def connect(address, jobs, device):
    """Join the Ray cluster at `address`, or start one here with `jobs` workers -> the options
    of each run's task: one CPU (on CUDA one GPU), and the threads it may use."""
    try:
        import ray
    except ImportError:
        raise UserError("--jobs N and --address run the sweep on Ray, which is not installed: "
                        "pip install -r requirements.txt, or pass --jobs 1") from None
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES}
    gpu = {"num_gpus": 1} if device.type == "cuda" else {}
    where = f"join the Ray cluster at {address}" if address else "start Ray here"
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init sets its own, which would skip the Ctrl-C path
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=jobs, num_gpus=torch.cuda.device_count() if gpu else 0, include_dashboard=False,
                     runtime_env=runtime_env, _node_ip_address="127.0.0.1", log_to_driver=True,
                     logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 (Ray raises several kinds: a wrong port, a version mismatch, a full /tmp)
        raise UserError(f"cannot {where} ({str(e).strip().splitlines()[0][:200]})"
                        + ("" if address else ": pass --jobs 1 to run the sweep in this process")) from None
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return {"num_cpus": 1, **gpu}, 1 if address else max(1, torch.get_num_threads() // jobs)


def run_task(dense, datasets, budget, run, start, scan, device_type, threads):
    """One run in a Ray worker, with its own loaders over the data the driver put in the
    object store -> (record, {export file name: bytes})."""
    from data import make_loaders
    from frontier import run_point

    torch.set_num_threads(threads)
    device = get_device(device_type, budget.cudnn_benchmark)  # on CUDA, Ray has set CUDA_VISIBLE_DEVICES
    return run_point(dense, make_loaders(datasets, budget.recipe, device, budget.eval_views), budget, run, start, scan)


def run_on_ray(chains, dense, datasets, budget, scan, device, resources, threads, retries, emit):
    """Submit every run of `chains`, the longest chains first, then emit(result, run) in the
    order they finish. On a failure, Ctrl-C or any exit, the runs not finished are cancelled."""
    import ray

    task = ray.remote(run_task).options(**resources, max_retries=retries, retry_exceptions=False)
    dense_ref, data_ref = ray.put(dense), ray.put(datasets)
    runs = {}
    for chain in sorted(chains, key=len, reverse=True):
        below = None
        for run, start in chain:
            below = task.remote(dense_ref, data_ref, budget, run, below if start == BELOW else start, scan,
                                device.type, threads)
            runs[below] = run
    pending = list(runs)
    try:
        while pending:
            [ready], pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayError as e:
                raise UserError(failure(e, runs[ready], retries)) from None
            emit(result, runs.pop(ready))  # its bytes leave the object store once no later run needs them
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.shutdown()


def failure(error, run, retries):
    """The one line for a run that failed in Ray: its own error, or its worker's death."""
    import ray

    what = run_label(run)
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, UserError):
        return f"{'' if str(cause).startswith(what) else what + ': '}{cause}; the runs finished before it are saved"
    if isinstance(error, ray.exceptions.RayTaskError):
        print(error, file=sys.stderr)  # a bug: its traceback, from the worker
        return (f"{what} failed ({type(cause).__name__}: {cause}; traceback above); the runs finished before it are "
                "saved")
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                          ray.exceptions.OutOfMemoryError)):
        return (f"{what}: its worker died {plural(retries + 1, 'time')} ({type(error).__name__}: out of memory, "
                "killed or a lost node); the runs finished before it are saved: rerun the same command to go on")
    return (f"{what}: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}; the runs finished before "
            "it are saved: rerun the same command to go on")
