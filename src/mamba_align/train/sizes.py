"""Sizes of a training run: parameters of a Mamba-1 config, disk for its checkpoints and final model, and peak
GPU memory per device (a model fitted to measured peaks). Training checks them before it starts (preflight.py);
the plan (ops/reporting/plan.py) sizes jobs with them."""

from __future__ import annotations

import math

# Optimizer state bytes per parameter (fp32): AdamW two moments, RMSprop one, Adafactor factored (~0).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "rmsprop": 4, "sgd": 4, "adagrad": 4, "adafactor": 0}
# The model size the measurements here and in ops/reporting/plan.py were taken at (the 2.8B shape).
REF_PARAMS = 2.77e9
# Peak training memory per GPU (allocated) as the recipes run, with gradient accumulation and DDP (gradients kept
# between micro-batches, inside DDP's all-reduce buckets): fp32 weights and gradients (8 bytes per parameter), the
# optimizer's state, a fixed part (LM-head chunks, kernel workspaces) and activations per token, both scaled by
# the model's size. Fitted to the 2.8B-shape peaks of docs/benchmarks.md section 8 (runs N and O, 2 x H200) and
# issue #17's table: SFT without checkpointing, AdamW, 2 x 2,048 tokens per device 64.39 GiB (DDP on 2 GPUs; 64.37
# on 1 GPU), 4 x 2,048 81.2 GiB (1 GPU); DPO with checkpointing, RMSprop, 2 pairs x 2 x 1,024 tokens, the fp32
# reference model on the GPU, 51.67 GiB (DDP on 2 GPUs; 51.63 on 1 GPU).
WEIGHT_AND_GRAD_BYTES = 8
_GIB_PER_PARAM = REF_PARAMS / 2**30
ACT_GIB_PER_TOKEN = (81.2 - 64.39) / 4096  # at REF_PARAMS, without checkpointing
FIXED_GIB = 64.39 - 16 * _GIB_PER_PARAM - ACT_GIB_PER_TOKEN * 4096
ACT_GIB_PER_TOKEN_CHECKPOINTED = (51.67 - (12 + 4) * _GIB_PER_PARAM - FIXED_GIB) / 4096
# A job is planned to fit when its modelled peak stays below this share of the GPU's memory (76 GiB of 80): the
# caching allocator reserves more than it hands out (up to 7 GiB more in the DPO runs) and the model is fitted.
MEMORY_FRACTION = 0.95


def params_from_config(c: dict) -> float:
    """Parameter count of a Mamba-1 model from a mamba_ssm or transformers config."""
    d = c.get("d_model") or c["hidden_size"]
    layers = c.get("n_layer") or c["num_hidden_layers"]
    vocab = c["vocab_size"]
    n = (c.get("ssm_cfg") or {}).get("d_state") or c.get("state_size", 16)
    e = c.get("intermediate_size") or 2 * d
    r = c.get("time_step_rank") or math.ceil(d / 16)
    per_layer = d * 2 * e + e * 5 + e * (r + 2 * n) + r * e + e + e * n + e + e * d + d
    return float(layers * per_layer + vocab * d + d)


def checkpoint_gb(params: float, optim: str) -> float:
    """One resumable checkpoint: fp32 weights + optimizer state (measured at 2.77B: 33.2 GB with AdamW, 22.15 GB
    with RMSprop)."""
    return params * (4 + optimizer_state_bytes(optim)) / 1e9


def optimizer_state_bytes(optim: str) -> int:
    """Optimizer state bytes per parameter (a transformers `optim` name; unknown ones count as AdamW)."""
    return next((b for name, b in OPTIMIZER_STATE_BYTES.items() if optim.lower().startswith(name)), 8)


def model_gb(params: float) -> float:
    """The final model: fp32 weights."""
    return params * 4 / 1e9


