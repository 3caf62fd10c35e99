"""What the executor plugins would submit for every job of the demo's DAGs (no cluster needed).

The demo DAG and the demo grid's DAG together run every rule the cluster profiles name; a grid's rules
(workflow/rules/experiments.smk) are `<rule>_grid` and must ask for what their rule asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CAPTURE = Path(__file__).with_name("capture_submits.py")
DRY_RUN_CONFIGS = (("config/demo.yaml",), ("config/demo.yaml", "config/demo-grid.yaml"))
_GPU = {"train_sft", "train_dpo", "generate_mt_bench", "generate_alpaca_eval"}
_TRAINING = {"train_sft", "train_dpo"}
GPU_RULES = _GPU | {f"{r}_grid" for r in _GPU} | {"eval_leaderboard", "eval_leaderboard_grid"}
TRAINING = _TRAINING | {f"{r}_grid" for r in _TRAINING}


def capture(kind: str, workdir: Path, out: Path, *args: str) -> list[dict]:
    """One record per job of both DAGs: rule, threads, resources and what the `kind` plugin builds
    (see capture_submits.py). `args` are extra snakemake arguments (the profiles)."""
    env = {**os.environ, "CONDOR_CONFIG": "/dev/null",  # no pool configured: silence the bindings
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    jobs = []
    for configs in DRY_RUN_CONFIGS:
        cmd = [sys.executable, str(CAPTURE), kind, str(out), "--", "--configfile", *configs,
               "--dry-run", "--cores", "1024", *args]
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"dry run of {configs} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        jobs += [json.loads(line) for line in out.read_text().splitlines()]
    return jobs
