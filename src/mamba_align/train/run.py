"""SFT and DPO of Mamba models with TRL's SFTTrainer / DPOTrainer (full fine-tuning).

Each run checkpoints into `checkpoint_dir` (beside, not inside, the output) and a rerun resumes from the
newest complete checkpoint; the model directory appears atomically only when training has finished.
SIGTERM / SIGUSR1 (e.g. Slurm `--signal=TERM@900`, see profiles/README.md) or a file `<checkpoint_dir>/STOP` make the run save a
checkpoint at the end of the current optimizer step and exit with PREEMPTED_EXIT_CODE.

    python -m mamba_align.train.run sft --model M --train T.parquet --test V.parquet --recipe-dir config/recipes/demo \
        --out results/sft --checkpoint-dir results/checkpoints/sft --metrics results/metrics/sft.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mamba_align.train.recipes import OPERATIONAL_KEYS, DPORecipe, SFTRecipe, TrainCommon, as_dict, gradient_accumulation_steps, load_recipe, \
    parse_overrides
from mamba_align.utils import UserError, atomic_path, read_json, setup_logging, write_json

log = logging.getLogger("mamba_align.train.run")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: Snakemake (--retries) resubmits the job, which resumes
STOP_FILE = "STOP"
COLUMNS = {"sft": ("text",), "dpo": ("prompt", "chosen", "rejected")}
# On GPU a recipe's optimizer runs as its fused CUDA kernel where torch has one: the same update in one pass over
# weights, gradients and moments instead of a dozen, with gradient clipping folded into it
# (MambaTrainerMixin._clip_grad_norm); docs/benchmarks.md §1b: SFT step 0.589 -> 0.537 s at 2.8B on an H100.
FUSED_OPTIMIZERS = {"adamw_torch": "adamw_torch_fused"}


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


# ---------------------------------------------------------------------------------------------- checks

LAUNCHED_ENV = "MAMBA_ALIGN_LAUNCHED"  # set for the ranks we start, so they can never relaunch again


def _in_distributed_launch() -> bool:
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    if os.environ.get(LAUNCHED_ENV):
        raise RuntimeError("started by accelerate launch but without LOCAL_RANK/WORLD_SIZE: not relaunching again")
    return False


def _check_model_dir(model_dir, what: str) -> dict:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise UserError(f"{what} {model_dir}: no config.json (expected a transformers checkpoint directory)")
    return json.loads(config.read_text())


def _check_tokenizer(tokenizer, model_dir) -> None:
    if tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer of {model_dir} has no pad token; set one other than eos (e.g. <|padding|>)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer of {model_dir}: pad token id {tokenizer.pad_token_id} equals the eos token id; "
                        "padding is masked from the loss, so the model would never learn to stop")


def _check_columns(path, stage: str) -> None:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise UserError(f"{stage} data file {path} does not exist")
    names = pq.read_schema(path).names
    missing = [c for c in COLUMNS[stage] if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} needed for {stage} "
                        f"(expected {', '.join(COLUMNS[stage])}; found {', '.join(names)})")


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(checkpoint_dir: Path, out_dir: Path, config: dict, recipe: TrainCommon) -> None:
    """Refuse to start a run whose first checkpoint or final model cannot fit on its filesystem (a 2.8B
    checkpoint is 33 GB with AdamW: weights + optimizer state); warn when save_total_limit + 1 checkpoints
    (the newest is written before the oldest goes) and the final model may not."""
    from mamba_align.ops.plan import checkpoint_gb, model_gb, params_from_config

    try:
        params = params_from_config(config)
    except (KeyError, TypeError, ValueError):  # not a Mamba-1 config: no estimate, no check
        return
    one = checkpoint_gb(params, recipe.optim) * 1e9
    final = model_gb(params) * 1e9
    kept = len(list(Path(checkpoint_dir).glob("checkpoint-*")))
    need: dict[int, list] = {}  # filesystem -> [folder, bytes needed at least, bytes needed at peak]
    for path, least, peak in ((checkpoint_dir, one, max(0, recipe.save_total_limit + 1 - kept) * one),
                              (Path(out_dir).parent, final, final)):
        anc = _existing_ancestor(path)
        entry = need.setdefault(anc.stat().st_dev, [anc, 0.0, 0.0])
        entry[1] += least
        entry[2] += peak
    for anc, least, peak in need.values():
        free = shutil.disk_usage(anc).free
        sizes = (f"one checkpoint of this {params / 1e9:.2f}B-parameter model with optim {recipe.optim} is "
                 f"{one / 1e9:.1f} GB (fp32 weights + optimizer state), the final model {final / 1e9:.1f} GB")
        if free < least:
            raise UserError(f"{anc}: {free / 1e9:.1f} GB free, but {sizes}: at least {least / 1e9:.1f} GB are needed "
                            f"there, or a save would fail. Free space, or put results/checkpoints on a larger "
                            f"filesystem (a symlink will do)")
        if free < peak:
            log.warning("%s: %.1f GB free; up to %d checkpoints + the final model need %.1f GB (%s): lower "
                        "save_total_limit or free space before the later saves fail", anc, free / 1e9,
                        recipe.save_total_limit + 1, peak / 1e9, sizes)


def check_memory(config: dict, recipe: TrainCommon, stage: str, num_processes: int, fsdp: bool) -> None:
    """Refuse, before any model loads, a DDP / single-GPU run whose modelled peak (plan.py, fitted to the 2.8B
    measurements) does not fit this GPU, naming the recipe change that makes it fit."""
    import torch

    from mamba_align.ops.plan import memory_fix, params_from_config

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


def _check_length(recipe: TrainCommon, config: dict, model_dir) -> None:
    length = recipe.max_seq_length if isinstance(recipe, SFTRecipe) else recipe.max_length
    name = "max_seq_length" if isinstance(recipe, SFTRecipe) else "max_length"
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):  # Mamba declares none
        if config.get(key) and length > config[key]:
            raise UserError(f"recipe {name} {length} exceeds the model's {key} {config[key]} ({model_dir})")
    if isinstance(recipe, DPORecipe) and recipe.max_prompt_length >= recipe.max_length:
        raise UserError(f"recipe max_prompt_length {recipe.max_prompt_length} must be below "
                        f"max_length {recipe.max_length}")


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last (after model, optimizer, scheduler, RNG states)."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(checkpoint_dir) -> Path | None:
    """Newest complete `checkpoint-N` (a job killed while saving leaves an incomplete one)."""
    done = [c for c in Path(checkpoint_dir).glob("checkpoint-*") if c.name[11:].isdigit() and _complete(c)]
    return max(done, key=lambda c: int(c.name[11:]), default=None)


# May change between resubmissions of one run (e.g. onto other GPUs): they do not change what is learned.


LOCK_FILE = "LOCK"
_held_locks: dict[Path, int] = {}  # checkpoint folder -> open file descriptor holding its flock


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("CONDOR_ID")
    return (f"host {socket.gethostname()} pid {os.getpid()}" + (f" job {job}" if job else "")
            + time.strftime(" since %Y-%m-%d %H:%M:%S"))


def lock_checkpoint_dir(checkpoint_dir: Path) -> None:
    """Hold an exclusive lock on the folder until release_checkpoint_dir or this process ends (the kernel drops
    it when the holder dies, so a killed job leaves no stale lock). Two jobs never write one checkpoint folder:
    the second fails naming the first (host, pid, Slurm/HTCondor job id)."""
    import errno
    import fcntl

    checkpoint_dir = Path(checkpoint_dir).resolve()
    path = checkpoint_dir / LOCK_FILE
    held = _held_locks.get(checkpoint_dir)
    if held is not None:
        try:
            if os.fstat(held).st_ino == path.stat().st_ino:
                return  # this process holds it already (train_sft called twice in one process)
        except FileNotFoundError:
            pass
        release_checkpoint_dir(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{checkpoint_dir} is being written by {holder}; two jobs must not train into one "
                        f"checkpoint folder: wait for that job or cancel it") from None
    except OSError as e:  # a filesystem without locks (some Lustre mounts): say so, run unlocked
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            os.close(fd)
            raise
        log.warning("%s: the filesystem does not support locks (%s); not locked", path, e)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder() + "\n").encode(), 0)
    _held_locks[checkpoint_dir] = fd


def release_checkpoint_dir(checkpoint_dir: Path) -> None:
    fd = _held_locks.pop(Path(checkpoint_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def _prepare_checkpoint_dir(checkpoint_dir: Path, stage: str, recipe: TrainCommon) -> None:
    """Outermost process only: lock the folder, refuse another recipe's checkpoints, drop stale stop requests
    and torn saves."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lock_checkpoint_dir(checkpoint_dir)
    run_file = checkpoint_dir / "run.json"
    settings = {k: v for k, v in as_dict(recipe).items() if k not in OPERATIONAL_KEYS}
    run = json.loads(json.dumps({"stage": stage, "recipe": settings}))
    if run_file.exists() and read_json(run_file) != run:
        old = read_json(run_file).get("recipe", {})
        changed = sorted(k for k in set(old) | set(run["recipe"]) if old.get(k) != run["recipe"].get(k))
        raise UserError(f"{checkpoint_dir} holds checkpoints of a {stage} run with other settings "
                        f"({', '.join(changed) or 'stage'}); delete the folder to start afresh, or use another")
    write_json(run_file, run)
    (checkpoint_dir / STOP_FILE).unlink(missing_ok=True)
    for ckpt in checkpoint_dir.glob("checkpoint-*"):
        if not _complete(ckpt):
            log.warning("removing incomplete checkpoint %s (killed while saving)", ckpt)
            shutil.rmtree(ckpt)


