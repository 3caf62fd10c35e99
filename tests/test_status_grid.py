"""Issue #29 item 5: `mamba-align status` shows a grid's experiments (config `experiments`) in their layout:
shared base model, data and SFT under results/shared/, DPO and scores under results/experiments/<name>/, logs
under results/logs/<the same folder>/; scores marked stale as in the classic layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wfhelpers import REPO, copy_workflow, snakemake

from mamba_align.cli.status import status as folder_status
from mamba_align.ops.store import provenance

GRID_CONFIG = [str(REPO / "config" / "demo.yaml"), str(REPO / "config" / "demo-grid.yaml")]
OLD_KEY = "0123456789ab"


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def mtbench(key: str | None, overall: float) -> dict:
    s = {"turn_1": overall, "turn_2": overall, "overall": overall}
    return {"benchmark": "mt_bench", "model_key": key, "model_run_key": None, "scores": s}


def alpacaeval(key: str | None, win_rate: float) -> dict:
    return {"benchmark": "alpaca_eval", "generator": "x-dpo", "model_key": key, "model_run_key": None,
            "results": {"weighted_alpaca_eval_gpt4_turbo": {
                "version": "2.0", "win_rate": win_rate, "length_controlled_winrate": None, "n": 8}}}


def progress_line(stage: str, step: int, of: int) -> str:
    return (f"2026-01-01 00:00:00,000 INFO mamba_align.train.callbacks: {stage} progress: step {step}/{of} "
            f"(50.0%) | loss 1.0 | 100 tokens/s | elapsed 0:01:00 | ETA 0:01:00\n")


@pytest.fixture
def grid(tmp_path):
    return provenance.current_grid(tmp_path / "results", GRID_CONFIG, REPO)


@pytest.fixture
def results(tmp_path, grid) -> Path:
    """The demo grid half way: shared base, data and SFT done; experiment 1 trained and scored (its AlpacaEval of
    an earlier DPO model), experiment 2 training from a checkpoint, 3 and 4 not started; one judge failed."""
    r = tmp_path / "results"
    first, second = grid.exps[0], grid.exps[1]
    write(r / grid.home(first, "base") / "verify.json", {})
    for stage in ("sft", "dpo"):
        write(Path(grid.data_dir(first, stage)) / "stats.json", {})
    sft = grid.home(first, "sft")
    write(r / sft / "model" / "config.json", {})
    write(r / sft / "metrics.json", {"global_step": 12, "wall_time_s": 36, "final": {"train_loss": 2.5}})
    done = grid.home(first, "dpo")
    write(r / done / "model" / "config.json", {})
    write(r / done / "metrics.json", {"global_step": 4, "wall_time_s": 18, "final": {"train_loss": 0.69}})
    write(r / done / "eval" / "mtbench.json", mtbench(provenance.grid_model_key(grid, done), 6.5))
    write(r / done / "eval" / "alpacaeval.json", alpacaeval(OLD_KEY, 12.5))
    running = grid.home(second, "dpo")
    ckpts = r / "checkpoints" / "dpo-feedc0ffee00"
    write(ckpts / "checkpoint-2" / "trainer_state.json", {"global_step": 2, "max_steps": 4})
    write(r / "checkpoints" / "dpo-0ther0000000" / "checkpoint-3" / "trainer_state.json",  # another experiment's
          {"global_step": 3, "max_steps": 4})
    write(r / "logs" / running / "train_dpo.log",
          f"2026-01-01 00:00:00,000 INFO mamba_align.ops.store.runs: dpo run feedc0ffee00: checkpoints in {ckpts} "
          f"(resuming), model to {r}/models/dpo-feedc0ffee00\n" + progress_line("dpo", 3, 4))
    write(r / "logs" / done / "judge_alpaca_eval.log",
          "2026-01-01 00:00:00,000 ERROR mamba_align: judge unreachable\n")
    return r


def status(results: Path, *config: str) -> str:
    return folder_status(results, list(config), REPO)


def test_each_experiment_shows_its_stages(results, grid):
    out = status(results, *GRID_CONFIG)
    first, second, third = grid.exps[:3]
    assert f"experiments: {len(grid.exps)}" in out
    block = out.split(f"experiment {first.name} ")[1].split("\nexperiment ")[0]
    assert f"base model (shared/base/{first.base_key}): ready" in block
    assert f"sft data (shared/data/sft/{first.data_keys['sft']}): ready" in block
    assert f"train sft (shared/sft/{first.sft_key}): done (12 steps" in block
    assert f"train dpo (experiments/{first.name}): done (4 steps" in block
    mt = next(line for line in block.splitlines() if "MT-Bench" in line)
    assert "overall 6.5" in mt and "stale" not in mt
    assert f"experiment {third.name} (dpo.beta" in out
    assert f"train dpo (experiments/{third.name}): not started" in out


def test_a_score_of_another_model_is_marked_stale(results, grid):
    out = status(results, *GRID_CONFIG)
    ae = next(line for line in out.splitlines() if "12.50%" in line)
    assert f"eval dpo (experiments/{grid.exps[0].name}):" in ae
    assert f"[stale: computed for model {OLD_KEY}, current config wants " in ae


def test_a_grid_training_shows_its_own_checkpoint_and_progress(results, grid):
    out = status(results, *GRID_CONFIG)
    line = next(x for x in out.splitlines() if f"train dpo (experiments/{grid.exps[1].name})" in x)
    assert "checkpoint at step 2/4" in line and "dpo-feedc0ffee00" in line  # not the other run's step 3
    assert "last log: step 3/4" in line


def test_errors_in_the_grid_logs_are_listed(results, grid):
    out = status(results, *GRID_CONFIG)
    assert f"logs/experiments/{grid.exps[0].name}/judge_alpaca_eval.log: ERROR mamba_align: judge unreachable" in out


def test_a_changed_grid_marks_the_scores_stale(results, grid, tmp_path):
    """A DPO override changed after the scores: every experiment's model is another one now."""
    changed = tmp_path / "changed.yaml"
    changed.write_text("recipe_overrides:\n  dpo:\n    num_train_epochs: 2\n")
    out = status(results, *GRID_CONFIG, str(changed))
    mt = next(line for line in out.splitlines() if "overall 6.5" in line)
    assert "[stale: computed for model" in mt


