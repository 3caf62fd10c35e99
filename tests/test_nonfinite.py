"""NaN and inf (issue #28, section 2): a non-finite number in the config or a recipe is refused when the workflow is
read, naming the key; a training run whose loss stops being a number is stopped with an error naming the step, and
no model is published. CPU, offline: dry runs of the demo config, and a tiny random Mamba trained at a learning rate
that overflows its weights in one step."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_runs import store_job
from wfhelpers import bench_module, snakemake

from mamba_align.ops.store import runs
from mamba_align.train.callbacks import NON_FINITE_STEPS, NonFiniteLoss
from mamba_align.train.checkpoints import last_complete_checkpoint
from mamba_align.train.recipes import load_recipe

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
bench = bench_module("train_throughput")

# ------------------------------------------------------------------------------------ when the workflow is read

DRY_RUNS = [
    ({"recipe_overrides": {"dpo": {"beta": float("inf")}}}, "recipe_overrides.dpo.beta is inf"),
    ({"recipe_overrides": {"sft": {"learning_rate": float("nan")}}}, "recipe_overrides.sft.learning_rate is nan"),
    ({"recipe_overrides": {"dpo": {"warmup_ratio": float("nan")}}}, "recipe_overrides.dpo.warmup_ratio is nan"),
    ({"judge": {"temperature": float("nan")}}, "judge.temperature is nan"),
]


@pytest.mark.parametrize("patch, expected", DRY_RUNS, ids=[e.split(" is")[0] for _, e in DRY_RUNS])
def test_non_finite_config_number_fails_the_dry_run_naming_the_key(workflow_copy, patch, expected):
    (workflow_copy / "bad.yaml").write_text(yaml.safe_dump(patch))  # writes .inf / .nan
    proc = snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "bad.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"bad.yaml, config/config.yaml): {expected}; expected a finite number" in out, out[-3000:]


def test_non_finite_in_a_recipe_file_fails_the_dry_run_naming_the_file_and_key(workflow_copy):
    recipe = workflow_copy / "my-recipe"
    recipe.mkdir()
    for stage in ("sft", "dpo"):
        (recipe / f"{stage}.yaml").write_text((DEMO / f"{stage}.yaml").read_text())
    dpo = recipe / "dpo.yaml"
    dpo.write_text(dpo.read_text().replace("beta: 0.1", "beta: .inf"))
    assert "beta: .inf" in dpo.read_text()
    (workflow_copy / "bad.yaml").write_text(yaml.safe_dump({"recipe": str(recipe)}))
    proc = snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert f"{dpo}: beta is inf; expected a finite number" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ when training

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bench.write_model(d / "model", **bench.SHAPES["tiny"])
    vocab = bench.words(512)[:40]
    bench.write_sft_rows(d / "sft.parquet", 64, vocab, seed=0)
    bench.write_dpo_rows(d / "dpo.parquet", 16, vocab, seed=0)
    return d


# Adam moves every weight by about the learning rate: at 1e30 one step overflows the model, and the loss of the
# next step is NaN. Honest divergence, no patched loss.
DIVERGING = {"learning_rate": 1e30, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "save_steps": 1}


def assert_nothing_published(tmp_path, stage):
    models = tmp_path / "models"
    assert not (models / stage).exists() and not (models / stage).is_symlink()
    assert not list(models.glob(f"{stage}-*"))  # no keyed model dir either
    assert not (tmp_path / f"{stage}.json").exists()  # no metrics of a finished run


def test_diverged_sft_stops_after_consecutive_non_finite_steps_and_publishes_nothing(tiny, tmp_path):
    recipe = load_recipe(DEMO, "sft", {**DIVERGING, "max_steps": 8, "logging_steps": 1})
    stop = 1 + NON_FINITE_STEPS  # step 1's loss is the untouched model's; steps 2.. are NaN
    with pytest.raises(NonFiniteLoss, match=rf"sft training stopped at step {stop}/8: loss nan.*logged step\(s\) "
                                            rf"2, 3, 4\); no model written") as e:
        runs.train_keyed(store_job(tmp_path, "sft", tiny / "model", tiny / "sft.parquet", recipe))
    assert "lower learning_rate" in str(e.value)
    assert_nothing_published(tmp_path, "sft")
    # the checkpoint of the last finite step stays for a resume; none of a step that logged NaN was written
    (ckpt,) = (tmp_path / "checkpoints").glob("sft-*")
    assert last_complete_checkpoint(ckpt).name == "checkpoint-1"
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(w).all() for w in load_file(ckpt / "checkpoint-1" / "model.safetensors").values())


def test_a_non_finite_last_step_stops_even_when_not_a_logging_step(tiny, tmp_path):
    # logging every 5 steps would not log step 2, the last: its loss is checked all the same
    recipe = load_recipe(DEMO, "sft", {**DIVERGING, "max_steps": 2, "logging_steps": 5})
    with pytest.raises(NonFiniteLoss, match=r"stopped at step 2/2: loss nan.*, the last step\); no model written"):
        runs.train_keyed(store_job(tmp_path, "sft", tiny / "model", tiny / "sft.parquet", recipe))
    assert_nothing_published(tmp_path, "sft")


def test_dpo_with_an_infinite_beta_that_got_past_the_parser_stops_at_once(tiny, tmp_path):
    # the case: beta .inf makes every DPO loss NaN from step 1 (policy == reference: inf * 0); the recipe
    # parser refuses it now, and training is the backstop for a value that reaches it some other way
    recipe = dataclasses.replace(load_recipe(DEMO, "dpo", {"max_steps": 6, "logging_steps": 1, "save_steps": 1}),
                                 beta=math.inf)
    with pytest.raises(NonFiniteLoss, match=rf"dpo training stopped at step {NON_FINITE_STEPS}/6: loss nan"):
        runs.train_keyed(store_job(tmp_path, "dpo", tiny / "model", tiny / "dpo.parquet", recipe))
    assert_nothing_published(tmp_path, "dpo")
    (ckpt,) = (tmp_path / "checkpoints").glob("dpo-*")
    assert not list(ckpt.glob("checkpoint-*"))  # every step logged NaN: nothing to resume from


def test_two_ranks_stop_together_and_the_launch_fails_naming_the_step(tiny, tmp_path):
    """Under `accelerate launch` (DDP over gloo here) every rank stops at the same step (the logged loss is the
    mean over ranks and the decision is reduced): the launch fails instead of hanging, the rule's log names the
    step, and no model is written."""
    overrides = {**DIVERGING, "max_steps": 6, "logging_steps": 1}
    cmd = [sys.executable, "-m", "mamba_align.cli", "train", "sft", "--model", str(tiny / "model"),
           "--train", str(tiny / "sft.parquet"), "--recipe-dir", str(DEMO), "--out", str(tmp_path / "model"),
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "m.json"),
           "--log", str(tmp_path / "log.txt"), "--num-processes", "2",
           *[a for k, v in overrides.items() for a in ("--override", f"{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = (tmp_path / "log.txt").read_text()
    assert "sft training stopped at step 4/6: loss nan" in log, log[-3000:]
    assert "training processes failed" in log + proc.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "m.json").exists()
    assert last_complete_checkpoint(tmp_path / "ckpt").name == "checkpoint-1"
