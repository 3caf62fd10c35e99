"""SFT and DPO of Mamba models with TRL's SFTTrainer / DPOTrainer (full fine-tuning).

Each run checkpoints into `checkpoint_dir` (beside, not inside, the output) and a rerun resumes from the
newest complete checkpoint; the model directory appears atomically only when training has finished.
SIGTERM / SIGUSR1 (e.g. Slurm `--signal=TERM@900`, see profiles/README.md) or a file `<checkpoint_dir>/STOP` make
the run save a checkpoint at the end of the current optimizer step and exit with PREEMPTED_EXIT_CODE.

    mamba-align train sft --model M --train T.parquet --test V.parquet --recipe-dir config/recipes/demo \
        --out results/sft --checkpoint-dir results/checkpoints/sft --metrics results/metrics/sft.json

`python -m mamba_align.train` runs the same (train/__main__.py); either builds the same TrainJob (train/job.py) as a
workflow job. The ranks of a multi-GPU run are started as `python -m mamba_align.train --job
<checkpoints>/launch/job.json`: the job this process resolved.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys

from mamba_align.process import terminate_with_this_process
from mamba_align.train.batch import batch_layout
from mamba_align.train.callbacks import on_signals, restore_signals
from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, STOP_FILE, exit_preempted, prepare_checkpoint_dir
from mamba_align.train.fit import fit
from mamba_align.train.job import TrainJob
from mamba_align.train.preflight import (
    check_columns,
    check_disk,
    check_length,
    check_memory,
    check_model_dir,
    check_tokenizer,
    check_trackers,
)
from mamba_align.train.recipes import load_recipe, parse_overrides
from mamba_align.utils import (
    UserError,
    follow_umask,
    read_json,
    remove_leftovers,
    setup_logging,
)

log = logging.getLogger(__name__)

LAUNCHED_ENV = "MAMBA_ALIGN_LAUNCHED"  # set for the ranks we start, so they can never relaunch again
# torchrun answers SIGTERM by signalling the workers and killing them 30 s later by default; saving a
# 2.8B model with its optimizer state across 8 ranks can take longer.
LAUNCH_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
JOB_FILE = "launch/job.json"  # in the checkpoint folder: the job as the launcher resolved it, read by every rank


def train(job: TrainJob) -> dict:
    """Train `job` into its `out` folder, resuming from its `checkpoints`: pre-flight (kernels, trackers, batch,
    model, columns, length, tokenizer, disk, memory) before any model loads, then one process, or N ranks under
    accelerate that read the same job. Returns the metrics (SFT: `text` rows packed into max_seq_length rows;
    DPO: `prompt`/`chosen`/`rejected` rows against the frozen reference model)."""
    from mamba_align.model.kernels import require_kernels

    require_kernels(f"training ({job.stage})")  # before any model is loaded
    check_trackers(job.recipe)
    launched = _in_distributed_launch()
    if launched:
        job = job.replace(num_processes=int(os.environ["WORLD_SIZE"]))
    recipe = job.recipe
    # the recipe's global batch on any count that divides it (UserError naming the nearest that do otherwise)
    per_device, accumulation = batch_layout(recipe.global_batch_size, recipe.per_device_train_batch_size,
                                            job.num_processes)
    if per_device != recipe.per_device_train_batch_size:
        log.info("%d processes: per-device batch %d (the recipe's %d does not divide the %d rows each takes per "
                 "step)", job.num_processes, per_device, recipe.per_device_train_batch_size,
                 recipe.global_batch_size // job.num_processes)
        job = job.replace(recipe=dataclasses.replace(recipe, per_device_train_batch_size=per_device))
        recipe = job.recipe
    config = check_model_dir(job.model, "model")
    if job.ref_model is not None and job.ref_model != job.model:
        check_model_dir(job.ref_model, "reference model")
    check_length(recipe, config, job.model)
    for path in (job.train, job.test):
        if path is not None:
            check_columns(path, job.stage)
    from transformers import AutoTokenizer

    check_tokenizer(AutoTokenizer.from_pretrained(job.model), job.model)
    if launched and not os.environ.get(LAUNCHED_ENV) and int(os.environ.get("RANK", 0)) == 0:
        # started by the user's launcher (one per node, profiles/README.md), not by _relaunch: rank 0 does the
        # outer process's pre-flight (the other ranks wait for it while rank 0 prepares the data)
        prepare_checkpoint_dir(job.checkpoints, job.stage, recipe)
        remove_leftovers(job.out)
        check_disk(job.checkpoints, job.out, config, recipe)
    if not launched:
        prepare_checkpoint_dir(job.checkpoints, job.stage, recipe)
        remove_leftovers(job.out)  # a killed run's partial model (GBs): before the disk check counts the space
        check_disk(job.checkpoints, job.out, config, recipe)
        check_memory(config, recipe, job.stage, job.num_processes, job.fsdp)
        if job.num_processes > 1:
            return _relaunch(job)
    metrics = fit(job, accumulation)
    if metrics:  # the process that saved the model: readable by the project group, as the base model
        follow_umask(job.out)
    return metrics


def _in_distributed_launch() -> bool:
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    if os.environ.get(LAUNCHED_ENV):
        raise RuntimeError("started by accelerate launch but without LOCAL_RANK/WORLD_SIZE: not relaunching again")
    return False


def _relaunch(job: TrainJob) -> dict:
    """Re-run `python -m mamba_align.train --job` under `accelerate launch`; every rank reads the job this process
    resolved (JOB_FILE in the checkpoint folder). SIGTERM/SIGUSR1 are forwarded to the ranks as the STOP file."""
    import torch

    job_file = job.save(job.checkpoints / JOB_FILE)
    cuda = torch.cuda.is_available()
    if job.fsdp:
        # FSDP1 wrapping each MambaBlock; sharded checkpoints for resume, a full state dict for the output
        dist = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
                "MambaBlock", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_use_orig_params", "true",
                "--fsdp_sync_module_states", "true"]
    else:
        dist = ["--multi_gpu"]  # torch.distributed.run underneath; on a machine without CUDA, gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(job.num_processes),
           "--num_machines", "1", "--mixed_precision", "bf16" if job.recipe.bf16 and cuda else "no", *dist,
           "-m", "mamba_align.train", "--job", str(job_file)]
    log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if log_files:  # the ranks log to the rule's log file too
        cmd += ["--log", log_files[0]]
    signalled = []

    def forward(signum, _frame):
        log.warning("signal %d: asking the %d ranks to checkpoint and stop", signum, job.num_processes)
        signalled.append(signum)
        (job.checkpoints / STOP_FILE).touch()

    previous = on_signals(forward)
    try:
        log.info("launching: %s", " ".join(cmd))
        # own session: a signal to our process group reaches us, not torchrun (which would kill the ranks
        # 30 s later, maybe mid-save); we pass it on as the STOP file instead. Should this process die without
        # passing it on (kill -9), torchrun gets SIGTERM from the kernel and stops the ranks itself.
        rc = subprocess.call(cmd, env={**os.environ, LAUNCHED_ENV: "1", **LAUNCH_ENV}, start_new_session=True,
                             preexec_fn=terminate_with_this_process())
    finally:
        restore_signals(previous)
    # the ranks exit 75 after a requested stop, which torchrun reports as a failure (1): the STOP file tells
    if signalled or rc == PREEMPTED_EXIT_CODE or (rc != 0 and (job.checkpoints / STOP_FILE).exists()):
        exit_preempted()
    if rc != 0:
        raise SystemExit(f"training processes failed with exit code {rc} (see the log above)")
    return read_json(job.metrics)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-align train", description=__doc__.split("\n\n")[0])
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
    return p


REQUIRED = ("stage", "model", "train", "recipe_dir", "out", "checkpoint_dir", "metrics")


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


def main(argv=None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    # a rank dies with its launcher; the attempt (header, end, SIGTERM logged) is the outer process's, or rank 0's
    # under a launcher of the user's (one per node, profiles/README.md)
    rank = "LOCAL_RANK" in os.environ
    outer = not rank or (not os.environ.get(LAUNCHED_ENV) and os.environ.get("RANK") == "0")
    setup_logging(a.log, attempt=outer, die_with_parent=rank or None)
    try:
        train(job_from_args(p, a))
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
