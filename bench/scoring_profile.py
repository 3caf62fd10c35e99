"""Where ours spends a multiple-choice batch's time at the 2.8B shape (issue #30): one MMLU-shaped batch set
(a shared ~600-token few-shot prefix, remainders of 50-130 tokens, 4 one-token choices) and one HellaSwag-shaped
set (~900-token unique contexts, 4 endings of 20-40 tokens) through eval/leaderboard/scoring.py `score` with the
mamba_ssm scorer: wall time against GPU busy time, and the top CPU and CUDA entries of torch.profiler.

    PYTHONPATH=src python bench/scoring_profile.py --out $OUT/scoring_profile.json      # one H200
"""

from __future__ import annotations

import argparse
import random
import time

from _benchutil import cuda_sync, emit, environment, profile_table, random_model


def requests(kind: str, n: int, vocab: int, rng: random.Random):
    tok = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    out = []
    prefix = tok(600)
    for _ in range(n):
        if kind == "mmlu":
            ctx = prefix + tok(rng.randint(50, 130))
            out += [(ctx, [c]) for c in (10, 11, 12, 13)]
        else:
            ctx = tok(rng.randint(800, 1000))
            out += [(ctx, tok(rng.randint(20, 40))) for _ in range(4)]
    return out


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mamba_align.eval.engine.ssm import MambaSSMEngine
    from mamba_align.eval.leaderboard import scoring as S

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--kinds", default="mmlu,hellaswag")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    hf = random_model("2.8b", "cuda", torch.bfloat16)
    engine = MambaSSMEngine.from_model(hf, batch_size=a.rows)
    del hf
    vocab = engine.model.lm_head.weight.shape[0]
    result = {"env": environment(), "docs": a.docs, "rows": a.rows}
    for kind in a.kinds.split(","):
        reqs = requests(kind, a.docs, vocab, random.Random(0))
        with torch.inference_mode():
            S.score(reqs[: 8 * a.rows], S.SSMScorer(engine, a.rows), max_rows=a.rows, max_tokens=32768)  # warm-up
            cuda_sync()
            scorer = S.SSMScorer(engine, a.rows)
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                S.score(reqs, scorer, max_rows=a.rows, max_tokens=32768)
                cuda_sync()
            wall = time.perf_counter() - t0
        gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                     for e in prof.key_averages())
        row = {"wall_s": wall, "gpu_busy_s": gpu_us / 1e6, "s_per_doc": wall / a.docs, "stats": dict(scorer.stats),
               "cuda_table": profile_table(prof, cuda=True, rows=15),
               "cpu_table": profile_table(prof, cuda=False, rows=15)}
        result[kind] = row
        print(kind, {k: v for k, v in row.items() if "table" not in k}, flush=True)
        print("\n".join(line[:100] + line[-40:] for line in row["cpu_table"].splitlines()[:16]), flush=True)
    emit("scoring_profile", result, a.out)


if __name__ == "__main__":
    main()
