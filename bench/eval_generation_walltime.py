"""Wall time of the evaluation generation steps for one model: MT-Bench (80 questions x 2 turns) and
AlpacaEval (805 instructions), through the pipeline's own `generate_mt_bench` / `generate_alpaca_eval`
(batching by temperature, turn 2 seeing turn 1, progress files) with the engine `load_engine` would pick.

The model has random weights at the 2.8B shape (bf16), so it never emits eos: every answer runs to
max_new_tokens. That is the worst case, an upper bound for a real model, whose answers end far earlier.
Prompts are synthetic token ids with realistic lengths (MT-Bench turn 1 ~ median 80 tokens, AlpacaEval ~
median 45, log-normal, plus a chat template's markers); a tiny id<->text tokenizer lets the pipeline encode
and decode them losslessly. Also reported: the decode rate per batch size, to extrapolate to other lengths.

    PYTHONPATH=src python bench/eval_generation_walltime.py --batch-size 128
    PYTHONPATH=src python bench/eval_generation_walltime.py --tiny
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from _benchutil import cuda_sync, emit, environment, random_model

MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


class IdTokenizer:
    """Text is 'w<id>' words; the chat template is [role marker] content [end marker] ... [assistant marker].
    decode -> apply_chat_template round-trips the ids exactly, as a real tokenizer roughly does."""

    USER, ASSISTANT, END, SYSTEM = 1, 2, 3, 4
    # has a system role, so the pipeline prepends the empty system turn (data.with_system_turn), as for zephyr
    chat_template = "(ids) system / user / assistant markers"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids = []
        for m in messages:
            role = {"user": self.USER, "assistant": self.ASSISTANT, "system": self.SYSTEM}[m["role"]]
            ids += [role, 10] + [int(w[1:]) for w in m["content"].split()] + [self.END, 10]
        if add_generation_prompt:
            ids += [self.ASSISTANT, 10]
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def _words(rng, vocab, median, sigma, lo, hi):
    n = int(min(hi, max(lo, rng.lognormvariate(0, sigma) * median)))
    return " ".join(f"w{rng.randrange(11, vocab)}" for _ in range(n))


def write_inputs(folder: Path, vocab: int, n_mt: int, n_alpaca: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    questions = []
    for i in range(n_mt):
        cat = MT_BENCH_CATEGORIES[i * len(MT_BENCH_CATEGORIES) // n_mt]
        questions.append({"question_id": 81 + i, "category": cat,
                          "turns": [_words(rng, vocab, 80, 0.6, 10, 700), _words(rng, vocab, 40, 0.5, 5, 200)]})
    mt = folder / "question.jsonl"
    mt.write_text("".join(json.dumps(q) + "\n" for q in questions))
    alpaca = folder / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": _words(rng, vocab, 45, 0.7, 3, 1200), "dataset": "synthetic"}
                                  for _ in range(n_alpaca)]))
    return mt, alpaca


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, few prompts (smoke test, any device)")
    p.add_argument("--batch-size", type=int, default=128, help="generation batch size (slots)")
    p.add_argument("--mt-max-new", type=int, default=1024, help="MT-Bench max_new_tokens (pipeline: 1024)")
    p.add_argument("--alpaca-max-new", type=int, default=2048, help="AlpacaEval max_new_tokens (pipeline: 2048)")
    p.add_argument("--n-mt", type=int, default=80)
    p.add_argument("--n-alpaca", type=int, default=805)
    p.add_argument("--steps", default="mt_bench,alpaca_eval")
    p.add_argument("--rate-batches", default="16,32,64,128,256", help="decode rates measured for extrapolation")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from mamba_align.eval import engine as E
    from mamba_align.eval.engine.sampling import Sampling
    from mamba_align.eval.generate import generate_alpaca_eval, generate_mt_bench

    cuda = torch.cuda.is_available()
    shape = "tiny" if a.tiny else "2.8b"
    if a.tiny:
        a.n_mt, a.n_alpaca, a.mt_max_new, a.alpaca_max_new, a.batch_size = 8, 10, 6, 5, 4
        a.rate_batches = "2,4"
    model = random_model(shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32,
                         use_mambapy=not cuda)
    model.generation_config.eos_token_id = None
    t0 = time.perf_counter()
    if a.backend == "transformers" or (a.backend == "auto" and E._mamba_ssm_missing() is not None):
        engine = E.TransformersEngine.from_model(model, IdTokenizer(), batch_size=a.batch_size)
    else:
        engine = E.MambaSSMEngine.from_model(model, IdTokenizer(), batch_size=a.batch_size)
        del model  # the engine holds its own copy of the weights
    engine.eos_token_id = None
    build_s = time.perf_counter() - t0

    # count what the engine is asked to do
    stats = {"calls": 0, "prompts": 0, "prompt_tokens": 0, "new_tokens": 0}
    generate = engine.generate

    def counting_generate(prompts, sampling):
        outs = generate(prompts, sampling)
        stats["calls"] += 1
        stats["prompts"] += len(prompts)
        stats["prompt_tokens"] += sum(map(len, prompts))
        stats["new_tokens"] += sum(map(len, outs))
        return outs

    engine.generate = counting_generate
    vocab = engine.model.config.vocab_size
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mt_q, alpaca_q = write_inputs(tmp, vocab, a.n_mt, a.n_alpaca)
        engine.generate([[11, 12, 13]] * a.batch_size, Sampling(max_new_tokens=4))  # warm-up / graphs
        for key in stats:
            stats[key] = 0
        if "mt_bench" in a.steps:
            cuda_sync()
            t = time.perf_counter()
            generate_mt_bench("unused", mt_q, tmp / "mt.jsonl", "bench", max_new_tokens=a.mt_max_new,
                              batch_size=a.batch_size, engine=engine)
            cuda_sync()
            steps["mt_bench"] = dict(seconds=round(time.perf_counter() - t, 1), max_new_tokens=a.mt_max_new,
                                     questions=a.n_mt, **stats)
            print("mt_bench", steps["mt_bench"], flush=True)
            for key in stats:
                stats[key] = 0
        if "alpaca_eval" in a.steps:
            cuda_sync()
            t = time.perf_counter()
            generate_alpaca_eval("unused", alpaca_q, tmp / "alpaca.json", "bench", temperature=0.7,
                                 max_new_tokens=a.alpaca_max_new, batch_size=a.batch_size, engine=engine)
            cuda_sync()
            steps["alpaca_eval"] = dict(seconds=round(time.perf_counter() - t, 1),
                                        max_new_tokens=a.alpaca_max_new, instructions=a.n_alpaca, **stats)
            print("alpaca_eval", steps["alpaca_eval"], flush=True)

    # decode rates per batch size (128-token prompts, 256 new tokens) for extrapolating to other answer lengths
    rates = {}
    engine.generate = generate
    for bs in map(int, a.rate_batches.split(",")):
        engine.batch_size = bs
        ps = [[11 + (i * 7 + j) % (vocab - 11) for j in range(128)] for i in range(bs)]
        n_new = 8 if a.tiny else 256
        engine.generate(ps, Sampling(max_new_tokens=4))
        cuda_sync()
        t = time.perf_counter()
        engine.generate(ps, Sampling(temperature=0.7, max_new_tokens=n_new))
        cuda_sync()
        rates[bs] = round(bs * n_new / (time.perf_counter() - t), 1)
    result = dict(benchmark="eval_generation_walltime", shape=shape, engine=engine.name,
                  batch_size=a.batch_size, engine_build_seconds=round(build_s, 1), steps=steps,
                  total_seconds=round(sum(s["seconds"] for s in steps.values()), 1),
                  decode_tokens_per_s_by_batch=rates,
                  note="random weights never emit eos: every answer ran to max_new_tokens (worst case)",
                  environment=environment())
    emit("eval_generation_walltime", result, a.out)
    return result


if __name__ == "__main__":
    main()
