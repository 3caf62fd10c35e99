"""Inputs for the tiny demo, generated here (no network): a small mamba_ssm-format checkpoint, a
tokenizer with GPT-NeoX's special-token layout, and chat / preference sets in the UltraChat and
UltraFeedback schemas. The content is synthetic arithmetic and word tasks: it trains fast and means
nothing."""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

from mamba_align.utils import atomic_path, setup_logging

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow"]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, good answer, bad answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.randrange(1, 5)}."
    if kind == 1:
        words = rng.sample(ANIMALS, 3)
        return (f"Reverse the words: {' '.join(words)}.", f"Reversed: {' '.join(reversed(words))}.",
                f"Reversed: {' '.join(words)}.")
    if kind == 2:
        c = rng.choice(COLORS)
        return f"Repeat the color {c} twice.", f"{c} {c}.", f"{rng.choice(COLORS)}."
    a = rng.choice(ANIMALS)
    return f"Write a short sentence about a {a}.", f"The {a} is happy and rests in the sun.", f"No."


def _pid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ultrachat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q1, a1, _ = _task(rng)
        msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
        if rng.random() < 0.3:
            q2, a2, _ = _task(rng)
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"prompt": q1, "prompt_id": _pid(q1), "messages": msgs})
    return rows


def ultrafeedback_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, good, bad = _task(rng)
        user = {"role": "user", "content": q}
        chosen = [user, {"role": "assistant", "content": good}]
        rows.append({"prompt": q, "prompt_id": _pid(q), "chosen": chosen,
                     "rejected": [user, {"role": "assistant", "content": bad}], "messages": chosen,
                     "score_chosen": 9.0, "score_rejected": 3.0})
    return rows


def _write_rows(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def build_demo_inputs(out_dir, vocab_files=(), d_model: int = 64, n_layer: int = 2, seed: int = 0) -> None:
    """Write out_dir/{data/ultrachat,data/ultrafeedback,tokenizer,base_mamba_ssm}.

    `vocab_files` (e.g. the demo's eval questions) are read so the tokenizer knows their words too."""
    from mamba_align.model.convert import build_tiny_mamba_ssm_checkpoint, build_tiny_tokenizer

    out = Path(out_dir)
    sft = {"train_sft": ultrachat_rows(256, seed), "test_sft": ultrachat_rows(16, seed + 1)}
    pref = {"train_prefs": ultrafeedback_rows(128, seed + 2), "test_prefs": ultrafeedback_rows(16, seed + 3)}
    for split, rows in sft.items():
        _write_rows(rows, out / "data" / "ultrachat" / f"{split}.parquet")
    for split, rows in pref.items():
        _write_rows(rows, out / "data" / "ultrafeedback" / f"{split}.parquet")
    texts = [m["content"] for rows in sft.values() for r in rows for m in r["messages"]]
    texts += [m["content"] for rows in pref.values() for r in rows for m in r["chosen"] + r["rejected"]]
    texts += [Path(f).read_text() for f in vocab_files]
    tok_dir = build_tiny_tokenizer(out / "tokenizer", texts)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    build_tiny_mamba_ssm_checkpoint(out / "base_mamba_ssm", d_model=d_model, n_layer=n_layer,
                                    vocab_size=vocab, seed=seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-files", nargs="*", default=[], help="texts the tokenizer must cover")
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    setup_logging(a.log)
    build_demo_inputs(a.out, a.vocab_files)


if __name__ == "__main__":
    main()
