"""Small shared helpers: atomic outputs, JSONL progress files, hashing, logging setup."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mamba_align import process

log = logging.getLogger("mamba_align")


class UserError(Exception):
    """A problem with the user's config, data or model; the message names what is wrong."""


def setup_logging(log_path: str | os.PathLike | None = None, level: int = logging.INFO, *, attempt: bool = True,
                  die_with_parent: bool | None = None) -> None:
    """One logging setup for every step: to the rule's log file (if given) and to stderr.

    The log file keeps every attempt: Snakemake deletes a rule's log when the job starts again, so the log is a hard
    link to a hidden `.<log>.history` that it never deletes (log_history): a rerun appends below the earlier
    attempts, and a writer still running from one of them keeps writing into the same file, never into a deleted
    one. With `attempt` (the job's outermost process; ranks pass False) the attempt gets a header line and an end
    line at exit, an earlier attempt that logged no end is reported as killed, and SIGTERM is logged before the
    process exits through its `finally` blocks (which remove its temporary outputs). `die_with_parent` (by default:
    when run as a Snakemake script) has the process terminated when its parent dies, even by kill -9.
    """
    if die_with_parent is None:
        die_with_parent = process.is_snakemake_script()
    if die_with_parent:
        process.terminate_with_parent()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    unlinked = None
    if log_path:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            process.link_history(log_path)
            handlers.append(logging.FileHandler(log_path, mode="a"))
        except OSError as e:  # a filesystem without hard links: both files, the history keeps every attempt
            unlinked = e
            history = process.log_history(log_path)
            handlers += [logging.FileHandler(log_path, mode="a"), logging.FileHandler(history, mode="a")]
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library warnings reach the rule's log too
    sys.excepthook = log_uncaught
    if log_path and attempt:
        process.start_attempt(process.log_history(log_path))
        if unlinked is not None:
            log.warning("%s: no hard link to %s (%s): a rerun's log starts afresh, the history keeps every attempt",
                        log_path, process.log_history(log_path), unlinked)


