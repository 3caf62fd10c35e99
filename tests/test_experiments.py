"""Unit tier: expansion of a grid into named experiments, the keys that share work, the grid plan's sums and
the experiments report (from hand-written eval summaries)."""

from __future__ import annotations

import json

import pytest

from mamba_align.ops.reporting import plan as planner
from mamba_align.ops.reporting.report import build_experiments_report, seed_groups
from mamba_align.ops.store import experiments as ex
from mamba_align.ops.store import provenance
from mamba_align.train.recipes import learning_settings
from mamba_align.utils import UserError

BASE = {"source": "state-spaces/mamba-2.8b-slimpj", "revision": "main", "tokenizer": "EleutherAI/gpt-neox-20b",
        "tokenizer_revision": "main", "chat_template": "zephyr", "verify": True}
CFG = {"base_model": BASE, "recipe": "zephyr-7b-beta", "recipe_overrides": {"sft": {}, "dpo": {"loss_type": "sigmoid"}}}
SFT = {"dataset": {"source": "HuggingFaceH4/ultrachat_200k", "train_split": "train_sft", "max_train_samples": None},
       "num_train_epochs": 1, "max_seq_length": 2048, "packing": True, "per_device_train_batch_size": 4,
       "gradient_checkpointing": True, "learning_rate": 2e-5, "seed": 42, "optim": "adamw_torch"}
DPO = {"dataset": {"source": "HuggingFaceH4/ultrafeedback_binarized", "train_split": "train_prefs",
                   "max_train_samples": None},
       "num_train_epochs": 3, "max_length": 1024, "max_prompt_length": 512, "precompute_ref_log_probs": False,
       "per_device_train_batch_size": 2, "gradient_checkpointing": True, "beta": 0.1, "seed": 42,
       "optim": "rmsprop"}


def grid_cfg(**grid):
    return {**CFG, "experiments": {"grid": grid}}


def resolved(exps):
    """Recipes as config_recipe would give them: the file's values with each experiment's overrides."""
    return [ex.resolve(e, {**SFT, **e.recipe_overrides["sft"]}, {**DPO, **e.recipe_overrides["dpo"]},
                       learning_settings) for e in exps]


def test_default_config_is_no_grid():
    assert not ex.is_grid(CFG)
    assert not ex.is_grid({**CFG, "experiments": {"grid": {"sft": {}, "dpo": {}}, "list": []}})  # schema defaults
    assert ex.expand(CFG) == []


def test_grid_is_the_product_of_its_axes_with_names_from_values():
    exps = ex.expand(grid_cfg(dpo={"beta": [0.01, 0.1]}, seed=[1, 2, 3]))
    assert [e.name for e in exps] == [f"beta{b}-seed{s}" for b in (0.01, 0.1) for s in (1, 2, 3)]
    e = exps[0]
    assert e.recipe_overrides == {"sft": {}, "dpo": {"loss_type": "sigmoid", "beta": 0.01, "seed": 1}}
    assert e.axes == {"dpo.beta": 0.01, "seed": 1} and e.base_model == BASE
    assert ex.is_grid(grid_cfg(seed=[1]))


def test_base_model_and_recipe_axes_and_a_list():
    cfg = grid_cfg(base_model=["state-spaces/mamba-130m", {"source": "state-spaces/mamba-370m", "verify": False}],
                   recipe=["zephyr-7b-beta", "zephyr-7b-gemma"])
    cfg["experiments"]["list"] = [{"name": "paper", "seed": 7, "recipe_overrides": {"dpo": {"beta": 0.01}}}]
    exps = ex.expand(cfg)
    assert [e.name for e in exps] == ["paper", "mamba-130m-zephyr-7b-beta", "mamba-130m-zephyr-7b-gemma",
                                      "mamba-370m-zephyr-7b-beta", "mamba-370m-zephyr-7b-gemma"]
    assert exps[0].recipe_overrides["dpo"] == {"loss_type": "sigmoid", "beta": 0.01, "seed": 7}
    assert exps[3].base_model == {**BASE, "source": "state-spaces/mamba-370m", "verify": False}
    assert exps[4].recipe == "zephyr-7b-gemma" and exps[4].axes["base_model"] == "mamba-370m"


