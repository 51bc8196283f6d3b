"""Faults a user's machine meets: a full disk, two sweeps on one file, a flipped bit in a
checkpoint, the temporary file of a killed save. Each ends in one line and loses nothing.
(SIGTERM, stopping a run as Ctrl-C does, is in test_cli's resume test.)"""
import builtins
import errno
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import checkpoint
import finetune
import frontier
import prune
from test_cli import PARSERS, assert_one_line, run_cli, script_argv, tree
from checkpoint import HOST, load_checkpoint, temp_name
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
FRONTIER = ["--methods", "global", "--sparsities", "0.9", "--epochs", "1", "--batch-size", "32", "--bits", "0",
            "--jobs", "1"]


def no_space():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingDisk:
    """A file opened for writing whose writes fail with ENOSPC once `room` bytes are in it."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise no_space()
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def full_disk(monkeypatch, where):
    """Every file write fails as a full disk makes it: partway through the bytes ("write"), or
    at the final fsync, when the data written to the page cache finds no free block ("fsync")."""
    if where == "write":
        monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FillingDisk(builtins.open(*a, **k), 1000), raising=False)
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(no_space()))


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("script,extra", [("prune", ["--method", "global", "--target", "0.9"]),
                                          ("finetune", ["--epochs", "1", "--batch-size", "32"]),
                                          ("frontier", FRONTIER)])
def test_a_full_disk_is_one_line_and_changes_nothing(script, extra, where, chain, image_folder, tmp_path, capsys,
                                                      monkeypatch):
    module, parser = PARSERS[script]
    argv = script_argv(script, chain, image_folder, tmp_path) + extra
    before = tree(tmp_path)
    full_disk(monkeypatch, where)
    code, err = run_cli(module, parser(), argv, capsys)
    assert_one_line(code, err, "(the disk is full): free some space, or choose another --checkpoint-dir")
    after = tree(tmp_path)
    assert {p: b for p, b in after.items() if p in before} == before  # every earlier file intact
    assert not [p for p in after if p.name.endswith(".tmp")]  # and no temporary file left


def test_a_second_sweep_on_the_same_file_is_refused(chain, image_folder, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = script_argv("frontier", chain, image_folder, tmp_path) + FRONTIER + ["--out", str(out)]
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import frontier; from pathlib import Path\n"
            f"with frontier.lock_sweep(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # another sweep is running on `out`
        before = tree(tmp_path)
        status, err = run_cli(frontier, frontier.get_args_parser(), argv, capsys)
        assert_one_line(status, err, "is being written by another frontier.py right now")
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # Once it has ended (killed: its lock goes with it), the same command runs.
    assert frontier.main(frontier.get_args_parser().parse_args(argv))["points"]


def flip_a_bit(path, entry_suffix, offset=64):
    """Flip one bit inside the stored bytes of the zip entry whose name ends with `entry_suffix`."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    data = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") + \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_and_extra + offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("entry", ["data/0", "data.pkl"])
def test_a_flipped_bit_in_a_checkpoint_is_refused(entry, chain, image_folder, tmp_path, capsys):
    flip_a_bit(chain / "dense.pt", entry)
    with pytest.raises(UserError, match=r"dense.pt is damaged: its part .* fails the CRC-32 checksum"):
        load_checkpoint(chain / "dense.pt")
    before = tree(tmp_path)
    code, err = run_cli(prune, prune.get_args_parser(),
                        script_argv("prune", chain, image_folder, tmp_path) + ["--method", "global", "--target", "0.9"],
                        capsys)
    assert_one_line(code, err, "is damaged")
    assert tree(tmp_path) == before


def test_a_killed_saves_temporary_file_is_removed_and_a_live_ones_kept(chain, image_folder, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    stale = chain / temp_name("finetuned.resume.pt", f"{HOST}-{pid}-0123abcd")
    live = chain / temp_name("finetuned.pt", f"{HOST}-{os.getpid()}-4567cdef")  # a save still in progress
    remote = chain / temp_name("finetuned.pt", f"{'0' if HOST[0] != '0' else '1'}{HOST[1:]}-{pid}-89abcdef")
    other = chain / temp_name("dense.pt", f"{HOST}-{pid}-0123abcd")  # not finetune.py's file
    for path in (stale, live, remote, other):
        path.write_bytes(b"half a checkpoint")
    finetune.main(finetune.get_finetune_args_parser().parse_args(
        script_argv("finetune", chain, image_folder, tmp_path) + ["--epochs", "1", "--batch-size", "32"]))
    assert not stale.exists() and live.exists() and remote.exists() and other.exists()


# Bits of the zip's directory (its central header per entry) that torch.load reads wrong
# without a word: an entry marked deflated (it read zeros), one marked a folder (garbage).
@pytest.mark.parametrize("offset,value", [(10, 8), (38, 0x10)], ids=["compressed", "folder"])
def test_a_flipped_bit_in_the_zips_directory_is_damage(offset, value, chain):
    path = chain / "dense.pt"
    data = bytearray(path.read_bytes())
    data[data.find(b"PK\x01\x02") + offset] |= value  # the first entry's header
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged"):
        load_checkpoint(path)
