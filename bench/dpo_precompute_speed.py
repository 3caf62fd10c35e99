"""DPO with the reference forward at every step against precomputed reference log-probs (issue #33), through the
pipeline's own train_dpo, on one GPU at the Mamba-2.8B shape with random weights and synthetic preference pairs.

Each repetition trains the same steps from the same weights on the same rows twice, alternating: per-step
reference first, then precomputed (3 repetitions by default). Per run: tokens/s of the training steps, the
precompute pass's time (and the hash of the reference weights TRL keys its cache by) separately, tokens/s with
that time amortised over the measured steps (one pass over the rows, as one epoch) and over the recipe's epochs,
and the loss, rewards and margin of every step; per repetition the largest difference of the per-step losses.

The optimizer step is the recipe's per GPU: its per-device batch and the accumulation it has on
--recipe-gpus GPUs (zephyr-7b-beta: 2 pairs x 2 accumulation on 8 GPUs, so 4 pairs per step here); override with
--per-device-batch / --accumulation. Its optimizer, beta, max_length, max_prompt_length and checkpointing.

    python3 bench/dpo_precompute_speed.py                       # GPU: 2.8B, 30 steps x 3 repetitions (~7 min)
    python3 bench/dpo_precompute_speed.py --tiny --device cpu   # CPU smoke run (~1 min)

JSON to --out, else $OUT/dpo_precompute_speed.json (and stdout).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape and lengths (CPU smoke run)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--recipe", default=str(HERE.parent / "config" / "recipes" / "zephyr-7b-beta"),
                   help="recipe folder whose dpo.yaml gives batch, accumulation, optimizer, beta, lengths")
    p.add_argument("--recipe-gpus", type=int, default=8, help="GPUs the recipe's accumulation is taken for")
    p.add_argument("--per-device-batch", type=int, default=0, help="pairs per micro-batch (default: the recipe's)")
    p.add_argument("--accumulation", type=int, default=0, help="micro-batches per step (default: the recipe's)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default 30; --tiny 3)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the pair of runs")
    p.add_argument("--prompt-words", default="", help="lo,hi prompt tokens (default 45,180; --tiny 4,24)")
    p.add_argument("--answer-words", default="", help="lo,hi answer tokens (default 150,600; --tiny 4,40)")
    p.add_argument("--workdir", help="where the model and runs go (default: a temporary folder, removed)")
    p.add_argument("--out", help="JSON results (default $OUT/dpo_precompute_speed.json)")
    return p


def _span(text: str, default: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(",")) if text else default
    return lo, hi


class Timers:
    """Wall time of TRL's precompute pass and of its hash of the reference weights, per run."""

    def __init__(self):
        import trl.trainer.dpo_trainer as dpo_trainer
        from trl import DPOTrainer

        self.precompute_s, self.hash_s = [], []
        precompute, hash_module = DPOTrainer._precompute_ref_logps, dpo_trainer.hash_module

        def timed_precompute(trainer, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = precompute(trainer, dataset, name, batch_size)
            self.precompute_s.append(time.perf_counter() - t0)  # ends with .cpu() copies: the GPU is done
            return out

        def timed_hash(module):
            t0 = time.perf_counter()
            out = hash_module(module)
            self.hash_s.append(time.perf_counter() - t0)
            return out

        DPOTrainer._precompute_ref_logps = timed_precompute
        dpo_trainer.hash_module = timed_hash

    def take(self) -> tuple[float, float]:
        out = sum(self.precompute_s), sum(self.hash_s)
        self.precompute_s.clear()
        self.hash_s.clear()
        return out


def one_run(work: Path, model_dir: Path, data: Path, recipe, timers: Timers, tag: str, epochs: float) -> dict:
    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train

    out, ckpt, metrics = work / f"out-{tag}", work / f"ckpt-{tag}", work / f"{tag}.json"
    t0 = time.time()
    m = train(TrainJob(stage="dpo", recipe=recipe, model=model_dir, train=data, test=None, out=out, checkpoints=ckpt,
                       metrics=metrics))
    wall = time.time() - t0
    precompute_s, hash_s = timers.take()
    steps = m["step_times_s"]
    train_s, tokens = sum(steps), m["tokens_this_run"]
    extra = precompute_s + hash_s
    history = [h for h in m["log_history"] if "loss" in h]
    res = {
        "precompute_ref_log_probs": recipe.precompute_ref_log_probs,
        "tokens": tokens, "steps": m["steps_this_run"], "step_times_s": steps,
        "seconds_per_step_median": statistics.median(steps[1:] or steps),
        "train_tokens_per_s": tokens / train_s,
        "steady_tokens_per_s": tokens / len(steps) / statistics.median(steps[1:] or steps),
        "precompute_s": round(precompute_s, 3), "ref_hash_s": round(hash_s, 3),
        # the precompute pass covers exactly the rows these steps train on: amortised as over one epoch, and over
        # the recipe's epochs (the pass is paid once, the steps every epoch)
        "amortised_tokens_per_s": tokens / (train_s + extra),
        "amortised_tokens_per_s_recipe_epochs": epochs * tokens / (epochs * train_s + extra),
        "peak_gpu_memory_gib": m["peak_gpu_memory_gib"], "wall_time_s": round(wall, 1),
        "per_step": {k: [h.get(k) for h in history] for k in STEP_KEYS},
    }
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)  # also the cached log-probs: every precompute run computes them
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def summary(runs: list[dict]) -> dict:
    keys = ("train_tokens_per_s", "steady_tokens_per_s", "amortised_tokens_per_s",
            "amortised_tokens_per_s_recipe_epochs", "seconds_per_step_median", "precompute_s", "ref_hash_s")
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    sys.path.insert(0, str(HERE.parent / "src"))
    import dataclasses

    import torch

    from mamba_align.train.recipes import DatasetSpec, load_recipe
    from mamba_align.utils import setup_logging

    tt, util = _bench_module("train_throughput"), _bench_module("_benchutil")
    setup_logging()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --tiny)")
    recipe = load_recipe(a.recipe, "dpo")
    per_device = a.per_device_batch or recipe.per_device_train_batch_size
    accumulation = a.accumulation or max(1, recipe.global_batch_size // (recipe.per_device_train_batch_size
                                                                         * a.recipe_gpus))
    steps = a.steps or (3 if a.tiny else 30)
    max_length, max_prompt = (128, 64) if a.tiny else (recipe.max_length, recipe.max_prompt_length)
    prompt = _span(a.prompt_words, (4, 24) if a.tiny else (45, 180))
    answer = _span(a.answer_words, (4, 40) if a.tiny else (150, 600))
    shape = tt.SHAPES["tiny" if a.tiny else "2.8b"]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dpo-precompute-"))
    try:
        t0 = time.time()
        params = tt.write_model(work / "model", **shape, dtype="bfloat16" if a.device == "cuda" else "float32")
        print(f"random model: {params / 1e6:.1f}M parameters in {time.time() - t0:.0f}s", file=sys.stderr)
        pairs = steps * per_device * accumulation  # one pass: the precompute covers exactly the trained rows
        tt.write_dpo_rows(work / "dpo.parquet", pairs, tt.words(shape["vocab_size"]), seed=0, lo=prompt[0],
                          hi=prompt[1], answer=answer)
        # the recipe's learning settings, cut to `steps` steps of this batch on one GPU; no checkpoint is saved
        # (the Trainer's end-of-training save, 22 GB at 2.8B with RMSprop, is the same with or without)
        base = dataclasses.replace(recipe, dataset=DatasetSpec(source="synthetic"), max_steps=steps,
                                   per_device_train_batch_size=per_device,
                                   global_batch_size=per_device * accumulation, max_length=max_length,
                                   max_prompt_length=max_prompt, logging_steps=1, save_steps=10**9,
                                   eval_steps=None, report_to=[])
        from transformers import Trainer

        Trainer._save_checkpoint = lambda self, *args, **kw: None
        timers = Timers()
        runs: dict[str, list[dict]] = {"per_step_reference": [], "precomputed_reference": []}
        for rep in range(a.reps):
            for key, precompute in (("per_step_reference", False), ("precomputed_reference", True)):
                r = dataclasses.replace(base, precompute_ref_log_probs=precompute)
                runs[key].append(one_run(work, work / "model", work / "dpo.parquet", r, timers,
                                         f"{key}-{rep}", recipe.num_train_epochs))
        per, pre = runs["per_step_reference"], runs["precomputed_reference"]
        loss_diff = [max(abs(x - y) for x, y in zip(p["per_step"]["loss"], q["per_step"]["loss"]))
                     for p, q in zip(per, pre)]
        margin_diff = [max(abs(x - y) for x, y in zip(p["per_step"]["rewards/margins"],
                                                      q["per_step"]["rewards/margins"])) for p, q in zip(per, pre)]
        s_per, s_pre = summary(per), summary(pre)
        result = {
            "what": "DPO tokens/s (chosen + rejected, non-padding) with the reference forward every step vs "
                    "precomputed reference log-probs; same weights, rows, seed and steps",
            "environment": util.environment(), "device": a.device, "shape": "tiny" if a.tiny else "2.8b",
            "parameters": params, "recipe": str(a.recipe), "recipe_epochs": recipe.num_train_epochs,
            "optim": recipe.optim, "beta": recipe.beta, "gradient_checkpointing": recipe.gradient_checkpointing,
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
            "steps": steps, "pairs": pairs, "max_length": max_length, "max_prompt_length": max_prompt,
            "prompt_tokens": prompt, "answer_tokens": answer, "reps": a.reps,
            "summary": {"per_step_reference": s_per, "precomputed_reference": s_pre,
                        "ratio_train_tokens_per_s": round(s_pre["train_tokens_per_s"] / s_per["train_tokens_per_s"], 4),
                        "ratio_amortised_one_epoch": round(s_pre["amortised_tokens_per_s"]
                                                           / s_per["amortised_tokens_per_s"], 4),
                        "ratio_amortised_recipe_epochs": round(s_pre["amortised_tokens_per_s_recipe_epochs"]
                                                               / s_per["amortised_tokens_per_s_recipe_epochs"], 4),
                        "max_abs_loss_diff_per_rep": loss_diff, "max_abs_margin_diff_per_rep": margin_diff},
            "runs": runs,
        }
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    util.emit("dpo_precompute_speed", result, a.out)
    return result


if __name__ == "__main__":
    main()
