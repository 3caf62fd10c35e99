"""profiles/slurm on a real Slurm: the demo DAG through the slurm executor plugin.

Two tiers live here:
- default tier (no cluster): the sbatch options the plugin builds from profiles/slurm for every job
  of the demo DAG (its own code, fed by a dry run), and that the test overlay keeps the profile's
  GPU selectors;
- `cluster` tier, opt-in with MAMBA_ALIGN_SLURM=1, as root, with apt-get: tests/cluster/slurm_up.sh
  starts munged + MariaDB + slurmdbd + slurmctld + slurmd with one fake A100 (File=/dev/null), the
  demo DAG runs in a scratch copy of the repository through profiles/slurm + tests/cluster/overlay,
  and the assertions are read back from Slurm's own records (sacct). slurm_down.sh stops exactly
  the daemons slurm_up.sh started, whatever happens.
    MAMBA_ALIGN_SLURM=1 .venv/bin/python -m pytest -m cluster tests/cluster -s
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import submits
import yaml

from mamba_align.train.checkpoints import is_complete

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROFILE = REPO / "profiles" / "slurm"
OVERLAY = HERE / "overlay"
TARGETS = ["results/eval/mtbench.json", "results/eval/alpacaeval.json"]
# the demo DAG's (cluster tier); the default tier checks the grid's rules too (submits.GPU_RULES)
GPU_RULES = {"train_sft", "train_dpo", "generate_mt_bench", "generate_alpaca_eval"}
TRAINING = {"train_sft", "train_dpo"}
# what the overlay must copy verbatim from profiles/slurm (only sizes may differ)
SELECTORS = ("gpu_model", "constraint", "slurm_extra")
RUN_TIMEOUT_S = int(os.environ.get("MAMBA_ALIGN_SLURM_TIMEOUT", "1500"))


def load(profile_dir: Path) -> dict:
    return yaml.safe_load((profile_dir / "config.yaml").read_text())


def env() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "CONDOR_CONFIG": "/dev/null", "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}


# ------------------------------------------------------------------------------------ default tier


def test_repo_profile_leaves_account_partition_and_defaults_to_the_user():
    p = load(PROFILE)
    assert p["executor"] == "slurm"
    # a profile's default-resources replaces the user's whole default-resources (account, partition)
    assert "default-resources" not in p
    for rule, res in p["set-resources"].items():
        assert not {"slurm_account", "slurm_partition", "cpus_per_task"} & set(res), rule


def test_overlay_keeps_the_profiles_gpu_selectors():
    repo, overlay = load(PROFILE)["set-resources"], load(OVERLAY)["set-resources"]
    assert set(overlay) == set(repo)
    for rule in repo:
        for key in SELECTORS:
            assert overlay[rule].get(key) == repo[rule].get(key), f"{rule}.{key} differs from profiles/slurm"
        assert bool(overlay[rule].get("gpu")) == bool(repo[rule].get("gpu")), rule


@pytest.fixture(scope="module")
def sbatch(repo_copy, tmp_path_factory) -> dict[str, list[str]]:
    """rule -> the sbatch option strings the slurm plugin builds for its jobs under profiles/slurm."""
    jobs = submits.capture("slurm", repo_copy, tmp_path_factory.mktemp("slurm") / "sbatch.jsonl",
                           "--profile", "profiles/slurm")
    calls = defaultdict(list)
    for job in jobs:
        calls[job["rule"]].append(job["submit"])
    return dict(calls)


def test_every_rule_has_slurm_resources(sbatch):
    rules = set(sbatch) - {"all"}
    assert rules >= submits.GPU_RULES
    assert rules == set(load(PROFILE)["set-resources"])


@pytest.mark.parametrize("rule", sorted(submits.TRAINING))
def test_training_asks_for_eight_a100_80gb_and_a_warning_signal(sbatch, rule):
    for call in sbatch[rule]:
        assert "--gpus=a100:8" in call
        assert re.search(r"(^| )-C a100_80gb( |$)", call)
        assert "--cpus-per-task=64" in call and "--mem 400000" in call
        # SIGTERM to the job steps 15 min before the limit; not B: (that ends the batch script)
        assert "--signal=TERM@900" in call and "B:" not in call
        minutes = int(re.search(r" -t (\d+)", call).group(1))
        assert minutes * 60 > 900, "runtime shorter than the signal's lead: the job would be told to stop at once"


@pytest.mark.parametrize("rule", sorted(submits.GPU_RULES - submits.TRAINING))
def test_generation_asks_for_one_a100(sbatch, rule):
    for call in sbatch[rule]:
        assert "--gpus=a100:1" in call and "--signal" not in call


def test_cpu_rules_ask_for_no_gpu(sbatch):
    for rule, calls in sbatch.items():
        if rule in submits.GPU_RULES:
            continue
        for call in calls:
            assert "--gpus" not in call and "--gres" not in call and " -C " not in call, rule


# -------------------------------------------------------------------------------- cluster tier


def _cluster_capable() -> str | None:
    """Why this machine cannot run the Slurm tier, or None."""
    if os.environ.get("MAMBA_ALIGN_SLURM") != "1":
        return "opt-in: set MAMBA_ALIGN_SLURM=1"
    if os.geteuid() != 0:
        return "needs root (starts Slurm daemons)"
    if not (shutil.which("apt-get") or shutil.which("slurmctld")):
        return "needs apt-get to install Slurm"
    for port in (6817, 6818, 6819):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} is taken (another Slurm running here?)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node Slurm with accounting, up for this module; always torn down."""
    why = _cluster_capable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("slurm-cluster")
    e = {**os.environ, "BASE": str(base), "WITH_DBD": "1"}
    try:
        up = subprocess.run(["bash", str(HERE / "slurm_up.sh")], env=e, capture_output=True, text=True,
                            timeout=900)
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield base
    finally:
        subprocess.run(["bash", str(HERE / "slurm_down.sh")], env=e, timeout=300)


