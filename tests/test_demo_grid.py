"""The grid demo end to end on CPU (two DPO betas x two seeds on the tiny model), run once for the module:
SFT ran once, every experiment was scored, the report compares them, the plan sums them, and a finished grid
reruns only what a change of the grid asks for."""

from __future__ import annotations

import csv
import json
import time

import pytest
import yaml
from wfhelpers import as_normal_user, copy_workflow, planned_jobs, snakemake

pytestmark = pytest.mark.slow
GRID = ("--workflow-profile", "profiles/local", "--configfile", "config/demo.yaml", "config/demo-grid.yaml")
NAMES = ["beta0.05-seed1", "beta0.05-seed2", "beta0.2-seed1", "beta0.2-seed2"]
USER = as_normal_user()


def sm(wf, *args, **kw):
    return snakemake(wf, *args, prefix=USER, **kw)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("grid") / "wf")
    t0 = time.time()
    proc = sm(wf, *GRID, "--cores", "2", timeout=1800)
    print(f"grid demo wall time: {time.time() - t0:.0f} s")
    return wf, proc


def test_sft_ran_once_for_four_experiments(grid_run):
    wf, proc = grid_run
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert jobs["train_sft_grid"] == 1 and jobs["prepare_base_model_grid"] == 1 and jobs["train_dpo_grid"] == 4
    r = wf / "results"
    sft_homes = list((r / "shared/sft").iterdir())
    assert len(sft_homes) == 1 and len(list(sft_homes[0].glob("model-*"))) == 1
    sft_store = (sft_homes[0] / "model").resolve()
    for name in NAMES:
        run = json.loads((r / "experiments" / name / "model" / "run.json").read_text())
        assert run["parent_model_path"] == str(sft_store)  # every DPO run started from the one SFT model
        assert run["recipe"]["beta"] == float(name[4:].split("-")[0]) and run["recipe"]["seed"] == int(name[-1])
        for bench in ("mtbench", "alpacaeval", "leaderboard"):
            assert (r / "experiments" / name / "eval" / f"{bench}.json").is_file()
    # the leaderboard's stages are base and dpo (config/demo-grid.yaml): the shared base model scored once
    assert jobs["eval_leaderboard_grid"] == 5 and len(list((r / "shared/base").glob("*/eval/leaderboard.json"))) == 1


def test_report_compares_the_experiments(grid_run):
    wf, _ = grid_run
    out = wf / "results/report/experiments"
    rows = list(csv.DictReader(open(out / "scores.csv")))
    base = f"base shared by 4: {', '.join(NAMES)}"  # scored on the leaderboard only
    assert [(row["experiment"], row["stage"]) for row in rows] == [(base, "base")] + [(n, "dpo") for n in NAMES]
    assert all(row["leaderboard_status"] == "current" and row["leaderboard_average"] for row in rows)
    dpo = [row for row in rows if row["stage"] == "dpo"]
    assert len(dpo) == 4 and all(row["mt_bench_overall"] for row in dpo)
    assert all(row["leaderboard_average_change"] and row["leaderboard:demo_arc_change"] for row in dpo)
    assert all(row["alpaca_eval_2_win_rate"] for row in dpo)  # the demo's 8 prompts are too few for LC
    md = (out / "scores.md").read_text()
    for name in NAMES:
        assert f"| {name} | dpo |" in md
    assert "## Over seeds" in md and "beta=0.05 (dpo, 2 seeds)" in md and "beta=0.2 (dpo, 2 seeds)" in md
    assert "zephyr-7b-beta (paper)" in md and "mean nothing" in md
    assert "## Open LLM Leaderboard tasks (lm-eval)" in md and "demo_arc (3-shot acc_norm)" in md
    png = (out / "dpo.beta.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_plan_totals_are_the_sums_of_the_experiments(grid_run):
    wf, _ = grid_run
    plan = json.loads((wf / "results/plan.json").read_text())
    assert list(plan["experiments"]) == NAMES
    assert plan["total_gpu_hours"] == round(sum(p["total_gpu_hours"] for p in plan["experiments"].values()), 1)
    owners = [n for n, p in plan["experiments"].items() if any(j["rule"] == "train_sft" for j in p["jobs"])]
    assert owners == [NAMES[0]]  # the shared SFT run is planned once
    assert "total GPU-hours" in (wf / "results/plan.txt").read_text()


def test_finished_grid_is_a_no_op(grid_run):
    wf, _ = grid_run
    assert "Nothing to be done" in sm(wf, *GRID, "-n").stdout


def _with_grid(wf, grid: dict):
    (wf / "change.yaml").write_text(yaml.safe_dump({"experiments": {"grid": grid}}))
    return planned_jobs(sm(wf, *GRID, "change.yaml", "-n").stdout)


def test_adding_an_experiment_runs_only_its_own_jobs(grid_run):
    wf, _ = grid_run
    jobs = _with_grid(wf, {"dpo": {"beta": [0.05, 0.2]}, "seed": [1, 2, 3]})
    own = {"train_dpo_grid": 2, "generate_mt_bench_grid": 2, "judge_mt_bench_grid": 2,
           "generate_alpaca_eval_grid": 2, "judge_alpaca_eval_grid": 2, "eval_leaderboard_grid": 2}
    assert jobs == {**own, "report_experiments": 1, "plan": 1, "all": 1}


def test_removing_an_experiment_touches_nothing_else(grid_run):
    wf, _ = grid_run
    jobs = _with_grid(wf, {"dpo": {"beta": [0.05, 0.2]}, "seed": [1]})
    assert set(jobs) <= {"report_experiments", "plan", "all"}