def test_without_the_grid_config_the_experiments_found_are_listed(results, grid):
    out = status(results, str(REPO / "config" / "demo.yaml"))
    assert "experiments found in" in out and "pass the grid's --configfile" in out
    assert f"experiment {grid.exps[0].name}:\n  train dpo: done (4 steps" in out
    assert "eval: MT-Bench: overall 6.5" in out


def test_the_classic_status_names_no_experiments(tmp_path):
    (tmp_path / "results").mkdir()
    assert "experiment" not in status(tmp_path / "results", str(REPO / "config" / "demo.yaml"))


def test_status_keys_are_the_ones_the_workflow_records(tmp_path, grid):
    """The key status expects for each model folder is the one the workflow's judge rules write into the score
    (common.smk's scored_learned_by), read from the workflow itself as Snakemake parses it."""
    wf = copy_workflow(tmp_path / "wf")
    homes = 'for r in GRID.exps for h in (GRID.home(r, "sft"), GRID.home(r, "dpo"))'
    with (wf / "Snakefile").open("a") as f:
        f.write("\nimport json\nfrom types import SimpleNamespace\n"
                'key = lambda h: provenance.model_key(scored_learned_by(SimpleNamespace(home=h)))\n'
                f'print("GRID_KEYS=" + json.dumps({{h: key(h) {homes}}}))\n')
    out = snakemake(wf, "--configfile", "config/demo.yaml", "config/demo-grid.yaml", "--list-rules").stdout
    workflow_keys = json.loads(next(x for x in out.splitlines() if x.startswith("GRID_KEYS="))[len("GRID_KEYS="):])
    ours = {h: provenance.grid_model_key(grid, h)
            for r in grid.exps for h in (grid.home(r, "sft"), grid.home(r, "dpo"))}
    assert workflow_keys == ours and len(set(ours.values())) == 5  # one SFT, four DPO models


def test_each_experiment_stage_shows_its_leaderboard_score(results, grid):
    """The demo grid scores base and DPO models on the leaderboard (eval.leaderboard.stages): each experiment's
    lines show the average and tasks, an earlier model's score marked stale, tasks done so far, or not started."""
    first, second, third = grid.exps[:3]
    base = grid.home(first, "base")

    def lb(key, avg):
        return {"model_key": key, "model_run_key": None, "average": avg,
                "tasks": {"demo_arc": {"score": avg, "stderr": 0.1, "num_fewshot": 3, "metric": "acc_norm"}}}

    write(results / base / "eval" / "leaderboard.json", lb(provenance.grid_model_key(grid, base), 0.25))
    done = grid.home(first, "dpo")
    write(results / done / "eval" / "leaderboard.json", lb(provenance.grid_model_key(grid, done), 0.375))
    write(results / grid.home(second, "dpo") / "eval" / "leaderboard.json", lb(OLD_KEY, 0.5))
    write(results / grid.home(third, "dpo") / "eval" / "leaderboard.json.work-0123456789ab" / "demo_arc.json", {})
    out = status(results, *GRID_CONFIG)
    lines = [x.strip() for x in out.splitlines() if x.strip().startswith("leaderboard ")]
    assert len(lines) == 2 * len(grid.exps)  # base and dpo of each experiment
    assert f"leaderboard base ({base}): average 25.00% (demo_arc 25.00)" in lines
    assert f"leaderboard dpo ({done}): average 37.50% (demo_arc 37.50)" in lines
    stale = next(x for x in lines if x.startswith(f"leaderboard dpo ({grid.home(second, 'dpo')})"))
    assert f"[stale: computed for model {OLD_KEY}, current config wants " in stale
    assert f"leaderboard dpo ({grid.home(third, 'dpo')}): 1 task(s) done so far" in lines
    assert f"leaderboard dpo ({grid.home(grid.exps[3], 'dpo')}): not started" in lines
