"""Workflow tier for experiments: a grid dry-runs to the job count computed by hand (shared jobs once), the
default config's DAG and targets are those it had before experiments existed, lint stays clean on a grid."""

from __future__ import annotations

import re

import yaml
from wfhelpers import planned_jobs, snakemake

DEMO_GRID = ("--configfile", "config/demo.yaml", "config/demo-grid.yaml")


def test_grid_dry_run_counts_shared_jobs_once(workflow_copy):
    b, betas, seeds = 2, 3, 2  # base models x DPO betas x seeds, SFT and DPO models evaluated
    (workflow_copy / "grid.yaml").write_text(yaml.safe_dump({"experiments": {"grid": {
        "base_model": ["results/demo/base_mamba_ssm", "results/demo/other_mamba_ssm"],
        "dpo": {"beta": [0.01, 0.05, 0.1]}, "seed": [1, 2]}}}))
    jobs = planned_jobs(snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "grid.yaml").stdout)
    dpo_models = b * betas * seeds
    evaluated = dpo_models + b  # every DPO model, and each base model's one SFT model
    assert jobs == {
        "build_demo_inputs": 1, "fetch_mt_bench": 1, "fetch_alpaca_eval": 1, "plan": 1, "report_experiments": 1,
        "all": 1, "fetch_leaderboard_data": 1,
        "eval_leaderboard_grid": b + evaluated,  # the leaderboard's stages (base, sft, dpo): each model once
        "prepare_base_model_grid": b,  # one conversion per base model
        "prepare_sft_data_grid": 1, "prepare_preference_data_grid": 1,  # one tokenizer and template: data once
        "train_sft_grid": b,  # SFT per base model: the beta sweep and the seeds share it
        "train_dpo_grid": dpo_models,
        "generate_mt_bench_grid": evaluated, "judge_mt_bench_grid": evaluated,
        "generate_alpaca_eval_grid": evaluated, "judge_alpaca_eval_grid": evaluated,
    }


def test_demo_grid_dry_run_shows_the_grid(workflow_copy):
    out = snakemake(workflow_copy, "-n", *DEMO_GRID).stdout
    jobs = planned_jobs(out)
    assert jobs["train_sft_grid"] == 1 and jobs["train_dpo_grid"] == 4 and jobs["judge_mt_bench_grid"] == 4
    for name in ("beta0.05-seed1", "beta0.05-seed2", "beta0.2-seed1", "beta0.2-seed2"):
        assert f"results/experiments/{name}/eval/mtbench.json" in out
    assert "results/report/experiments/dpo.beta.png" in out


def _jobs_of(out: str, rule: str) -> list[str]:
    """The dry run's blocks of `rule`'s jobs."""
    return [block.split("\n\n")[0] for block in out.split(f"rule {rule}:\n")[1:]]


def test_grid_leaderboard_jobs_are_keyed_by_model_and_hold_one_gpu(workflow_copy):
    """eval_leaderboard_grid scores each model of eval.leaderboard.stages once (demo grid: [base, dpo]): the base
    model the four experiments share in one job under its key, each DPO model under its experiment, one GPU each;
    the grid's report reads them all. No leaderboard stages: no leaderboard job."""
    out = snakemake(workflow_copy, "-n", *DEMO_GRID).stdout
    blocks = _jobs_of(out, "eval_leaderboard_grid")
    homes = [re.search(r"wildcards: home=(\S+)", b).group(1) for b in blocks]
    assert len(blocks) == 5 == planned_jobs(out)["eval_leaderboard_grid"] and len(set(homes)) == 5
    assert sum(re.fullmatch(r"shared/base/[0-9a-f]{12}", h) is not None for h in homes) == 1
    assert sorted(h for h in homes if h.startswith("experiments/")) == [
        f"experiments/beta{b}-seed{s}" for b in ("0.05", "0.2") for s in (1, 2)]
    for home, block in zip(homes, blocks):
        assert f"output: results/{home}/eval/leaderboard.json, " in block
        assert f"input: results/{home}/model, results/data/leaderboard/tasks.json" in block
        assert re.search(r"resources: .*\bgpu=1\b", block), block
    report = _jobs_of(out, "report_experiments")[0]
    assert all(f"results/{h}/eval/leaderboard.json" in report for h in homes)
    (workflow_copy / "no_lb.yaml").write_text(yaml.safe_dump({"eval": {"leaderboard": {"stages": []}}}))
    jobs = planned_jobs(snakemake(workflow_copy, "-n", *DEMO_GRID, "no_lb.yaml").stdout)
    assert "eval_leaderboard_grid" not in jobs and "fetch_leaderboard_data" not in jobs


