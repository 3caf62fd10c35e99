"""TRL's SFTTrainer / DPOTrainer for Mamba (weight decay, DDP gradients in the all-reduce buckets, fused clipping,
the fast path's loss, deferred token counts, TRL 0.7's DPO truncation) and a recipe's TrainingArguments."""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
from pathlib import Path

from mamba_align.train.job import TrainJob

log = logging.getLogger(__name__)

# On GPU a recipe's optimizer runs as its fused CUDA kernel where torch has one: the same update in one pass over
# weights, gradients and moments instead of a dozen, with gradient clipping folded into it
# (MambaTrainerMixin._clip_grad_norm); docs/benchmarks.md §1b: SFT step 0.589 -> 0.537 s at 2.8B on an H100.
FUSED_OPTIMIZERS = {"adamw_torch": "adamw_torch_fused"}

# TRL prepares the datasets row by row in one process unless told otherwise: 17 s per 4,000 UltraChat-length rows
# in the rehearsal (docs/benchmarks.md §10), ~15 min for UltraChat's 207,865 at every fresh start of a job that
# holds its GPUs meanwhile. The job's CPUs share it, one per ROWS_PER_WORKER rows, at most MAX_WORKERS.
ROWS_PER_WORKER = 1000
MAX_WORKERS = 32


