"""Data preparation on local files in the Hub schemas: templating, counts, and named errors."""

from __future__ import annotations

import pandas as pd
import pytest

from mamba_align.data import prepare_preference_data, prepare_sft_data
from mamba_align.demo import ultrachat_rows, ultrafeedback_rows
from mamba_align.recipes import DatasetSpec
from mamba_align.utils import UserError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from mamba_align.convert import CHAT_TEMPLATES, build_tiny_tokenizer

    rows = ultrachat_rows(64, 0) + ultrafeedback_rows(32, 1)
    texts = [m["content"] for r in rows for m in r.get("messages", r.get("chosen"))]
    out = build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok", texts)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATES["zephyr"]
    tok.save_pretrained(out)
    return out


def _write(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet", index=False)


def test_sft_rows_are_templated_and_counted(tmp_path, tokenizer_dir):
    rows = ultrachat_rows(20, 0)
    rows[0]["messages"] = rows[0]["messages"][:1]  # no assistant reply: malformed
    _write(tmp_path / "uc", "train_sft", rows)
    _write(tmp_path / "uc", "test_sft", ultrachat_rows(4, 1))
    spec = DatasetSpec(source=str(tmp_path / "uc"), train_split="train_sft", test_split="test_sft")
    stats = prepare_sft_data(spec, tokenizer_dir, tmp_path / "out", max_seq_length=90, packing=False)
    assert stats["train"]["malformed_dropped"] == 1
    assert stats["train"]["over_length"] == stats["train"]["over_length_dropped"] > 0
    assert 0 < stats["train"]["rows_out"] == 19 - stats["train"]["over_length"]
    text = pd.read_parquet(tmp_path / "out" / "train.parquet")["text"].iloc[0]
    assert text.startswith("<|system|>\n<|endoftext|>\n<|user|>\n") and "<|assistant|>\n" in text


def test_preferences_are_prompt_chosen_rejected(tmp_path, tokenizer_dir):
    _write(tmp_path / "uf", "train_prefs", ultrafeedback_rows(8, 0))
    spec = DatasetSpec(source=str(tmp_path / "uf"), train_split="train_prefs", test_split=None)
    prepare_preference_data(spec, tokenizer_dir, tmp_path / "out", max_length=512, max_prompt_length=256)
    row = pd.read_parquet(tmp_path / "out" / "train.parquet").iloc[0]
    assert row["prompt"].endswith("<|assistant|>\n")
    assert row["chosen"].endswith("<|endoftext|>") and row["rejected"].endswith("<|endoftext|>")
    assert row["chosen"] != row["rejected"]


@pytest.mark.parametrize("stage, drop, split", [("sft", "messages", "train_sft"), ("dpo", "rejected", "train_prefs"),
                                                ("dpo", "chosen", "train_prefs")])
def test_missing_column_is_named(tmp_path, tokenizer_dir, stage, drop, split):
    rows = ultrachat_rows(4, 0) if stage == "sft" else ultrafeedback_rows(4, 0)
    _write(tmp_path / "d", split, [{k: v for k, v in r.items() if k != drop} for r in rows])
    spec = DatasetSpec(source=str(tmp_path / "d"), train_split=split, test_split=None)
    with pytest.raises(UserError, match=f"missing column.*{drop}"):
        if stage == "sft":
            prepare_sft_data(spec, tokenizer_dir, tmp_path / "out", 128, True)
        else:
            prepare_preference_data(spec, tokenizer_dir, tmp_path / "out", 128, 64)


def test_missing_split_file_is_named(tmp_path, tokenizer_dir):
    (tmp_path / "empty").mkdir()
    spec = DatasetSpec(source=str(tmp_path / "empty"), train_split="train_sft", test_split=None)
    with pytest.raises(UserError, match="train_sft"):
        prepare_sft_data(spec, tokenizer_dir, tmp_path / "out", 128, True)
