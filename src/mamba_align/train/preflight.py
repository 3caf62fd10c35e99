"""Checks before any GPU time is spent: the model and reference model directories, the tokenizer's pad token,
the data's columns, the sequence length, the trackers in report_to, the disk for checkpoints and the GPU's memory
(the sizes from sizes.py). Each names the file, key or column at fault and what was expected."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mamba_align.train.checkpoints import checkpoint_step, last_complete_checkpoint
from mamba_align.train.recipes import DPORecipe, SFTRecipe, TrainCommon, as_dict
from mamba_align.train.sizes import checkpoint_gb, checkpoints_at_peak, memory_fix, model_gb, params_from_config
from mamba_align.utils import UserError

log = logging.getLogger(__name__)

COLUMNS = {"sft": ("text",), "dpo": ("prompt", "chosen", "rejected")}


def check_model_dir(model_dir, what: str) -> dict:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise UserError(f"{what} {model_dir}: no config.json (expected a transformers checkpoint directory)")
    return json.loads(config.read_text())


def check_tokenizer(tokenizer, model_dir) -> None:
    if tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer of {model_dir} has no pad token; set one other than eos (e.g. <|padding|>)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer of {model_dir}: pad token id {tokenizer.pad_token_id} equals the eos token id; "
                        "padding is masked from the loss, so the model would never learn to stop")


def check_columns(path, stage: str) -> None:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise UserError(f"{stage} data file {path} does not exist")
    names = pq.read_schema(path).names
    missing = [c for c in COLUMNS[stage] if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} needed for {stage} "
                        f"(expected {', '.join(COLUMNS[stage])}; found {', '.join(names)})")


def check_length(recipe: TrainCommon, config: dict, model_dir) -> None:
    length = recipe.max_seq_length if isinstance(recipe, SFTRecipe) else recipe.max_length
    name = "max_seq_length" if isinstance(recipe, SFTRecipe) else "max_length"
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):  # Mamba declares none
        if config.get(key) and length > config[key]:
            raise UserError(f"recipe {name} {length} exceeds the model's {key} {config[key]} ({model_dir})")
    if isinstance(recipe, DPORecipe) and recipe.max_prompt_length >= recipe.max_length:
        raise UserError(f"recipe max_prompt_length {recipe.max_prompt_length} must be below "
                        f"max_length {recipe.max_length}")


def check_trackers(recipe: TrainCommon) -> None:
    """report_to's integrations are importable (else transformers fails after the model is loaded)."""
    import importlib.util

    listed = getattr(recipe, "report_to", [])
    if "tensorboard" in listed and importlib.util.find_spec("tensorboard") is None:
        # the default (and a project dependency): a stripped-down environment trains without the curves
        log.warning("tensorboard is not installed: no TensorBoard curves (pip install tensorboard)")
        recipe.report_to = [x for x in listed if x != "tensorboard"]
    for name in ("wandb", "mlflow", "trackio"):
        if name in listed and importlib.util.find_spec(name) is None:
            raise UserError(f"recipe report_to lists {name}, which is not installed: pip install {name} "
                            f"(or remove it from recipe_overrides.<stage>.report_to)")


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(checkpoint_dir: Path, out_dir: Path, config: dict, recipe: TrainCommon) -> None:
    """Refuse to start a run whose checkpoints or final model will not fit on their filesystem: a 2.8B checkpoint
    is 33 GB with AdamW (weights + optimizer state), and a save that finds the disk full fails the job, at every
    rerun, after the GPU time up to it (the rehearsal's SFT did: docs/benchmarks.md)."""
    try:
        params = params_from_config(config)
    except (KeyError, TypeError, ValueError):  # not a Mamba-1 config: no estimate, no check
        return
    one = checkpoint_gb(params, recipe.optim) * 1e9
    final = model_gb(params) * 1e9
    # prepare_checkpoint_dir has dropped torn saves: what is there is complete
    kept = len(list(Path(checkpoint_dir).glob("checkpoint-*")))
    last = last_complete_checkpoint(checkpoint_dir)
    held = checkpoints_at_peak(as_dict(recipe), kept, checkpoint_step(last) if last else 0)
    need: dict[int, list] = {}  # filesystem -> [folder, bytes still to be written at the peak]
    for path, peak in ((checkpoint_dir, max(0, held - kept) * one), (Path(out_dir).parent, final)):
        anc = _existing_ancestor(path)
        entry = need.setdefault(anc.stat().st_dev, [anc, 0.0])
        entry[1] += peak
    for anc, peak in need.values():
        free = shutil.disk_usage(anc).free
        if free >= peak:
            continue
        raise UserError(
            f"{anc}: {free / 1e9:.1f} GB free, but this run needs {peak / 1e9:.1f} GB more there: it will hold up to "
            f"{held} checkpoints at once ({kept} there now; save_total_limit {recipe.save_total_limit} + the one "
            f"being written, a save every {recipe.save_steps} steps) and then the final model; one checkpoint of this "
            f"{params / 1e9:.2f}B-parameter model with optim {recipe.optim} is {one / 1e9:.1f} GB (fp32 weights + "
            f"optimizer state), the final model {final / 1e9:.1f} GB. Lower save_total_limit or raise save_steps "
            f"(operational: nothing reruns), free space, or put results/checkpoints on a larger filesystem (a "
            f"symlink will do)")


def check_memory(config: dict, recipe: TrainCommon, stage: str, num_processes: int, fsdp: bool) -> None:
    """Refuse, before any model loads, a DDP / single-GPU run whose modelled peak (sizes.py, fitted to the 2.8B
    measurements) does not fit this GPU, naming the recipe change that makes it fit."""
    import torch

    if fsdp or not torch.cuda.is_available():
        return
    try:
        params = params_from_config(config)
    except (KeyError, TypeError, ValueError):  # not a Mamba-1 config: no estimate, no check
        return
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    fix = memory_fix(params, as_dict(recipe), stage, num_processes, round(total, 1))
    if fix:
        raise UserError(f"{stage} on {torch.cuda.get_device_name(0)}: {fix}")