# What `snakemake -n --configfile config/config.yaml` planned before experiments existed (main at 245e010).
DEFAULT_JOBS = {"prepare_base_model": 1, "prepare_sft_data": 1, "train_sft": 1, "prepare_preference_data": 1,
                "train_dpo": 1, "fetch_mt_bench": 1, "fetch_alpaca_eval": 1, "generate_mt_bench": 2,
                "judge_mt_bench": 2, "generate_alpaca_eval": 2, "judge_alpaca_eval": 2, "report": 1, "plan": 1,
                "all": 1, "fetch_leaderboard_data": 1, "eval_leaderboard": 3}  # base, sft, dpo (#30)
# Since issue #28 the report's and the plan's every file is a declared output, so a target too: scores.json and the
# provenance records (written by the same jobs before, undeclared).
DEFAULT_TARGETS = ["results/eval/sft/mtbench.json", "results/eval/sft/alpacaeval.json", "results/eval/mtbench.json",
                   "results/eval/alpacaeval.json", "results/eval/base/leaderboard.json",
                   "results/eval/sft/leaderboard.json", "results/eval/leaderboard.json", "results/report/scores.md",
                   "results/report/scores.html", "results/report/scores.csv", "results/report/scores.json",
                   "results/report/mt_bench_radar.png", "results/report/training_curves.png",
                   "results/report/leaderboard.json", "results/report/leaderboard_changes.png",
                   "results/provenance/report.json", "results/plan.json",
                   "results/plan.txt", "results/provenance/plan.json"]
DEFAULT_OUTPUTS = {
    "results/data/alpaca_eval", "results/data/mt_bench/question.jsonl", "results/models/base",
    "results/models/base.verify.json", "results/data/sft/train.parquet", "results/data/dpo/train.parquet",
    "results/models/sft", "results/metrics/sft.json", "results/models/dpo", "results/metrics/dpo.json",
    "results/eval/sft/mt_bench_answers.jsonl", "results/eval/dpo/mt_bench_answers.jsonl",
    "results/eval/sft/alpaca_eval_outputs.json", "results/eval/dpo/alpaca_eval_outputs.json",
    *DEFAULT_TARGETS}


def test_default_config_dag_and_targets_are_unchanged(workflow_copy):
    out = snakemake(workflow_copy, "-n", "--configfile", "config/config.yaml").stdout
    assert planned_jobs(out) == DEFAULT_JOBS
    all_block = out[out.rindex("rule all:"):]
    assert re.search(r"input: (.*)", all_block).group(1).split(", ") == DEFAULT_TARGETS
    outputs = {f for line in re.findall(r"^    output: (.*)$", out, re.M) for f in line.split(", ")}
    assert DEFAULT_OUTPUTS <= outputs and not any("experiments" in f or "shared" in f for f in outputs)


def test_lint_is_clean_on_a_grid(workflow_copy):
    proc = snakemake(workflow_copy, "--lint", *DEMO_GRID, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_grid_is_named_before_any_job(workflow_copy):
    for patch, expected in [({"experiments": {"grid": {"sed": [1]}}}, "sed"),
                            ({"experiments": {"grid": {"dpo": {"betta": [0.1]}}}}, "betta"),
                            ({"experiments": {"list": [{"name": "a"}, {"name": "a"}]}},
                             "two experiments are named 'a'")]:
        (workflow_copy / "bad.yaml").write_text(yaml.safe_dump(patch))
        proc = snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "bad.yaml", check=False)
        assert proc.returncode != 0 and expected in proc.stdout + proc.stderr, patch


