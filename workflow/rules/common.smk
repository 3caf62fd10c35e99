import os
from pathlib import Path

from snakemake.utils import min_version, validate

from mamba_align import layout
from mamba_align.recipes import as_dict, load_recipe

min_version("9.0")


validate(config, schema="../schemas/config.schema.yaml")

R = config["results_dir"]
BASE = config["base_model"]
EVAL = config["eval"]
JUDGE = config["judge"]


def recipe_dir():
    """config['recipe'] is a folder name under config/recipes/ (or a path to a recipe folder)."""
    name = config["recipe"]
    return (
        name
        if Path(name).is_dir()
        else str(Path(workflow.basedir) / "config" / "recipes" / name)
    )


# Parsed strictly now, so a bad recipe fails before any job (and any GPU time).
SFT = as_dict(load_recipe(recipe_dir(), "sft", config["recipe_overrides"].get("sft")))
DPO = as_dict(load_recipe(recipe_dir(), "dpo", config["recipe_overrides"].get("dpo")))


# Secrets reach cluster jobs through envvars (never config, logs or results).
envvars:
    *[v for v in ("HF_TOKEN", JUDGE["api_key_env"]) if v in os.environ],


onstart:
    # Checked before the first job (not in dry runs) when judge jobs will run, so a missing judge key
    # fails before training, not after it.
    judging = any(
        j.rule.name.startswith("judge_") for j in workflow.dag.needrun_jobs()
    )
    if (
        judging
        and JUDGE["backend"] == "openai"
        and JUDGE["api_key_env"] not in os.environ
    ):
        raise WorkflowError(
            f"judge.backend is 'openai' but the environment variable {JUDGE['api_key_env']} "
            "(judge.api_key_env) is not set; export it before running the judge rules."
        )


wildcard_constraints:
    stage="|".join(layout.STAGES),
    stagedir="(base/|sft/)?",


def demo_inputs():
    return [f"{R}/demo"] if config["demo"] else []


def model_of(stage):
    return layout.model_dir(R, stage)


def model_for(wildcards):
    return model_of(wildcards.stage)


def answers_for(name):
    """Input function: the per-stage generation output a judge rule reads."""
    return lambda w: f"{R}/eval/{layout.stage_of(w.stagedir)}/{name}"


def all_targets():
    return [
        layout.eval_summary(R, s, b) for s in EVAL["stages"] for b in layout.BENCHMARKS
    ]
