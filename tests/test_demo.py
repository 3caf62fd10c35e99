"""The demo end to end on CPU in a temp dir: every target, trained weights changed, incremental reruns."""

from __future__ import annotations

import json
import time

import pytest

from wfhelpers import copy_workflow, planned_jobs, snakemake

pytestmark = pytest.mark.slow
DEMO = ("--configfile", "config/demo.yaml")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("demo") / "wf")
    t0 = time.time()
    proc = snakemake(wf, *DEMO, "--cores", "2", timeout=1500)
    wall = time.time() - t0
    print(f"demo wall time: {wall:.0f} s")
    (wf / "demo_wall_time_s.txt").write_text(f"{wall:.1f}\n")
    return wf, proc


def test_every_target_exists(demo_run):
    wf, _ = demo_run
    r = wf / "results"
    for path in ["eval/mtbench.json", "eval/alpacaeval.json", "eval/sft/mtbench.json", "eval/sft/alpacaeval.json",
                 "models/base.verify.json", "metrics/sft.json", "metrics/dpo.json", "report/scores.md",
                 "report/scores.csv", "report/mt_bench_radar.png", "report/training_curves.png"]:
        assert (r / path).is_file(), path
    for stage in ("base", "sft", "dpo"):
        assert (r / "models" / stage / "config.json").is_file()
        assert list((r / "models" / stage).glob("*.safetensors"))
    mt = json.loads((r / "eval/mtbench.json").read_text())
    assert mt["n_questions"] == 8 and "provenance" in mt
    prov = json.loads((wf / mt["provenance"]).read_text())
    assert prov["packages"]["torch"] and prov["config"]["recipe"] == "demo"
    assert "mean nothing" in (r / "report/scores.md").read_text()


def test_conversion_was_exact(demo_run):
    wf, _ = demo_run
    verify = json.loads((wf / "results/models/base.verify.json").read_text())["verify"]
    assert verify["max_abs_logit_diff"] < 1e-4
    assert verify["greedy_continuation_identical"]


def _weights(model_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_trainable_parameter_changed(demo_run):
    wf, _ = demo_run
    base, sft, dpo = (_weights(wf / "results/models" / s) for s in ("base", "sft", "dpo"))
    assert base.keys() == sft.keys() == dpo.keys()
    for name in base:
        if name == "lm_head.weight":  # tied to the embedding
            continue
        assert not (base[name] == sft[name]).all(), f"SFT did not change {name}"
        assert not (sft[name] == dpo[name]).all(), f"DPO did not change {name}"
    metrics = json.loads((wf / "results/metrics/sft.json").read_text())
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert losses and losses[-1] < losses[0]


def test_second_run_is_a_no_op(demo_run):
    wf, _ = demo_run
    out = snakemake(wf, *DEMO, "-n").stdout
    assert "Nothing to be done" in out


def test_dpo_change_reruns_dpo_and_evals_only(demo_run):
    wf, _ = demo_run
    out = snakemake(wf, *DEMO, "-n", "--config", "recipe_overrides={'dpo': {'beta': 0.2}}").stdout
    jobs = planned_jobs(out)
    assert jobs.get("train_dpo") == 1
    assert "train_sft" not in jobs and "prepare_sft_data" not in jobs and "prepare_base_model" not in jobs
    assert jobs.get("judge_mt_bench") == 1 and jobs.get("generate_mt_bench") == 1  # the DPO model's only


def test_operational_change_of_a_finished_stage_reruns_nothing(demo_run):
    wf, _ = demo_run
    (wf / "ops.yaml").write_text("recipe_overrides:\n  sft: {save_steps: 7, per_device_train_batch_size: 2}\n"
                                 "  dpo: {logging_steps: 3}\n")
    jobs = planned_jobs(snakemake(wf, "-n", "--configfile", "config/demo.yaml", "ops.yaml").stdout)
    assert set(jobs) <= {"plan", "all"}  # only the plan, whose memory estimate depends on the batch size
    (wf / "ops.yaml").write_text("recipe_overrides:\n  sft: {learning_rate: 0.002}\n")  # what is learned: retrain
    jobs = planned_jobs(snakemake(wf, "-n", "--configfile", "config/demo.yaml", "ops.yaml").stdout)
    assert jobs.get("train_sft") == 1 and jobs.get("train_dpo") == 1


def test_report_matches_the_eval_jsons_with_provenance(demo_run):
    import csv

    wf, _ = demo_run
    r = wf / "results"
    rows = {row["model"]: row for row in csv.DictReader(open(r / "report/scores.csv"))}
    for stage, prefix in (("sft", "sft/"), ("dpo", "")):
        row = rows[f"demo-{stage}"]
        mt = json.loads((r / f"eval/{prefix}mtbench.json").read_text())
        ae = json.loads((r / f"eval/{prefix}alpacaeval.json").read_text())
        assert float(row["mt_bench_overall"]) == pytest.approx(mt["scores"]["overall"])
        assert float(row["mt_bench_turn_1"]) == pytest.approx(mt["scores"]["turn_1"])
        assert int(row["mt_bench_unrated"]) == mt["n_unrated"]
        win = ae["results"]["weighted_alpaca_eval_gpt4_turbo"]["win_rate"]
        assert float(row["alpaca_eval_2_win_rate"]) == pytest.approx(win, abs=0.005)
        for summary in (mt, ae):  # every number has a provenance record
            prov = json.loads((wf / summary["provenance"]).read_text())
            assert "git_commit" in prov  # None here: the temp copy is no git checkout
            assert prov["packages"]["transformers"] and prov["config"]["run_name"] == "demo"
            assert prov["hardware"]["cpus"] and prov["inputs"]
    assert any("paper" in m for m in rows) and any("leaderboard" in m for m in rows)


def test_snakemake_report_builds_html(demo_run):
    wf, _ = demo_run
    snakemake(wf, *DEMO, "--report", "results/report.html")
    html = (wf / "results/report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "scores.md" in html


def test_finished_models_and_scores_are_protected(demo_run):
    import os

    wf, _ = demo_run
    for path in ("results/models/dpo", "results/models/sft", "results/eval/mtbench.json"):
        assert not os.stat(wf / path).st_mode & 0o222, path
