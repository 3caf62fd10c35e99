"""SFT and DPO of Mamba models with TRL's SFTTrainer / DPOTrainer (full fine-tuning).

Each run checkpoints into `checkpoint_dir` (beside, not inside, the output) and a rerun resumes from the
newest complete checkpoint; the model directory appears atomically only when training has finished.
SIGTERM / SIGUSR1 (e.g. Slurm `--signal=TERM@900`, see profiles/README.md) or a file `<checkpoint_dir>/STOP` make
the run save a checkpoint at the end of the current optimizer step and exit with PREEMPTED_EXIT_CODE.

    mamba-align train sft --model M --train T.parquet --test V.parquet --recipe-dir config/recipes/demo \
        --out results/sft --checkpoint-dir results/checkpoints/sft --metrics results/metrics/sft.json

The command (cli/train.py) builds the same TrainJob (train/job.py) as a workflow job. The ranks of a multi-GPU run
are started as `python -m mamba_align.cli train --job <checkpoints>/launch/job.json`: the job this process resolved.
"""

from __future__ import annotations

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
from mamba_align.utils import follow_umask, read_json, remove_leftovers

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
    """Re-run `python -m mamba_align.cli train --job` under `accelerate launch`; every rank reads the job this process
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
           "-m", "mamba_align.cli", "train", "--job", str(job_file)]
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
