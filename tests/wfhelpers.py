"""Shared test helpers: a copy of the workflow in a temp dir, and running snakemake in it.

(Not in conftest.py: tests/cluster has a conftest of its own, and both would import as `conftest`.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def bench_module(name: str):
    """bench/<name>.py as a module (its synthetic-model helpers are the tests' tiny fixtures)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "results", ".snakemake", "__pycache__", ".pytest_cache",
                                     ".gpu", ".whl", "*.egg-info")

os.environ.setdefault("CONDOR_CONFIG", "/dev/null")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def copy_workflow(dest: Path) -> Path:
    """The workflow as a user would have it (no results), in `dest`."""
    shutil.copytree(REPO, dest, ignore=COPY_IGNORE, dirs_exist_ok=True)
    return dest


# Root ignores file permissions; this drops that override (as tests/../shared/checks/as-a-normal-user.sh does),
# so a test run as root sees files as a normal user on a cluster would.
DROP_ROOT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-fowner,-dac_read_search", "--"]


def as_normal_user() -> list[str]:
    """Command prefix that runs a command as an unprivileged user would: none when not root; None when root
    and setpriv (util-linux) is missing."""
    if os.geteuid() != 0:
        return []
    return DROP_ROOT_OVERRIDE if shutil.which("setpriv") else None


def snakemake(cwd: Path, *args: str, timeout: int = 1800, check: bool = True, env: dict | None = None,
              prefix: list[str] | None = None):
    cmd = [*(prefix or []), *SNAKEMAKE, *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}")
    return proc


def stand_in_outputs(wf: Path, dry_run: str, skip=()) -> dict[str, list[str]]:
    """Every output a dry run's output lists made in `wf` as an empty file (a folder where the name has no
    suffix), but those of the rules in `skip`: {rule: its outputs} for those."""
    skipped: dict[str, list[str]] = {}
    for rule, line in re.findall(r"^rule (\w+):\n(?:    input: .*\n)?    output: (.*)$", dry_run, re.M):
        if rule in skip:
            skipped.setdefault(rule, []).extend(line.split(", "))
            continue
        for f in line.split(", "):
            path = wf / f
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch() if path.suffix else path.mkdir(exist_ok=True)
    return skipped


def planned_jobs(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run into {rule: count}."""
    jobs: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3:]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                if parts[0] != "total":
                    jobs[parts[0]] = int(parts[1])
            break
    return jobs
