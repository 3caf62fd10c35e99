"""One training run in this process (or in one rank of a distributed launch): load the model and data, train with
resume from the newest complete checkpoint, save the model atomically, write the metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from mamba_align.train.callbacks import (
    non_finite_loss_callback,
    on_signals,
    progress_callback,
    restore_signals,
    stop_and_timing_callbacks,
)
from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, STOP_FILE, exit_preempted, last_complete_checkpoint
from mamba_align.train.job import TrainJob
from mamba_align.train.preflight import COLUMNS
from mamba_align.train.recipes import as_dict
from mamba_align.train.trainer import dataset_workers, one_gpu_per_process, trainer_classes, trl_config
from mamba_align.utils import atomic_path, write_json

log = logging.getLogger(__name__)


def _load_model(model_dir, cpu: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    saved = {k: getattr(config, k, None) for k in ("use_cache", "use_mambapy")}
    config.use_cache = False
    if cpu and hasattr(config, "use_mambapy"):
        config.use_mambapy = True  # parallel scan: ~16x faster than the sequential loop on CPU
    # fp32 master weights always; bf16 only as autocast (the SSM recurrence is precision-sensitive)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    return model, saved


def _load_rows(path, stage: str, cache_dir: Path):
    from datasets import Dataset

    ds = Dataset.from_parquet(str(path), columns=list(COLUMNS[stage]), cache_dir=str(cache_dir))
    if stage == "sft":
        # The chat template closes each turn with eos then "\n"; drop the trailing newline so TRL does not
        # append a second eos: documents are then joined by exactly one eos when packed.
        ds = ds.map(lambda r: {"text": r["text"].rstrip()}, desc="Stripping trailing whitespace")
    return ds


def fit(job: TrainJob, accumulation: int) -> dict:
    """Train `job` in this process (one rank of it under a distributed launch) with `accumulation` steps per
    optimizer step; the metrics ({} on ranks other than 0)."""
    import torch
    from transformers import AutoTokenizer

    stage, recipe, model_dir, checkpoint_dir = job.stage, job.recipe, job.model, job.checkpoints
    started = time.time()
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger("mamba_align").setLevel(logging.WARNING)  # rank 0 speaks for the run
    if recipe.bf16 and not cuda:
        log.info("no CUDA: training in fp32 (recipe bf16 applies on GPU only)")
    if not cuda:
        import importlib.util

        if importlib.util.find_spec("mambapy") is None:
            log.warning("mambapy is not installed: CPU training uses the slow sequential scan")
    else:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"  # Mamba is causal: right padding never reaches the real tokens
    model, saved_config = _load_model(model_dir, cpu=not cuda)
    # mamba_ssm's fused add+RMSNorm and mixer call, on GPU only
    from mamba_align.train.fast import enable_fast_path

    if enable_fast_path(model):
        log.info("mamba_ssm fast path on (fused add+RMSNorm and mixer call)")
    cache = checkpoint_dir / "cache"
    train_ds = _load_rows(job.train, stage, cache)
    eval_ds = _load_rows(job.test, stage, cache) if job.test is not None else None
    args = trl_config(job, accumulation, cuda, eval_ds is not None, dataset_workers(len(train_ds)))
    one_gpu_per_process(args)
    sft_cls, dpo_cls = trainer_classes()
    throughput: dict = {}
    stopper, timer = stop_and_timing_callbacks(checkpoint_dir / STOP_FILE, throughput)
    callbacks = [stopper, timer, progress_callback(stage), non_finite_loss_callback(stage)]
    if stage == "sft":
        trainer = sft_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=callbacks)
    else:
        from accelerate.utils import parse_flag_from_env

        # Precomputed, the reference is the policy before its first step (TRL computes the log-probs in __init__,
        # before a checkpoint is loaded); under FSDP TRL would load a reference of its own, without the fast path
        precompute = recipe.precompute_ref_log_probs
        ref_model = None
        if not (precompute and job.ref_model == job.model and not parse_flag_from_env("ACCELERATE_USE_FSDP")):
            ref_model, _ = _load_model(job.ref_model, cpu=not cuda)
            enable_fast_path(ref_model)
        log.info("dpo: reference log-probs %s", "precomputed before the first step" if precompute
                 else "from a reference forward at every step")
        trainer = dpo_cls(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                          eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
                          max_prompt_length=recipe.max_prompt_length)
        if precompute and ref_model is not None:
            trainer.ref_model = ref_model = None  # its log-probs are in the datasets now: its memory goes back
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # LogAndTime logs instead (one format, to the rule's log)
    resume = last_complete_checkpoint(checkpoint_dir)
    log.info("%s: %d processes x %d per device x %d accumulation = global batch %d; %s", stage, job.num_processes,
             recipe.per_device_train_batch_size, accumulation, recipe.global_batch_size,
             f"resuming from {resume}" if resume else "starting from scratch")
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    if optim != recipe.optim:
        log.info("optimizer: the recipe's %s runs as %s (the same update, one fused kernel)", recipe.optim, optim)
    previous = on_signals(stopper.handle)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        restore_signals(previous)
    throughput["tokens1"] = trainer.read_num_input_tokens()
    if stopper.stopped:
        if trainer.accelerator.is_main_process:
            log.warning("stopped early with a checkpoint in %s; exiting %d so the job is retried",
                        checkpoint_dir, PREEMPTED_EXIT_CODE)
        leave_process_group()
        exit_preempted()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_ds is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()

    peaks = None
    if cuda:  # [allocated, reserved] of every rank (a collective: every rank)
        mine = torch.tensor([[torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]],
                            dtype=torch.float64, device=trainer.args.device)
        peaks = [[round(b / 2**30, 2) for b in rank] for rank in trainer.accelerator.gather(mine).tolist()]
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective under FSDP: every rank
    leave_process_group()  # the last collective
    if not trainer.accelerator.is_main_process:
        return {}
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.config.use_cache = True
    if saved_config["use_mambapy"] is not None:
        unwrapped.config.use_mambapy = saved_config["use_mambapy"]  # the base's value, not the CPU switch
    with atomic_path(job.out) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    metrics = _metrics(stage, trainer, recipe, throughput, job.num_processes, accumulation, resume, started, peaks,
                       dict(model_dir=str(model_dir), ref_model_dir=job.ref_model and str(job.ref_model),
                            train_path=str(job.train), test_path=job.test and str(job.test)))
    write_json(job.metrics, metrics)
    log.info("%s done: %s", stage, json.dumps(metrics["final"]))
    return metrics


def leave_process_group() -> None:
    """End this rank's part in the process group once every rank is past its last collective (at exit NCCL
    otherwise warns on every run: "destroy_process_group() was not called before program exit")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