# ---------------------------------------------------------------------------------------------- entry

def _train(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir, checkpoint_dir, metrics_path,
           num_processes, fsdp) -> dict:
    from mamba_align.model.kernels import require_kernels

    require_kernels(f"training ({stage})")  # before any model is loaded
    _check_trackers(recipe)
    launched = _in_distributed_launch()
    if launched:
        num_processes = int(os.environ["WORLD_SIZE"])
    accumulation = gradient_accumulation_steps(recipe, num_processes)  # UserError if the batch doesn't divide
    config = _check_model_dir(model_dir, "model")
    if ref_model_dir is not None and Path(ref_model_dir) != Path(model_dir):
        _check_model_dir(ref_model_dir, "reference model")
    _check_length(recipe, config, model_dir)
    for path in (train_path, test_path):
        if path is not None:
            _check_columns(path, stage)
    from transformers import AutoTokenizer

    _check_tokenizer(AutoTokenizer.from_pretrained(model_dir), model_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if launched and not os.environ.get(LAUNCHED_ENV) and int(os.environ.get("RANK", 0)) == 0:
        # started by the user's launcher (one per node, profiles/README.md), not by _relaunch: rank 0 does the
        # outer process's pre-flight (the other ranks wait for it while rank 0 prepares the data)
        _prepare_checkpoint_dir(checkpoint_dir, stage, recipe)
        check_disk(checkpoint_dir, Path(out_dir), config, recipe)
    if not launched:
        _prepare_checkpoint_dir(checkpoint_dir, stage, recipe)
        check_disk(checkpoint_dir, Path(out_dir), config, recipe)
        check_memory(config, recipe, stage, num_processes, fsdp)
        if num_processes > 1:
            return _relaunch(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir,
                             checkpoint_dir, metrics_path, num_processes, fsdp)
    return _run(stage, model_dir, ref_model_dir, train_path, test_path, recipe, Path(out_dir), checkpoint_dir,
                Path(metrics_path), num_processes, accumulation)


def _check_trackers(recipe: TrainCommon) -> None:
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


# torchrun answers SIGTERM by signalling the workers and killing them 30 s later by default; saving a
# 2.8B model with its optimizer state across 8 ranks can take longer.
LAUNCH_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}


