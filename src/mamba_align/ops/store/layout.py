"""Where every output lives under the results folder. The Snakefile and the steps both use this."""

from __future__ import annotations

STAGES = ("base", "sft", "dpo")
FINAL_STAGE = "dpo"
BENCHMARKS = ("mtbench", "alpacaeval")  # the judged chat benchmarks
LEADERBOARD = "leaderboard"  # the lm-eval tasks: results/eval/<stage>/leaderboard.json


def model_dir(results: str, stage: str) -> str:
    return f"{results}/models/{stage}"


def stage_dir(stage: str) -> str:
    """Prefix of a stage's eval summaries: '' for the final model (results/eval/mtbench.json), else 'sft/'."""
    return "" if stage == FINAL_STAGE else f"{stage}/"


def stage_of(stagedir: str) -> str:
    return stagedir.rstrip("/") or FINAL_STAGE


def eval_summary(results: str, stage: str, bench: str) -> str:
    return f"{results}/eval/{stage_dir(stage)}{bench}.json"


def checkpoint_dir(checkpoints: str, stage: str, key: str) -> str:
    """Checkpoints of one training run under the checkpoints folder, keyed by what it learns from (runs.run_key):
    another recipe, other data or another parent model never resumes an old run. Lives beside (not inside) the
    declared outputs, so Snakemake never deletes it after a failure."""
    return f"{checkpoints}/{stage}-{key}"


def stored_model_dir(model_link: str, key: str) -> str:
    """Where a trained model lives: results/models/sft-<key>/; results/models/sft is a symlink to it."""
    return f"{model_link}-{key}"


def tensorboard_dir(results: str, checkpoints: str) -> str:
    """TensorBoard event files of one training run (named like its checkpoint folder: one run per recipe).

    `tensorboard --logdir results/logs/tensorboard` shows every run."""
    return f"{results}/logs/tensorboard/{checkpoints.rstrip('/').rsplit('/', 1)[-1]}"