def test_duplicate_or_unusable_names_are_refused():
    cfg = {**CFG, "experiments": {"list": [{"name": "a"}, {"name": "a"}]}}
    with pytest.raises(UserError, match="two experiments are named 'a'"):
        ex.expand(cfg)
    with pytest.raises(UserError, match="not usable in a path"):
        ex.expand({**CFG, "experiments": {"list": [{"name": "a/b"}]}})


def test_a_beta_sweep_over_seeds_shares_base_data_and_sft():
    grid = ex.Grid("results", resolved(ex.expand(grid_cfg(dpo={"beta": [0.01, 0.1]}, seed=[1, 2]))), ["sft", "dpo"])
    assert len({r.base_key for r in grid.exps}) == len({r.sft_key for r in grid.exps}) == 1
    assert len({r.data_keys["dpo"] for r in grid.exps}) == 1
    targets = grid.eval_targets()
    assert len(targets) == 2 * (1 + 4)  # one SFT model and four DPO models, two benchmarks each
    r = grid.exps[0]
    assert grid.eval_summary(r, "dpo", "mtbench") == "results/experiments/beta0.01-seed1/eval/mtbench.json"
    assert grid.model(r, "sft") == f"results/shared/sft/{r.sft_key}/model"
    assert grid.owner(f"shared/sft/{r.sft_key}") == (r, "sft")
    assert grid.learned_by("experiments/beta0.1-seed2", learning_settings)["dpo"]["beta"] == 0.1
    assert grid.swept_axes() == ["dpo.beta"]  # seeds are averaged, not plotted
    with pytest.raises(UserError, match="no experiment"):
        grid.owner("experiments/nope")


def test_sft_settings_and_base_models_split_what_they_change_only():
    cfg = grid_cfg(base_model=["state-spaces/mamba-130m", "state-spaces/mamba-370m"],
                   sft={"learning_rate": [1e-5, 2e-5]})
    grid = ex.Grid("results", resolved(ex.expand(cfg)), ["dpo"])
    assert len({r.base_key for r in grid.exps}) == 2 and len({r.sft_key for r in grid.exps}) == 4
    # the family shares one tokenizer: data is prepared once for all four
    assert len({r.data_keys["sft"] for r in grid.exps}) == 1
    # max_seq_length is data: another length, other data
    other = resolved(ex.expand(grid_cfg(sft={"max_seq_length": [1024, 2048]})))
    assert other[0].data_keys["sft"] != other[1].data_keys["sft"]


def test_grid_round_trips_through_plain_data():
    grid = ex.Grid("results", resolved(ex.expand(grid_cfg(seed=[1, 2]))), ["sft", "dpo"])
    again = ex.Grid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert again.eval_targets() == grid.eval_targets() and again.to_dict() == grid.to_dict()


PLAN_CFG = {**CFG, "judge": {"repeats": 1, "backend": "openai"},
            "eval": {"stages": ["sft", "dpo"], "mt_bench": {"max_new_tokens": 1024},
                     "alpaca_eval": {"max_new_tokens": 2048, "annotators": ["alpaca_eval_gpt4"]}},
            "plan": {"safety_margin": 0.25, "max_job_minutes": 600, "judge_price_per_1m_input": 30.0,
                     "judge_price_per_1m_output": 60.0}}


