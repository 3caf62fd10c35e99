"""Workflow tier: lint, dry runs of every config (and profile), strict config validation."""

from __future__ import annotations

import json

import pytest
import yaml
from wfhelpers import REPO, planned_jobs, snakemake

CHAIN = ["prepare_base_model", "prepare_sft_data", "train_sft", "prepare_preference_data", "train_dpo",
         "fetch_mt_bench", "generate_mt_bench", "judge_mt_bench"]


def test_real_config_dry_run_lists_the_full_chain(workflow_copy):
    # targets before --configfile: it takes several values
    out = snakemake(workflow_copy, "-n", "results/eval/mtbench.json", "--configfile", "config/config.yaml").stdout
    jobs = planned_jobs(out)
    assert all(jobs.get(rule) == 1 for rule in CHAIN), jobs
    assert "build_demo_inputs" not in jobs
    # the base model's conversion feeds SFT
    assert "results/models/base" in out


def test_job_runtime_comes_from_the_plan(workflow_copy):
    out = snakemake(workflow_copy, "-n", "results/models/sft", "--configfile", "config/config.yaml").stdout
    block = out[out.index("rule train_sft:"):]
    runtime = int(block.split("runtime=")[1].split(",")[0])
    assert runtime > 600  # ~19 A100-hours on the one GPU the rule asks for without a profile


def test_real_config_all_targets_score_sft_and_dpo(workflow_copy):
    out = snakemake(workflow_copy, "-n", "--configfile", "config/config.yaml").stdout
    jobs = planned_jobs(out)
    for rule in ("generate_mt_bench", "judge_mt_bench", "generate_alpaca_eval", "judge_alpaca_eval"):
        assert jobs[rule] == 2, jobs  # sft and dpo
    assert "results/eval/sft/mtbench.json" in out and "results/eval/alpacaeval.json" in out


def test_demo_dry_run(workflow_copy):
    jobs = planned_jobs(snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml").stdout)
    assert jobs["build_demo_inputs"] == 1 and jobs["train_dpo"] == 1


@pytest.mark.parametrize("key, expected", [(None, "is not set"), ("", "is empty")])
def test_missing_judge_key_fails_before_any_job(workflow_copy, monkeypatch, key, expected):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    if key is not None:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    proc = snakemake(workflow_copy, "--cores", "1", "--configfile", "config/config.yaml", check=False)
    assert proc.returncode != 0
    assert f"OPENAI_API_KEY (judge.api_key_env) {expected}" in proc.stderr + proc.stdout
    assert not (workflow_copy / "results" / "models").exists()


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"base_modle": {"source": "x"}}, "base_modle"),
        ({"eval": {"generation_batch_size": "big"}}, "big"),
        ({"judge": {"backend": "gpt"}}, "gpt"),
        ({"recipe_overrides": {"dpo": {"betta": 0.2}}}, "betta"),
        ({"recipe_overrides": {"sft": {"learning_rate": "fast"}}}, "learning_rate"),
        ({"recipe_overrides": {"dpo": {"global_batch_size": 30, "per_device_train_batch_size": 8}}},
         "global_batch_size"),
        ({"recipe": "no-such-recipe"}, "no-such-recipe"),
        ({"judge": {"base_url": "not a url"}}, "'not a url' does not match '^https?://"),
        ({"recipe_overrides": {"sft": {"learnin_rate": 0.1}}},
         "bad.yaml, config/config.yaml): unknown key(s) recipe_overrides.sft.learnin_rate (did you mean"),
        ({"recipe_overrides": {"sft": {"per_device_train_batch_size": 0}}},
         "per_device_train_batch_size is 0; expected a number > 0"),
        ({"recipe_overrides": {"dpo": {"loss_type": "sigmoidd"}}}, "loss_type is 'sigmoidd' (did you mean 'sigmoid'?)"),
    ],
)
def test_bad_config_is_named(workflow_copy, patch, expected):
    cfg = workflow_copy / "bad.yaml"
    cfg.write_text(yaml.safe_dump(patch))
    proc = snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr


def test_lint_is_clean(workflow_copy):
    proc = snakemake(workflow_copy, "--lint", "--configfile", "config/demo.yaml", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_is_clean():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("snakefmt")
    if not exe.exists() and not shutil.which("snakefmt"):
        pytest.skip("snakefmt not installed")
    proc = subprocess.run([str(exe if exe.exists() else "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_is_clean():
    """The package, tests, bench and scripts pass the ruff rules in pyproject.toml (absolute imports, order)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("ruff")  # installed with the `test` extra
    # --no-cache: nothing written into the checkout (tests may run in parallel, beside a developer's edits)
    proc = subprocess.run([str(exe), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("profile", ["slurm", "condor"])
@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/demo.yaml"])
def test_dry_run_with_each_profile(workflow_copy, profile, configfile):
    if not (REPO / "profiles" / profile / "config.yaml").exists():
        pytest.skip(f"profiles/{profile} not written yet")
    proc = snakemake(workflow_copy, "-n", "--profile", f"profiles/{profile}", "--configfile", configfile)
    assert "train_dpo" in proc.stdout


def test_the_promised_run_command_dry_runs(workflow_copy):
    # README's command without a site profile: the plugin guesses the account at submission
    proc = snakemake(workflow_copy, "-n", "--profile", "profiles/slurm", "results/eval/mtbench.json")
    jobs = planned_jobs(proc.stdout)
    assert all(jobs.get(rule) == 1 for rule in CHAIN), jobs


def test_the_run_command_with_the_example_site_profile(workflow_copy):
    import shutil

    shutil.copytree(workflow_copy / "profiles" / "site.example", workflow_copy / "profiles" / "site")
    out = snakemake(workflow_copy, "-n", "--profile", "profiles/slurm", "--profile", "profiles/site",
                    "results/eval/mtbench.json").stdout
    block = out[out.index("rule train_sft:"):]
    block = block[:block.index("\n\n")]
    # the site's account and partition reach every job, and the repo profile's resources stay
    assert "slurm_account=myproject" in block and "slurm_partition=gpu" in block, block
    assert "gpu=8" in block and "constraint=a100_80gb" in block, block


def test_every_rule_has_a_log_and_a_benchmark():
    import re

    rules = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.S | re.M):
            rules[name] = body
    assert len(rules) >= 14, sorted(rules)
    missing = {n: [k for k in ("log:", "benchmark:") if f"    {k}\n" not in b] for n, b in rules.items()}
    assert not {n: m for n, m in missing.items() if m}


def test_the_gemma_recipe_brings_chatml_and_a_mismatch_is_named(workflow_copy):
    gemma = workflow_copy / "gemma.yaml"
    gemma.write_text(yaml.safe_dump({"recipe": "zephyr-7b-gemma"}))
    proc = snakemake(workflow_copy, "--cores", "1", "results/plan.json", "--configfile", "config/config.yaml",
                     "gemma.yaml", check=False)
    record = workflow_copy / "results" / "provenance" / "plan.json"
    assert record.exists(), proc.stdout + proc.stderr
    assert json.loads(record.read_text())["config"]["base_model"]["chat_template"] == "chatml"
    bad = workflow_copy / "bad.yaml"
    bad.write_text(yaml.safe_dump({"recipe": "zephyr-7b-gemma", "base_model": {"chat_template": "zephyr"}}))
    proc = snakemake(workflow_copy, "-n", "--configfile", "config/config.yaml", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert "base_model.chat_template is 'zephyr' but recipe 'zephyr-7b-gemma' is written for 'chatml'" in \
        proc.stdout + proc.stderr
