"""Inputs for the rehearsal of the real run (issue #17 item 4), written by the demo's own rule
(`build_demo_inputs`) when the config has a `demo_inputs` block: a random mamba_ssm-format checkpoint at a
chosen shape (the 2.8B one in config/rehearsal.yaml), a byte-level BPE tokenizer in GPT-NeoX's special-token
layout, UltraChat-200k- and UltraFeedback-binarized-schema rows with realistic token lengths, and MT-Bench /
AlpacaEval question sets with the real benchmarks' counts and shapes. All text is synthetic: words made of
syllables, each one token of the tokenizer, so a length drawn in tokens is the length the model sees.

Where the lengths come from (none measured here; no data downloaded):
- UltraChat 200k: ~1,400 tokens per conversation (GPT-NeoX tokenizer; the plan's published estimate,
  mamba_align.ops.reporting.plan.PUBLISHED); the defaults give ~3.2 exchanges x (65 + 310 median tokens, log-normal
  sigma 0.6), mean ~1,440.
- UltraFeedback binarized: ~520 tokens per chosen or rejected sequence (same source); prompts median 90,
  sigma 0.9 (a long tail: some exceed max_prompt_length 512), answers median 300, sigma 0.6.
- MT-Bench turn 1 median 80 / turn 2 median 40 tokens and AlpacaEval instructions median 45 (log-normal),
  as bench/eval_generation_walltime.py draws them (docs/benchmarks.md section 5).
- Counts: MT-Bench 80 questions, 10 in each of 8 categories, 2 turns, reference answers for math,
  reasoning and coding; AlpacaEval 805 instructions (helpful_base 129, koala 156, oasst 188,
  selfinstruct 252, vicuna 80), each with a baseline output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mamba_align.testing.demo import _pid, _write_rows, build_tiny_mamba_ssm_checkpoint, build_tiny_tokenizer
from mamba_align.utils import atomic_path

MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
MT_BENCH_WITH_REFERENCE = {"math", "reasoning", "coding"}
ALPACA_EVAL_DATASETS = {"helpful_base": 129, "koala": 156, "oasst": 188, "selfinstruct": 252, "vicuna": 80}

# The defaults of config `demo_inputs` (workflow/schemas/config.schema.yaml describes each key).
DEFAULTS = {
    "model": {"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "pad_vocab_size_multiple": 8},
    "rows": {"train_sft": 4000, "test_sft": 200, "train_prefs": 2000, "test_prefs": 200},
    "sft_exchanges_mean": 3.2,
    "sft_user_tokens": {"median": 65, "sigma": 0.6},
    "sft_assistant_tokens": {"median": 310, "sigma": 0.6},
    "prefs_prompt_tokens": {"median": 90, "sigma": 0.9},
    "prefs_answer_tokens": {"median": 300, "sigma": 0.6},
    "mt_bench_turn_tokens": [{"median": 80, "sigma": 0.6}, {"median": 40, "sigma": 0.5}],
    "alpaca_eval_tokens": {"median": 45, "sigma": 0.7},
    "alpaca_eval_instructions": 805,
    "mt_bench_questions_per_category": 10,
    "max_tokens": 4000,
    "seed": 0,
}


def resolve(spec: dict | None) -> dict:
    """The defaults with `spec` laid over them (one level of nesting, as the schema has)."""
    out = json.loads(json.dumps(DEFAULTS))
    for k, v in (spec or {}).items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def word_list(n: int = 2000, seed: int = 0) -> list[str]:
    """Syllable words; the tokenizer trained on them holds each as one token (with its leading space)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.sample(syllables, rng.choice([2, 3]))))
    return sorted(words)


class _Text:
    def __init__(self, words: list[str], rng: random.Random, max_tokens: int):
        self.words, self.rng, self.max_tokens = words, rng, max_tokens

    def length(self, dist: dict) -> int:
        return max(1, min(self.max_tokens, round(self.rng.lognormvariate(0, dist["sigma"]) * dist["median"])))

    def text(self, dist: dict) -> str:
        return " ".join(self.rng.choices(self.words, k=self.length(dist)))

    def exchanges(self, mean: float) -> int:
        # 1 + Poisson(mean - 1) by counting exponential gaps, capped at 8 (long chats are rare)
        n, t = 1, self.rng.expovariate(1.0)
        while t < mean - 1 and n < 8:
            n, t = n + 1, t + self.rng.expovariate(1.0)
        return n


def ultrachat_rows(n: int, spec: dict, gen: _Text) -> list[dict]:
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(gen.exchanges(spec["sft_exchanges_mean"])):
            msgs += [{"role": "user", "content": gen.text(spec["sft_user_tokens"])},
                     {"role": "assistant", "content": gen.text(spec["sft_assistant_tokens"])}]
        prompt = msgs[0]["content"]
        rows.append({"prompt": prompt, "prompt_id": _pid(prompt), "messages": msgs})
    return rows


