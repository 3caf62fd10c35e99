"""The package's one file lock (mamba_align.flock): exclusive across processes, never waiting, the holder named in
the file, a no-op for its holder, released by release() or the holder's death (nothing stale after a kill), and
unlocked with a warning only where the caller allows it on a filesystem without locks."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_align import flock

HOLD = """
import sys, time
from mamba_align import flock
assert flock.acquire(sys.argv[1], holder="job " + sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/x/LOCK; killed (SIGKILL) at the end."""
    path = tmp_path / "x" / "LOCK"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "42"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_another_process_holding_it_is_refused_without_waiting_and_named(holder):
    path, _ = holder
    assert flock.acquire(path, holder="me") is False
    assert flock.holder_of(path) == "job 42"  # the refused attempt left the holder's line alone


def test_a_killed_holder_leaves_no_stale_lock(holder):
    path, proc = holder
    proc.kill()
    proc.wait()
    try:
        assert flock.acquire(path, holder="me")
        assert flock.holder_of(path) == "me"
    finally:
        flock.release(path)


def test_acquire_creates_the_folder_is_a_noop_for_the_holder_and_release_frees_it(tmp_path):
    path = tmp_path / "a" / "b" / "LOCK"
    assert flock.acquire(path, holder="first")
    try:
        assert flock.acquire(path, holder="second")  # ours already: kept, holder line unchanged
        assert flock.holder_of(path) == "first"
        with open(path) as other:  # another open of the file (as another process would) is refused
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        flock.release(path)
    with open(path) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
    flock.release(path)  # not held: nothing happens


def test_a_replaced_lock_file_is_locked_afresh(tmp_path):
    path = tmp_path / "LOCK"
    assert flock.acquire(path, holder="old")
    path.unlink()  # the folder was deleted and made again: the held descriptor's file is gone
    try:
        assert flock.acquire(path, holder="new")
        assert flock.holder_of(path) == "new"
        with open(path) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        flock.release(path)


def test_holder_of_a_lock_without_a_line_or_file(tmp_path):
    (tmp_path / "LOCK").write_text("")
    assert flock.holder_of(tmp_path / "LOCK") == "another process"
    assert flock.holder_of(tmp_path / "missing") == "another process"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_warns_only_where_the_caller_allows_it(tmp_path, monkeypatch, caplog, code):
    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(flock.fcntl, "flock", no_locks)
    path = tmp_path / "LOCK"
    with pytest.raises(OSError):
        flock.acquire(path)
    assert Path(path).resolve() not in flock._held
    try:
        assert flock.acquire(path, holder="me", unlocked_ok=True)
        assert "does not support locks" in caplog.text and flock.holder_of(path) == "me"
    finally:
        flock.release(path)
