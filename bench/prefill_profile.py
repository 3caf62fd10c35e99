"""Where the leaderboard scorer's prefill time goes at the 2.8B shape (issue #30): positions/s of

- `masked`: the engine's prefill (eval/engine/ssm.py `_GraphRunner.prefill`: masked mixer, last-position logits),
- `fused`: mamba_ssm's own forward (`MambaLMHeadModel(ids, num_last_tokens=1)`, the fused mamba_inner_fn path),
- `step`: one CUDA-graph decode step at several slot counts (row-steps/s: what scoring a continuation costs),

for a few (rows x width) shapes, then a torch.profiler table of one masked prefill. Random bf16 weights.

    PYTHONPATH=src python bench/prefill_profile.py --out $OUT/prefill_profile.json      # one H200
    PYTHONPATH=src python bench/prefill_profile.py --tiny                              # CPU-less smoke: needs CUDA
"""

from __future__ import annotations

import argparse
import time

from _benchutil import cuda_sync, emit, environment, profile_table


def _engine(shape: str, rows: int):
    import torch
    from _benchutil import random_model

    from mamba_align.eval.engine.ssm import MambaSSMEngine

    hf = random_model(shape, "cuda", torch.bfloat16)
    engine = MambaSSMEngine.from_model(hf, batch_size=rows)
    del hf
    torch.cuda.empty_cache()
    return engine


def timed(fn, reps: int) -> float:
    fn()
    cuda_sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    cuda_sync()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a small model and shapes (smoke test)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile-only", action="store_true", help="only the two profiles of the first shape")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    shape = "tiny" if a.tiny else "2.8b"
    shapes = [(2, 64), (4, 32)] if a.tiny else [(30, 1088), (16, 1024), (8, 1024), (1, 1024), (60, 544), (8, 4096)]
    slots = [8, 64] if a.tiny else [64, 128, 256, 512]
    engine = _engine(shape, max(slots))
    vocab = engine.model.lm_head.weight.shape[0]
    result = {"env": environment(), "shape": shape, "prefill": [], "step": []}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, width in ([] if a.profile_only else shapes):
            prompts = torch.randint(0, vocab, (rows, width), generator=g).tolist()
            runner = engine._runner(max(64, rows) if not a.tiny else 8)
            masked = timed(lambda: runner.prefill(list(range(rows)), prompts), a.reps)  # noqa: B023
            # ragged rows (the real case): lengths spread over [width/2, width] so the mask applies
            ragged_prompts = [q[: width // 2 + (k * width) // (2 * rows)] for k, q in enumerate(prompts)]
            ragged = timed(lambda: runner.prefill(list(range(rows)), ragged_prompts), a.reps)  # noqa: B023
            ids = torch.tensor(prompts, device=engine.device)
            fused = timed(lambda: engine.model(ids, num_last_tokens=1), a.reps)  # noqa: B023
            pos = rows * width
            row = {"rows": rows, "width": width, "positions": pos,
                   "masked_s": masked, "masked_pos_per_s": pos / masked,
                   "ragged_s": ragged, "ragged_pos_per_s": pos / ragged,
                   "fused_s": fused, "fused_pos_per_s": pos / fused,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            result["prefill"].append(row)
            print(row, flush=True)
        for n in ([] if a.profile_only else slots):
            runner = engine._runner(n)
            tok = torch.randint(0, vocab, (n,), device=engine.device)
            dt = timed(lambda: runner.step(tok), 20)  # noqa: B023
            row = {"slots": n, "step_s": dt, "row_steps_per_s": n / dt}
            result["step"].append(row)
            print(row, flush=True)
        rows, width = shapes[0]
        prompts = torch.randint(0, vocab, (rows, width), generator=g).tolist()
        ragged_prompts = [q[: width // 2 + (k * width) // (2 * rows)] for k, q in enumerate(prompts)]
        runner = engine._runner(max(64, rows) if not a.tiny else 8)
        from torch.profiler import ProfilerActivity, profile

        for name, batch in (("ragged", ragged_prompts), ("unpadded", prompts)):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runner.prefill(list(range(rows)), batch)
                cuda_sync()
            table = profile_table(prof, cuda=True, rows=30)
            print(name, "\n", "\n".join(line[:100] + line[-40:] for line in table.splitlines()[:14]))
            result[f"profile_table_{name}"] = table
    emit("prefill_profile", result, a.out)


if __name__ == "__main__":
    main()