def log_uncaught(exc_type, exc, tb) -> None:
    """sys.excepthook of every step: the failure goes to the rule's log, not only to the console.

    A UserError is the user's to fix and its message says how: one line, no traceback. Anything else is a
    bug or an environment problem: its traceback, logged. Python then exits with status 1 either way.
    """
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
    elif issubclass(exc_type, UserError):
        log.error("%s", " ".join(str(exc).split("\n")))
    else:
        log.critical("unexpected error: %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))
    for handler in logging.getLogger().handlers:
        handler.flush()


def format_duration(seconds: float | None) -> str:
    """H:MM:SS ('?' when unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """Progress of a long loop in the rule's log: '<what>: i/N (p%) | elapsed | ETA [| extra]'.

    Logs at most every `every_s` seconds or every `every_frac` of N (whichever comes first) and at the end,
    so a user watching the log of a multi-hour job always knows when it ends. `done` items finished before
    this run (resumed work) count toward i but not toward the rate.
    """

    def __init__(self, what: str, total: int, done: int = 0, every_s: float = 30.0, every_frac: float = 0.05,
                 extra: Callable[[], str] | None = None, logger: logging.Logger | None = None):
        self.what, self.total, self.start_count, self.count = what, total, done, done
        self.every_s, self.every_n = every_s, max(1, int(total * every_frac))
        self.extra, self.log = extra, logger or log
        self.t0 = self.last_t = time.monotonic()
        self.last_count = done
        self.bar = None
        if sys.stderr.isatty():  # an interactive run also gets a bar; a job's log gets the lines only
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=what, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            if self.count >= self.total:
                self.bar.close()
        now = time.monotonic()
        if (self.count >= self.total or now - self.last_t >= self.every_s
                or self.count - self.last_count >= self.every_n):
            self.last_t, self.last_count = now, self.count
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        new = self.count - self.start_count
        eta = elapsed / new * (self.total - self.count) if new > 0 else None
        pct = 100.0 * self.count / self.total if self.total else 100.0
        text = (f"{self.what}: {self.count}/{self.total} ({pct:.0f}%) | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(eta)}")
        return f"{text} | {self.extra()}" if self.extra else text


TMP_INFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path `.<name>.tmp-<pid>`; rename it onto `path` only if the block finishes.

    Works for files and directories. A crash leaves `path` untouched (absent or old); what a killed process left
    (a model folder can be GBs) is removed here by the next writer (remove_leftovers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the `.<name>.tmp-<pid>` siblings of `path` that atomic_path left in processes that were killed: those
    whose pid no longer runs on this host. (Snakemake's lock keeps two jobs from writing one output at once; a
    leftover of a process that runs on another host is removed too.) Returns what it removed."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}{TMP_INFIX}"
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for leftover in siblings:
        pid = leftover.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue  # not atomic_path's; or this process's own, which atomic_path handles
        if process.pid_running(int(pid)):
            log.warning("%s: left by pid %s, which still runs on this host: kept", leftover, pid)
            continue
        size = _size(leftover)
        _remove(leftover)
        log.warning("previous attempt (pid %s) was killed: removed its leftover %s (%.2f GB)", pid, leftover,
                    size / 1e9)
        removed.append(leftover)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*"))
    return path.lstat().st_size


def current_umask() -> int:
    try:  # Linux >= 4.7: read without changing it (os.umask changes it for every thread meanwhile)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode a new file gets under this process's umask.
    safetensors writes its files 0600: the others of the project group could not read a published model."""
    path = Path(path)
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | os.PathLike, row: dict, fh=None) -> None:
    """Append one row and make it durable (flush + fsync) before returning."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    if fh is not None:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Read a JSONL file. A bad or unterminated last line is a torn append (a crash mid-write): it is dropped with
    a warning and, with `repair` (for the file's only writer, before it appends again), cut off the file, so the
    next append starts on a line of its own. A bad line anywhere else is an error naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the file ends with a newline, as every complete append does
        lines.pop()
    rows, start = [], 0
    for i, raw in enumerate(lines, 1):
        try:
            if raw.strip():
                rows.append(json.loads(raw.decode("utf-8")))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            if i < len(lines):
                raise UserError(f"{path}:{i}: not valid JSON ({e}); fix or delete that line") from None
            log.warning("%s:%d: dropping a torn last line (interrupted write)%s", path, i,
                        "; file truncated to the last complete line" if repair else "")
            if repair:
                _truncate(path, start)
            return rows
        start += len(raw) + 1
    if repair and data and not data.endswith(b"\n"):  # a complete row whose newline was not written
        with open(path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return rows


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def progress_file(out_path: str | os.PathLike, digest: str) -> Path:
    """A resumable step's progress file, beside (not inside) its output: <output>.progress-<digest>.jsonl."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.name}.progress-{digest}.jsonl")


def progress_files(out_path: str | os.PathLike) -> list[Path]:
    """Every progress file of an output (progress_file), whatever run left it."""
    out_path = Path(out_path)
    return sorted(out_path.parent.glob(f"{out_path.name}.progress-*.jsonl"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: str | os.PathLike, hash_limit: int | None = None) -> dict:
    """A file's content as recorded everywhere (a model's manifest and identity, provenance): {size, sha256};
    above `hash_limit` bytes {size, mtime} instead, read without hashing."""
    st = os.stat(path)
    if hash_limit is not None and st.st_size > hash_limit:
        return {"size": st.st_size, "mtime": st.st_mtime}
    return {"size": st.st_size, "sha256": sha256_file(path)}


def fetch_file(url: str, dest: str | os.PathLike, sha256: str | None = None,
               local_path: str | os.PathLike | None = None) -> Path:
    """Copy `local_path` (offline clusters) or download `url` to `dest`, verifying sha256 if given.

    An existing `dest` with the right hash is reused (no network).
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    with atomic_path(dest) as tmp:
        if local_path:
            if not Path(local_path).exists():
                raise UserError(f"local data file {local_path} does not exist")
            shutil.copyfile(local_path, tmp)
        else:
            import urllib.request

            log.info("downloading %s", url)
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise UserError(f"could not download {url}: {e}") from e
        if sha256 is not None:
            got = sha256_file(tmp)
            if got != sha256:
                raise UserError(f"{local_path or url}: sha256 is {got}, expected {sha256}")
    return dest
