"""Training throughput of mamba_align.train (train_sft / train_dpo) on synthetic data, random weights.

Default: the Mamba-2.8B shape (d_model 2560, 64 layers, vocab 50280) on one GPU, with transformers'
MambaForCausalLM (mamba_ssm / causal_conv1d kernels when installed), fp32 weights + bf16 autocast,
gradient checkpointing; SFT rows packed to 2048 tokens, DPO pairs at max_length 1024. Reports tokens/s,
seconds per optimizer step (mean over steps after the first, which warms up), steady tokens/s (tokens per
step / seconds per step) and peak GPU memory as JSON.

    python bench/train_throughput.py --out bench.json                         # GPU, 2.8B shape
    python bench/train_throughput.py --out bench.json --precompute-ref        # + DPO with precomputed ref
    python bench/train_throughput.py --tiny --device cpu --out /tmp/tiny.json # smoke run on CPU

Measured on one H100 80GB (torch 2.11, transformers 5.17, trl 1.16, mamba_ssm 2.3.2; docs/benchmarks.md §1, run L):
SFT 4 x 2048 tokens per step, no checkpointing, 0.525 s/step median (15.62k tokens/s), peak 70.9 GiB; DPO 4 pairs
at 1,024 with checkpointing and RMSprop, 1.10 s/step (median), 0.79 s with precomputed reference log-probs.

The synthetic-model helpers (write_tokenizer, write_model, write_sft_rows, write_dpo_rows) are also the
tests' tiny fixtures.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|padding|>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>"]
EOS = SPECIALS[0]
SHAPES = {
    # state-spaces/mamba-2.8b-slimpj: d_model 2560, n_layer 64, vocab 50277 padded to 50280
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64, state_size=16, vocab_size=50280),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, state_size=16, vocab_size=512),
}
ZEPHYR_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def words(vocab_size: int) -> list[str]:
    return [f"w{i}" for i in range(vocab_size - len(SPECIALS))]


def write_tokenizer(out_dir, vocab_size: int):
    """A word-level tokenizer: <|endoftext|>=0 (eos), <|padding|>=1 (pad), one id per word `w<i>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words(vocab_size))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token="<|padding|>", unk_token="[UNK]",
                                  additional_special_tokens=SPECIALS[3:])
    tok.chat_template = ZEPHYR_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def write_model(out_dir, hidden_size: int, num_hidden_layers: int, state_size: int, vocab_size: int,
                seed: int = 0, dtype: str = "float32") -> int:
    """Random-init MambaForCausalLM + tokenizer in `out_dir`; returns the parameter count."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         state_size=state_size, eos_token_id=0, bos_token_id=0, pad_token_id=1,
                         tie_word_embeddings=True)
    with torch.device("cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"):
        model = MambaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    write_tokenizer(out_dir, vocab_size)
    return sum(p.numel() for p in model.parameters())


def _turn(role: str, text: str) -> str:
    return f"<|{role}|>\n{text}{EOS}\n"


def _sentence(rng: random.Random, vocab: list[str], lo: int, hi: int) -> list[str]:
    return [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]


def write_sft_rows(path, n: int, vocab: list[str], seed: int = 0, lo: int = 4, hi: int = 24) -> None:
    """Rows with `messages` and `text`; the answer repeats the question reversed (learnable)."""
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = _sentence(rng, vocab, lo, hi)
        a = " ".join(reversed(q))
        q = " ".join(q)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                     "text": _turn("user", q) + _turn("assistant", a)})
    pd.DataFrame(rows).to_parquet(path)


def write_dpo_rows(path, n: int, vocab: list[str], seed: int = 0, lo: int = 4, hi: int = 24,
                   answer: tuple[int, int] | None = None) -> None:
    """Rows with `prompt` (ending in the generation prompt), `chosen` (question reversed) and `rejected`
    (words from the other half of the vocabulary), each response closed by eos."""
    import pandas as pd

    rng = random.Random(seed)
    half = len(vocab) // 2
    alo, ahi = answer or (lo, hi)
    rows = []
    for _ in range(n):
        q = _sentence(rng, vocab[:half], lo, hi)
        chosen = list(reversed(q)) + _sentence(rng, vocab[:half], max(0, alo - len(q)), max(0, ahi - len(q)))
        rows.append({"prompt": _turn("user", " ".join(q)) + "<|assistant|>\n",
                     "chosen": " ".join(chosen) + EOS,
                     "rejected": " ".join(_sentence(rng, vocab[half:], len(chosen), len(chosen))) + EOS})
    pd.DataFrame(rows).to_parquet(path)


class _PreemptAt(logging.Handler):
    """Touches the trainer's STOP file when it logs step `k - 1` (seen at the end of step k: checkpoint-k, exit
    75, what SIGTERM from Slurm does) and records the checkpoint-save times it logs."""

    def __init__(self, stop_file: Path, k: int):
        super().__init__()
        self.stop_file, self.k, self.saves = stop_file, k, []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(f"step {self.k - 1}: ") and self.k > 0:
            self.stop_file.touch()
            self.k = 0
        elif msg.startswith("checkpoint-") and " saved in " in msg:
            self.saves.append(msg)


def _bench(stage: str, work: Path, model_dir: Path, data: Path, recipe, precompute: bool = False,
           preempt_at: int = 0) -> dict:
    from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, STOP_FILE
    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train

    tag = f"{stage}{'-precompute' if precompute else ''}"
    out, ckpt, metrics = work / f"out-{tag}", work / f"ckpt-{tag}", work / f"{tag}.json"

    def run():
        shutil.rmtree(out, ignore_errors=True)  # 11 GB at the 2.8B shape
        return train(TrainJob(stage=stage, recipe=recipe, model=model_dir, train=data, test=None, out=out,
                              checkpoints=ckpt, metrics=metrics))

    res = {}
    t0 = time.time()
    if preempt_at:  # stop at step k as on SIGTERM, then rerun: it must resume from checkpoint-k
        watcher = _PreemptAt(ckpt / STOP_FILE, preempt_at)
        logging.getLogger("mamba_align.train").addHandler(watcher)
        ckpt.mkdir(parents=True, exist_ok=True)
        try:
            run()
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            logging.getLogger("mamba_align.train").removeHandler(watcher)
        res["preempted"] = {"exit_code": code, "expected_exit_code": PREEMPTED_EXIT_CODE,
                            "checkpoints": sorted(c.name for c in ckpt.glob("checkpoint-*")),
                            "log": watcher.saves, "wall_time_s": round(time.time() - t0, 1)}
        _release_memory()
        t0 = time.time()
    m = run()
    wall = round(time.time() - t0, 1)
    # the Trainer saves a full checkpoint (fp32 weights + optimizer state) at the last step
    sizes = {c.name: round(_du(c) / 1e9, 2) for c in sorted(ckpt.glob("checkpoint-*"))}
    keep = ("tokens_per_second", "seconds_per_step", "peak_gpu_memory_gib", "steps_this_run", "tokens_this_run",
            "global_step", "resumed_from", "checkpoint_saves", "optimizer")
    per_step = m["tokens_this_run"] / max(1, m["steps_this_run"])
    res.update({k: m.get(k) for k in keep}, steady_tokens_per_second=per_step / m["seconds_per_step"],
               seconds_per_step_median=statistics.median(m["step_times_s"][1:] or m["step_times_s"]),
               wall_time_s=wall, final=m["final"], optim=recipe.optim, step_times_s=m["step_times_s"],
               per_device_train_batch_size=recipe.per_device_train_batch_size, checkpoint_gb=sizes,
               disk_free_gb_after=round(shutil.disk_usage(work).free / 1e9, 1))
    if preempt_at:
        res["preempted"]["resume_ok"] = bool(
            res["preempted"]["exit_code"] == PREEMPTED_EXIT_CODE and m["resumed_from"]
            and m["resumed_from"].endswith(f"checkpoint-{preempt_at}") and m["global_step"] == recipe.max_steps
            and m["steps_this_run"] == recipe.max_steps - preempt_at)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)  # tens of GB each at the 2.8B shape: the disk holds only a few
    _release_memory()
    return res


def _release_memory() -> None:
    """Between runs in one process: drop the last model's objects and cached GPU blocks."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--tiny", action="store_true", help="tiny shape and sequence lengths (smoke test)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per stage (the first is not timed)")
    p.add_argument("--sft-batch", type=int, default=4, help="per-device SFT rows (of max_seq_length tokens)")
    p.add_argument("--dpo-batch", type=int, default=4, help="per-device DPO pairs")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--precompute-ref", action="store_true", help="also time DPO with precompute_ref_log_probs")
    p.add_argument("--stages", default="sft,dpo", help="comma-separated subset of sft,dpo")
    p.add_argument("--optim", default="adamw_torch", help="Trainer optimizer (zephyr-7b-beta's DPO: rmsprop)")
    p.add_argument("--dpo-optim", default=None, help="optimizer for DPO only (default: --optim)")
    p.add_argument("--preempt-at", type=int, default=0, metavar="K",
                   help="stop each stage at step K as SIGTERM would (checkpoint, exit 75), then rerun it: it must "
                        "resume there; times then come from the resumed run (steps K+1..)")
    p.add_argument("--workdir", help="where the synthetic model and runs go (default: a temporary folder)")
    p.add_argument("--profile", metavar="FILE", help="append a torch.profiler table of steps 3-4 of each stage")
    p.add_argument("--trace", metavar="FILE", help="with --profile: also write a gzipped Chrome trace of those steps")
    p.add_argument("--no-checkpoint-save", action="store_true",
                   help="skip the Trainer's end-of-training checkpoint (33 GB, ~50 s at 2.8B): throughput only")
    p.add_argument("--no-mask-check", action="store_true",
                   help="ablation: the fast path multiplies by the attention mask even when it is all ones")
    p.add_argument("--logging-steps", type=int, default=5, help="the recipes' value (1 with --preempt-at)")
    p.add_argument("--no-fused-optimizer", action="store_true",
                   help="ablation: the recipe's optimizer as written (no fused kernel, no clipping folded into it)")
    p.add_argument("--sft-global-batch", type=int, default=0,
                   help="SFT rows per optimizer step (default: --sft-batch, no accumulation); the recipes "
                        "accumulate, e.g. --sft-batch 2 --sft-global-batch 32")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (the recipes': 1.0; 0: none)")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from mamba_align.train.recipes import DatasetSpec, DPORecipe, SFTRecipe
    from mamba_align.utils import setup_logging, write_json

    setup_logging()
    _ablations(a)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --tiny)")
    shape = SHAPES["tiny" if a.tiny else "2.8b"]
    seq, dpo_len, dpo_prompt = (128, 128, 64) if a.tiny else (2048, 1024, 512)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mamba-bench-"))
    model_dir = work / "model"
    t0 = time.time()
    params = write_model(model_dir, **shape, dtype="bfloat16" if a.device == "cuda" else "float32")
    print(f"random model: {params / 1e6:.1f}M parameters in {time.time() - t0:.0f}s", file=sys.stderr)
    _release_memory()
    vocab = words(shape["vocab_size"])
    common = dict(dataset=DatasetSpec(source="synthetic"), max_steps=a.steps, learning_rate=1e-5,
                  warmup_ratio=0.0, save_steps=10**9, max_grad_norm=a.max_grad_norm,
                  logging_steps=1 if a.preempt_at else a.logging_steps, save_total_limit=1, bf16=True,
                  gradient_checkpointing=not a.no_gradient_checkpointing)
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "shape": shape, "parameters": params, "steps": a.steps,
              "gradient_checkpointing": not a.no_gradient_checkpointing,
              "fused_optimizer": not a.no_fused_optimizer, "checkpoint_save": not a.no_checkpoint_save,
              "mask_check": not a.no_mask_check,
              "max_grad_norm": a.max_grad_norm, "logging_steps": common["logging_steps"],
              "mamba_ssm_kernels": _importable("mamba_ssm") and _importable("causal_conv1d"),
              "versions": {m: _version(m) for m in ("torch", "transformers", "trl", "mamba_ssm", "causal_conv1d")}}
    stages = a.stages.split(",")
    if "sft" in stages:
        # enough documents of ~seq/4 tokens to fill steps x batch packed rows
        global_batch = a.sft_global_batch or a.sft_batch
        docs = 4 * a.steps * global_batch + 8
        write_sft_rows(work / "sft.parquet", docs, vocab, lo=seq // 16, hi=seq // 6)
        recipe = SFTRecipe(**common, max_seq_length=seq, packing=True, per_device_train_batch_size=a.sft_batch,
                           global_batch_size=global_batch, optim=a.optim)
        result["sft"] = {"max_seq_length": seq, "global_batch_size": global_batch,
                         **_bench("sft", work, model_dir, work / "sft.parquet", recipe, preempt_at=a.preempt_at)}
    if "dpo" in stages:
        pairs = (a.steps + 1) * a.dpo_batch
        # prompts up to max_prompt_length, answers long enough that most pairs are truncated to max_length
        write_dpo_rows(work / "dpo.parquet", pairs, vocab, lo=dpo_prompt // 2, hi=dpo_prompt,
                       answer=(dpo_len // 2, dpo_len))
        for precompute in [False, True] if a.precompute_ref else [False]:
            recipe = DPORecipe(**common, max_length=dpo_len, max_prompt_length=dpo_prompt, beta=0.1,
                               per_device_train_batch_size=a.dpo_batch, global_batch_size=a.dpo_batch,
                               precompute_ref_log_probs=precompute, optim=a.dpo_optim or a.optim)
            key = "dpo_precompute_ref" if precompute else "dpo"
            result[key] = {"max_length": dpo_len, **_bench("dpo", work, model_dir, work / "dpo.parquet", recipe,
                                                           precompute, preempt_at=0 if precompute else a.preempt_at)}
        if a.precompute_ref and "dpo" in result and "dpo_precompute_ref" in result:
            pre, ref = result["dpo_precompute_ref"], result["dpo"]
            ratio = pre["seconds_per_step"] / ref["seconds_per_step"]
            result["dpo_step_time_ratio_precompute_vs_not"] = round(ratio, 3)
            result["dpo_step_time_ratio_precompute_vs_not_median"] = round(
                pre["seconds_per_step_median"] / ref["seconds_per_step_median"], 3)
    write_json(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=1, default=str))
    return result


def _ablations(a) -> None:
    """Patch the trainer for --profile, --no-checkpoint-save, --no-fused-optimizer, --no-mask-check."""
    from mamba_align.train import fast, fit, trainer

    if a.no_fused_optimizer:
        trainer.FUSED_OPTIMIZERS = {}
        fast.fused_clip_grad_norm_ = lambda *args: None
    if a.no_mask_check:
        fast.mask_with_padding = lambda mask: mask
    if a.no_checkpoint_save:
        from transformers import Trainer

        Trainer._save_checkpoint = lambda self, *args, **kw: None
    if a.profile:
        classes = fit.trainer_classes

        def add_profiler(cls):
            def __init__(self, *args, callbacks=None, **kw):
                cls.__init__(self, *args, callbacks=[*(callbacks or []), _step_profiler(a.profile, a.trace)], **kw)

            return type(cls.__name__, (cls,), {"__init__": __init__})

        fit.trainer_classes = lambda: tuple(add_profiler(c) for c in classes())


def _step_profiler(path, trace=None, first: int = 3, count: int = 2):
    """A TrainerCallback: torch.profiler over optimizer steps `first`..; appends the kernel table to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _benchutil import profile_table

    last = first + count - 1
    cuda = torch.cuda.is_available()

    class StepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == first:
                self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or state.global_step != last:
                return
            if cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = profile_table(self.prof, cuda, rows=45)
            cpu = profile_table(self.prof, False, rows=25)
            with open(path, "a") as f:
                optim = getattr(args.optim, "value", args.optim)
                f.write(f"\n===== pipeline steps {first}-{last} (optim {optim}) =====\n{table}\n"
                        f"\n----- by CPU time -----\n{cpu}\n")
            if trace:
                import gzip
                import shutil as sh

                self.prof.export_chrome_trace(str(trace) + ".tmp")
                with open(str(trace) + ".tmp", "rb") as src, gzip.open(trace, "wb") as dst:
                    sh.copyfileobj(src, dst)
                os.remove(str(trace) + ".tmp")
            self.prof = None

    return StepProfiler()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