def dataset_workers(rows: int) -> int | None:
    """Processes for TRL's dataset preparation (None: TRL's one): the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(MAX_WORKERS, cpus, rows // ROWS_PER_WORKER)
    return n if n > 1 else None


def _decay_parameter_names(model) -> list[str]:
    """Weight decay only on matrices: not on A_log and D (as mamba_ssm's _no_weight_decay), norms or biases."""
    return [n for n, _ in model.named_parameters()
            if not (n.endswith(("A_log", ".D", "bias")) or any("norm" in part for part in n.split(".")))]


def truncate_pair(prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int) -> dict:
    """TRL >= 1.0 has no max_prompt_length; this is the rule of the TRL 0.7 the handbook ran
    (trl/trainer/utils.py DPODataCollatorWithPadding, default truncation_mode="keep_end"): when the prompt
    plus the longer answer exceed max_length, keep the prompt's last max_prompt_length tokens; if still too
    long, cut both answers to max_length - max_prompt_length."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def _truncate_row(row: dict, max_length: int, max_prompt_length: int) -> dict:
    return truncate_pair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], max_length, max_prompt_length)


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def ref_cache_file(dataset, model_hash: str) -> str:
    """Where TRL's DPOTrainer._precompute_ref_logps caches a dataset's reference log-probs: beside the dataset's
    own cache files (fit keeps them in the run's checkpoint folder), named by the dataset's fingerprint and the
    reference weights' hash (tests/test_precompute_ref.py pins that this is TRL's file)."""
    from datasets.fingerprint import Hasher

    return dataset._get_cache_file_path(Hasher.hash((dataset._fingerprint, model_hash)))


def check_ref_logps(dataset, rows: int, name: str) -> None:
    """Every row has both reference log-probs, finite."""
    import numpy as np

    missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
    if missing or len(dataset) != rows:
        raise RuntimeError(f"reference log-probs of the {name} dataset: {len(dataset)} rows (expected {rows}), "
                           f"missing columns {missing}")
    for column in REF_COLUMNS:
        values = np.asarray(dataset.with_format("numpy")[column], dtype=np.float64)
        if not np.isfinite(values).all():
            raise RuntimeError(f"reference log-probs of the {name} dataset: {column} is not finite in "
                               f"{int((~np.isfinite(values)).sum())} rows")


def drop_unusable_ref_cache(dataset, model_hash: str, name: str) -> None:
    """Remove a cached reference log-probs file that cannot be read or does not hold a finite value for every row
    (datasets writes it to a temporary name and renames it when complete; this also covers a file damaged later),
    so that TRL computes it again instead of training against it."""
    from datasets import Dataset

    path = Path(ref_cache_file(dataset, model_hash))
    if not path.exists():
        return
    try:
        check_ref_logps(Dataset.from_file(str(path)), len(dataset), name)
        log.info("reference log-probs of the %s dataset: reusing %s", name, path)
    except Exception as e:  # noqa: BLE001 - unreadable arrow, wrong rows or values: recompute
        log.warning("reference log-probs of the %s dataset: %s is unusable (%s); computing them again", name, path,
                    e)
        path.unlink()


def _prepare_model_grads_in_buckets(prepare_model, model, *args, **kwargs):
    """accelerate's prepare_model, for DDP with gradients that live in its all-reduce buckets all along.

    DDP otherwise holds the gradients twice, in the parameters' .grad and in its buckets: 10.3 GiB more per GPU at
    the 2.8B shape (docs/benchmarks.md §8). `gradient_as_bucket_view` alone is not enough with gradient
    accumulation: the Trainer sets .grad to None after every step, the micro-batches under no_sync then accumulate
    into new tensors, and the last one copies them into the buckets (both copies alive). So the gradients exist
    before DDP is built (DDP turns them into bucket views) and are zeroed in place instead of dropped."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    training = not kwargs.get("evaluation_mode", False)
    if training:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    wrapped = prepare_model(model, *args, **kwargs)
    if isinstance(wrapped, DistributedDataParallel) and wrapped.gradient_as_bucket_view:
        wrapped.zero_grad = functools.partial(torch.nn.Module.zero_grad, wrapped, set_to_none=False)
    elif training:
        model.zero_grad(set_to_none=True)  # not wrapped in DDP after all: nothing to keep them for
    return wrapped


def tied_parameter_names(model) -> set[str]:
    """Names under which a parameter already named earlier appears again (a tied LM head: lm_head.weight)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def trainer_classes():
    from trl import DPOTrainer, SFTTrainer

    class MambaTrainerMixin:
        def get_decay_parameter_names(self, model):
            return _decay_parameter_names(model)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import DistributedDataParallelKwargs, DistributedType

            if self.accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
                return  # not DDP
            if self.accelerator.ddp_handler is None:
                self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=False)
            self.accelerator.ddp_handler.gradient_as_bucket_view = True
            self.accelerator.prepare_model = functools.partial(_prepare_model_grads_in_buckets,
                                                               self.accelerator.prepare_model)

        def _clip_grad_norm(self, model):
            # With a fused AdamW on one process or DDP (whole gradients on every rank), the clipping scale is
            # applied inside the optimizer's kernel instead of by a pass over the gradients (fast.py)
            from accelerate.utils import DistributedType

            from mamba_align.train.fast import fused_clip_grad_norm_

            norm = None
            if self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU) \
                    and self.accelerator.scaler is None:
                norm = fused_clip_grad_norm_(model.parameters(), getattr(self.optimizer, "optimizer", self.optimizer),
                                             self.args.max_grad_norm)
            return super()._clip_grad_norm(model) if norm is None else norm

        def _get_grad_norm(self, model, grad_norm=None):
            # Without clipping (max_grad_norm 0) the Trainer still logs the norm, through clip_grad_norm_(inf),
            # which also multiplies every gradient by 1: here the norm alone, one pass over the gradients
            from accelerate.utils import DistributedType

            from mamba_align.train.fast import total_grad_norm

            if grad_norm is None and self.accelerator.distributed_type in (DistributedType.NO,
                                                                           DistributedType.MULTI_GPU):
                grad_norm = total_grad_norm(model.parameters())
            return super()._get_grad_norm(model, grad_norm)

        # The Trainer reads the tokens of every micro-batch back from the GPU right after its backward, so the GPU
        # idles while the CPU then clips and launches the optimizer (~16 ms per step at 2.8B on an H100,
        # docs/benchmarks.md §1b). On one process the count stays on the GPU until the next log, save or the end.
        def _track_num_input_tokens(self, inputs):
            mask = inputs.get("attention_mask")
            if self.args.include_num_input_tokens_seen != "non_padding" or mask is None \
                    or self.accelerator.num_processes > 1:
                return super()._track_num_input_tokens(inputs)
            unread = getattr(self, "_unread_tokens", None)
            self._unread_tokens = mask.sum() if unread is None else unread + mask.sum()

        def read_num_input_tokens(self) -> int:
            unread = getattr(self, "_unread_tokens", None)
            if unread is not None:
                self.state.num_input_tokens_seen += int(unread)
                self._unread_tokens = None
            return self.state.num_input_tokens_seen

        def log(self, *args, **kwargs):
            self.read_num_input_tokens()
            return super().log(*args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            self.read_num_input_tokens()
            return super()._save_checkpoint(*args, **kwargs)

        def _issue_warnings_after_load(self, load_result):
            # A tied LM head is saved once, as the embeddings, and comes back through them; transformers calls it
            # missing ("There were missing keys in the checkpoint model loaded: ['lm_head.weight']") at every resume
            tied = tied_parameter_names(self.model)
            return super()._issue_warnings_after_load(
                load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    class MambaSFTTrainer(MambaTrainerMixin, SFTTrainer):
        """SFTTrainer with the mixin: its loss is TRL's (the fused LM head on top of the fast backbone)."""

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            # Tokens and labels row by row in dataset_num_proc processes (the same rows whatever their number);
            # packing in one: TRL packs each map batch, and shards would move the batches' boundaries.
            if packing and args.dataset_num_proc and "input_ids" not in dataset.column_names:
                rowwise = copy.copy(args)
                rowwise.max_length, rowwise.shuffle_dataset = None, False  # no truncation, no shuffle yet
                dataset = super()._prepare_dataset(dataset, processing_class, rowwise, False, formatting_func,
                                                   dataset_name)
                args, formatting_func = copy.copy(args), None
                args.dataset_num_proc = None
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    class MambaDPOTrainer(MambaTrainerMixin, DPOTrainer):
        def __init__(self, *args, max_prompt_length: int, **kwargs):
            self.max_prompt_length = max_prompt_length
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # TRL drops pairs whose prompt alone reaches max_length; TRL 0.7 kept them with the prompt cut
            untruncated = copy.copy(args)
            untruncated.max_length = None
            dataset = super()._prepare_dataset(dataset, processing_class, untruncated, dataset_name)
            # a module-level function and plain arguments: the same fingerprint in every job, so the reference
            # log-probs cached under it are found again on resume (a lambda over the trainer hashes at random)
            return dataset.map(_truncate_row, fn_kwargs={"max_length": args.max_length,
                                                         "max_prompt_length": self.max_prompt_length},
                               num_proc=args.dataset_num_proc,
                               desc=f"Truncating {dataset_name} prompts to max_prompt_length")

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # TRL computes them in __init__, before train() loads a checkpoint: always the initial (SFT) weights,
            # also when resuming. In eval mode, as the per-step reference model runs (the fast path's kernels
            # follow the mode). A cached file that does not hold a finite value for every row is removed first.
            if self.accelerator.is_main_process:
                drop_unusable_ref_cache(dataset, self._precompute_model_hash, name)
            self.accelerator.wait_for_everyone()
            reference = self.ref_model or self.model
            was_training = reference.training
            reference.eval()
            try:
                out = super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                reference.train(was_training)
            check_ref_logps(out, len(dataset), name)
            return out

    return MambaSFTTrainer, MambaDPOTrainer


def trl_config(job: TrainJob, accumulation: int, cuda: bool, has_eval: bool, workers: int | None = None):
    """The job's recipe as TRL's SFTConfig / DPOConfig on this machine, checkpointing into the job's folder. A
    recipe key is the TRL field of the same name, except where noted here (tests/test_train.py pins that for every
    shipped recipe): warmup_ratio, SFT's max_seq_length and DPO's loss_type under TRL's names; global_batch_size as
    the accumulation; bf16 and the fused optimizer on CUDA only; max_prompt_length, which TRL >= 1.0 lacks, by
    MambaDPOTrainer; dataset by the prepare steps. `workers`: dataset_num_proc (dataset_workers), where the job
    runs, not what it learns."""
    from transformers import TrainingArguments
    from trl import DPOConfig, SFTConfig

    stage, recipe = job.stage, job.recipe

    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    if not has_eval:
        eval_strategy = "no"
    else:
        eval_strategy = "epoch" if recipe.eval_steps is None else "steps"
    common = dict(
        output_dir=str(job.checkpoints), num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # transformers 5: a float < 1 is the warmup ratio
        weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
        optim=FUSED_OPTIMIZERS.get(recipe.optim, recipe.optim) if cuda else recipe.optim,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation, **{ckpt: recipe.gradient_checkpointing,
                                                     f"{ckpt}_kwargs": {"use_reentrant": False}},
        bf16=recipe.bf16 and cuda, seed=recipe.seed, use_cpu=not cuda,
        # a progress bar for interactive runs only (a job's log gets the Progress callback's lines instead);
        # live curves to TensorBoard / W&B as the recipe's operational key report_to says
        logging_steps=recipe.logging_steps, logging_first_step=True, disable_tqdm=not sys.stderr.isatty(),
        report_to=list(getattr(recipe, "report_to", [])) or "none",
        save_strategy="steps", save_steps=recipe.save_steps, save_total_limit=recipe.save_total_limit,
        eval_strategy=eval_strategy, eval_steps=recipe.eval_steps,
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        # the Trainer's default drops inf/nan losses from the logged mean (hiding them), reading every micro-batch's
        # loss back from the GPU to do so; a diverged run must show in its log
        logging_nan_inf_filter=False,
        # the next batch's copy to the GPU does not wait for the optimizer step: the trainer prepares that batch
        # (collation, pinning: ~7 ms per step at 2.8B) while the GPU still updates the weights
        dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
        dataset_num_proc=workers,
    )
    if stage == "sft":
        return SFTConfig(**common, dataset_text_field="text", max_length=recipe.max_seq_length,
                         packing=recipe.packing, packing_strategy="wrapped", completion_only_loss=False)
    return DPOConfig(**common, beta=recipe.beta, loss_type=[recipe.loss_type], max_length=recipe.max_length,
                     precompute_ref_log_probs=recipe.precompute_ref_log_probs)  # a bool in every job


def one_gpu_per_process(args) -> None:
    """Without a distributed launch, the Trainer wraps the model in nn.DataParallel when several GPUs are visible
    (TRL refuses it; it would also be slower than DDP): train on the first GPU and say how to use them all."""
    if args.n_gpu > 1:
        log.warning("%d GPUs are visible to one training process: training on %s only. To train on all of them "
                    "(DDP), set the rule's `gpu` resource (or --num-processes) to the GPU count; to choose the GPU, "
                    "set CUDA_VISIBLE_DEVICES", args.n_gpu, args.device)
        args._n_gpu = 1  # what the Trainer sets for a model split across devices: no DataParallel
