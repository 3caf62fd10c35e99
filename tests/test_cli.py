"""The `mamba-align` console script: one command per step (its module in mamba_align.cli), status of a results
folder, rescoring stored judgments, plan."""

from __future__ import annotations

import importlib
import json
import re
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mamba_align import cli

REPO = Path(__file__).resolve().parents[1]


def test_console_script_points_at_a_function_that_exists():
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["mamba-align"]
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    r = tmp_path / "results"
    write(r / "models/base/config.json", "{}")
    write(r / "data/sft/stats.json", "{}")
    # SFT: interrupted at step 8 of 20
    write(r / "checkpoints/sft-0123456789/checkpoint-8/trainer_state.json",
          json.dumps({"global_step": 8, "max_steps": 20}))
    write(r / "checkpoints/sft-0123456789/checkpoint-10/optimizer.pt", "")  # torn save: no trainer_state.json
    write(r / "logs/train_sft.log", "2026-01-01 00:00:00,000 INFO mamba_align.train.callbacks: sft progress: step 9/20 "
          "(45.0%) | loss 1.2345 | 15,620 tokens/s | elapsed 0:45:00 | ETA 0:55:00\n")
    write(r / "logs/fetch_alpaca_eval.log", "2026-01-01 00:00:00,000 ERROR mamba_align: /x/alpaca_eval.json does "
          "not exist\n")
    # DPO: done and judged
    write(r / "models/dpo/config.json", "{}")
    write(r / "metrics/dpo.json", json.dumps({"global_step": 100, "wall_time_s": 7200, "final": {"train_loss": 0.5}}))
    questions = [{"question_id": 1, "category": "writing", "turns": ["a", "b"]},
                 {"question_id": 2, "category": "math", "turns": ["c", "d"]}]
    write(r / "data/mt_bench/question.jsonl", "".join(json.dumps(q) + "\n" for q in questions))
    judgments = [{"question_id": 1, "turn": 1, "judgment": "Rating: [[8]]", "score": 8},
                 {"question_id": 1, "turn": 2, "judgment": "Rating: [[6]]", "score": 6},
                 {"question_id": 2, "turn": 1, "judgment": "Rating: [4]", "score": -1},  # an older parser missed it
                 {"question_id": 2, "turn": 2, "judgment": "no rating", "score": -1}]
    write(r / "eval/dpo/mt_bench_judgments.jsonl", "".join(json.dumps(j) + "\n" for j in judgments))
    write(r / "eval/mtbench.json", json.dumps({"scores": {"turn_1": 8.0, "turn_2": 6.0, "overall": 7.0}}))
    return r


