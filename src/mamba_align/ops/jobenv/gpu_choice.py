"""The GPU count a training job asks for: the largest count of the profile's list that one node can give now.

A recipe keeps its global batch through gradient accumulation, so train_sft and train_dpo optimise the same way
on 1, 2, 4 or 8 GPUs (docs/benchmarks.md section 8). A profile's `gpu_counts: auto` (8, 4, 2, 1) or list (`8,4,2`) for a
training rule lets each submission ask for what the scheduler has free now on one node with the required GPU type
and memory, instead of waiting for a drained 8-GPU node: Slurm's `sinfo` (GRES and GRES in use per node),
HTCondor's `condor_status` (free GPUs of partitionable slots). Where nothing in the list is free, or the scheduler
cannot be asked, the job asks for the list's first (largest) count and queues for it. A count that cannot keep the
global batch is refused before anything is submitted, naming the nearest counts that can.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass

from mamba_align.ops.store.layout import Results
from mamba_align.train.batch import batch_layout, nearest_valid  # noqa: F401 (batch_layout: callers' one import)
from mamba_align.utils import UserError

log = logging.getLogger(__name__)

AUTO = (8, 4, 2, 1)
QUERY_TIMEOUT_S = 30
# one line per node: name|state|GRES|GRES in use|active features|memory MB|allocated memory MB
SINFO = ["sinfo", "-N", "-h", "-O",
         "NodeHost:|,StateCompact:|,Gres:|,GresUsed:|,features_act:|,Memory:|,AllocMem:|"]
# partitionable slots: machine, unclaimed GPUs, unclaimed memory (MB), then require_gpus evaluated per slot
CONDOR_STATUS = ["condor_status", "-constraint", "PartitionableSlot =?= true", "-af", "Machine", "Gpus", "Memory"]
# GPU properties a require_gpus expression names; a slot advertises those its GPUs share as GPUs_<name>
_GPU_ATTRS = ("Capability", "GlobalMemoryMb", "DeviceName", "DriverVersion", "MaxSupportedVersion", "ECCEnabled")
_USABLE_STATES = ("idle", "mix", "mixed")


@dataclass
class Choice:
    gpus: int
    reason: str


def parse_setting(value, rule: str = "training") -> list[int]:
    """A profile's `gpu_counts` for a training rule as counts to try, largest first: `auto`, a list (`8,4,2`,
    `[8, 4, 2]`) or one count."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return list(AUTO)
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[] ").replace(",", " ").split()
    try:
        counts = sorted({int(v) for v in items}, reverse=True)
    except ValueError:
        counts = []
    if not counts or counts[-1] < 1:
        raise UserError(f"{rule}: gpu_counts {value!r} in the profile: expected auto, a count, or a list of counts "
                        f"such as 8,4,2")
    return counts


def check_counts(counts, global_batch: int, rule: str) -> None:
    """Refuse, before any submission, a count that cannot keep the recipe's global batch."""
    bad = [n for n in counts if global_batch % n]
    if bad:
        n = bad[0]
        raise UserError(f"{rule}: {n} GPUs cannot keep the recipe's global_batch_size {global_batch} (not a "
                        f"divisor); nearest valid counts: {', '.join(map(str, nearest_valid(n, global_batch)))} "
                        f"(set gpu_counts for {rule} in the profile)")


# ---------------------------------------------------------------------------------------------- Slurm


def _gres_count(gres: str, gpu_type: str | None) -> int:
    """GPUs of `gpu_type` (any type when None) in a GRES string: gpu:a100:4(S:0-1),gpu:h100:2(IDX:0-1)."""
    total = 0
    for part in re.split(r",(?=gpu|[a-z_]+:)", gres):
        fields = re.sub(r"\(.*?\)", "", part).split(":")
        if fields[0] != "gpu" or len(fields) < 2 or not fields[-1].isdigit():
            continue
        kind = fields[1] if len(fields) == 3 else None
        if gpu_type is None or kind == gpu_type:
            total += int(fields[-1])
    return total


