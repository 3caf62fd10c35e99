"""The training job's GPU count, chosen at submission from what a real Slurm has free (issue #32).

Cluster tier, opt-in with MAMBA_ALIGN_SLURM=1 (as root, with apt-get), like tests/cluster/test_slurm.py:
tests/cluster/slurm_up.sh starts a single-node Slurm whose node has 4 fake A100s (GPU_COUNT=4), another job holds
2 of them, and the demo's train_sft runs through profiles/slurm with `gpu_counts: '4,2,1'`: it must be submitted
with --gpus=a100:2 (the largest count free now), say so in its log, and train on 2 processes (DDP over gloo here).
    MAMBA_ALIGN_SLURM=1 .venv/bin/python -m pytest -m cluster tests/cluster/test_slurm_gpu_choice.py -s
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import HERE, OVERLAY, _cluster_capable, run_snakemake, tail


@pytest.fixture(scope="module")
def slurm_with_4_gpus(tmp_path_factory):
    why = _cluster_capable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("slurm-4gpu")
    e = {**__import__("os").environ, "BASE": str(base), "WITH_DBD": "0", "GPU_COUNT": "4"}
    try:
        up = subprocess.run(["bash", str(HERE / "slurm_up.sh")], env=e, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        assert "gpu:a100:4" in up.stdout, up.stdout
        yield base
    finally:
        subprocess.run(["bash", str(HERE / "slurm_down.sh")], env=e, timeout=300)


def elastic_overlay(work: Path, counts: str) -> Path:
    """tests/cluster/overlay with train_sft's gpu_counts set to `counts`; squeue for status (no slurmdbd)."""
    ov = work / "tests" / "cluster" / "overlay-elastic"
    ov.mkdir()
    shutil.copy(OVERLAY / "partitions.yaml", ov / "partitions.yaml")
    cfg = yaml.safe_load((OVERLAY / "config.yaml").read_text())
    cfg["set-resources"]["train_sft"] = {**cfg["set-resources"]["train_sft"], "gpu_counts": f"'{counts}'"}
    cfg["slurm-status-command"] = "squeue"
    (ov / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ov


def job_fields(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def jobs_of(work: Path, comment: str) -> list[dict]:
    """This run's Slurm jobs with `comment` (the plugin comments rule_<rule>), from scontrol (MinJobAge keeps
    finished jobs there for an hour)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True,
                         check=True).stdout
    jobs = [job_fields(i) for i in out.split()]
    return [j for j in jobs if j.get("Comment") == comment and Path(j.get("WorkDir", "")) == work]


@pytest.mark.cluster
def test_training_is_submitted_with_the_gpus_free_now(slurm_with_4_gpus, fresh_repo_copy, tmp_path):
    work = fresh_repo_copy
    holder = subprocess.run(["sbatch", "--parsable", "-p", "gpu", "--gpus=a100:2", "--mem=500", "-c", "1",
                             "-o", "/dev/null", "--wrap", "sleep 3000"], capture_output=True, text=True,
                            check=True).stdout.strip().split(";")[0]
    try:
        t0 = time.time()
        while job_fields(holder).get("JobState") != "RUNNING":
            assert time.time() - t0 < 120, job_fields(holder)
            time.sleep(1)
        ov = elastic_overlay(work, "4,2,1")
        log = tmp_path / "snakemake.log"
        rc, wall = run_snakemake(work, ["results/models/sft", "--profile", "profiles/slurm", "--profile", str(ov),
                                        "--configfile", "config/demo.yaml"], log)
    finally:
        subprocess.run(["scancel", holder], check=False)
    print(f"\nslurm tier: train_sft on the GPUs free now in {wall:.0f} s")
    assert rc == 0, tail(log)
    [sft] = jobs_of(work, "rule_train_sft")
    assert sft["TresPerJob"] == "gres:gpu:a100:2", sft  # --gpus=a100:2: the 2 of 4 not held
    assert "GPU count for train_sft attempt 1: 2 GPU(s): 2 free on one node" in log.read_text()
    train_log = (work / "results/logs/train_sft.log").read_text()
    assert "submitted with train_sft attempt 1: 2 GPU(s)" in train_log and "2 processes x 4 per device" in train_log
    metrics = json.loads((work / "results/metrics/sft.json").read_text())
    assert (metrics["num_processes"], metrics["gradient_accumulation_steps"]) == (2, 1)