def _relaunch(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir, checkpoint_dir,
              metrics_path, num_processes, fsdp) -> dict:
    """Re-run this module under `accelerate launch`; forward SIGTERM/SIGUSR1 to the ranks as the STOP file."""
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
           "-m", "mamba_align.train.run", stage, "--model", str(model_dir), "--train", str(train_path),
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

    previous = _on_signals(forward)
    try:
        log.info("launching: %s", " ".join(cmd))
        # own session: a signal to our process group reaches us, not torchrun (which would kill the ranks
        # 30 s later, maybe mid-save); we pass it on as the STOP file instead
        rc = subprocess.call(cmd, env={**os.environ, LAUNCHED_ENV: "1", **LAUNCH_ENV}, start_new_session=True)
    finally:
        _restore_signals(previous)
    # the ranks exit 75 after a requested stop, which torchrun reports as a failure (1): the STOP file tells
    if signalled or rc == PREEMPTED_EXIT_CODE or (rc != 0 and (checkpoint_dir / STOP_FILE).exists()):
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if rc != 0:
        raise SystemExit(f"training processes failed with exit code {rc} (see the log above)")
    return read_json(metrics_path)


# ---------------------------------------------------------------------------------------------- training

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


def _callbacks(stop_file: Path, throughput: dict):
    """(stop callback, logging + timing callback). The stop callback sets `.stopped` when it stopped training."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """SIGTERM/SIGUSR1 or the STOP file: all ranks agree, save a checkpoint at this step's end, stop."""

        def __init__(self):
            self.requested = self.stopped = False

        def handle(self, signum, _frame):
            log.warning("received signal %d: will checkpoint at the end of this step", signum)
            self.requested = True

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.requested or stop_file.exists()
            if dist.is_available() and dist.is_initialized():  # every rank must stop at the same step
                flag = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                log.warning("stop requested: saving a checkpoint at step %d, then exiting", state.global_step)
                self.stopped = control.should_save = control.should_training_stop = True

    class LogAndTime(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                log.info("step %d: %s", state.global_step, json.dumps(logs, default=str))

        # Step times: on GPU from CUDA events recorded at each step's end (in stream order, read at the end of
        # training: no step waits for the GPU to be timed, and the time between steps counts), else CPU clocks.
        def on_train_begin(self, args, state, control, **kwargs):
            throughput.update(step0=state.global_step, tokens0=state.num_input_tokens_seen, steps=[])
            self.events = []
            self._record()

        def on_step_begin(self, args, state, control, **kwargs):
            throughput["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and torch.cuda.is_available():
                torch.cuda.synchronize()  # so that on_save times the save alone
            throughput["t_end"] = time.perf_counter()
            if not self._record():
                throughput["steps"].append(throughput["t_end"] - throughput["t"])

        def _record(self) -> bool:
            if not torch.cuda.is_available():
                return False
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
            return True

        def on_save(self, args, state, control, **kwargs):
            # a 2.8B checkpoint (fp32 weights + optimizer state) is tens of GB: say how long it took
            seconds = time.perf_counter() - throughput.get("t_end", time.perf_counter())
            throughput.setdefault("saves", []).append({"step": state.global_step, "seconds": round(seconds, 1)})
            if state.is_world_process_zero:
                log.info("checkpoint-%d saved in %.1f s", state.global_step, seconds)

        def on_train_end(self, args, state, control, **kwargs):
            if self.events:
                self.events[-1].synchronize()
                throughput["steps"] = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])]
            throughput.update(step1=state.global_step)

    return StopOnSignal(), LogAndTime()