def _features_match(features: str, constraint: str | None) -> bool:
    """A -C constraint of features joined by & (all) or | (any) against a node's active features."""
    if not constraint:
        return True
    have = set(features.split(","))
    if "|" in constraint:
        return any(f.strip() in have for f in constraint.split("|"))
    return all(f.strip() in have for f in constraint.split("&"))


def slurm_free(sinfo_out: str, gpu_type: str | None, constraint: str | None, mem_mb: int | None) -> dict[str, int]:
    """Free GPUs per node (of `gpu_type`, on nodes with the `constraint` features and `mem_mb` unallocated) from
    the output of SINFO."""
    free = {}
    for line in sinfo_out.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) < 7:
            continue
        node, state, gres, used, features, mem, alloc = cols[:7]
        state = state.rstrip("*~#!%$@^-+").lower()
        if state not in (*_USABLE_STATES, "alloc", "allocated") or not _features_match(features, constraint):
            continue
        if mem_mb and mem.isdigit() and alloc.isdigit() and int(mem) - int(alloc) < mem_mb:
            continue
        total = _gres_count(gres, gpu_type)
        if total:  # a node without GPUs of the type is not a candidate; one with every CPU taken has none free
            free[node] = 0 if state.startswith("alloc") else max(0, total - _gres_count(used, gpu_type))
    return free


# -------------------------------------------------------------------------------------------- HTCondor


def condor_command(require_gpus: str | None) -> list[str]:
    """CONDOR_STATUS plus a column that says whether a slot's GPUs meet `require_gpus`."""
    if not require_gpus:
        return CONDOR_STATUS
    expr = re.sub(rf"\b({'|'.join(_GPU_ATTRS)})\b", r"GPUs_\1", require_gpus)
    return [*CONDOR_STATUS, f"({expr}) =?= true"]


def condor_free(status_out: str, mem_mb: int | None) -> dict[str, int]:
    """Free GPUs per machine from condor_command's output (the largest partitionable slot of each)."""
    free: dict[str, int] = {}
    for line in status_out.splitlines():
        cols = line.split()
        if len(cols) < 3 or not cols[1].isdigit():
            continue
        machine, gpus, memory = cols[0], int(cols[1]), cols[2]
        if len(cols) > 3 and cols[3].lower() != "true":
            continue  # its GPUs do not meet require_gpus
        if mem_mb and memory.isdigit() and int(memory) < mem_mb:
            continue
        free[machine] = max(free.get(machine, 0), gpus)
    return free


# ---------------------------------------------------------------------------------------------- choice


def choose(counts: list[int], free: dict[str, int] | None, source: str) -> Choice:
    """The largest count that one node has free, else the first (largest) count."""
    if free is None:
        return Choice(counts[0], f"{source} could not be asked; asking for {counts[0]} (the list's first)")
    most = max(free.values(), default=0)
    fits = [n for n in counts if n <= most]
    where = f"{most} free on one node ({len(free)} matching node(s))"
    if fits:
        return Choice(fits[0], f"{where} per {source}: the largest of {counts} that fits")
    return Choice(counts[0], f"{where} per {source}: none of {counts} fits now; asking for {counts[0]} and queueing")


