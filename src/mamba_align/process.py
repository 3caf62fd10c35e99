"""A step's process: its attempts in the rule's log, and its lifetime tied to whoever started it.

- Attempts: Snakemake deletes a rule's log when its job starts again, so the log is a hard link to a hidden
  `.<log>.history` it never deletes (`log_history`); each attempt appends below a header, an attempt that logged no
  end is reported as killed at the next start, and SIGTERM is logged before the process exits through its `finally`
  blocks. `mamba_align.utils.setup_logging` sets this up for every step.
- Lifetime: Linux's parent-death signal terminates a step when the snakemake (or launcher) that started it exits,
  even by kill -9, so no trainer keeps writing after its job is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import types
from pathlib import Path

log = logging.getLogger("mamba_align")


# ---------------------------------------------------------------------------------------------------------- attempts

ATTEMPT_STARTED = "attempt started: pid {pid} on {host}"
ATTEMPT_ENDED = "attempt ended: pid {pid}"
_STARTED_RE = re.compile(rb"attempt started: pid (\d+) on (\S+)")
_attempt_pid: int | None = None  # this process, once its attempt has started (atexit and SIGTERM set up once)


def log_history(log_path: str | os.PathLike) -> Path:
    """The file that holds every attempt's lines of a rule's log: a hidden sibling Snakemake does not know of."""
    log_path = Path(log_path)
    return log_path.with_name(f".{log_path.name}.history")


def link_history(log_path: Path) -> None:
    """Make `log_path` a hard link to its history (creating either as needed). A log that is not the history's
    (written before there was one) is appended to the history first."""
    history = log_history(log_path)
    os.close(os.open(history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666))
    try:
        os.link(history, log_path)
        return
    except FileExistsError:
        if os.path.samefile(history, log_path):
            return  # linked already: another process of this attempt (a rank), or this one again
    with open(log_path, "rb") as src, open(history, "ab") as dst:
        shutil.copyfileobj(src, dst)
    tmp = log_path.with_name(f".{log_path.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(history, tmp)
    os.replace(tmp, log_path)


def start_attempt(history: Path) -> None:
    global _attempt_pid
    previous = _unfinished_attempt(history)
    host, pid = socket.gethostname(), os.getpid()
    log.info(ATTEMPT_STARTED.format(pid=pid, host=host))
    if previous is not None and previous != (pid, host):
        old_pid, old_host = previous
        if old_host == host and pid_running(old_pid):
            log.warning("previous attempt (pid %d) is still running; it writes to this log too", old_pid)
        else:
            log.warning("previous attempt (pid %d on %s) was killed: it logged no end; its leftovers are removed "
                        "when this attempt writes the same outputs", old_pid, old_host)
    if _attempt_pid is None:
        import atexit

        atexit.register(_end_attempt, pid)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, _terminated)
    _attempt_pid = pid


def _unfinished_attempt(history: Path) -> tuple[int, str] | None:
    """(pid, host) of the last attempt in the history if it logged no end."""
    try:
        text = history.read_bytes()
    except OSError:
        return None
    start = text.rfind(b"attempt started: pid ")
    if start < 0:
        return None
    m = _STARTED_RE.match(text, start)
    if m is None or ATTEMPT_ENDED.format(pid=int(m[1])).encode() in text[m.end():]:
        return None
    return int(m[1]), m[2].decode(errors="replace")


def _end_attempt(pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child (those leave through os._exit anyway)
        # at exit, a handler whose stream its owner closed already (a test runner's capture) stays quiet
        logging.raiseExceptions = False
        log.info(ATTEMPT_ENDED.format(pid=pid))


def _terminated(signum, _frame) -> None:
    """SIGTERM of a step: say so in the log, then exit through the `finally` blocks (atomic_path removes its
    temporary output). A second SIGTERM kills at once."""
    signal.signal(signum, signal.SIG_DFL)
    log.error("terminated by %s (the job was cancelled, or the snakemake that started it stopped or died): exiting; "
              "a rerun starts afresh or resumes", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------------- process tree

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_snakemake_script() -> bool:
    """Run by Snakemake's `script:` directive, whose preamble puts a `snakemake` object into the script."""
    job = getattr(sys.modules.get("__main__"), "snakemake", None)
    return job is not None and not isinstance(job, types.ModuleType)


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def terminate_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send `signum` to this process when its parent exits, even by kill -9 (Linux's parent-death
    signal): a job never keeps running, and writing, after the snakemake or launcher that started it is gone.
    False where the system has no such signal."""
    prctl = _prctl()
    parent = os.getppid()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: the signal would never come
        os.kill(os.getpid(), signum)
    return True


def terminate_with_this_process(signum: int = signal.SIGTERM):
    """subprocess `preexec_fn`: the child gets `signum` when this process exits, even by kill -9 (None where the
    system cannot). Its parent is the thread that starts it: start it from one that lives as long as the child."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True