def _progress_callback(stage: str):
    """At every logging step (rank 0): step i/N, loss, tokens/s since the last log, elapsed and ETA."""
    from transformers import TrainerCallback

    from mamba_align.utils import format_duration

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()
            self.step0 = state.global_step  # a resumed run's rate counts only this run's steps
            self.last = (self.t0, state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return  # evaluation and the final summary have lines of their own
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            elapsed = now - self.t0
            done = state.global_step - self.step0
            eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
            rate = (tokens - self.last[1]) / (now - self.last[0]) if now > self.last[0] else 0.0
            self.last = (now, tokens)
            pct = 100.0 * state.global_step / state.max_steps if state.max_steps else 0.0
            log.info("%s progress: step %d/%d (%.1f%%) | loss %.4f | %s tokens/s | elapsed %s | ETA %s", stage,
                     state.global_step, state.max_steps, pct, logs["loss"], f"{rate:,.0f}",
                     format_duration(elapsed), format_duration(eta))

    return Progress()


def _on_signals(handler) -> dict:
    """Install `handler` for SIGTERM and SIGUSR1; returns the previous handlers (for _restore_signals)."""
    previous = {}
    for s in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: the STOP file still works
            log.warning("cannot install a handler for signal %d outside the main thread", s)
    return previous


def _restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


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


def _trainer_classes():
    import torch
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

    class MambaSFTTrainer(MambaTrainerMixin, SFTTrainer):
        # With the fast path, the loss is the model's own chunked one (fast.py: one Triton kernel per chunk for
        # loss, gradient, entropy and top-1), not TRL's fused LM head on top of it (which recomputes the logits in
        # backward), and TRL's per-micro-batch metrics (entropy, token accuracy, token count: three read-backs
        # from the GPU between forward and backward) stay on the device until the next log: the same numbers.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from accelerate.utils import DistributedType

            from mamba_align.train.fast import fast_path_enabled

            if return_outputs or self.compute_loss_func is not None or self.label_smoother is not None \
                    or self.args.loss_type != "nll" or self.aux_loss_enabled or self._tp_size != 1 \
                    or self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU) \
                    or not fast_path_enabled(self.accelerator.unwrap_model(model)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=inputs["labels"],
                        num_items_in_batch=num_items_in_batch, use_cache=False, token_stats=True)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer.compute_loss: DDP averages
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = torch.tensor(inputs["position_ids"].size(1), device=loss.device)
            pending = self.__dict__.setdefault("_pending_token_stats", {"train": [], "eval": []})
            pending[mode].append(torch.cat([out.token_stats, tokens.float()[None]]))
            return loss

        def _read_token_stats(self, mode):
            """SFTTrainer's per-micro-batch metrics, from the statistics kept on the device: one read-back (and
            one all-reduce across processes, where SFTTrainer gathers every micro-batch)."""
            pending = self.__dict__.get("_pending_token_stats", {}).get(mode)
            if not pending:
                return
            rows = self.accelerator.reduce(torch.stack(pending), reduction="sum").tolist()
            pending.clear()
            for entropy, top1, valid, tokens in rows:
                self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(top1 / valid if valid > 0 else 0.0)
                if mode == "train":
                    self._total_train_tokens += int(tokens)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        def log(self, logs, *args, **kwargs):
            self._read_token_stats("train" if self.model.training else "eval")
            return super().log(logs, *args, **kwargs)

    class MambaDPOTrainer(MambaTrainerMixin, DPOTrainer):
        def __init__(self, *args, max_prompt_length: int, **kwargs):
            self.max_prompt_length = max_prompt_length
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # TRL drops pairs whose prompt alone reaches max_length; TRL 0.7 kept them with the prompt cut
            untruncated = copy.copy(args)
            untruncated.max_length = None
            dataset = super()._prepare_dataset(dataset, processing_class, untruncated, dataset_name)
            return dataset.map(lambda r: truncate_pair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"],
                                                       args.max_length, self.max_prompt_length),
                               desc=f"Truncating {dataset_name} prompts to max_prompt_length")

    return MambaSFTTrainer, MambaDPOTrainer


