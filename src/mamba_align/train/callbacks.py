"""Trainer callbacks: stop at a signal or the STOP file with a checkpoint, time the steps and saves, log progress,
stop a run whose loss is no longer a number; and the SIGTERM / SIGUSR1 handlers that drive the stop."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

from mamba_align.utils import UserError

log = logging.getLogger(__name__)

# Consecutive logged steps with a NaN / infinite loss (or gradient norm) that stop training. Once the weights are
# NaN no step brings them back; a few steps tell a diverged run from one bad logging window.
NON_FINITE_STEPS = 3


class NonFiniteLoss(UserError):
    """Training diverged: the loss is NaN or infinite. Raised from inside Trainer.train, so no model is saved."""


def stop_and_timing_callbacks(stop_file: Path, throughput: dict):
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
                if state.is_world_process_zero:  # the same on every rank: said once
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


def progress_callback(stage: str):
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


def non_finite_loss_callback(stage: str, limit: int = NON_FINITE_STEPS):
    """Stops training with NonFiniteLoss, naming the step, when the logged loss or gradient norm is NaN or infinite
    at `limit` consecutive logged steps or at the last step (always logged, so always checked). A non-finite
    logged step is not checkpointed: the checkpoints left for a resume are of steps that logged finite numbers.
    Every rank decides the same (the logged loss is the mean over ranks; the flag is reduced anyway)."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def __init__(self):
            self.bad_steps: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.bad_steps = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the model written is the last step's: check its loss

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return  # evaluation and the final summary
            numbers = {k: logs[k] for k in ("loss", "grad_norm") if isinstance(logs.get(k), (int, float))}
            bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
            if dist.is_available() and dist.is_initialized():  # every rank must stop at the same step
                flag = torch.tensor([int(bool(bad))], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = bad or ({"loss": float("nan")} if flag.item() else {})
            if not bad:
                self.bad_steps = []
                return
            self.bad_steps.append(state.global_step)
            control.should_save = False  # no checkpoint of weights that may already be NaN
            what = ", ".join(f"{k} {v}" for k, v in bad.items())
            last = state.global_step >= state.max_steps
            if len(self.bad_steps) >= limit or last:
                steps = ", ".join(map(str, self.bad_steps))
                raise NonFiniteLoss(
                    f"{stage} training stopped at step {state.global_step}/{state.max_steps}: {what} "
                    f"(non-finite at logged step(s) {steps}{', the last step' if last else ''}); no model written. "
                    f"The run diverged: lower learning_rate or max_grad_norm, raise warmup_ratio, or check the data. "
                    f"Checkpoints of earlier finite steps stay in {args.output_dir}.")
            if state.is_world_process_zero:
                log.warning("%s step %d: %s; training stops if %d consecutive logged steps are non-finite", stage,
                            state.global_step, what, limit)

    return StopOnNonFiniteLoss()


def on_signals(handler) -> dict:
    """Install `handler` for SIGTERM and SIGUSR1; returns the previous handlers (for restore_signals)."""
    previous = {}
    for s in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: the STOP file still works
            log.warning("cannot install a handler for signal %d outside the main thread", s)
    return previous


def restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)
