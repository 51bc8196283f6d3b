"""Refactors move no result: the golden run (tests/golden.py: the tiny chain, gradual and
iterative pruning, and a frontier of every method, through the scripts' command lines)
gives the figures and export bytes recorded in tests/golden.json, bit for bit.

Its steps pin fp32, one thread and AVX2 kernels, but a float's last bit may still depend
on torch's version or the CPU's maker. On a platform other than the recorded one, the
recorded commit's own code is run here instead (from git) and compared against."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import golden

REPO = Path(__file__).parents[1]
RECORD = Path(__file__).with_name("golden.json")


def golden_commit_figures(commit, tmp_path):
    """Run the golden commit's own tests/golden.py in a copy of that commit's files."""
    old = tmp_path / "golden-commit"
    old.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"another platform than golden.json's, and git cannot give commit {commit} to run here")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    subprocess.run([sys.executable, str(old / "tests" / "golden.py"), str(tmp_path / "then.json")], check=True,
                   cwd=old)
    return json.loads((tmp_path / "then.json").read_text())["figures"]


def test_the_golden_run_gives_the_recorded_figures_bit_for_bit(tmp_path):
    recorded = json.loads(RECORD.read_text())
    golden.run(REPO, tmp_path / "now.json")
    now = json.loads((tmp_path / "now.json").read_text())
    expected = recorded["figures"]
    if now["platform"] != recorded["platform"]:
        expected = golden_commit_figures(recorded["commit"], tmp_path)
    moved = sorted(k for k in {*expected, *now["figures"]} if expected.get(k) != now["figures"].get(k))
    assert not moved, f"figures that moved from commit {recorded['commit'][:10]}: {moved}"