def ultrafeedback_rows(n: int, spec: dict, gen: _Text) -> list[dict]:
    rows = []
    for _ in range(n):
        prompt = gen.text(spec["prefs_prompt_tokens"])
        user = {"role": "user", "content": prompt}
        chosen = [user, {"role": "assistant", "content": gen.text(spec["prefs_answer_tokens"])}]
        rejected = [user, {"role": "assistant", "content": gen.text(spec["prefs_answer_tokens"])}]
        score_chosen = float(gen.rng.randint(6, 10))
        rows.append({"prompt": prompt, "prompt_id": _pid(prompt), "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": score_chosen,
                     "score_rejected": float(gen.rng.randint(1, int(score_chosen) - 1))})
    return rows


def mt_bench_files(out: Path, spec: dict, gen: _Text, judge_prompts: Path) -> None:
    """FastChat's question.jsonl / reference_answer.jsonl (ids 81-160 as FastChat numbers them) and the
    demo's judge prompts (FastChat's schema)."""
    questions, refs = [], []
    per = spec["mt_bench_questions_per_category"]
    for c, category in enumerate(MT_BENCH_CATEGORIES):
        for i in range(per):
            qid = 81 + c * per + i
            questions.append({"question_id": qid, "category": category,
                              "turns": [gen.text(d) for d in spec["mt_bench_turn_tokens"]]})
            if category in MT_BENCH_WITH_REFERENCE:
                refs.append({"question_id": qid, "answer_id": f"rehearsal-ref-{qid}", "model_id": "gpt-4",
                             "choices": [{"index": 0, "turns": [gen.text(spec["sft_assistant_tokens"])
                                                                for _ in spec["mt_bench_turn_tokens"]]}],
                             "tstamp": 0})
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("question.jsonl", questions), ("reference_answer.jsonl", refs)):
        with atomic_path(out / name) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with atomic_path(out / "judge_prompts.jsonl") as tmp:
        tmp.write_text(Path(judge_prompts).read_text())


def alpaca_eval_files(out: Path, spec: dict, gen: _Text) -> None:
    """alpaca_eval.json and alpaca_eval_gpt4_baseline.json (instruction, output, generator, dataset), the
    real subsets scaled to `alpaca_eval_instructions`."""
    total = spec["alpaca_eval_instructions"]
    counts = {k: round(v * total / 805) for k, v in ALPACA_EVAL_DATASETS.items()}
    counts["selfinstruct"] += total - sum(counts.values())
    rows = [{"instruction": gen.text(spec["alpaca_eval_tokens"]), "output": gen.text(spec["prefs_answer_tokens"]),
             "generator": "gpt4_1106_preview", "dataset": name}
            for name, n in counts.items() for _ in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("alpaca_eval.json", "alpaca_eval_gpt4_baseline.json"):
        with atomic_path(out / name) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))


def build_rehearsal_inputs(out_dir, spec: dict | None, judge_prompts) -> dict:
    """Write out_dir/{data/ultrachat,data/ultrafeedback,tokenizer,base_mamba_ssm,mt_bench,alpaca_eval};
    returns the resolved spec (also written to out_dir/spec.json)."""
    spec = resolve(spec)
    out = Path(out_dir)
    words = word_list(seed=spec["seed"])
    # the words and the judge prompts' text, so nothing falls back to bytes
    build_tiny_tokenizer(out / "tokenizer", [" ".join(words)] * 2 + [Path(judge_prompts).read_text()],
                         vocab_size=8192)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    # the rare word BPE left in two pieces goes, so a length drawn in words is the length in tokens
    words = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    gen = _Text(words, random.Random(spec["seed"]), spec["max_tokens"])
    r = spec["rows"]
    for split in ("train_sft", "test_sft"):
        _write_rows(ultrachat_rows(r[split], spec, gen), out / "data" / "ultrachat" / f"{split}.parquet")
    for split in ("train_prefs", "test_prefs"):
        _write_rows(ultrafeedback_rows(r[split], spec, gen), out / "data" / "ultrafeedback" / f"{split}.parquet")
    mt_bench_files(out / "mt_bench", spec, gen, judge_prompts)
    alpaca_eval_files(out / "alpaca_eval", spec, gen)
    m = spec["model"]
    build_tiny_mamba_ssm_checkpoint(out / "base_mamba_ssm", d_model=m["d_model"], n_layer=m["n_layer"],
                                    vocab_size=m["vocab_size"], pad_vocab_size_multiple=m["pad_vocab_size_multiple"],
                                    seed=spec["seed"])
    (out / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    return spec
