"""A temporary file that a killed writer left beside its target is removed by a later
successful write of that target (or, for the Trainer, of any checkpoint in the folder), but
never while a live process may still be writing it: its flock is held, it is too recent, or it
is not a regular file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gatedprune as gp
from gatedprune import io

fcntl = pytest.importorskip("fcntl")  # POSIX advisory locks; Windows never sweeps

_OLD = time.time() - 24 * 3600  # a day ago: older than io.STALE_TEMP_AGE (10 minutes)


def _leftover(
    folder: Path, target: str, hexpart: str = "0123456789abcdef", old: bool = True
) -> Path:
    tmp = folder / f".{target}.{hexpart}.tmp"
    tmp.write_bytes(b"half a file")
    if old:
        os.utime(tmp, (_OLD, _OLD))
    return tmp


def _small() -> torch.nn.Module:
    return gp.prune(gp.ShortcutMLP(3, [4], 2).eval())


def test_a_later_save_removes_a_stale_temp_of_the_same_target(tmp_path: Path) -> None:
    stale = _leftover(tmp_path, "m.safetensors")
    recent = _leftover(tmp_path, "m.safetensors", "fedcba9876543210", old=False)
    other = _leftover(tmp_path, "other.safetensors")
    odd = _leftover(tmp_path, "m.safetensors", "not-hex-at-all!!")
    gp.save(_small(), tmp_path / "m.safetensors")
    assert not stale.exists()
    assert recent.exists()  # may be a live writer whose lock we cannot see: kept for now
    assert other.exists()  # another target's: its own next save removes it
    assert odd.exists()  # not a name atomic_write makes
    assert (tmp_path / "m.safetensors").exists()


def test_a_temp_locked_by_a_live_process_is_kept(tmp_path: Path) -> None:
    stale = _leftover(tmp_path, "m.safetensors")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(stale)!r}, os.O_WRONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        gp.save(_small(), tmp_path / "m.safetensors")
        assert stale.exists()  # a live writer holds it
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    gp.save(_small(), tmp_path / "m.safetensors")  # the holder is gone: now it is stale
    assert not stale.exists()


def test_a_symlink_named_like_a_temp_is_not_followed_or_removed(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("keep me")
    link = tmp_path / ".m.safetensors.0123456789abcdef.tmp"
    link.symlink_to(victim)
    os.utime(link, (_OLD, _OLD), follow_symlinks=False)
    gp.save(_small(), tmp_path / "m.safetensors")
    assert link.is_symlink()
    assert victim.read_text() == "keep me"


def test_atomic_write_holds_the_lock_until_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper can never take a temp file from a live writer, not even between its last
    write and its rename."""
    seen: list[bool] = []
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        fd = os.open(src, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)  # held by the writer
        finally:
            os.close(fd)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    io.write_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)}, {})
    assert seen == [True]


def test_a_temp_swept_before_its_writer_locked_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between creating its temp file and locking it a writer may be suspended, and a sweep
    (a clock step, NFS skew) remove the file: the writer takes another name and the write
    completes (before: the rename failed with FileNotFoundError)."""
    real_flock = io.fcntl.flock
    swept: list[str] = []

    def flock(fd: int, op: int) -> None:
        if not swept:  # the first temp file disappears before it is locked
            name = next(p for p in os.listdir(tmp_path) if p.endswith(".tmp"))
            os.unlink(tmp_path / name)
            swept.append(name)
        real_flock(fd, op)

    monkeypatch.setattr(io.fcntl, "flock", flock)
    target = tmp_path / "t.safetensors"
    io.write_tensors(target, {"a": torch.arange(3.0)}, {"k": 1})
    tensors, meta = io.read_tensors(target)
    assert torch.equal(tensors["a"], torch.arange(3.0))
    assert meta == {"k": 1}
    assert len(swept) == 1
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


_KILLED_WRITER = """
import os, sys, torch, gatedprune as gp
from gatedprune import io as gio
torch.set_num_threads(1)
torch.manual_seed(1); x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
torch.manual_seed(0); net = gp.ShortcutMLP(6, [8, 8], 3)
real_fdopen = os.fdopen
def dying_fdopen(fd, *a, **k):
    f = real_fdopen(fd, *a, **k)
    def write(data):
        os.write(fd, data[: len(data) // 2]); os._exit(9)  # killed mid-write
    f.write = write
    return f
calls = [0]
def write_tensors(path, tensors, meta, _real=gio.write_tensors):
    calls[0] += 1
    if calls[0] == 3:
        gio.os.fdopen = dying_fdopen  # the third checkpoint dies half written
    return _real(path, tensors, meta)
gio.write_tensors = write_tensors
gp.Trainer(net, epochs=4, batch_size=16, checkpoint_dir=sys.argv[1], progress=False).fit((x, y))
"""


def test_a_resumed_run_removes_the_temp_of_a_killed_checkpoint_write(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert [p.name[:27] for p in left] == [".step-000000012.safetensors"]
    os.utime(left[0], (_OLD, _OLD))  # as if the run is resumed a while later
    torch.manual_seed(1)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    torch.manual_seed(0)
    net = gp.ShortcutMLP(6, [8, 8], 3)
    trainer = gp.Trainer(net, epochs=4, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    trainer.fit((x, y), resume=True, max_steps=12)  # writes step 12 again
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000008.safetensors",
        "step-000000012.safetensors",
    ]
