"""SFT and DPO of Mamba models with TRL's SFTTrainer / DPOTrainer (full fine-tuning).

Each run checkpoints into `checkpoint_dir` (beside, not inside, the output) and a rerun resumes from the
newest complete checkpoint; the model directory appears atomically only when training has finished.
SIGTERM / SIGUSR1 (e.g. Slurm `--signal=TERM@900`, see profiles/README.md) or a file `<checkpoint_dir>/STOP` make
the run save a checkpoint at the end of the current optimizer step and exit with PREEMPTED_EXIT_CODE.

    mamba-align train sft --model M --train T.parquet --test V.parquet --recipe-dir config/recipes/demo \
        --out results/sft --checkpoint-dir results/checkpoints/sft --metrics results/metrics/sft.json

`python -m mamba_align.train` runs the same (train/__main__.py): what the accelerate relaunch starts on each rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

from mamba_align.process import terminate_with_this_process
from mamba_align.train.batch import batch_layout
from mamba_align.train.callbacks import on_signals, restore_signals
from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, STOP_FILE, exit_preempted, prepare_checkpoint_dir
from mamba_align.train.fit import fit
from mamba_align.train.preflight import (
    check_columns,
    check_disk,
    check_length,
    check_memory,
    check_model_dir,
    check_tokenizer,
    check_trackers,
)
from mamba_align.train.recipes import (
    DPORecipe,
    SFTRecipe,
    as_dict,
    load_recipe,
    parse_overrides,
    precompute_ref_log_probs,
)
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


def train_sft(model_dir, train_path, test_path, recipe: SFTRecipe, out_dir, checkpoint_dir, metrics_path,
              num_processes: int = 1, fsdp: bool = False) -> dict:
    """Supervised fine-tuning on `text` rows, packed into max_seq_length rows; returns the metrics."""
    return _train("sft", model_dir, None, train_path, test_path, recipe, out_dir, checkpoint_dir, metrics_path,
                  num_processes, fsdp)


def train_dpo(model_dir, ref_model_dir, train_path, test_path, recipe: DPORecipe, out_dir, checkpoint_dir,
              metrics_path, num_processes: int = 1, fsdp: bool = False) -> dict:
    """DPO on `prompt`/`chosen`/`rejected` rows against the frozen reference model; returns the metrics."""
    return _train("dpo", model_dir, ref_model_dir or model_dir, train_path, test_path, recipe, out_dir,
                  checkpoint_dir, metrics_path, num_processes, fsdp)


def _train(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir, checkpoint_dir, metrics_path,
           num_processes, fsdp) -> dict:
    from mamba_align.model.kernels import require_kernels

    require_kernels(f"training ({stage})")  # before any model is loaded
    check_trackers(recipe)
    if stage == "dpo" and recipe.precompute_ref_log_probs is None:  # a recipe read without a config
        recipe = dataclasses.replace(recipe, precompute_ref_log_probs=precompute_ref_log_probs(recipe))
    launched = _in_distributed_launch()
    if launched:
        num_processes = int(os.environ["WORLD_SIZE"])
    # the recipe's global batch on any count that divides it (UserError naming the nearest that do otherwise)
    per_device, accumulation = batch_layout(recipe.global_batch_size, recipe.per_device_train_batch_size,
                                            num_processes)
    if per_device != recipe.per_device_train_batch_size:
        log.info("%d processes: per-device batch %d (the recipe's %d does not divide the %d rows each takes per "
                 "step)", num_processes, per_device, recipe.per_device_train_batch_size,
                 recipe.global_batch_size // num_processes)
        recipe = dataclasses.replace(recipe, per_device_train_batch_size=per_device)
    config = check_model_dir(model_dir, "model")
    if ref_model_dir is not None and Path(ref_model_dir) != Path(model_dir):
        check_model_dir(ref_model_dir, "reference model")
    check_length(recipe, config, model_dir)
    for path in (train_path, test_path):
        if path is not None:
            check_columns(path, stage)
    from transformers import AutoTokenizer

    check_tokenizer(AutoTokenizer.from_pretrained(model_dir), model_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if launched and not os.environ.get(LAUNCHED_ENV) and int(os.environ.get("RANK", 0)) == 0:
        # started by the user's launcher (one per node, profiles/README.md), not by _relaunch: rank 0 does the
        # outer process's pre-flight (the other ranks wait for it while rank 0 prepares the data)
        prepare_checkpoint_dir(checkpoint_dir, stage, recipe)
        remove_leftovers(out_dir)
        check_disk(checkpoint_dir, Path(out_dir), config, recipe)
    if not launched:
        prepare_checkpoint_dir(checkpoint_dir, stage, recipe)
        remove_leftovers(out_dir)  # a killed run's partial model (GBs): before the disk check counts the space
        check_disk(checkpoint_dir, Path(out_dir), config, recipe)
        check_memory(config, recipe, stage, num_processes, fsdp)
        if num_processes > 1:
            return _relaunch(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir,
                             checkpoint_dir, metrics_path, num_processes, fsdp)
    metrics = fit(stage, model_dir, ref_model_dir, train_path, test_path, recipe, Path(out_dir), checkpoint_dir,
                  Path(metrics_path), num_processes, accumulation)
    if metrics:  # the process that saved the model: readable by the project group, as the base model
        follow_umask(out_dir)
    return metrics


def _in_distributed_launch() -> bool:
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    if os.environ.get(LAUNCHED_ENV):
        raise RuntimeError("started by accelerate launch but without LOCAL_RANK/WORLD_SIZE: not relaunching again")
    return False


def _relaunch(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir, checkpoint_dir,
              metrics_path, num_processes, fsdp) -> dict:
    """Re-run `python -m mamba_align.train` under `accelerate launch`; forward SIGTERM/SIGUSR1 to the ranks as
    the STOP file."""
    import torch
    import yaml

    recipe_dir = checkpoint_dir / "launch"  # the resolved recipe, read back by every rank
    recipe_dir.mkdir(parents=True, exist_ok=True)
    (recipe_dir / f"{stage}.yaml").write_text(yaml.safe_dump(as_dict(recipe), sort_keys=False))
    cuda = torch.cuda.is_available()
    if fsdp:
        # FSDP1 wrapping each MambaBlock; sharded checkpoints for resume, a full state dict for the output
        dist = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
                "MambaBlock", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_use_orig_params", "true",
                "--fsdp_sync_module_states", "true"]
    else:
        dist = ["--multi_gpu"]  # torch.distributed.run underneath; on a machine without CUDA, gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "bf16" if recipe.bf16 and cuda else "no", *dist,
           "-m", "mamba_align.train", stage, "--model", str(model_dir), "--train", str(train_path),
           "--recipe-dir", str(recipe_dir), "--out", str(out_dir), "--checkpoint-dir", str(checkpoint_dir),
           "--metrics", str(metrics_path), "--num-processes", str(num_processes)]
    if test_path is not None:
        cmd += ["--test", str(test_path)]
    if stage == "dpo":
        cmd += ["--ref-model", str(ref_model_dir)]
    log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if log_files:  # the ranks log to the rule's log file too
        cmd += ["--log", log_files[0]]
    signalled = []

    def forward(signum, _frame):
        log.warning("signal %d: asking the %d ranks to checkpoint and stop", signum, num_processes)
        signalled.append(signum)
        (checkpoint_dir / STOP_FILE).touch()

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
    if signalled or rc == PREEMPTED_EXIT_CODE or (rc != 0 and (checkpoint_dir / STOP_FILE).exists()):
        exit_preempted()
    if rc != 0:
        raise SystemExit(f"training processes failed with exit code {rc} (see the log above)")
    return read_json(metrics_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-align train", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["sft", "dpo"])
    p.add_argument("--model", required=True, help="transformers checkpoint directory (with tokenizer)")
    p.add_argument("--ref-model", help="DPO reference model directory (default: --model)")
    p.add_argument("--train", required=True, help="train.parquet from the prepare step")
    p.add_argument("--test", help="test.parquet (evaluated once per epoch or every eval_steps)")
    p.add_argument("--recipe-dir", required=True, help="folder holding <stage>.yaml, e.g. config/recipes/demo")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="recipe override, repeatable (e.g. max_steps=10, dataset.revision=abc)")
    p.add_argument("--out", required=True, help="final model directory (written atomically)")
    p.add_argument("--checkpoint-dir", required=True, help="resumable checkpoints, beside the output")
    p.add_argument("--metrics", required=True, help="metrics JSON")
    p.add_argument("--num-processes", type=int, default=1, help="GPUs; >1 relaunches with accelerate")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP when multi-GPU")
    p.add_argument("--log", help="also log to this file")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    # a rank dies with its launcher; the attempt (header, end, SIGTERM logged) is the outer process's, or rank 0's
    # under a launcher of the user's (one per node, profiles/README.md)
    rank = "LOCAL_RANK" in os.environ
    outer = not rank or (not os.environ.get(LAUNCHED_ENV) and os.environ.get("RANK") == "0")
    setup_logging(a.log, attempt=outer, die_with_parent=rank or None)
    try:
        recipe = load_recipe(a.recipe_dir, a.stage, parse_overrides(a.override))
        if a.stage == "sft":
            train_sft(a.model, a.train, a.test, recipe, a.out, a.checkpoint_dir, a.metrics, a.num_processes, a.fsdp)
        else:
            train_dpo(a.model, a.ref_model, a.train, a.test, recipe, a.out, a.checkpoint_dir, a.metrics,
                      a.num_processes, a.fsdp)
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
