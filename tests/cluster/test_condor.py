"""profiles/condor, checked without a pool (no HTCondor daemons can run here).

A dry run of the demo DAG with the condor profile hands every job to the real
snakemake-executor-plugin-htcondor, which builds its submit description; only the hand-over to a
schedd is replaced (tests/cluster/capture_submits.py). The assertions are on those descriptions:
GPUs, GPU class, memory, disk and CPUs per rule, and no GPU for the CPU rules.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from submits import GPU_RULES, TRAINING, capture

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("snakemake_executor_plugin_htcondor")

PROFILE = REPO / "profiles" / "condor"
# keys of set-resources that are for Snakemake / the workflow, not for HTCondor
WORKFLOW_KEYS = {"gpu", "gpu_counts"}


def submit_key(resource: str) -> str:
    """The submit command a resource becomes (the plugin's job_wrapper is the executable; htcondor_submit_<key> is
    <key> verbatim)."""
    return "executable" if resource == "job_wrapper" else resource.removeprefix("htcondor_submit_")


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


@pytest.fixture(scope="module")
def submits(repo_copy, tmp_path_factory) -> dict[str, list[dict]]:
    jobs = capture("htcondor", repo_copy, tmp_path_factory.mktemp("condor") / "submits.jsonl",
                   "--profile", str(PROFILE))
    by_rule = defaultdict(list)
    for job in jobs:
        by_rule[job["rule"]].append(job)
    return dict(by_rule)


def test_every_rule_is_set_and_every_set_rule_exists(submits):
    rules = set(submits) - {"all"}
    assert rules >= GPU_RULES
    set_rules = set(profile()["set-resources"])
    assert rules - set_rules == set(), "rules without HTCondor resources (pool defaults would apply)"
    assert set_rules - rules == set(), "profile names rules the workflow does not have"


def test_every_key_reaches_the_submit_description(submits):
    """The plugin passes only HTCondor-named keys; a key it drops would be silently ignored."""
    for rule, keys in profile()["set-resources"].items():
        for job in submits[rule]:
            missing = {submit_key(k) for k in set(keys) - WORKFLOW_KEYS} - set(job["submit"])
            assert not missing, f"{rule}: {sorted(missing)} not in the submit description"


@pytest.mark.parametrize("rule", sorted(GPU_RULES))
def test_gpu_rules_ask_for_a100_class_gpus(submits, rule):
    for job in submits[rule]:
        sub = job["submit"]
        n = int(sub["request_gpus"])
        assert n >= 1
        # the trainer launches `gpu` processes: it must see as many GPUs as HTCondor gives it
        assert job["resources"]["gpu"] == n
        assert re.search(r"Capability\s*>=\s*8\.0", sub["require_gpus"])
        if rule in TRAINING:
            assert n == 8
            assert re.search(r"GlobalMemoryMb\s*>=\s*80000", sub["require_gpus"])
            assert int(sub["request_cpus"]) >= 8 * n
        else:
            assert n == 1


@pytest.mark.parametrize("rule", sorted(set(profile()["set-resources"]) - GPU_RULES))
def test_cpu_rules_ask_for_no_gpu(submits, rule):
    for job in submits[rule]:
        sub = job["submit"]
        assert int(sub.get("request_gpus", 0)) == 0
        assert "require_gpus" not in sub and "gpus_minimum_capability" not in sub
        assert job["resources"].get("gpu", 0) == 0


def test_memory_and_disk_are_requested_for_every_job(submits):
    """The plugin ignores mem_mb, so request_memory must cover what each rule declares."""
    for rule, jobs in submits.items():
        if rule == "all":
            continue
        for job in jobs:
            sub = job["submit"]
            assert int(sub["request_memory"]) >= int(job["resources"]["mem_mb"]), rule
            assert re.fullmatch(r"\d+(KB|MB|GB|TB)", str(sub["request_disk"])), rule
            assert int(sub["request_cpus"]) == job["threads"], rule


def test_submit_descriptions_are_valid_for_the_bindings(submits):
    htcondor = pytest.importorskip("htcondor2")
    for jobs in submits.values():
        for job in jobs:
            text = str(htcondor.Submit(job["submit"]))
            assert "request_cpus" in text


@pytest.mark.parametrize("rule", sorted(TRAINING))
def test_training_is_self_checkpointing(submits, rule):
    """The trainer's exit 75 (a checkpoint saved on SIGTERM) is HTCondor's checkpoint_exit_code, through the
    wrapper that turns the job's exit 1 after it into 75 (tests/test_condor_checkpoint.py)."""
    for job in submits[rule]:
        sub = job["submit"]
        assert sub["executable"] == "profiles/condor/self_checkpoint.sh"
        assert (REPO / sub["executable"]).stat().st_mode & 0o111
        assert int(sub["checkpoint_exit_code"]) == 75
        assert " -m snakemake " in sub["arguments"]  # the whole command: the wrapper runs it as it is


def test_other_jobs_are_not_wrapped(submits):
    for rule, jobs in submits.items():
        if rule not in TRAINING:
            assert all("checkpoint_exit_code" not in j["submit"] for j in jobs), rule

