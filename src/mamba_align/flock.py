"""Exclusive file locks that the kernel releases when the holding process ends (flock(2)), so a killed job leaves no
stale lock; the one lock of the package (a checkpoint folder's LOCK in train/checkpoints, a GPU's in ops/jobenv/gpus).

`acquire` never waits (callers that wait poll it); a lock is held by this process until `release` or its end, and
acquiring one this process holds already is a no-op. The file holds a line saying who holds it (`holder`), which
the next one reads back (`holder_of`) to name it in an error. Not the `filelock` package: where the filesystem
lacks flock it turns into a marker file (left behind by a job killed on another node), and it keeps no holder line.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # flock on a filesystem without locks (some Lustre)
_held: dict[Path, int] = {}  # lock file (resolved) -> open descriptor holding its flock


def acquire(path: str | os.PathLike, holder: str | None = None, unlocked_ok: bool = False) -> bool:
    """Take the exclusive lock on `path` (created, with its folder, if missing) without waiting: True when this
    process holds it now, False when another process (or another open of it) does. `holder` is written into the
    file once it is ours. `unlocked_ok`: on a filesystem without locks, log a warning and count it as held rather
    than raise."""
    path = Path(path).resolve()
    fd = _held.get(path)
    if fd is not None:
        try:
            if os.fstat(fd).st_ino == path.stat().st_ino:
                return True  # ours already
        except FileNotFoundError:
            pass
        release(path)  # the file was deleted or replaced since: lock the one there now
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError as e:
        if not (unlocked_ok and e.errno in NO_LOCKS):
            os.close(fd)
            raise
        log.warning("%s: the filesystem does not support locks (%s); not locked", path, e)
    if holder is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    _held[path] = fd
    return True


def release(path: str | os.PathLike) -> None:
    """Give the lock on `path` back (nothing if this process does not hold it)."""
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


def holder_of(path: str | os.PathLike) -> str:
    """Who holds the lock on `path`, as its holder wrote it ('another process' when it wrote nothing)."""
    try:
        return Path(path).read_bytes()[:4096].decode(errors="replace").strip() or "another process"
    except FileNotFoundError:
        return "another process"
