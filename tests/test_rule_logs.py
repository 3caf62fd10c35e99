"""A failing step leaves its message in the log file Snakemake points to (utils.log_uncaught).

One bad input per kind of step, run for real by snakemake on the demo config: a UserError is one line
without traceback; an unexpected error leaves its traceback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from wfhelpers import copy_workflow, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The demo workflow with the base model, SFT data and MT-Bench files prepared (~15 s)."""
    wf = copy_workflow(tmp_path_factory.mktemp("prepared") / "wf")
    snakemake(wf, "--cores", "2", "results/models/base", "results/data/sft/stats.json",
              "results/data/mt_bench/question.jsonl", "--configfile", "config/demo.yaml")
    return wf


@pytest.fixture
def wf(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "wf", symlinks=True))


def failing_log(wf: Path, target: str, *extra: str) -> str:
    """Run `target`, expect failure, return the text of the log Snakemake names in its error report."""
    proc = snakemake(wf, "--cores", "1", target, "--rerun-triggers", "mtime", "--configfile", "config/demo.yaml",
                     *extra, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    logs = re.findall(r"log: (\S+) \(check log file\(s\) for error details\)", out)
    assert logs, out
    return (wf / logs[0]).read_text()


def assert_clean(log: str, message: str) -> None:
    assert message in log, log
    assert "ERROR" in log and "Traceback" not in log, log
    lines = [x for x in log.splitlines() if message in x]  # info lines may name it too (the data source)
    assert any("ERROR" in x for x in lines), lines  # one line: level and message together


def test_fetch_failure_is_in_its_log(wf):
    (wf / "bad.yaml").write_text("eval:\n  mt_bench:\n    local_dir: /nonexistent/mt\n")
    (wf / "results/data/mt_bench/question.jsonl").unlink()
    assert_clean(failing_log(wf, "results/data/mt_bench/question.jsonl", "bad.yaml"),
                 "/nonexistent/mt/question.jsonl does not exist")


def test_data_preparation_failure_is_in_its_log(wf):
    (wf / "bad.yaml").write_text("recipe_overrides:\n  sft:\n    dataset:\n      source: /nonexistent/chat\n")
    assert_clean(failing_log(wf, "results/data/sft/stats.json", "bad.yaml", "--forcerun", "prepare_sft_data"),
                 "/nonexistent/chat")


def test_training_failure_is_in_its_log(wf):
    import pandas as pd

    pd.DataFrame({"txt": ["a"]}).to_parquet(wf / "results/data/sft/train.parquet")
    assert_clean(failing_log(wf, "results/models/sft"), "missing column(s) text")


def test_generation_failure_is_in_its_log(wf):
    (wf / "results/data/mt_bench/question.jsonl").write_text('{"question_id": 1}\n')
    assert_clean(failing_log(wf, "results/eval/base/mt_bench_answers.jsonl"), "no 'category' key")


def test_judge_failure_is_in_its_log(wf):
    answers = wf / "results/eval/base/mt_bench_answers.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    assert_clean(failing_log(wf, "results/eval/base/mtbench.json"), "mt_bench_answers.jsonl:2: not valid JSON")


def test_unexpected_failure_leaves_its_traceback_in_the_log(wf):
    for stage in ("", "sft/"):
        (wf / "results/eval" / stage).mkdir(parents=True, exist_ok=True)
        for name in ("mtbench.json", "alpacaeval.json"):
            (wf / "results/eval" / stage / name).write_text("{")
    for stage in ("", "sft/", "base/"):
        (wf / "results/eval" / stage).mkdir(parents=True, exist_ok=True)
        (wf / "results/eval" / stage / "leaderboard.json").write_text("{")
    (wf / "results/metrics").mkdir()
    for stage in ("sft", "dpo"):
        (wf / "results/metrics" / f"{stage}.json").write_text("{}")
    log = failing_log(wf, "results/report/scores.md")
    assert "CRITICAL" in log and "Traceback (most recent call last)" in log and "JSONDecodeError" in log, log
