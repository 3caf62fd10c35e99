"""GPUs of their own for the jobs that snakemake runs on this machine (the local executor: a workstation, the
rehearsal's GPU machine).

A scheduler gives each job its own GPUs (Slurm and HTCondor set CUDA_VISIBLE_DEVICES). Snakemake's local executor
gives none: every job sees every GPU and uses the first, so train_dpo and the SFT model's generation, ready at the
same moment, would share GPU 0 (51 + 20 GiB at the recipes' sizes), whatever `--resources gpu=N` says. `claim(n)`
takes n of the visible GPUs that no other job of this user holds (a lock file per GPU UUID through mamba_align.flock,
which the kernel releases when the process ends), waits while fewer are free, and makes them the only visible ones
(CUDA_VISIBLE_DEVICES, by UUID) for this process and the ranks it starts. Call it before anything touches CUDA.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from mamba_align import flock
from mamba_align.utils import UserError

log = logging.getLogger(__name__)

# Set inside a scheduler's job: it chose the GPUs already.
SCHEDULER_ENV = ("SLURM_JOB_ID", "_CONDOR_JOB_AD", "_CONDOR_SCRATCH_DIR")
POLL_S = 5.0
_held: list[Path] = []  # the GPUs' lock files: held for the life of the process


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"mamba-align-gpus-{os.getuid()}"


def visible_gpus(environ=os.environ) -> list[str]:
    """UUIDs of the GPUs this process may use, in CUDA_VISIBLE_DEVICES order ([] without nvidia-smi or GPUs).
    Indices in CUDA_VISIBLE_DEVICES are nvidia-smi's (the same order as CUDA's on a machine of one GPU model)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    by_index = dict(tuple(s.strip() for s in line.split(",", 1)) for line in out.splitlines() if "," in line)
    wanted = environ.get("CUDA_VISIBLE_DEVICES")
    if wanted is None:
        return list(by_index.values())
    uuids = []
    for entry in (e.strip() for e in wanted.split(",")):
        if not entry or entry == "-1":
            break  # CUDA stops at the first invalid entry
        uuid = by_index.get(entry) or next((u for u in by_index.values() if u.startswith(entry)), None)
        if uuid is None:
            break
        uuids.append(uuid)
    return uuids


def claim(n: int, environ=os.environ, poll_s: float = POLL_S) -> list[str]:
    """n GPUs for this process (see the module); [] where there is nothing to claim: n == 0, inside a scheduler's
    job, or no GPU at all (a CPU run)."""
    if n <= 0 or any(v in environ for v in SCHEDULER_ENV):
        return []
    gpus = visible_gpus(environ)
    if not gpus:
        return []
    if n > len(gpus):
        raise UserError(f"this job asks for {n} GPUs (its `gpu` resource) but this machine shows {len(gpus)}; "
                        f"lower the rule's gpu (--set-resources RULE:gpu=N) or run it where {n} are")
    folder = lock_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    waited = False
    while True:
        got = []
        for uuid in gpus:
            if folder / f"{uuid}.lock" in _held:
                continue  # this process's already (an earlier claim): not a GPU for this one
            if flock.acquire(folder / f"{uuid}.lock", holder=str(os.getpid())):
                got.append(uuid)
                if len(got) == n:
                    break
        if len(got) == n:
            break
        for uuid in got:  # all or nothing: a job never holds some GPUs while it waits for the rest
            flock.release(folder / f"{uuid}.lock")
        if not waited:
            log.info("waiting for %d free GPU(s) of %d: the others are held by this user's other jobs (%s)",
                     n, len(gpus), folder)
            waited = True
        time.sleep(poll_s)
    _held.extend(folder / f"{uuid}.lock" for uuid in got)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(got)
    log.info("GPU(s) for this job: %s", environ["CUDA_VISIBLE_DEVICES"])
    return got
