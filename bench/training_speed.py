"""Training throughput, side by side on one device: transformers MambaForCausalLM vs mamba_ssm's
MambaLMHeadModel (native, fused add+RMSNorm) vs transformers + `mamba_align.train.fast.enable_fast_path`.

Same recipe for all: random weights at the 2.8B shape, fp32 parameters, bf16 autocast, fused AdamW,
sequence length 2048, causal LM loss on every token. Each variant runs in its own process (clean peak
memory); tokens/s is the median over --steps timed optimizer steps after --warmup steps; peak GiB is
torch.cuda.max_memory_allocated over the whole run (weights, gradients, optimizer state, activations).

Variants (--variants, comma-separated, each NAME or NAME:BATCH or NAME:BATCH:ckpt):
  transformers   model(input_ids, labels=...).loss, transformers' forward (fp32 logits + loss)
  mamba_ssm      MambaLMHeadModel(input_ids).logits -> F.cross_entropy(logits.float()), its fused add+norm
  fast           transformers + enable_fast_path (the pipeline's training path): fused add+norm, mamba_ssm's
                 in_proj layout, mixer activations kept for backward, chunked loss (no full logits)
  fast_recompute fast with save_mixer_activations=False (recomputes the convolution and time steps in
                 backward, as mamba_ssm does)
  fast_trl       fast + TRL's fused LM head (what SFTTrainer/DPOTrainer call: fused_lm_head=True)
  fast_hf_mixer  fast with native_mixer_layout=False (transformers' own mixer call: in_proj(x).transpose)
  NAME+cuscan    NAME with bench/cuda_scan.py's selective scan in place of mamba_ssm's CUDA kernel (issue #33;
                 CUSCAN=DB:TT[:time] in the environment picks its layout, channels per block and tile,
                 default 16:16)

--max-grad-norm N clips every step as the recipes do (max_grad_norm 1.0): clip_grad_norm_ then step, or for the
fast variants fast.fused_clip_grad_norm_ (the scale applied inside the fused AdamW step, as the trainer does).

    PYTHONPATH=src python bench/training_speed.py
    PYTHONPATH=src python bench/training_speed.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _benchutil import emit, environment, hf_config, profile_table

FAST_VARIANTS = ("fast", "fast_recompute", "fast_trl", "fast_hf_mixer")


def worker(variant: str, batch: int, ckpt: bool, shape: str, seq: int, warmup: int, steps: int,
           profile: str | None = None, max_grad_norm: float = 0.0, rows_per_step: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    label = variant
    variant, _, own_scan = variant.partition("+")
    if own_scan == "cuscan":  # mamba_inner_fn looks selective_scan_cuda up at call time
        import mamba_ssm.ops.selective_scan_interface as ssi
        from cuda_scan import CudaScan

        ssi.selective_scan_cuda = CudaScan.from_spec(os.environ.get("CUSCAN", "16:16"))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = hf_config(shape, use_cache=False, use_mambapy=not cuda)
    if variant == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        from mamba_align.model.mapping import mamba_ssm_config_from_hf

        model = MambaLMHeadModel(MambaConfig(**mamba_ssm_config_from_hf(cfg)), device=device,
                                 dtype=torch.float32)
    else:
        from transformers import MambaForCausalLM

        with torch.device(device):
            model = MambaForCausalLM(cfg)
        if variant in FAST_VARIANTS:
            from mamba_align.train.fast import enable_fast_path, patch_model, reference_add_rms_norm

            if not enable_fast_path(model, native_mixer_layout=variant != "fast_hf_mixer",
                                    save_mixer_activations=variant != "fast_recompute"):
                if cuda:
                    raise RuntimeError("enable_fast_path returned False on a CUDA machine")
                patch_model(model, reference_add_rms_norm, cuda_only=False)  # CPU smoke test of the plumbing
        if variant == "fast_trl":
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def loss_fn():
        if variant == "mamba_ssm":
            logits = model(ids).logits
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if variant == "fast_trl":
            return model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).loss
        return model(input_ids=ids, labels=ids).loss

    accum = max(1, rows_per_step // batch)  # micro-batches per optimizer step (gradient accumulation)

    def train_step():
        for _ in range(accum):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn() / accum
            loss.backward()
        if max_grad_norm > 0:
            from mamba_align.train.fast import fused_clip_grad_norm_

            if variant not in FAST_VARIANTS or fused_clip_grad_norm_(model.parameters(), opt, max_grad_norm) is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item() * accum, 4))
    step_s = statistics.median(times)
    if profile:  # two more steps under torch.profiler: the kernels that take the time, appended to a text file
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(2):
                train_step()
            if cuda:
                torch.cuda.synchronize()
        table = profile_table(prof, cuda)
        with open(profile, "a") as f:
            f.write(f"\n===== {label} batch {batch} ckpt {ckpt}: 2 steps =====\n{table}\n")
    return dict(variant=label, batch=batch, gradient_checkpointing=ckpt, params=params, seq=seq,
                max_grad_norm=max_grad_norm,
                accumulation=accum, step_seconds=round(step_s, 4), tokens_per_s=round(accum * batch * seq / step_s, 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                first_losses=losses[:3], steps_timed=steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--variants", default="transformers:2,mamba_ssm:2,fast:2,fast_trl:2,fast:4,"
                                         "transformers:8:ckpt,fast:8:ckpt")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    p.add_argument("--profile", default=None, help="append a torch.profiler table of 2 steps per variant here")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip every step (recipes: 1.0); 0: no clipping")
    p.add_argument("--rows-per-step", type=int, default=0,
                   help="accumulate batch-sized micro-batches up to this many rows per optimizer step, as the "
                        "recipes do (0: one micro-batch per step)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    shape = "tiny" if a.tiny else "2.8b"
    if a.tiny:
        a.seq, a.warmup, a.steps = 64, 1, 2

    if a.worker:
        name, batch, ckpt = (a.worker.split(":") + ["", ""])[:3]
        res = worker(name, int(batch), ckpt == "ckpt", shape, a.seq, a.warmup, a.steps, a.profile, a.max_grad_norm,
                     a.rows_per_step)
        print("RESULT " + json.dumps(res), flush=True)
        return res

    import torch

    rows = []
    for spec in a.variants.split(","):
        parts = spec.split(":")
        name, batch = parts[0], int(parts[1]) if len(parts) > 1 else 2
        ckpt = len(parts) > 2 and parts[2] == "ckpt"
        if name == "mamba_ssm" and not torch.cuda.is_available():
            rows.append(dict(variant=name, batch=batch, skipped="needs CUDA + mamba_ssm"))
            continue
        cmd = [sys.executable, __file__, "--worker", f"{name}:{batch}:{'ckpt' if ckpt else ''}",
               "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps),
               "--max-grad-norm", str(a.max_grad_norm), "--rows-per-step", str(a.rows_per_step)] \
            + (["--tiny"] if a.tiny else []) \
            + (["--profile", a.profile] if a.profile else [])
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1][len("RESULT "):])
            else:
                err = proc.stderr.strip().splitlines()
                row = dict(variant=name, batch=batch, gradient_checkpointing=ckpt,
                           error="\n".join(err[-6:]) or f"exit {proc.returncode}")
        except subprocess.TimeoutExpired:
            row = dict(variant=name, batch=batch, gradient_checkpointing=ckpt, error=f"timeout {a.timeout}s")
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(row, flush=True)
    base = next((r for r in rows if r.get("variant") == "transformers" and "tokens_per_s" in r
                 and not r.get("gradient_checkpointing")), None)
    native = {}  # the first mamba_ssm row of each batch size and checkpointing setting
    for r in rows:
        if r.get("variant") == "mamba_ssm" and "tokens_per_s" in r:
            native.setdefault((r["batch"], r["gradient_checkpointing"]), r)
    for r in rows:
        if "tokens_per_s" in r:
            if base:
                r["vs_transformers"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            if (key := (r["batch"], r["gradient_checkpointing"])) in native:
                r["vs_mamba_ssm_same_batch"] = round(r["tokens_per_s"] / native[key]["tokens_per_s"], 3)
    result = dict(benchmark="training_speed", shape=shape, seq=a.seq, max_grad_norm=a.max_grad_norm,
                  recipe="fp32 params, bf16 autocast, fused AdamW, random weights", rows=rows,
                  environment=environment())
    emit("training_speed", result, a.out)
    return result


if __name__ == "__main__":
    main()
