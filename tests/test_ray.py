"""frontier.py's runs as Ray tasks give the records and export bytes of the in-process sweep,
wherever they run: on two local workers, on a simulated two-node cluster (--address), after
a worker is killed mid-run; a failure or Ctrl-C keeps the finished runs and the same command
completes the sweep; a killed driver leaves no task training. Ray stays on 127.0.0.1
(conftest.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import frontier
from conftest import script_args
from utils import UserError

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's workers in /proc")
REPO = Path(frontier.__file__).parent
# long enough a run (8 epochs, about 3 s) to be caught mid-run
FLAGS = ("--methods", "global,global-iterative", "--sparsities", "0.5,0.8", "--bits", "2", "--epochs", "8",
         "--batch-size", "32", "--quantize-epochs", "1", "--device", "cpu")


def argv(image_folder, chain, out, *extra):
    return ["--data-dir", str(image_folder), "--checkpoint-dir", str(chain), "--plot-dir", str(out.parent / "plots"),
            "--out", str(out), *FLAGS, *extra]


def outcome(out):
    """{run: record without its seconds} and {export name: bytes} of a sweep."""
    points = json.loads(out.read_text())["points"]
    records = {(p["method"], p["target"], p["seed"]): {k: v for k, v in p.items() if k != "seconds"} for p in points}
    return records, {p.name: p.read_bytes() for p in out.with_suffix("").iterdir()}


@pytest.fixture(scope="module")
def reference(chain_dir, image_folder, tmp_path_factory):
    """The in-process sweep, one thread, as each Ray worker of two gets on two cores."""
    out = tmp_path_factory.mktemp("reference") / "f.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frontier.main(frontier.get_args_parser().parse_args(argv(image_folder, chain_dir, out, "--jobs", "1")))
    finally:
        torch.set_num_threads(threads)
    return outcome(out)


def start(image_folder, chain, out, *extra):
    """frontier.py in a process of its own, with 2 threads (one for each of two workers)."""
    return subprocess.Popen([sys.executable, "frontier.py", *argv(image_folder, chain, out, *extra)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def tasks():
    """PIDs of the Ray workers running a run now (Ray titles them by the task they run)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{entry}/cmdline", "rb").read().startswith(b"ray::run_task"):
                found.append(int(entry))
        except OSError:
            pass
    return found


def wait_for(condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def test_two_local_workers_and_a_two_node_cluster_give_the_in_process_records(chain, image_folder, tmp_path,
                                                                            reference):
    process = start(image_folder, chain, tmp_path / "local.json", "--jobs", "2")
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    assert outcome(tmp_path / "local.json") == reference

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        assert cluster.address.startswith("127.0.0.1:")
        process = start(image_folder, chain, tmp_path / "cluster.json", "--address", cluster.address)
        assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    finally:
        cluster.shutdown()
    assert outcome(tmp_path / "cluster.json") == reference


def test_a_killed_worker_has_its_run_retried_to_the_same_records(chain, image_folder, tmp_path, reference):
    process = start(image_folder, chain, tmp_path / "f.json", "--jobs", "2")
    victim = wait_for(tasks, "no run started")[0]
    time.sleep(0.5)  # into its training
    assert victim in tasks(), "the run ended before the kill: nothing would be retried"
    os.kill(victim, signal.SIGKILL)
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    assert outcome(tmp_path / "f.json") == reference


def test_a_worker_dead_past_its_retries_stops_in_one_line_and_the_rerun_completes(chain, image_folder, tmp_path,
                                                                                reference):
    out = tmp_path / "f.json"
    process = start(image_folder, chain, out, "--jobs", "2", "--retries", "0")
    wait_for(lambda: out.exists(), "no run finished")  # one run saved, the others under way
    os.kill(wait_for(tasks, "no run under way")[0], signal.SIGKILL)
    assert process.wait(timeout=300) == 2
    err = [line for line in process.communicate()[1].splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "its worker died 1 time " in err[0] and "rerun the same command" in err[0], err
    kept = json.loads(out.read_text())["points"]
    assert 1 <= len(kept) < 4
    process = start(image_folder, chain, out, "--jobs", "2")
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    assert outcome(out) == reference


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and a scheduler's or timeout's stop
def test_ctrl_c_keeps_the_finished_runs_and_the_same_command_goes_on(chain, image_folder, tmp_path, reference, stop):
    out = tmp_path / "f.json"
    process = start(image_folder, chain, out, "--jobs", "2")
    wait_for(lambda: out.exists(), "no run finished")
    process.send_signal(stop)
    assert process.wait(timeout=120) == 130
    assert "rerun the same command to continue" in process.communicate()[1]
    assert wait_for(lambda: not tasks(), "a run went on after Ctrl-C", 60)
    assert 1 <= len(json.loads(out.read_text())["points"]) < 4
    process = start(image_folder, chain, out, "--jobs", "2")
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    assert outcome(out) == reference


def test_a_killed_driver_leaves_no_run_training(chain, image_folder, tmp_path):
    process = start(image_folder, chain, tmp_path / "f.json", "--jobs", "2", "--epochs", "200")
    wait_for(lambda: len(tasks()) == 2, "the two runs did not start")
    process.kill()  # SIGKILL: no handler of the driver's runs
    process.wait()
    try:
        assert wait_for(lambda: not tasks(), "a run outlived its killed driver", 60)
    finally:
        for pid in tasks():  # not to leave them training on if the test fails
            os.kill(pid, signal.SIGKILL)


def test_a_run_that_fails_on_a_worker_is_one_line(chain, image_folder, tmp_path):
    with pytest.raises(UserError, match=r"^(global|uniform) 0.5 seed 0: finetuning diverged .* lower --lr; the runs fin"):
        frontier.main(script_args(frontier.get_args_parser(), image_folder, chain, "--out", str(tmp_path / "f.json"),
                                  "--methods", "global,uniform", "--sparsities", "0.5", "--epochs", "1",
                                  "--batch-size", "32", "--lr", "1e30", "--bits", "0", "--jobs", "2"))
    assert not (tmp_path / "f.json").exists()