def test_profiles_and_plan_size_each_grid_job_by_its_model(workflow_copy):
    (workflow_copy / "family.yaml").write_text(yaml.safe_dump({"experiments": {"grid": {
        "base_model": ["state-spaces/mamba-130m", "state-spaces/mamba-2.8b"]}}}))
    out = snakemake(workflow_copy, "-n", "--profile", "profiles/slurm", "--configfile", "config/config.yaml",
                    "family.yaml").stdout
    jobs = planned_jobs(out)
    assert jobs["prepare_base_model_grid"] == 2 and jobs["train_sft_grid"] == 2 and jobs["train_dpo_grid"] == 2
    runtimes = []
    for block in out.split("rule train_sft_grid:")[1:]:
        block = block.split("\n\n")[0]
        assert "gpu=8" in block  # the profile's resources of train_sft apply to its grid twin
        runtimes.append(int(block.split("runtime=")[1].split(",")[0]))
    small, large = sorted(runtimes)  # 130M and 2.8B: the plan's runtime of each
    assert small == 30 and large > 100, runtimes  # 130M: under the 30-min floor; 2.8B: ~2 h on 8 A100s
    leaderboard = {}  # the leaderboard's jobs too: each sized by its own model, on the profile's one A100
    for block in _jobs_of(out, "eval_leaderboard_grid"):
        home = re.search(r"wildcards: home=(\S+)", block).group(1)
        assert "gpu=1," in block and "gpu_model=a100" in block
        leaderboard[home] = int(block.split("runtime=")[1].split(",")[0])
    by_size = {h: t for h, t in leaderboard.items() if h.startswith("experiments/")}
    assert len(leaderboard) == 6 and by_size["experiments/mamba-130m"] == 30 < by_size["experiments/mamba-2.8b"]


def _local_sft(source: str) -> dict:
    return {"sft": {"dataset": {"source": source, "revision": None, "train_split": "train_sft",
                                "test_split": "test_sft"}}}


def test_an_edited_local_source_reruns_its_grid_data_step_only(workflow_copy):
    """Each grid data step carries the digest of its own local dataset (not the config's, which the rule would
    inherit from prepare_sft_data): an edit reruns that experiment's data step and no other."""
    wf = workflow_copy
    (wf / "local.yaml").write_text(yaml.safe_dump({
        "recipe_overrides": _local_sft("local_main"),  # experiment b's dataset
        "experiments": {"list": [{"name": "a", "recipe_overrides": _local_sft("local_a")}, {"name": "b"}]}}))
    for d in ("local_main", "local_a"):
        (wf / d).mkdir()
        (wf / d / "train_sft.parquet").write_text("v1")
    cfg = ("--configfile", "config/demo.yaml", "local.yaml")
    dry = snakemake(wf, "-n", *cfg).stdout
    data = re.findall(r"^rule prepare_sft_data_grid:\n    input: .*\n    output: (results/\S+/train\.parquet)", dry,
                      re.M)
    assert len(data) == 2, dry
    # empty files stand in for the data steps' outputs and upstream ones, so that --touch records the data steps'
    # params as a run would (no model, no data)
    rules = "build_demo_inputs|prepare_base_model_grid|prepare_sft_data_grid"
    for line in re.findall(rf"^rule (?:{rules}):\n(?:    input: .*\n)?    output: (.*)$", dry, re.M):
        for f in line.split(", "):
            path = wf / f
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:  # a directory() output
                path.mkdir(parents=True, exist_ok=True)
    snakemake(wf, *data, "--touch", "--cores", "1", "--forcerun", "prepare_sft_data_grid", *cfg)
    assert planned_jobs(snakemake(wf, "-n", *data, *cfg).stdout) == {}

    rerun = {}
    for d in ("local_a", "local_main"):
        (wf / d / "train_sft.parquet").write_text(f"{d} edited")  # another size: another digest
        out = snakemake(wf, "-n", *data, *cfg).stdout
        assert planned_jobs(out) == {"prepare_sft_data_grid": 1}, out
        assert "Params have changed since last execution" in out
        rerun[d] = re.search(r"^    wildcards: key=(\w+)", out, re.M).group(1)
        snakemake(wf, *data, "--touch", "--cores", "1", "--forcerun", "prepare_sft_data_grid", *cfg)
    assert rerun["local_a"] != rerun["local_main"]  # each edit reran its own experiment's data
