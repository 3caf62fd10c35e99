"""The checkpoint folder of a training run: complete checkpoints to resume from, the lock that keeps a second job
out, the STOP file that asks the run to checkpoint and exit, and its run.json of the recipe's learning settings."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from mamba_align import flock
from mamba_align.train.recipes import OPERATIONAL_KEYS, TrainCommon, as_dict
from mamba_align.utils import UserError, read_json, write_json

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: Snakemake (--retries) resubmits the job, which resumes
# A file to create when the run stops with a checkpoint: Snakemake's job exits 1 whatever the script's code, so
# a wrapper around it (profiles/condor/self_checkpoint.sh) learns from this file that it should exit 75
PREEMPTED_MARKER_ENV = "MAMBA_ALIGN_PREEMPTED_MARKER"
STOP_FILE = "STOP"
LOCK_FILE = "LOCK"  # a kernel lock (mamba_align.flock) naming its holder


def is_complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last (after model, optimizer, scheduler, RNG states)."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def checkpoint_step(ckpt: Path) -> int | None:
    """N of a `checkpoint-N` folder (None for another name)."""
    tail = Path(ckpt).name.removeprefix("checkpoint-")
    return int(tail) if tail.isdigit() else None


def last_complete_checkpoint(checkpoint_dir) -> Path | None:
    """Newest complete `checkpoint-N` (a job killed while saving leaves an incomplete one)."""
    done = [c for c in Path(checkpoint_dir).glob("checkpoint-*") if checkpoint_step(c) is not None and is_complete(c)]
    return max(done, key=checkpoint_step, default=None)


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("CONDOR_ID")
    return (f"host {socket.gethostname()} pid {os.getpid()}" + (f" job {job}" if job else "")
            + time.strftime(" since %Y-%m-%d %H:%M:%S"))


def lock_checkpoint_dir(checkpoint_dir: Path) -> None:
    """Hold an exclusive lock on the folder until release_checkpoint_dir or this process ends (the kernel drops
    it when the holder dies, so a killed job leaves no stale lock; a second call in the holding process is a no-op).
    Two jobs never write one checkpoint folder: the second fails naming the first (host, pid, Slurm/HTCondor job
    id). On a filesystem without locks (some Lustre mounts) it warns and runs unlocked."""
    path = Path(checkpoint_dir).resolve() / LOCK_FILE
    if not flock.acquire(path, holder=_holder(), unlocked_ok=True):
        raise UserError(f"{path.parent} is being written by {flock.holder_of(path)}; two jobs must not train into "
                        f"one checkpoint folder: wait for that job or cancel it")


def release_checkpoint_dir(checkpoint_dir: Path) -> None:
    flock.release(Path(checkpoint_dir).resolve() / LOCK_FILE)


def prepare_checkpoint_dir(checkpoint_dir: Path, stage: str, recipe: TrainCommon) -> None:
    """Outermost process only: lock the folder, refuse another recipe's checkpoints, drop stale stop requests
    and torn saves."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lock_checkpoint_dir(checkpoint_dir)
    run_file = checkpoint_dir / "run.json"
    settings = {k: v for k, v in as_dict(recipe).items() if k not in OPERATIONAL_KEYS}
    run = json.loads(json.dumps({"stage": stage, "recipe": settings}))
    earlier = read_json(run_file) if run_file.exists() else run
    # keys that became operational (precompute_ref_log_probs) do not make a folder of the same run another run's
    earlier = {**earlier, "recipe": {k: v for k, v in (earlier.get("recipe") or {}).items()
                                     if k not in OPERATIONAL_KEYS}}
    if earlier != run:
        old = earlier.get("recipe", {})
        changed = sorted(k for k in set(old) | set(run["recipe"]) if old.get(k) != run["recipe"].get(k))
        raise UserError(f"{checkpoint_dir} holds checkpoints of a {stage} run with other settings "
                        f"({', '.join(changed) or 'stage'}); delete the folder to start afresh, or use another")
    write_json(run_file, run)
    (checkpoint_dir / STOP_FILE).unlink(missing_ok=True)
    for ckpt in checkpoint_dir.glob("checkpoint-*"):
        if not is_complete(ckpt):
            log.warning("removing incomplete checkpoint %s (killed while saving)", ckpt)
            shutil.rmtree(ckpt)


def exit_preempted() -> None:
    """Exit PREEMPTED_EXIT_CODE, first creating the file PREEMPTED_MARKER_ENV names (if set)."""
    marker = os.environ.get(PREEMPTED_MARKER_ENV)
    if marker:
        Path(marker).touch()
    raise SystemExit(PREEMPTED_EXIT_CODE)