def run_snakemake(workdir: Path, args: list[str], log: Path, watch=None) -> tuple[int, float]:
    """Snakemake in `workdir`, bounded by RUN_TIMEOUT_S (SIGINT, which makes it cancel its Slurm jobs;
    a hung Snakemake ignores SIGTERM). `watch()` is called every second while it runs."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
                if watch:
                    watch()
                time.sleep(1)
        finally:
            if proc.poll() is None:  # timed out, or the watcher failed
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return proc.returncode, time.monotonic() - start


def slurm_jobs(workdir: Path) -> list[dict]:
    """This run's Slurm jobs, in submission order, from accounting (sacct)."""
    fields = ["JobIDRaw", "Comment", "State", "Partition", "ReqTRES", "Constraints", "WorkDir", "ExitCode"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1days", "-o", ",".join(fields)],
                         capture_output=True, text=True, check=True).stdout
    jobs = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]
    mine = [j for j in jobs if Path(j["WorkDir"]) == workdir]
    for j in mine:
        j["rule"] = rule_of(j["Comment"])
    return sorted(mine, key=lambda j: int(j["JobIDRaw"]))


def rule_of(comment: str) -> str | None:
    """The plugin comments each job `rule_<rule>[_wildcards_<values>]`."""
    m = re.match(r"rule_(.+?)(_wildcards_.*)?$", comment)
    return m.group(1) if m else None