def _training_args(recipe: TrainCommon, checkpoint_dir: Path, accumulation: int, cuda: bool, has_eval: bool) -> dict:
    from transformers import TrainingArguments

    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    if not has_eval:
        eval_strategy = "no"
    else:
        eval_strategy = "epoch" if recipe.eval_steps is None else "steps"
    return dict(
        output_dir=str(checkpoint_dir), num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps,
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
    )


def _one_gpu_per_process(args) -> None:
    """Without a distributed launch, the Trainer wraps the model in nn.DataParallel when several GPUs are visible
    (TRL refuses it; it would also be slower than DDP): train on the first GPU and say how to use them all."""
    if args.n_gpu > 1:
        log.warning("%d GPUs are visible to one training process: training on %s only. To train on all of them "
                    "(DDP), set the rule's `gpu` resource (or --num-processes) to the GPU count; to choose the GPU, "
                    "set CUDA_VISIBLE_DEVICES", args.n_gpu, args.device)
        args._n_gpu = 1  # what the Trainer sets for a model split across devices: no DataParallel


def _load_rows(path, stage: str, cache_dir: Path):
    from datasets import Dataset

    ds = Dataset.from_parquet(str(path), columns=list(COLUMNS[stage]), cache_dir=str(cache_dir))
    if stage == "sft":
        # The chat template closes each turn with eos then "\n"; drop the trailing newline so TRL does not
        # append a second eos: documents are then joined by exactly one eos when packed.
        ds = ds.map(lambda r: {"text": r["text"].rstrip()}, desc="Stripping trailing whitespace")
    return ds