def checkpoints_at_peak(recipe: dict, kept: int = 0, done_step: int = 0) -> int:
    """The most checkpoints a run holds at once: save_total_limit + the one being written (the Trainer deletes the
    oldest only after the new one is saved), or fewer where the run has fewer saves ahead (max_steps, save_steps,
    `kept` checkpoints already there, the last at `done_step`). A run measured in epochs is taken to reach the limit
    (the recipes' do: hundreds of steps, a save every 50-200)."""
    most = recipe.get("save_total_limit", 2) + 1
    max_steps, every = recipe.get("max_steps", -1), recipe.get("save_steps", 100)
    if max_steps <= 0:
        return most
    ahead = -(-max_steps // every) - done_step // every  # the last step saves too
    return min(most, kept + max(0, ahead))


def disk_gb(params: float, recipe: dict) -> float:
    """Peak disk of one training stage: the checkpoints it holds at once (checkpoints_at_peak) + the final fp32
    model."""
    return checkpoints_at_peak(recipe) * checkpoint_gb(params, recipe.get("optim", "adamw_torch")) + model_gb(params)


def train_memory_gib(params: float, tokens_per_device_batch: int, checkpointing: bool,
                     optim: str = "adamw_torch") -> float:
    """Modelled peak GiB per GPU of a training job (without a reference model)."""
    per_token = ACT_GIB_PER_TOKEN_CHECKPOINTED if checkpointing else ACT_GIB_PER_TOKEN
    static = (WEIGHT_AND_GRAD_BYTES + optimizer_state_bytes(optim)) * params / 2**30
    return static + (FIXED_GIB + per_token * tokens_per_device_batch) * params / REF_PARAMS


def stage_memory_gib(params: float, recipe: dict, stage: str, per_device: int | None = None,
                     checkpointing: bool | None = None) -> float:
    """train_memory_gib for a recipe of `stage` (sft/dpo), optionally with another per-device batch or
    checkpointing; DPO counts the fp32 reference model unless its log-probs are precomputed."""
    per_device = recipe["per_device_train_batch_size"] if per_device is None else per_device
    checkpointing = recipe["gradient_checkpointing"] if checkpointing is None else checkpointing
    seq = recipe["max_seq_length"] if stage == "sft" else recipe["max_length"] * 2  # chosen + rejected
    mem = train_memory_gib(params, per_device * seq, checkpointing, recipe.get("optim", "adamw_torch"))
    if stage == "dpo" and not recipe.get("precompute_ref_log_probs"):
        mem += params * 4 / 2**30
    return mem


def memory_fix(params: float, recipe: dict, stage: str, gpus: int, mem_gib: float) -> str | None:
    """None when the stage fits a GPU of `mem_gib`; else what to change in the recipe (the largest per-device
    batch that fits and still divides the global batch, or gradient checkpointing)."""
    limit = MEMORY_FRACTION * mem_gib
    peak = stage_memory_gib(params, recipe, stage)
    if peak <= limit:
        return None
    per_gpu = recipe.get("global_batch_size", 0) // max(1, gpus)
    for b in range(recipe["per_device_train_batch_size"] - 1, 0, -1):
        if (not per_gpu or per_gpu % b == 0) and (m := stage_memory_gib(params, recipe, stage, per_device=b)) <= limit:
            return (f"modelled peak {peak:.1f} GiB per GPU exceeds {limit:.0f} of the GPU's {mem_gib} GiB: set "
                    f"per_device_train_batch_size: {b} ({m:.1f} GiB; the global batch stays, by accumulation)")
    if not recipe["gradient_checkpointing"] and \
            (m := stage_memory_gib(params, recipe, stage, per_device=1, checkpointing=True)) <= limit:
        return (f"modelled peak {peak:.1f} GiB per GPU exceeds {limit:.0f} of the GPU's {mem_gib} GiB: set "
                f"gradient_checkpointing: true and per_device_train_batch_size: 1 ({m:.1f} GiB)")
    return (f"modelled peak {peak:.1f} GiB per GPU exceeds {limit:.0f} of the GPU's {mem_gib} GiB even at "
            "per-device batch 1: a GPU with more memory, or a sharded run (--fsdp) is needed")
