"""mamba_align.train.job: a training job built once (from a rule's params and the config, or from the command line),
its DPO reference setting resolved there, and the same job read back by the ranks of a multi-GPU run."""

import dataclasses
import types
from pathlib import Path

import pytest

from mamba_align.cli import build_parser
from mamba_align.cli.train import job_from_args
from mamba_align.train.job import TrainJob
from mamba_align.train.recipes import (
    PRECOMPUTE_REF_DEFAULT,
    as_dict,
    config_recipe,
    learning_settings,
    load_recipe,
    recipe_of,
)
from mamba_align.utils import UserError, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
PATHS = dict(model="m", train="t.parquet", test=None, out="o", checkpoints="c", metrics="x.json")


def rule(stage: str, config: dict, **resources):
    """What a Snakemake script gets for train_<stage>, as train.smk wires it: the learned settings Snakemake records
    (params.recipe) and the recipe object the job runs with (params.job_recipe), both of the parsed config."""
    recipe = as_dict(config_recipe(config, stage, ROOT))
    params = types.SimpleNamespace(recipe=learning_settings(recipe), job_recipe=recipe_of(stage, recipe),
                                   checkpoints="results/checkpoints")
    return types.SimpleNamespace(
        input=types.SimpleNamespace(model="results/models/base", train="d/train.parquet", test="d/test.parquet"),
        output=types.SimpleNamespace(model=f"results/models/{stage}", metrics=f"results/metrics/{stage}.json"),
        params=params, config=config, scriptdir=str(ROOT / "workflow" / "scripts"), rule=f"train_{stage}",
        resources=types.SimpleNamespace(**{"gpu": 0, **resources}))


def test_a_rule_hands_the_job_its_recipe_whole_and_the_config_is_not_read_again():
    config = {"recipe": "demo", "training": {"precompute_ref_log_probs": False},
              "recipe_overrides": {"dpo": {"save_steps": 7}}}
    smk = rule("dpo", config)
    job = TrainJob.from_snakemake(types.SimpleNamespace(**{**vars(smk), "config": {"recipe": "no such recipe"}}),
                                  "dpo")
    assert job.recipe == config_recipe(config, "dpo", ROOT) and job.recipe is not smk.params.job_recipe
    assert job.recipe.save_steps == 7 and job.recipe.precompute_ref_log_probs is False
    assert (job.model, job.ref_model, job.test) == (Path("results/models/base"),) * 2 + (Path("d/test.parquet"),)
    assert (job.out, job.checkpoints, job.rule, job.num_processes, job.fsdp) == \
        (Path("results/models/dpo"), Path("results/checkpoints"), "train_dpo", 1, False)
    sft = TrainJob.from_snakemake(rule("sft", config, gpu=4, fsdp=1), "sft")
    assert sft.ref_model is None and sft.num_processes == 4 and sft.fsdp


def test_params_that_disagree_are_a_workflow_error():
    smk = rule("dpo", {"recipe": "demo"})
    smk.params.recipe = {**smk.params.recipe, "beta": 0.5}
    with pytest.raises(UserError, match="train_dpo: its params disagree"):
        TrainJob.from_snakemake(smk, "dpo")
    smk = rule("dpo", {"recipe": "demo"})  # an operational key is not in the recorded settings
    smk.params.job_recipe = dataclasses.replace(smk.params.job_recipe, save_steps=3)
    assert TrainJob.from_snakemake(smk, "dpo").recipe.save_steps == 3


def test_the_reference_setting_is_a_bool_in_every_job_and_the_callers_recipe_is_untouched():
    recipe = load_recipe(DEMO, "dpo")
    assert recipe.precompute_ref_log_probs is None
    job = TrainJob(stage="dpo", recipe=recipe, **PATHS)
    assert job.recipe.precompute_ref_log_probs is PRECOMPUTE_REF_DEFAULT and recipe.precompute_ref_log_probs is None
    off = TrainJob(stage="dpo", recipe=dataclasses.replace(recipe, precompute_ref_log_probs=False), **PATHS)
    assert off.recipe.precompute_ref_log_probs is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.stage = "sft"


def test_the_ranks_read_the_same_job(tmp_path):
    job = TrainJob(stage="dpo", recipe=load_recipe(DEMO, "dpo", {"beta": 0.05, "report_to": []}), num_processes=2,
                   fsdp=True, rule="train_dpo_grid", **PATHS)
    assert TrainJob.load(job.save(tmp_path / "launch" / "job.json")) == job
    data = read_json(tmp_path / "launch" / "job.json")
    assert data["recipe"]["beta"] == 0.05 and data["ref_model"] == "m" and data["test"] is None


def test_a_wrong_job_is_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="a DPORecipe for stage sft; expected SFTRecipe"):
        TrainJob(stage="sft", recipe=load_recipe(DEMO, "dpo"), **PATHS)
    with pytest.raises(UserError, match="stage 'ppo'"):
        TrainJob(stage="ppo", recipe=load_recipe(DEMO, "dpo"), **PATHS)
    data = TrainJob(stage="sft", recipe=load_recipe(DEMO, "sft"), **PATHS).as_dict()
    write_json(tmp_path / "job.json", {**data, "recipe": {**data["recipe"], "learning_rat": 1}})
    with pytest.raises(UserError, match=r"job\.json: recipe: unknown key\(s\) learning_rat"):
        TrainJob.load(tmp_path / "job.json")


def test_the_command_line_builds_the_job_the_same_way(tmp_path, capsys):
    p = build_parser("train")
    args = ["dpo", "--model", "m", "--train", "t.parquet", "--recipe-dir", str(DEMO), "--out", "o",
            "--checkpoint-dir", "c", "--metrics", "x.json", "--override", "beta=0.2"]
    job = job_from_args(p, p.parse_args(args))
    assert job == TrainJob(stage="dpo", recipe=load_recipe(DEMO, "dpo", {"beta": 0.2}), **PATHS)
    assert job_from_args(p, p.parse_args(["--job", str(job.save(tmp_path / "job.json"))])) == job
    for wrong, says in ((["--job", "j.json", "--model", "m"], "--job replaces the other options; also given: --model"),
                        (args[:3], "required: --train, --recipe-dir, --out, --checkpoint-dir, --metrics")):
        with pytest.raises(SystemExit):
            job_from_args(p, p.parse_args(wrong))
        assert says in capsys.readouterr().err