FINAL_KEYS = ("loss", "eval_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies", "eval_rewards/margins",
              "mean_token_accuracy", "eval_mean_token_accuracy", "train_loss")


def _metrics(stage, trainer, recipe, throughput, num_processes, accumulation, resume, started, peaks, inputs):
    import torch
    import transformers
    import trl

    history = trainer.state.log_history
    final = {}
    for entry in history:  # the last value of each key
        final.update({k: entry[k] for k in FINAL_KEYS if k in entry})
    steps = throughput.get("steps", [])
    timed = steps[1:] or steps  # the first step includes warm-up (kernels, allocator)
    step_time = sum(timed) / len(timed) if timed else None
    tokens = throughput.get("tokens1", 0) - throughput.get("tokens0", 0)
    return {
        "stage": stage, **inputs, "recipe": as_dict(recipe),
        "num_processes": num_processes, "gradient_accumulation_steps": accumulation,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "global_batch_size": recipe.global_batch_size,
        "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
        "resumed_from": str(resume) if resume else None,
        "global_step": trainer.state.global_step,
        "steps_this_run": throughput.get("step1", 0) - throughput.get("step0", 0),
        "tokens_this_run": tokens,
        "tokens_per_second": tokens / sum(steps) if steps and sum(steps) > 0 else None,
        "seconds_per_step": step_time,
        "step_times_s": [round(t, 4) for t in steps],
        "checkpoint_saves": throughput.get("saves", []),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if peaks else None,
        # per rank: [allocated, reserved by the caching allocator] GiB; reserved is what must fit the GPU
        "peak_gpu_memory_gib_per_rank": peaks,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wall_time_s": time.time() - started,
        "final": final,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "log_history": history,
    }
