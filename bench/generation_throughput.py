"""Generation throughput, side by side on one device: transformers `generate` (TransformersEngine) vs our
MambaSSMEngine (mamba_ssm + CUDA graphs + continuous batching), and mamba_ssm's own `generate(cg=True)` as
a reference for the engine's overhead.

Random weights at the 2.8B shape in bf16, prompts of --prompt-len random tokens, exactly --new-tokens new
tokens per prompt (eos disabled, so every sequence runs to the limit), greedy unless stated. Each timing is
the median of --repeats calls after a warm-up call (which also captures the CUDA graphs).

    PYTHONPATH=src python bench/generation_throughput.py            # on the GPU, 2.8B
    PYTHONPATH=src python bench/generation_throughput.py --tiny     # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import statistics
import time

from _benchutil import cuda_sync, emit, environment, random_model


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        cuda_sync()
        t0 = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on whatever device there is (smoke test)")
    p.add_argument("--batch-sizes", default="1,16,64,128", help="our engine's batch sizes")
    p.add_argument("--hf-batch-sizes", default="1,16", help="transformers generate's batch sizes")
    p.add_argument("--ref-batch-sizes", default="1,16,64,128", help="mamba_ssm generate(cg=True) batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-new-tokens", type=int, default=None, help="default: --new-tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--extra", default="sample,bf16state", help="also: 'sample' (T=0.7, top_p=0.9 at the "
                   "largest batch), 'bf16state' (bf16 SSM state at the largest batch)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    import torch

    from mamba_align.eval.engine import _mamba_ssm_missing
    from mamba_align.eval.engine.hf import TransformersEngine
    from mamba_align.eval.engine.sampling import Sampling
    from mamba_align.eval.engine.ssm import MambaSSMEngine

    cuda = torch.cuda.is_available()
    shape = "tiny" if a.tiny else "2.8b"
    if a.tiny:
        a.prompt_len, a.new_tokens, a.repeats = 16, 8, 1
        a.batch_sizes, a.hf_batch_sizes, a.ref_batch_sizes = "1,4", "1,4", "1,4"
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_model(shape, device, dtype, use_mambapy=not cuda)
    model.generation_config.eos_token_id = None  # run every sequence to the token limit
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts(n):
        return torch.randint(1, vocab, (n, a.prompt_len), generator=gen).tolist()

    rows = []
    hf_rate = {}
    hf_new = a.hf_new_tokens or a.new_tokens
    hf = TransformersEngine.from_model(model, batch_size=max(int(b) for b in a.hf_batch_sizes.split(",")))
    hf.eos_token_id = None
    for bs in map(int, a.hf_batch_sizes.split(",")):
        ps = prompts(bs)
        hf.generate(ps, Sampling(max_new_tokens=4))  # warm-up
        secs = _time(lambda: hf.generate(ps, Sampling(max_new_tokens=hf_new)), a.repeats)
        hf_rate[bs] = bs * hf_new / secs
        rows.append(dict(engine="transformers.generate", batch=bs, new_tokens=hf_new, seconds=round(secs, 3),
                         tokens_per_s=round(hf_rate[bs], 1)))
        print(rows[-1], flush=True)

    missing = _mamba_ssm_missing()
    if missing is None:
        eng = MambaSSMEngine.from_model(model, batch_size=max(int(b) for b in a.batch_sizes.split(",")))
        eng.eos_token_id = None
        cases = [(bs, "greedy", Sampling(max_new_tokens=a.new_tokens), None) for bs in
                 map(int, a.batch_sizes.split(","))]
        top = max(int(b) for b in a.batch_sizes.split(","))
        if "sample" in a.extra:
            cases.append((top, "T=0.7,top_p=0.9", Sampling(temperature=0.7, top_p=0.9,
                                                              max_new_tokens=a.new_tokens), None))
            cases.append((top, "T=0.7,top_p=1", Sampling(temperature=0.7, max_new_tokens=a.new_tokens), None))
        if "bf16state" in a.extra:
            cases.append((top, "greedy", Sampling(max_new_tokens=a.new_tokens), torch.bfloat16))
        for bs, mode, sampling, state_dtype in cases:
            e = eng
            if state_dtype is not None:
                e = MambaSSMEngine.from_model(model, batch_size=bs, state_dtype=state_dtype)
                e.eos_token_id = None
            e.batch_size = bs
            ps = prompts(bs)
            e.generate(ps, Sampling(max_new_tokens=4))  # warm-up, graph capture
            outs = []
            secs = _time(lambda: outs.append(e.generate(ps, sampling)), a.repeats)
            assert all(len(o) == a.new_tokens for o in outs[-1]), "a sequence stopped early"
            rate = bs * a.new_tokens / secs
            row = dict(engine="mamba_align MambaSSMEngine", batch=bs, mode=mode,
                       state_dtype=str(state_dtype or e.state_dtype).replace("torch.", ""),
                       new_tokens=a.new_tokens, seconds=round(secs, 3), tokens_per_s=round(rate, 1))
            if bs in hf_rate:
                row["speedup_vs_transformers"] = round(rate / hf_rate[bs], 1)
            rows.append(row)
            print(row, flush=True)
            if e is not eng:
                del e
                torch.cuda.empty_cache()

        # mamba_ssm's own generate with CUDA graphs (its batch must share one prompt length; greedy)
        for bs in map(int, a.ref_batch_sizes.split(",")):
            ids = torch.tensor(prompts(bs), device="cuda")
            length = a.prompt_len + a.new_tokens
            eng.model.generate(ids, max_length=a.prompt_len + 4, cg=True, top_k=1)  # warm-up, capture
            secs = _time(lambda: eng.model.generate(ids, max_length=length, cg=True, top_k=1), a.repeats)
            rows.append(dict(engine="mamba_ssm generate(cg=True)", batch=bs, mode="greedy",
                             new_tokens=a.new_tokens, seconds=round(secs, 3),
                             tokens_per_s=round(bs * a.new_tokens / secs, 1)))
            print(rows[-1], flush=True)
    else:
        rows.append(dict(engine="mamba_align MambaSSMEngine", skipped=missing))

    result = dict(benchmark="generation_throughput", shape=shape, dtype=str(dtype).replace("torch.", ""),
                  prompt_len=a.prompt_len, environment=environment(), rows=rows)
    emit("generation_throughput", result, a.out)
    return result


if __name__ == "__main__":
    main()
