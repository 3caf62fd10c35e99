"""Data preparation on local files in the Hub schemas: templating, counts, and named errors."""

from __future__ import annotations

import pandas as pd
import pytest

from mamba_align.testing.demo import ultrachat_rows, ultrafeedback_rows
from mamba_align.train.data import prepare_preference_data, prepare_sft_data
from mamba_align.train.recipes import DatasetSpec
from mamba_align.utils import UserError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from mamba_align.model.tokenizer import CHAT_TEMPLATES
    from mamba_align.testing.demo import build_tiny_tokenizer

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


def _conv(reply="a"):
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]


# (case, stage, file name, file content (bytes) or rows for parquet, expected message)
BAD_DATA = [
    ("empty JSONL file", "sft", "train_sft.jsonl", b"", r"train_sft\.jsonl: no rows; expected UTF-8 JSON"),
    ("parquet without rows", "sft", "train_sft.parquet", pd.DataFrame({"messages": pd.Series([], dtype=object)}),
     r"train_sft\.parquet: no rows; expected"),
    ("non-UTF-8 file", "sft", "train_sft.jsonl", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
     r"train_sft\.jsonl: not UTF-8 \(byte 0xe9 at offset 46\); expected UTF-8 JSON Lines"),
    ("not JSON", "sft", "train_sft.jsonl", b"hello\n", r"train_sft\.jsonl: cannot be read \(.*\); expected UTF-8"),
    ("every SFT row malformed", "sft", "train_sft.jsonl",
     b'{"messages": [{"role": "user", "content": "no reply"}]}\n{"messages": [{"role": "bot", "content": "x"}]}\n',
     r"train_sft\.jsonl: none of its 2 rows is well formed; expected 'messages': a list of \{role, content\}"),
    ("every pair malformed", "dpo", "train_prefs.parquet",
     pd.DataFrame({"chosen": [_conv()[:1]], "rejected": [_conv()]}),
     r"train_prefs\.parquet: none of its 1 rows is well formed; expected 'chosen' and 'rejected' each a list"),
    ("every pair identical", "dpo", "train_prefs.parquet",
     pd.DataFrame({"chosen": [_conv("same"), _conv("x")], "rejected": [_conv("same"), _conv("x")]}),
     r"train_prefs\.parquet: every well-formed pair has the same chosen and rejected reply; expected pairs that "
     r"differ"),
]


@pytest.mark.parametrize("case, stage, name, content, expected", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_rejected_naming_the_file(tmp_path, tokenizer_dir, case, stage, name, content, expected):
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content.to_parquet(path, index=False)
    spec = DatasetSpec(source=str(tmp_path / "d"), train_split=name.split(".")[0], test_split=None)
    with pytest.raises(UserError, match=expected):
        if stage == "sft":
            prepare_sft_data(spec, tokenizer_dir, tmp_path / "out", 128, True)
        else:
            prepare_preference_data(spec, tokenizer_dir, tmp_path / "out", 128, 64)
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_identical_pairs_are_dropped_counted_and_warned(tmp_path, tokenizer_dir, caplog):
    rows = ultrafeedback_rows(6, 0)
    for r in rows[:2]:
        r["rejected"] = r["chosen"]
    _write(tmp_path / "uf", "train_prefs", rows)
    spec = DatasetSpec(source=str(tmp_path / "uf"), train_split="train_prefs", test_split=None)
    stats = prepare_preference_data(spec, tokenizer_dir, tmp_path / "out", max_length=512, max_prompt_length=256)
    assert stats["train"]["identical_pair_dropped"] == 2 and stats["train"]["rows_out"] == 4
    assert "train_prefs.parquet: dropped 2 of 6 pairs whose chosen and rejected replies are the same" in caplog.text
    assert len(pd.read_parquet(tmp_path / "out" / "train.parquet")) == 4
