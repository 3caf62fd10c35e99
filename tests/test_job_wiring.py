"""The training rules hand their job the recipe the workflow parsed (params.job_recipe), of which Snakemake records
nothing: a job runs with the operational keys of the config it was submitted with, and an operational change reruns
nothing. The rules run for real here, their two scripts replaced by one that writes the job it was given (the
training itself is the demo's, tests/test_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wfhelpers import copy_workflow, planned_jobs, snakemake, stand_in_outputs

DEMO = ("--configfile", "config/demo.yaml")
GRID = (*DEMO, "config/demo-grid.yaml")
TRAINING = ("train_sft", "train_dpo", "train_sft_grid", "train_dpo_grid")
# writes the job as the rule's script built it, where the metrics go; a folder where the model goes
STUB = """
import json, os
from mamba_align.train.job import TrainJob

job = TrainJob.from_snakemake(snakemake, snakemake.rule.split("_")[1])
os.makedirs(snakemake.output.model, exist_ok=True)
for path in (snakemake.output.metrics, snakemake.output.provenance):
    with open(path, "w") as f:
        json.dump(job.as_dict(), f)
"""


def _prepared(wf: Path, config: tuple[str, ...]) -> list[str]:
    """Every input of the training jobs made (empty files), the scripts stubbed; returns the training metrics files."""
    for stage in ("sft", "dpo"):
        (wf / "workflow" / "scripts" / f"train_{stage}.py").write_text(STUB)
    dry = snakemake(wf, "-n", *config).stdout
    metrics = [f for outputs in stand_in_outputs(wf, dry, skip=TRAINING).values() for f in outputs if "/metrics" in f]
    assert metrics, dry
    return metrics


def _train(wf: Path, config: tuple[str, ...], metrics: list[str], *extra: str) -> dict[str, dict]:
    snakemake(wf, *metrics, "--cores", "1", "--allowed-rules", *TRAINING, *config, *extra)
    return {m: json.loads((wf / m).read_text()) for m in metrics}


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> tuple[Path, list[str]]:
    wf = copy_workflow(tmp_path_factory.mktemp("wiring") / "wf")
    return wf, _prepared(wf, DEMO)


def test_the_job_runs_with_the_recipe_of_the_config_it_was_submitted_with(classic):
    wf, metrics = classic
    jobs = _train(wf, DEMO, metrics)
    sft, dpo = (jobs[f"results/metrics/{s}.json"]["recipe"] for s in ("sft", "dpo"))
    assert sft["save_steps"] != 7 and dpo["beta"] == 0.1 and dpo["precompute_ref_log_probs"] is True
    (wf / "ops.yaml").write_text("recipe_overrides:\n  sft: {save_steps: 7}\n"
                                 "training: {precompute_ref_log_probs: false}\n")
    assert planned_jobs(snakemake(wf, "-n", *metrics, *DEMO, "ops.yaml").stdout) == {}  # operational: no rerun
    # ... and a job submitted now (here forced) runs with the new values
    jobs = _train(wf, (*DEMO, "ops.yaml"), metrics, "--forcerun", "train_sft", "train_dpo")
    assert jobs["results/metrics/sft.json"]["recipe"]["save_steps"] == 7
    assert jobs["results/metrics/dpo.json"]["recipe"]["precompute_ref_log_probs"] is False


def test_each_grid_experiment_runs_with_its_own_recipe(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    (wf / "training.yaml").write_text("training: {precompute_ref_log_probs: false}\n")
    config = (*GRID, "training.yaml")
    jobs = _train(wf, config, _prepared(wf, config))
    dpo = {m: j["recipe"] for m, j in jobs.items() if j["stage"] == "dpo"}
    assert sorted(r["beta"] for r in dpo.values()) == [0.05, 0.05, 0.2, 0.2]
    assert {r["seed"] for r in dpo.values()} == {1, 2}
    # the experiments' own override, and the workflow's training section
    assert all(r["num_train_epochs"] == 1 and r["precompute_ref_log_probs"] is False for r in dpo.values())
    assert [j["stage"] for j in jobs.values()].count("sft") == 1  # shared by all four
