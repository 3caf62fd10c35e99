"""Inputs for the tiny demo, generated here (no network): a small mamba_ssm-format checkpoint, a
tokenizer with GPT-NeoX's special-token layout, and chat / preference sets in the UltraChat and
UltraFeedback schemas. The content is synthetic arithmetic and word tasks: it trains fast and means
nothing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

import torch

from mamba_align.model.mapping import padded_vocab_size
from mamba_align.model.tokenizer import EOS_TOKEN, PAD_TOKEN
from mamba_align.utils import atomic_path

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
    return f"Write a short sentence about a {a}.", f"The {a} is happy and rests in the sun.", "No."


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


# ------------------------------------------------------------------ a tiny tokenizer and mamba_ssm checkpoint

def build_tiny_tokenizer(out_dir: str | os.PathLike, texts: list[str], vocab_size: int = 300) -> Path:
    """A tiny byte-level BPE tokenizer laid out like GPT-NeoX's (<|endoftext|> id 0 is bos/eos/unk,
    <|padding|> id 1, no pad token set), trained on `texts`, saved as a PreTrainedTokenizerFast dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN)
    with atomic_path(out_dir) as tmp:
        tok.save_pretrained(tmp)
    return Path(out_dir)



def build_tiny_mamba_ssm_checkpoint(out_dir: str | os.PathLike, d_model: int = 64, n_layer: int = 2,
                                    vocab_size: int = 301, pad_vocab_size_multiple: int = 8, seed: int = 0,
                                    d_state: int = 16) -> Path:
    """Write a random-init checkpoint in mamba_ssm's format (config.json + pytorch_model.bin), initialised
    the way mamba_ssm's MambaLMHeadModel initialises itself, so forward values look like a real model's."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    d_inner, d_conv = 2 * d_model, 4
    dt_rank = math.ceil(d_model / 16)
    rows = padded_vocab_size(vocab_size, pad_vocab_size_multiple)
    embedding = torch.randn(rows, d_model, generator=g) * 0.02
    sd = {"backbone.embedding.weight": embedding}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        sd.update({
            p + "mixer.A_log": torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1),
            p + "mixer.D": torch.ones(d_inner),
            p + "mixer.in_proj.weight": uniform((2 * d_inner, d_model), d_model ** -0.5),  # nn.Linear default
            p + "mixer.conv1d.weight": uniform((d_inner, 1, d_conv), d_conv ** -0.5),  # nn.Conv1d default
            p + "mixer.conv1d.bias": uniform((d_inner,), d_conv ** -0.5),
            p + "mixer.x_proj.weight": uniform((dt_rank + 2 * d_state, d_inner), d_inner ** -0.5),
            p + "mixer.dt_proj.weight": uniform((d_inner, dt_rank), dt_rank ** -0.5),
            p + "mixer.dt_proj.bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
            # kaiming_uniform(a=sqrt(5)) then / sqrt(n_layer), as mamba_ssm's _init_weights does
            p + "mixer.out_proj.weight": uniform((d_model, d_inner), d_inner ** -0.5) / math.sqrt(n_layer),
            p + "norm.weight": torch.ones(d_model),
        })
    sd["backbone.norm_f.weight"] = torch.ones(d_model)
    sd["lm_head.weight"] = embedding  # tied: torch.save stores one tensor under both names, like mamba_ssm
    config = {"d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": vocab_size,
              "ssm_cfg": {"layer": "Mamba1", "d_state": d_state}, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": pad_vocab_size_multiple, "tie_embeddings": True}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        torch.save(sd, tmp / "pytorch_model.bin")
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return Path(out_dir)


def build_demo_inputs(out_dir, vocab_files=(), d_model: int = 64, n_layer: int = 2, seed: int = 0) -> None:
    """Write out_dir/{data/ultrachat,data/ultrafeedback,tokenizer,base_mamba_ssm}.

    `vocab_files` (e.g. the demo's eval questions) are read so the tokenizer knows their words too."""
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