def test_status_reports_stages_checkpoints_progress_scores_and_errors(results, capsys):
    assert cli.main(["status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "base model: ready" in out and "sft data: ready" in out and "dpo data: not prepared" in out
    assert "train sft: checkpoint at step 8/20" in out and "checkpoint-8" in out
    assert "last log: step 9/20 (45.0%) | loss 1.2345 | 15,620 tokens/s | elapsed 0:45:00 | ETA 0:55:00" in out
    assert "train dpo: done (100 steps, 2.00 h, final loss 0.5)" in out
    assert "eval dpo: MT-Bench: overall 7.0, turn 1 8.0, turn 2 6.0" in out
    assert "fetch_alpaca_eval.log: ERROR mamba_align: /x/alpaca_eval.json does not exist" in out


def test_status_of_a_missing_folder_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_rescore_reparses_judgments_without_judge_calls(results, capsys):
    assert cli.main(["rescore", str(results), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scores"] == {"turn_1": 6.0, "turn_2": 6.0, "overall": 6.0}  # [4] now parsed (FastChat's backup)
    assert r["n_unrated"] == 1 and r["changed"] is True
    assert r["per_category"]["math"]["turn_1"] == 4


def test_rescore_without_judgments_names_the_file(results, capsys):
    assert cli.main(["rescore", str(results), "--stage", "sft"]) == 2
    assert "eval/sft/mt_bench_judgments.jsonl does not exist" in capsys.readouterr().err


def test_plan_subcommand_runs_the_planner(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "mamba_align.cli", "plan", "--config", "config/config.yaml",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "total GPU-hours" in proc.stdout and out.exists()


def test_plan_of_the_demo_on_a_fresh_checkout_is_a_one_line_error(workflow_copy, monkeypatch, capsys):
    """#29: a raw traceback (the demo's base model is built by the workflow, so its size is not known yet)."""
    monkeypatch.chdir(workflow_copy)
    assert cli.main(["plan", "--config", "config/demo.yaml", "--out", "plan.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mamba-align: unknown size of base model results/demo/base_mamba_ssm")
    assert err.count("\n") == 1
    assert "snakemake --configfile config/demo.yaml results/plan.json" in err


@pytest.mark.parametrize("setup, args, expected", [
    (None, ["--config", "config/nope.yaml"], "config/nope.yaml does not exist"),
    ({"config/bad.yaml": "eval: [unclosed"}, ["--config", "config/bad.yaml"], "config/bad.yaml: not valid YAML"),
    ({"config/bad.yaml": "- a list"}, ["--config", "config/bad.yaml"], "expected a mapping of config keys"),
    ({"config/bad.yaml": "base_modle: {source: x}"}, ["--config", "config/bad.yaml"], "base_modle"),
    ({"results/models/base.verify.json": '{"source": '}, [], "base.verify.json: not valid JSON"),
    ({"results/data/sft/stats.json": "[]"}, [], "stats.json: expected a JSON object"),
    ({"taken": ""}, ["--out", "taken/plan.json"], "taken"),  # a file where the output's folder should be
], ids=["missing-config", "bad-yaml", "not-a-mapping", "misspelled-key", "torn-verify", "odd-stats", "bad-out"])
def test_plan_with_bad_inputs_is_a_one_line_error(workflow_copy, monkeypatch, capsys, setup, args, expected):
    monkeypatch.chdir(workflow_copy)
    for path, text in (setup or {}).items():
        write(workflow_copy / path, text)
    assert cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mamba-align: ") and expected in err and err.count("\n") == 1, err


def test_rescore_with_bad_files_is_a_one_line_error(results, capsys):
    judgments = results / "eval/dpo/mt_bench_judgments.jsonl"
    judgments.write_text('{"question_id": 1, "turn": 1}\n')
    assert cli.main(["rescore", str(results)]) == 2
    assert "mt_bench_judgments.jsonl:1: no judgment" in capsys.readouterr().err
    judgments.write_text('{"question_id": 1, "turn": 1, "judgment": "Rating: [[8]]"}\n')
    (results / "eval/mtbench.json").write_text("{")
    assert cli.main(["rescore", str(results)]) == 2
    assert "eval/mtbench.json: not an MT-Bench summary" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the one command

EVERY_COMMAND = list(cli.COMMANDS)


@pytest.mark.parametrize("name", EVERY_COMMAND)
def test_every_command_imports_and_its_help_names_it(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mamba-align {name} ")


def test_help_lists_every_command_with_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, (_, help_text) in cli.COMMANDS.items():
        assert f"{name} {' '.join(help_text.split())}" in out
    assert "status what is done" in out and "rescore re-score" in out


@pytest.mark.parametrize("name", ["train", "status"])
def test_python_dash_m_of_the_cli_runs_a_command(name, monkeypatch, capsys):
    """accelerate's ranks run `python -m mamba_align.cli train --job ...` (train/launch.py's relaunch)."""
    monkeypatch.setattr(sys, "argv", ["mamba_align.cli", name, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("mamba_align.cli", run_name="__main__", alter_sys=False)
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: mamba-align {name} ")


def test_every_command_the_docs_name_exists():
    docs = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("config/**/*.md"), *REPO.glob("profiles/*.md")]
    named = {m for d in docs for m in re.findall(r"(?:`|^)mamba-align ([a-z][\w-]*)", d.read_text(), re.M)}
    assert named and named - set(EVERY_COMMAND) == set()


def test_an_unknown_command_is_an_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian", "sft"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and all(f"'{name}'" in err for name in EVERY_COMMAND)


@pytest.mark.parametrize("module, func, argv, expected", [
    ("mamba_align.cli.generate", "generate_alpaca_eval",
     ["generate", "alpaca_eval", "--model", "m", "--questions", "q", "--out", "o", "--model-id", "x", "--top-k", "0"],
     {"top_k": 0}),
    ("mamba_align.cli.alpacaeval", "fetch_alpaca_eval",
     ["alpaca-eval", "fetch", "--out-dir", "o", "--annotators", "alpaca_eval_gpt4"],
     {"annotators": ["alpaca_eval_gpt4"]}),
    ("mamba_align.cli.report", "build_report",
     ["report", "--run-name", "r", "--out", "o", "--leaderboard", "dpo", "l"],
     {"leaderboards": {"dpo": "l"}}),
], ids=["generate-top-k", "fetch-annotators", "report-leaderboards"])
def test_a_command_passes_what_its_rule_passes(monkeypatch, module, func, argv, expected):
    """The settings the rule's script gives the package function can be given on the command line too."""
    mod = importlib.import_module(module)
    calls = []
    monkeypatch.setattr(mod, func, lambda *a, **k: calls.append(k))
    monkeypatch.setattr(mod, "setup_logging", lambda *a, **k: None)  # no global logging set-up in the test process
    assert cli.main(argv) == 0
    assert expected.items() <= calls[0].items()