def running_jobs(workdir: Path, rule: str) -> list[str]:
    """Ids of this run's running jobs of `rule`, from squeue (accounting may lag behind)."""
    out = subprocess.run(["squeue", "-h", "-t", "running", "-o", "%i|%k|%Z"], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return [i for i, comment, wd in rows if rule_of(comment) == rule and Path(wd) == workdir]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def assert_demo_outputs(workdir: Path):
    for target in TARGETS:
        json.loads((workdir / target).read_text())  # exists and is complete JSON


def base_args(*configfiles: str) -> list[str]:
    # targets first: --configfile takes every word up to the next option
    return [*TARGETS, "--profile", "profiles/slurm", "--profile", "tests/cluster/overlay",
            "--configfile", "config/demo.yaml", *configfiles]


@pytest.mark.cluster
def test_demo_dag_runs_through_slurm(slurm, fresh_repo_copy, tmp_path, record_property):
    work = fresh_repo_copy
    log = tmp_path / "snakemake.log"
    rc, wall = run_snakemake(work, base_args(), log)
    record_property("wall_s", round(wall))
    print(f"\nslurm tier: demo DAG through Slurm in {wall:.0f} s")
    assert rc == 0, tail(log)
    assert_demo_outputs(work)

    jobs = slurm_jobs(work)
    rules = {j["rule"] for j in jobs}
    assert rules >= GPU_RULES, f"GPU rules that did not go through Slurm: {GPU_RULES - rules}"
    for j in jobs:
        gpu = "gres/gpu" in j["ReqTRES"]
        if j["rule"] in GPU_RULES:
            assert gpu and "gres/gpu:a100=1" in j["ReqTRES"], j
            assert j["Partition"] == "gpu", j
            if j["rule"] in TRAINING:
                assert j["Constraints"] == "a100_80gb", j
        else:  # CPU rules: local (absent here) or submitted without a GPU
            assert not gpu and j["Partition"] == "main", j
    last_attempt = {j["Comment"]: j for j in jobs}  # one comment per job (rule + wildcards)
    assert all(j["State"] == "COMPLETED" for j in last_attempt.values()), last_attempt


@pytest.mark.cluster
def test_cancelled_training_resumes_from_its_checkpoint(slurm, fresh_repo_copy, tmp_path, record_property):
    """scancel the train_sft job once it has a complete checkpoint: --retries resubmits it, the new
    job resumes from that checkpoint and the DAG completes."""
    work = fresh_repo_copy
    # long enough (~1 min on CPU) to be caught mid-training, checkpointing every 10 steps
    longer = tmp_path / "longer_sft.yaml"
    longer.write_text(yaml.safe_dump({"recipe_overrides": {"sft": {"max_steps": 200, "save_steps": 10}}}))
    cancelled = {}

    def cancel_once_checkpointed():
        if cancelled:
            return
        done = [c for c in work.glob("results/checkpoints/sft-*/checkpoint-*") if is_complete(c)]
        if not done:
            return
        running = running_jobs(work, "train_sft")
        if running:
            cancelled["job"] = running[-1]
            cancelled["step"] = max(int(c.name.split("-")[1]) for c in done)
            subprocess.run(["scancel", cancelled["job"]], check=True)

    log = tmp_path / "snakemake.log"
    # sacct reports a scancel'ed job as "CANCELLED by <uid>", which plugin 2.8.0 does not recognise
    # (Snakemake would wait for it forever); squeue reports "CANCELLED".
    args = [*base_args(str(longer)), "--slurm-status-command", "squeue"]
    rc, wall = run_snakemake(work, args, log, watch=cancel_once_checkpointed)
    record_property("wall_s", round(wall))
    print(f"\nslurm tier: cancel + resume run in {wall:.0f} s (cancelled job {cancelled.get('job')} "
          f"after checkpoint-{cancelled.get('step')})")
    assert cancelled, f"train_sft never had a checkpoint while running:\n{tail(log)}"
    assert rc == 0, tail(log)
    assert_demo_outputs(work)

    sft = [j for j in slurm_jobs(work) if j["rule"] == "train_sft"]
    states = [(j["JobIDRaw"], j["State"]) for j in sft]
    assert len(sft) >= 2 and sft[-1]["State"] == "COMPLETED", states
    assert any(j["JobIDRaw"] == cancelled["job"] and j["State"].startswith("CANCELLED") for j in sft), states

    train_log = (work / "results/logs/train_sft.log").read_text()  # the last attempt's log
    resumed = re.search(r"resuming from \S*checkpoint-(\d+)", train_log)
    assert resumed, train_log[-3000:]
    assert int(resumed.group(1)) >= cancelled["step"]
    metrics = json.loads((work / "results/metrics/sft.json").read_text())
    assert metrics["resumed_from"] and metrics["resumed_from"].endswith(f"checkpoint-{resumed.group(1)}")