def test_grid_plan_counts_shared_jobs_once_and_totals_are_the_sums(tmp_path):
    cfg = {**PLAN_CFG, "experiments": {"grid": {"base_model": ["state-spaces/mamba-130m", "state-spaces/mamba-2.8b"],
                                                "dpo": {"beta": [0.01, 0.1]}}}}
    grid = ex.Grid(str(tmp_path), resolved(ex.expand(cfg)), cfg["eval"]["stages"])
    gp = planner.make_grid_plan(cfg, grid, {"train_sft": 8, "train_dpo": 8}, "A100-80GB")
    plans = gp["experiments"]
    assert list(plans) == ["mamba-130m-beta0.01", "mamba-130m-beta0.1", "mamba-2.8b-beta0.01", "mamba-2.8b-beta0.1"]
    rules = {n: [j["rule"] for j in p["jobs"]] for n, p in plans.items()}
    assert rules["mamba-130m-beta0.01"].count("train_sft") == 1 and "train_sft" not in rules["mamba-130m-beta0.1"]
    assert rules["mamba-130m-beta0.1"].count("generate_mt_bench") == 1  # its DPO model only; SFT's is shared
    assert plans["mamba-130m-beta0.1"]["shares_sft_with"] == "mamba-130m-beta0.01"
    # each job sized by its model: the 2.8B DPO run costs ~20x the 130M one
    dpo_h = {n: next(j["gpu_hours"] for j in p["jobs"] if j["rule"] == "train_dpo") for n, p in plans.items()}
    assert dpo_h["mamba-2.8b-beta0.1"] > 10 * dpo_h["mamba-130m-beta0.1"]
    assert gp["total_gpu_hours"] == round(sum(p["total_gpu_hours"] for p in plans.values()), 1)
    assert gp["judge_usd"] == round(sum(p["judge_usd"] for p in plans.values()), 2)
    # the judge pays for 2 SFT models and 4 DPO models
    one = planner.judge_cost(PLAN_CFG, 1)["mt_bench"]["usd"]
    assert sum(p["judge"]["mt_bench"]["usd"] for p in plans.values()) == pytest.approx(6 * one)
    text = planner.format_plan(gp)
    assert "SFT shared with mamba-130m-beta0.01" in text and f"total GPU-hours: {gp['total_gpu_hours']}" in text


def _write_evals(tmp_path, name, stage, mt, ae1, lc):
    d = tmp_path / name / stage
    d.mkdir(parents=True)
    (d / "mtbench.json").write_text(json.dumps({"scores": {"overall": mt, "turn_1": mt, "turn_2": mt},
                                                "per_category": {"writing": {"overall": mt},
                                                                 "math": {"overall": 1.0}}}))
    (d / "alpacaeval.json").write_text(json.dumps({"results": {
        "alpaca_eval_gpt4": {"win_rate": ae1, "standard_error": 1.5},
        "weighted_alpaca_eval_gpt4_turbo": {"win_rate": lc - 1, "length_controlled_winrate": lc,
                                            "lc_standard_error": 0.5}}}))
    return {"mtbench": str(d / "mtbench.json"), "alpacaeval": str(d / "alpacaeval.json")}