def _query(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s: %s", cmd[0], e)
        return None


def choose_gpus(executor: str, counts: list[int], resources: dict, run=_query) -> Choice:
    """The GPU count for a training job about to be submitted by `executor` (slurm, htcondor; any other runs
    on this machine and gets the first count). `resources` are the job's profile resources (gpu_model,
    constraint, mem_mb; require_gpus, request_memory)."""
    if len(counts) == 1:
        return Choice(counts[0], f"a fixed count ({counts[0]})")
    if executor == "slurm":
        out = run(SINFO)
        free = None if out is None else slurm_free(out, resources.get("gpu_model") or None,
                                                    resources.get("constraint") or None,
                                                    _int(resources.get("mem_mb")))
        return choose(counts, free, "sinfo")
    if executor == "htcondor":
        out = run(condor_command(resources.get("require_gpus")))
        free = None if out is None else condor_free(out, _int(resources.get("request_memory")))
        return choose(counts, free, "condor_status")
    return Choice(counts[0], f"executor {executor}: no scheduler to ask; the list's first")


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def record(choice: Choice, rule: str, wildcards, attempt: int, results: str, dryrun: bool) -> None:
    """Say which count a job was submitted with and why: on stderr, in results/logs/gpu_choices.jsonl, and in the
    rule's log (its history, which the job's log links to: utils.setup_logging)."""
    import json
    import sys
    import time
    from pathlib import Path

    from mamba_align.process import log_history

    line = f"{rule} attempt {attempt}: {choice.gpus} GPU(s): {choice.reason}"
    print(f"GPU count for {line}", file=sys.stderr)
    if dryrun:
        return
    paths = Results(str(results))
    logs = Path(paths.log_dir())
    logs.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    entry = {"time": when, "rule": rule, "wildcards": dict(wildcards.items()) if wildcards else {},
             "attempt": attempt, "gpus": choice.gpus, "reason": choice.reason}
    with open(paths.log_dir("gpu_choices.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")
    if not entry["wildcards"]:  # a grid's rules log elsewhere; the JSONL has them
        with open(log_history(paths.log(rule)), "a") as f:
            f.write(f"{when} INFO mamba_align.ops.jobenv.gpu_choice: submitted with {line}\n")


# ------------------------------------------------------------------------------------------------ plan


def with_gpu_counts(job, global_batch: int, efficiency: float, counts=AUTO):
    """A training JobPlan with `by_gpu_count`: wall and GPU hours on each count that keeps the global batch, from
    the measured per-GPU efficiency of more than one GPU (docs/benchmarks.md section 8; measured at 2, assumed
    the same at 4 and 8 on one host), so that waiting for 8 GPUs can be weighed against running on 4 now."""
    def speed(n):
        return n * (efficiency if n > 1 else 1.0)

    job.by_gpu_count = [{"gpus": n, "hours": round(job.hours * speed(job.gpus) / speed(n), 2),
                         "gpu_hours": round(job.hours * speed(job.gpus) / speed(n) * n, 2)}
                        for n in sorted(counts) if global_batch % n == 0]
    return job


def format_gpu_counts(plan: dict) -> list[str]:
    """The plan's per-count table of each training job (lines of plan.txt)."""
    jobs = [j for j in plan["jobs"] if j.get("by_gpu_count")]
    if not jobs:
        return []
    lines = ["", "training on another GPU count (the same result: the global batch is kept; chosen at submission "
             "from the profile's gpu_counts, results/logs/gpu_choices.jsonl):",
             f"{'rule':<22}{'GPUs':>5}{'wall h':>9}{'GPU-h':>9}"]
    for j in jobs:
        lines += [f"{j['rule']:<22}{r['gpus']:>5}{r['hours']:>9.2f}{r['gpu_hours']:>9.2f}"
                  + ("  (planned)" if r["gpus"] == j["gpus"] else "") for r in j["by_gpu_count"]]
    return lines


def granted_gpus(environ=None) -> int | None:
    """GPUs the scheduler gave the job this process runs in (None outside one): what a training job's `gpu`
    is inside the job, where Snakemake evaluates the rule's resources again (and must not choose anew)."""
    import os

    env = os.environ if environ is None else environ
    if (n := env.get("SLURM_GPUS_ON_NODE", "")).isdigit():
        return int(n)
    if (n := env.get("SLURM_GPUS", "").split(":")[-1]).isdigit():  # [type:]count
        return int(n)
    for listed in ("SLURM_JOB_GPUS", "_CONDOR_AssignedGPUs"):
        if env.get(listed):
            return len([g for g in env[listed].split(",") if g.strip()])
    ad = env.get("_CONDOR_JOB_AD")
    if ad:
        try:
            text = open(ad).read()
        except OSError:
            return None
        m = re.search(r"(?im)^RequestGpus\s*=\s*(\d+)\s*$", text)
        return int(m.group(1)) if m else None
    return None