def _run(stage, model_dir, ref_model_dir, train_path, test_path, recipe, out_dir: Path, checkpoint_dir: Path,
         metrics_path: Path, num_processes: int, accumulation: int) -> dict:
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, SFTConfig

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
    from mamba_align.train.fast import enable_fast_path  # mamba_ssm's fused add+RMSNorm and a chunked LM loss, on GPU only

    if enable_fast_path(model):
        log.info("mamba_ssm fast path on (fused add+RMSNorm, chunked LM loss)")
    cache = checkpoint_dir / "cache"
    train_ds = _load_rows(train_path, stage, cache)
    eval_ds = _load_rows(test_path, stage, cache) if test_path is not None else None
    common = _training_args(recipe, checkpoint_dir, accumulation, cuda, eval_ds is not None)
    sft_cls, dpo_cls = _trainer_classes()
    throughput: dict = {}
    stopper, timer = _callbacks(checkpoint_dir / STOP_FILE, throughput)
    callbacks = [stopper, timer, _progress_callback(stage)]
    if stage == "sft":
        args = SFTConfig(**common, dataset_text_field="text", max_length=recipe.max_seq_length,
                         packing=recipe.packing, packing_strategy="wrapped", completion_only_loss=False)
        _one_gpu_per_process(args)
        trainer = sft_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=callbacks)
    else:
        ref_model = None
        if not (recipe.precompute_ref_log_probs and Path(ref_model_dir) == Path(model_dir)):
            ref_model, _ = _load_model(ref_model_dir, cpu=not cuda)
            enable_fast_path(ref_model)
        args = DPOConfig(**common, beta=recipe.beta, loss_type=[recipe.loss_type], max_length=recipe.max_length,
                         precompute_ref_log_probs=recipe.precompute_ref_log_probs)
        _one_gpu_per_process(args)
        trainer = dpo_cls(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                          eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
                          max_prompt_length=recipe.max_prompt_length)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # LogAndTime logs instead (one format, to the rule's log)
    resume = last_complete_checkpoint(checkpoint_dir)
    log.info("%s: %d processes x %d per device x %d accumulation = global batch %d; %s", stage, num_processes,
             recipe.per_device_train_batch_size, accumulation, recipe.global_batch_size,
             f"resuming from {resume}" if resume else "starting from scratch")
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    if optim != recipe.optim:
        log.info("optimizer: the recipe's %s runs as %s (the same update, one fused kernel)", recipe.optim, optim)
    previous = _on_signals(stopper.handle)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        _restore_signals(previous)
    throughput["tokens1"] = trainer.read_num_input_tokens()
    if stopper.stopped:
        log.warning("stopped early with a checkpoint in %s; exiting %d so the job is retried",
                    checkpoint_dir, PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_ds is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()

    peaks = None
    if cuda:  # [allocated, reserved] of every rank (a collective: every rank)
        mine = torch.tensor([[torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]],
                            dtype=torch.float64, device=trainer.args.device)
        peaks = [[round(b / 2**30, 2) for b in rank] for rank in trainer.accelerator.gather(mine).tolist()]
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective under FSDP: every rank
    if not trainer.accelerator.is_main_process:
        return {}
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.config.use_cache = True
    if saved_config["use_mambapy"] is not None:
        unwrapped.config.use_mambapy = saved_config["use_mambapy"]  # the base's value, not the CPU switch
    with atomic_path(out_dir) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    metrics = _metrics(stage, trainer, recipe, throughput, num_processes, accumulation, resume, started, peaks,
                       dict(model_dir=str(model_dir), ref_model_dir=ref_model_dir and str(ref_model_dir),
                            train_path=str(train_path), test_path=test_path and str(test_path)))
    write_json(metrics_path, metrics)
    log.info("%s done: %s", stage, json.dumps(metrics["final"]))
    return metrics


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


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba_align.train.run", description=__doc__.split("\n\n")[0])
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
    setup_logging(a.log)
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


if __name__ == "__main__":
    main()
