"""`mamba-align train {sft,dpo}`: SFT or DPO training into `--out`, resumable (train/launch.py), the job built from the
options as the rules train_sft and train_dpo build it from the config. The ranks of a multi-GPU run are started
as `python -m mamba_align.cli train --job <checkpoints>/launch/job.json`: the job the launcher resolved."""

from __future__ import annotations

import argparse
import os

from mamba_align.train import launch
from mamba_align.train.job import TrainJob
from mamba_align.train.launch import LAUNCHED_ENV, train
from mamba_align.train.recipes import load_recipe, parse_overrides
from mamba_align.utils import UserError, setup_logging

REQUIRED = ("stage", "model", "train", "recipe_dir", "out", "checkpoint_dir", "metrics")


def configure(p: argparse.ArgumentParser) -> None:
    p.description = launch.__doc__.split("\n\n")[0]
    p.add_argument("stage", nargs="?", choices=["sft", "dpo"], help="required unless --job")
    p.add_argument("--model", help="transformers checkpoint directory (with tokenizer); required")
    p.add_argument("--ref-model", help="DPO reference model directory (default: --model)")
    p.add_argument("--train", help="train.parquet from the prepare step; required")
    p.add_argument("--test", help="test.parquet (evaluated once per epoch or every eval_steps)")
    p.add_argument("--recipe-dir", help="folder holding <stage>.yaml, e.g. config/recipes/demo; required")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="recipe override, repeatable (e.g. max_steps=10, dataset.revision=abc)")
    p.add_argument("--out", help="final model directory (written atomically); required")
    p.add_argument("--checkpoint-dir", help="resumable checkpoints, beside the output; required")
    p.add_argument("--metrics", help="metrics JSON; required")
    p.add_argument("--num-processes", type=int, default=1, help="GPUs; >1 relaunches with accelerate")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP when multi-GPU")
    p.add_argument("--job", help="instead of all the above: a job file written by the launcher for its ranks")
    p.add_argument("--log", help="also log to this file")
    p.set_defaults(parser=p)  # for job_from_args's errors, argparse's own


def job_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> TrainJob:
    """The job the command line describes: the launcher's job file, or the options (the recipe file with its
    overrides, strictly parsed)."""
    def named(keys):
        return ", ".join(k if k == "stage" else f"--{k.replace('_', '-')}" for k in keys)

    given = [k for k in (*REQUIRED, "ref_model", "test", "override") if getattr(a, k) is not None]
    if a.job is not None:
        if given:
            p.error(f"--job replaces the other options; also given: {named(given)}")
        return TrainJob.load(a.job)
    missing = [k for k in REQUIRED if getattr(a, k) is None]
    if missing:
        p.error(f"the following arguments are required: {named(missing)}")
    return TrainJob(stage=a.stage, recipe=load_recipe(a.recipe_dir, a.stage, parse_overrides(a.override)),
                    model=a.model, ref_model=a.ref_model, train=a.train, test=a.test, out=a.out,
                    checkpoints=a.checkpoint_dir, metrics=a.metrics, num_processes=a.num_processes, fsdp=a.fsdp)


def run(a: argparse.Namespace) -> None:
    # a rank dies with its launcher; the attempt (header, end, SIGTERM logged) is the outer process's, or rank 0's
    # under a launcher of the user's (one per node, profiles/README.md)
    rank = "LOCAL_RANK" in os.environ
    outer = not rank or (not os.environ.get(LAUNCHED_ENV) and os.environ.get("RANK") == "0")
    setup_logging(a.log, attempt=outer, die_with_parent=rank or None)
    try:
        train(job_from_args(a.parser, a))
    except UserError as e:
        launch.log.error("%s", e)
        raise SystemExit(2) from None
