"""The rehearsal of the real run (config/rehearsal.yaml, bench/rehearsal.py): what a CPU can show of it.

Its inputs at a tiny model shape but the real lengths and benchmark sizes; the dry run of the 2.8B config with
the driver's own command; and (slow) the driver end to end on CPU at the tiny shape, SFT stopped and resumed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from wfhelpers import REPO, bench_module, planned_jobs, snakemake

from mamba_align.testing import rehearsal

JUDGE_PROMPTS = REPO / "config" / "demo" / "mt_bench" / "judge_prompts.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal") / "demo"
    # the 2.8B config's lengths and question sets; a tiny model and fewer rows (the distribution still shows)
    spec = rehearsal.build_rehearsal_inputs(out, {
        "model": {"d_model": 16, "n_layer": 1, "vocab_size": 4096},
        "rows": {"train_sft": 300, "test_sft": 20, "train_prefs": 400, "test_prefs": 20}}, JUDGE_PROMPTS)
    return out, spec


def test_the_config_writes_out_the_generators_defaults():
    cfg = yaml.safe_load((REPO / "config" / "rehearsal.yaml").read_text())
    assert rehearsal.resolve(cfg["demo_inputs"]) == rehearsal.DEFAULTS
    assert cfg["demo_inputs"]["model"] == {"d_model": 2560, "n_layer": 64, "vocab_size": 50277,
                                           "pad_vocab_size_multiple": 8}
    recipe = cfg["recipe_overrides"]
    assert cfg["recipe"] == "zephyr-7b-beta" and recipe["sft"]["max_steps"] == 30 and recipe["dpo"]["max_steps"] == 20


def test_splits_columns_and_rows(built):
    out, spec = built
    sft = {s: pd.read_parquet(out / "data" / "ultrachat" / f"{s}.parquet") for s in ("train_sft", "test_sft")}
    pref = {s: pd.read_parquet(out / "data" / "ultrafeedback" / f"{s}.parquet") for s in ("train_prefs", "test_prefs")}
    assert [len(sft[s]) for s in sft] == [300, 20] and [len(pref[s]) for s in pref] == [400, 20]
    assert list(sft["train_sft"].columns) == ["prompt", "prompt_id", "messages"]
    assert list(pref["train_prefs"].columns) == ["prompt", "prompt_id", "chosen", "rejected", "messages",
                                                 "score_chosen", "score_rejected"]
    row = pref["train_prefs"].iloc[0]
    assert row["chosen"][0]["content"] == row["prompt"] and row["rejected"][0]["content"] == row["prompt"]
    assert row["score_chosen"] > row["score_rejected"]
    roles = [m["role"] for m in sft["train_sft"].iloc[0]["messages"]]
    assert roles[0] == "user" and roles == ["user", "assistant"] * (len(roles) // 2)
    assert json.loads((out / "base_mamba_ssm" / "config.json").read_text())["vocab_size"] == 4096


def test_benchmarks_have_the_real_counts_and_shapes(built):
    out, _ = built
    questions = [json.loads(line) for line in (out / "mt_bench" / "question.jsonl").read_text().splitlines()]
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    cats = [q["category"] for q in questions]
    assert {c: cats.count(c) for c in set(cats)} == {c: 10 for c in rehearsal.MT_BENCH_CATEGORIES}
    assert [q["question_id"] for q in questions] == list(range(81, 161))
    refs = [json.loads(line) for line in (out / "mt_bench" / "reference_answer.jsonl").read_text().splitlines()]
    assert len(refs) == 30 and all(len(r["choices"][0]["turns"]) == 2 for r in refs)
    alpaca = json.loads((out / "alpaca_eval" / "alpaca_eval.json").read_text())
    assert len(alpaca) == 805
    assert {d: sum(r["dataset"] == d for r in alpaca) for d in rehearsal.ALPACA_EVAL_DATASETS} == \
        rehearsal.ALPACA_EVAL_DATASETS
    baseline = json.loads((out / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json").read_text())
    assert [r["instruction"] for r in baseline] == [r["instruction"] for r in alpaca]


def test_lengths_in_tokens_follow_the_published_sizes(built):
    """Each synthetic word is one token, so the drawn lengths are what the model sees: UltraChat ~1,400 tokens
    per conversation and UltraFeedback ~520 per chosen/rejected sequence (mamba_align.ops.reporting.plan.PUBLISHED),
    MT-Bench turn 1 median 80, AlpacaEval median 45 (docs/benchmarks.md section 5)."""
    from transformers import AutoTokenizer

    from mamba_align.ops.reporting.plan import PUBLISHED

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ntok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    train = pd.read_parquet(out / "data" / "ultrachat" / "train_sft.parquet")
    for msgs in train["messages"].iloc[:20]:  # one token a word (after a space, as all but a text's first are)
        for m in msgs:
            assert ntok(" " + m["content"]) == len(m["content"].split())
    conv = [sum(len(m["content"].split()) for m in msgs) for msgs in train["messages"]]
    exchanges = [len(msgs) // 2 for msgs in train["messages"]]
    assert statistics.mean(conv) == pytest.approx(PUBLISHED[("HuggingFaceH4/ultrachat_200k", "train_sft")][1],
                                                  rel=0.12)
    assert statistics.mean(exchanges) == pytest.approx(3.2, rel=0.1) and max(exchanges) <= 8
    prefs = pd.read_parquet(out / "data" / "ultrafeedback" / "train_prefs.parquet")
    seq = [sum(len(m["content"].split()) for m in c) for c in prefs["chosen"]]
    assert statistics.mean(seq) == pytest.approx(
        PUBLISHED[("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")][1], rel=0.12)
    assert max(len(p.split()) for p in prefs["prompt"]) > 512  # the tail that max_prompt_length truncates
    questions = [json.loads(line) for line in (out / "mt_bench" / "question.jsonl").read_text().splitlines()]
    assert statistics.median(len(q["turns"][0].split()) for q in questions) == pytest.approx(80, rel=0.25)
    alpaca = json.loads((out / "alpaca_eval" / "alpaca_eval.json").read_text())
    assert statistics.median(len(r["instruction"].split()) for r in alpaca) == pytest.approx(45, rel=0.15)


def test_dry_run_of_the_drivers_command_at_the_2_8b_shape(workflow_copy):
    driver = bench_module("rehearsal")
    cmd = driver.snakemake_cmd([], cpu=False, gpus=2)[3:]  # after `python -m snakemake`
    out = snakemake(workflow_copy, "-n", *cmd).stdout
    jobs = planned_jobs(out)
    assert jobs == {"build_demo_inputs": 1, "prepare_base_model": 1, "prepare_sft_data": 1,
                    "prepare_preference_data": 1, "train_sft": 1, "train_dpo": 1, "fetch_mt_bench": 1,
                    "fetch_alpaca_eval": 1, "generate_mt_bench": 2, "generate_alpaca_eval": 2, "judge_mt_bench": 2,
                    "judge_alpaca_eval": 2, "report": 1, "plan": 1, "all": 1, "fetch_leaderboard_data": 1,
                    "eval_leaderboard": 3}
    # the training rules get the driver's 2 GPUs; the questions come from the generated inputs
    assert out.count("gpu=2") >= 2
    # the local judge runs on CUDA there: its jobs hold the GPU, counted against --resources gpu
    for rule in ("judge_mt_bench", "judge_alpaca_eval"):
        block = out.split(f"rule {rule}:")[1].split("rule ")[0]
        assert "gpu=1" in block, block
    assert "results/demo" in out.split("rule fetch_mt_bench:")[1].split("rule ")[0]


@pytest.mark.slow
def test_driver_on_cpu_runs_the_rehearsal_and_sft_resumes(workflow_copy):
    """bench/rehearsal.py all --cpu: every phase through snakemake at the tiny shape; SFT stopped after step 10
    and resumed from its checkpoint; the summary has every rule's benchmark."""
    import subprocess
    import sys

    out = workflow_copy / "summary"
    proc = subprocess.run([sys.executable, "bench/rehearsal.py", "all", "--cpu", "--out", str(out)],
                          cwd=workflow_copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + (out / "snakemake.log").read_text()[-5000:]
    s = json.loads((out / "summary.json").read_text())
    assert {"build_demo_inputs", "prepare_base_model", "train_sft", "train_dpo", "report", "judge_mt_bench/judge",
            "generate_alpaca_eval/dpo"} <= set(s["rules"])
    assert all(r["s"] > 0 and r["max_rss_mb"] for r in s["rules"].values())
    assert s["sft_stop"]["stop_requested_at_step"] >= 10 and s["sft_stop"]["snakemake_exit"] != 0
    assert "checkpoint-1" in s["training"]["sft"]["resumed_from"] and s["training"]["sft"]["global_step"] == 24
    assert Path(workflow_copy, "results", "report", "scores.md").exists()


def test_summary_reads_benchmarks_metrics_and_gpu_samples(tmp_path):
    driver = bench_module("rehearsal")
    res = tmp_path / "results"
    (res / "benchmarks" / "generate_mt_bench").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (res / "benchmarks" / "train_sft.tsv").write_text(header + "312.5\t0:05:12\t40960.5\t1\t1\t1\t1\t1\t1\t1\n")
    (res / "benchmarks" / "generate_mt_bench" / "sft.tsv").write_text(
        header + "80.0\t0:01:20\tNA\t1\t1\t1\t1\t1\t1\t1\n")
    (res / "metrics").mkdir()
    (res / "metrics" / "sft.json").write_text(json.dumps({"global_step": 30, "resumed_from": "x/checkpoint-11",
                                                         "peak_gpu_memory_gib_per_rank": [64.4, 64.3],
                                                         "log_history": [{"loss": 1.0}]}))
    smi = tmp_path / "nvidia-smi.csv"
    smi.write_text("2026/12/01 10:00:00.000, 0, 1200, 5\n2026/12/01 10:00:02.000, 0, 70100, 99\n"
                   "2026/12/01 10:00:02.000, 1, 69000, 98\n")
    s = driver.summary(res, smi)
    assert s["rules"] == {"train_sft": {"s": 312.5, "max_rss_mb": 40960.5},
                          "generate_mt_bench/sft": {"s": 80.0, "max_rss_mb": None}}
    assert s["training"]["sft"] == {"global_step": 30, "resumed_from": "x/checkpoint-11",
                                    "peak_gpu_memory_gib_per_rank": [64.4, 64.3]}
    assert s["gpu_memory_peak_mib_this_phase"] == {"0": 70100, "1": 69000}
    assert "| train_sft | 312.5 | 40,960 |" in driver.summary_markdown(s)