@pytest.fixture
def panels(monkeypatch):
    """What each saved figure draws: per panel (by title) its points (x, mean, spread), or else the text it shows."""
    from matplotlib.figure import Figure

    drawn, save = [], Figure.savefig

    def spy(fig, *a, **k):
        out = {}
        for ax in fig.axes:
            points = [
                (float(x), float(y), float(seg[1][1] - seg[0][1]) / 2)
                for line, _, (bars,) in ax.containers
                for (x, y), seg in zip(line.get_xydata(), bars.get_segments())
            ]
            out[ax.get_title()] = points or [t.get_text() for t in ax.texts]
        drawn.append(out)
        return save(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    return drawn


def test_experiments_report_table_seed_means_and_axis_plot(tmp_path, panels):
    entries = []
    for beta, seed, mt, ae in [(0.01, 1, 5.0, 10.0), (0.01, 2, 6.0, 14.0), (0.1, 1, 4.0, 20.0), (0.1, 2, 4.0, 22.0)]:
        name = f"beta{beta}-seed{seed}"
        entries.append({"name": name, "axes": {"dpo.beta": beta, "seed": seed}, "recipe": "r", "base_model": "m",
                        "evals": {"dpo": _write_evals(tmp_path, name, "dpo", mt, ae, ae + 1)}, "metrics": {}})
    out = tmp_path / "report"
    rows = build_experiments_report(entries, ["dpo.beta"], out)
    assert len(rows) == 4 and rows[0]["mt_bench:writing"] == 5.0 and rows[0]["alpaca_eval_2_lc_standard_error"] == 0.5
    groups = seed_groups(rows)
    assert [(g["axis:dpo.beta"], g["n_seeds"]) for g in groups] == [(0.01, 2), (0.1, 2)]
    assert groups[0]["mt_bench_overall"] == pytest.approx(5.5)
    assert groups[0]["mt_bench_overall_spread"] == pytest.approx(0.7071, abs=1e-4)
    md = (out / "scores.md").read_text()
    assert "| beta0.01-seed1 | dpo | 0.01 | 1 | 5.00 | 5.00 | 1.00 | 10.00 ± 1.50 | 10.00 | 11.00 ± 0.50 |" in md
    assert "5.50 ± 0.71" in md and "zephyr-7b-beta (paper)" in md and "![dpo.beta](dpo.beta.png)" in md
    png = (out / "dpo.beta.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    (drawn,) = panels  # a grid without the leaderboard: no panel of it
    assert list(drawn) == ["MT-Bench overall", "AlpacaEval 1.0 win %", "AlpacaEval 2.0 LC win %"]
    assert drawn["MT-Bench overall"] == [(0.01, 5.5, pytest.approx(0.7071, abs=1e-4)), (0.1, 4.0, 0.0)]
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("experiment,stage,axis:dpo.beta,axis:seed")


def test_a_shared_sft_model_is_one_row_without_the_axes_it_does_not_depend_on(tmp_path):
    sft = _write_evals(tmp_path, "shared", "sft", 3.0, 5.0, 6.0)
    entries = [{"name": f"beta{b}", "axes": {"dpo.beta": b}, "recipe": "r", "base_model": "m",
                "evals": {"sft": sft, "dpo": _write_evals(tmp_path, f"beta{b}", "dpo", 4.0, b * 100, 7.0)},
                "metrics": {}} for b in (0.01, 0.1)]
    rows = build_experiments_report(entries, ["dpo.beta"], tmp_path / "report")
    assert [r["experiment"] for r in rows] == ["sft shared by 2: beta0.01, beta0.1", "beta0.01", "beta0.1"]
    assert "axis:dpo.beta" not in rows[0] and rows[1]["axis:dpo.beta"] == 0.01
    assert "| sft shared by 2: beta0.01, beta0.1 | sft | – |" in (tmp_path / "report/scores.md").read_text()


def test_a_base_model_family_axis_converts_and_verifies_each_and_the_plan_knows_its_size(tmp_path):
    """Two tiny stand-ins for the Mamba-1 family (sizes differ as mamba-130m and mamba-370m do: width and depth),
    converted as the grid's prepare_base_model_grid job does it, each verified, each sized by the plan."""
    from mamba_align.model.convert import prepare_base_model
    from mamba_align.testing.demo import build_tiny_mamba_ssm_checkpoint, build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tokenizer", ["hello world, a tiny family of models"] * 4)
    family = [build_tiny_mamba_ssm_checkpoint(tmp_path / name, d_model=d, n_layer=n, vocab_size=301)
              for name, d, n in (("mamba-tiny-a", 32, 1), ("mamba-tiny-b", 64, 2))]
    cfg = {**CFG, "base_model": {**BASE, "tokenizer": str(tok), "tokenizer_revision": None, "revision": None},
           "experiments": {"grid": {"base_model": [str(p) for p in family]}}}
    grid = ex.Grid(str(tmp_path / "results"), resolved(ex.expand(cfg)), ["dpo"])
    assert [r.name for r in grid.exps] == ["mamba-tiny-a", "mamba-tiny-b"]
    assert len({r.data_keys["sft"] for r in grid.exps}) == 1  # one tokenizer: data prepared once
    sizes = []
    for key, r in grid.first_base.items():
        b = r.exp.base_model
        home = tmp_path / "results" / grid.home(r, "base")
        report = prepare_base_model(b["source"], b["revision"], b["tokenizer"], b["tokenizer_revision"],
                                    b["chat_template"], home / "model", home / "verify.json", verify=b["verify"])
        assert report["verify"]["max_abs_logit_diff"] < 1e-4 and report["verify"]["greedy_continuation_identical"]
        cfg_e = r.exp.config(cfg)
        assert planner.base_params(cfg_e, "unused", verify=home / "verify.json") == report["n_params"]
        assert planner.base_params(cfg_e, "unused", verify=tmp_path / "none.json") == pytest.approx(
            report["n_params"], rel=0.02)  # before conversion: from the source's config.json
        sizes.append(report["n_params"])
    assert sizes[1] > 2 * sizes[0]


# --- the leaderboard in a grid (#30) ---------------------------------------------------------------------------

LB_CFG = {**PLAN_CFG, "eval": {**PLAN_CFG["eval"], "stages": ["dpo"], "leaderboard": {
    "stages": ["base", "sft", "dpo"], "tasks": ["arc_challenge", "mmlu"]}}}


def test_leaderboard_targets_are_one_per_model_and_round_trip():
    grid = ex.Grid("results", resolved(ex.expand(grid_cfg(dpo={"beta": [0.01, 0.1]}, seed=[1, 2]))), ["dpo"],
                   ["base", "sft", "dpo"])
    r = grid.exps[0]
    lb = [t for t in grid.eval_targets() if t.endswith("/leaderboard.json")]
    assert lb[:3] == [f"results/shared/base/{r.base_key}/eval/leaderboard.json",
                      f"results/shared/sft/{r.sft_key}/eval/leaderboard.json",
                      "results/experiments/beta0.01-seed1/eval/leaderboard.json"]
    assert len(lb) == 1 + 1 + 4  # the shared base and SFT models once, each DPO model
    again = ex.Grid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert again.eval_targets() == grid.eval_targets() and again.leaderboard_stages == ["base", "sft", "dpo"]
    entry = grid.report_entries(learning_settings)[0]
    assert entry["leaderboard"]["sft"] == {"path": lb[1], "model": grid.model(r, "sft"),
                                           "model_key": provenance.grid_model_key(grid, grid.home(r, "sft"))}
    assert "leaderboard" not in ex.Grid("results", grid.exps, ["dpo"]).report_entries()[0]  # none configured


def test_grid_plan_counts_one_leaderboard_job_per_model(tmp_path):
    """Two base models x two betas: 2 base + 2 SFT + 4 DPO models, each scored once on the leaderboard, in the plan
    of the first experiment that has it; each sized by its own model."""
    cfg = {**LB_CFG, "experiments": {"grid": {"base_model": ["state-spaces/mamba-130m", "state-spaces/mamba-2.8b"],
                                               "dpo": {"beta": [0.01, 0.1]}}}}
    grid = ex.Grid(str(tmp_path), resolved(ex.expand(cfg)), ["dpo"], ["base", "sft", "dpo"])
    plans = planner.make_grid_plan(cfg, grid, {"train_sft": 8, "train_dpo": 8}, "A100-80GB")["experiments"]
    lb = {n: [j for j in p["jobs"] if j["rule"] == "eval_leaderboard"] for n, p in plans.items()}
    assert {n: len(j) for n, j in lb.items()} == {"mamba-130m-beta0.01": 3, "mamba-130m-beta0.1": 1,
                                                   "mamba-2.8b-beta0.01": 3, "mamba-2.8b-beta0.1": 1}
    assert lb["mamba-2.8b-beta0.1"][0]["gpu_hours"] > lb["mamba-130m-beta0.1"][0]["gpu_hours"]  # the fixed load aside
    assert all(j["gpus"] == 1 for jobs in lb.values() for j in jobs)
    # the judged benchmarks keep their own stages (dpo only here)
    assert all(sum(j["rule"] == "generate_mt_bench" for j in p["jobs"]) == 1 for p in plans.values())
    no_lb = {**cfg, "eval": {**cfg["eval"], "leaderboard": {**cfg["eval"]["leaderboard"], "stages": []}}}
    plans = planner.make_grid_plan(no_lb, grid, {"train_sft": 8, "train_dpo": 8}, "A100-80GB")["experiments"]
    assert not any(j["rule"] == "eval_leaderboard" for p in plans.values() for j in p["jobs"])


def _leaderboard(key, arc: float, mmlu: float, arc_se: float | None = 0.01) -> dict:
    """A leaderboard.json as eval_leaderboard writes it (fractions; the report shows %)."""
    return {"model_key": key, "model_run_key": None, "average": (arc + mmlu) / 2, "tasks": {
        "arc_challenge": {"score": arc, "stderr": arc_se, "num_fewshot": 25, "metric": "acc_norm", "n": 1172},
        "mmlu": {"score": mmlu, "stderr": 0.02, "num_fewshot": 5, "metric": "acc", "n": 14042}}}


def _write(path, obj):
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


def test_grid_report_has_leaderboard_columns_and_never_another_models_score(tmp_path, panels):
    """Per experiment and scored stage: the average and each task (% ± stderr) with the change from the shared
    base model; a missing score, or one of another model, is shown as missing (–), named with why below."""
    grid = ex.Grid(str(tmp_path / "results"), resolved(ex.expand(grid_cfg(dpo={"beta": [0.01, 0.1]}, seed=[1, 2]))),
                   ["dpo"], ["base", "dpo"])
    entries = grid.report_entries(learning_settings)
    refs = [e["leaderboard"] for e in entries]
    _write(refs[0]["base"]["path"], _leaderboard(refs[0]["base"]["model_key"], 0.30, 0.25))
    for i, e in enumerate(entries):
        _write(e["evals"]["dpo"]["mtbench"], {"scores": {"overall": 5.0 + i, "turn_1": 5.0, "turn_2": 5.0}})
    _write(refs[0]["dpo"]["path"], _leaderboard(refs[0]["dpo"]["model_key"], 0.35, 0.26))
    _write(refs[1]["dpo"]["path"], _leaderboard(refs[1]["dpo"]["model_key"], 0.36, 0.26, arc_se=None))
    _write(refs[2]["dpo"]["path"], _leaderboard("0123456789ab", 0.99, 0.99))  # an earlier model's; seed2: none
    out = tmp_path / "report"
    rows = build_experiments_report(entries, ["dpo.beta"], out)
    by = {(r["experiment"].split(":")[0], r["stage"]): r for r in rows}
    assert list(by) == [("base shared by 4", "base"), ("beta0.01-seed1", "dpo"), ("beta0.01-seed2", "dpo"),
                        ("beta0.1-seed1", "dpo"), ("beta0.1-seed2", "dpo")]
    first = by[("beta0.01-seed1", "dpo")]
    assert first["leaderboard:arc_challenge"] == pytest.approx(35.0)
    assert first["leaderboard:arc_challenge_change"] == pytest.approx(5.0)
    assert first["leaderboard_average_change"] == pytest.approx(3.0)
    stale, missing = by[("beta0.1-seed1", "dpo")], by[("beta0.1-seed2", "dpo")]
    assert stale["leaderboard_status"].startswith("stale: computed for model 0123456789ab")
    assert missing["leaderboard_status"] == "missing"
    assert not any(v == pytest.approx(99.0) for r in (stale, missing) for v in r.values() if isinstance(v, float))
    md = (out / "scores.md").read_text()
    assert "| beta0.01-seed1 | dpo | 0.01 | 1 | 5.00 | – | – | – | 30.50 (+3.00) |" in md  # the main table's average
    assert ("| beta0.01-seed1 | dpo | 35.00 ± 1.00 (+5.00) | 26.00 ± 2.00 (+1.00) | 30.50 (+3.00) |" in md)
    assert "| beta0.01-seed2 | dpo | 36.00 (+6.00) |" in md  # no stderr recorded: none shown
    assert "| beta0.1-seed1 | dpo | – | – | – |" in md and "| beta0.1-seed2 | dpo | – | – | – |" in md
    assert "arc_challenge (25-shot acc_norm)" in md and "Mistral-7B-v0.1 base (leaderboard)" in md
    assert "- beta0.1-seed1 (dpo): stale: computed for model 0123456789ab" in md
    assert "- beta0.1-seed2 (dpo): missing" in md
    assert "| dpo.beta=0.01 (dpo, 2 seeds) | 1, 2 | 5.50 ± 0.71 | – | – | – | 30.75 ± 0.35 |" in md
    assert "99.00" not in md
    head = (out / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"leaderboard_average", "leaderboard_average_change", "leaderboard:mmlu", "leaderboard:mmlu_stderr",
            "leaderboard:mmlu_change", "leaderboard_status"} <= set(head)
    saved = {(r["experiment"], r["stage"]): r for r in json.loads((out / "scores.json").read_text())["experiments"]}
    assert saved[("beta0.01-seed1", "dpo")]["leaderboard:mmlu_change"] == pytest.approx(1.0)
    assert "leaderboard:arc_challenge" not in saved[("beta0.1-seed1", "dpo")]
    html = (out / "scores.html").read_text()
    assert "Open LLM Leaderboard tasks (lm-eval)" in html and "35.00 ± 1.00 (+5.00)" in html
    (drawn,) = panels  # the final models' average in %, over seeds; beta 0.1 (stale, missing): no point
    assert list(drawn)[-1] == "Open LLM Leaderboard avg %" and len(drawn) == 4
    assert drawn["Open LLM Leaderboard avg %"] == [(0.01, pytest.approx(30.75), pytest.approx(0.3536, abs=1e-4))]


@pytest.mark.parametrize("stages, shown", [(["base", "dpo"], True), (["base"], False), ([], False)])
def test_the_axis_plot_has_a_leaderboard_panel_where_the_grid_scores_final_models(tmp_path, panels, stages, shown):
    """Leaderboard stages with dpo but no score yet: the panel says so, as the others do; without dpo (only the
    base model scored there) or without a leaderboard: no panel."""
    exps = resolved(ex.expand(grid_cfg(dpo={"beta": [0.01, 0.1]})))
    grid = ex.Grid(str(tmp_path / "results"), exps, ["dpo"], stages)
    entries = grid.report_entries(learning_settings)
    for i, e in enumerate(entries):
        _write(e["evals"]["dpo"]["mtbench"], {"scores": {"overall": 5.0 + i, "turn_1": 5.0, "turn_2": 5.0}})
    build_experiments_report(entries, ["dpo.beta"], tmp_path / "report")
    (drawn,) = panels
    assert drawn["MT-Bench overall"] == [(0.01, 5.0, 0.0), (0.1, 6.0, 0.0)]
    assert drawn["AlpacaEval 1.0 win %"] == ["not scored in this run"]
    assert drawn.get("Open LLM Leaderboard avg %") == (["not scored in this run"] if shown else None)


def test_a_grid_without_leaderboard_keeps_its_tables(tmp_path):
    entries = [{"name": "a", "axes": {}, "recipe": "r", "base_model": "m", "metrics": {},
                "evals": {"dpo": _write_evals(tmp_path, "a", "dpo", 5.0, 10.0, 11.0)}}]
    build_experiments_report(entries, [], tmp_path / "report")
    md = (tmp_path / "report/scores.md").read_text()
    assert "leaderboard" not in md.split("## Published")[0].lower()
    assert "leaderboard" not in (tmp_path / "report/scores.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("home, matches", [
    ("shared/base/0123456789ab", True), ("shared/sft/abcdef012345", True), ("experiments/beta=0.1_seed-2", True),
    ("experiments/A.b+c", True), ("shared/dpo/0123456789ab", False), ("shared/sft/0123456789a", False),
    ("shared/sft/0123456789AB", False), ("experiments/_x", False), ("experiments/a/b", False), ("models/sft", False),
])
def test_the_home_wildcard_matches_what_it_matched_when_spelled_in_common_smk(home, matches):
    """layout.home_pattern() replaced the regex that common.smk spelled out; the same folders match."""
    import re

    from mamba_align.ops.store import layout

    spelled = "shared/(base|sft)/[0-9a-f]{12}|experiments/[A-Za-z0-9][A-Za-z0-9._=+-]*"
    assert bool(re.fullmatch(f"(?:{layout.home_pattern()})", home)) is matches
    assert bool(re.fullmatch(f"(?:{spelled})", home)) is matches
    assert all(re.fullmatch(layout.home_pattern(), layout.home(s, "0123456789ab")) for s in layout.STAGES)
