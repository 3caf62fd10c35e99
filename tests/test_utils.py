"""Shared helpers: JSONL progress files survive a torn last line; other bad lines are errors naming file:line; one
record of a file's content (file_record) for a model's manifest and identity and for provenance."""

from __future__ import annotations

import hashlib
import os

import pytest

from mamba_align.utils import UserError, append_jsonl, file_record, read_jsonl

ROWS = '{"i": 1}\n{"i": 2}\n'


@pytest.mark.parametrize("content, rows, repaired, warned", [
    (ROWS, [1, 2], ROWS, False),
    (ROWS + '{"i": 3, "out', [1, 2], ROWS, True),  # torn mid-row
    (ROWS + '{"i": 3}', [1, 2, 3], ROWS + '{"i": 3}\n', False),  # torn just before the newline: the row is whole
    (ROWS + '{"i": "\xe9', [1, 2], ROWS, True),  # torn inside a multi-byte character (encoded below)
    (ROWS + "\n", [1, 2], ROWS + "\n", False),  # blank lines are skipped
])
def test_a_torn_last_line_is_dropped_and_with_repair_cut_off(tmp_path, caplog, content, rows, repaired, warned):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content.encode("utf-8")[:-1] if "\xe9" in content else content.encode())
    assert [r["i"] for r in read_jsonl(path)] == rows
    assert [r["i"] for r in read_jsonl(path, repair=True)] == rows
    assert path.read_text() == repaired
    append_jsonl(path, {"i": 9})  # the next append starts on a line of its own
    assert [r["i"] for r in read_jsonl(path)] == rows + [9]
    # once when read, once when repaired; never again once repaired
    assert caplog.text.count("p.jsonl:3: dropping a torn last line") == (2 if warned else 0)


@pytest.mark.parametrize("middle", ['{"i": ', "not json", '{"i": "\xe9"}'])
def test_a_bad_line_inside_the_file_is_an_error_naming_file_and_line(tmp_path, middle):
    path = tmp_path / "p.jsonl"
    data = f'{{"i": 1}}\n{middle}\n{{"i": 3}}\n'.encode()
    path.write_bytes(data.replace("\xe9".encode(), b"\xe9"))  # latin-1 byte: not UTF-8
    with pytest.raises(UserError, match=r"p\.jsonl:2: not valid JSON"):
        read_jsonl(path, repair=True)
    assert path.read_bytes() == data.replace("\xe9".encode(), b"\xe9")


def test_file_record_is_size_and_sha256_or_above_the_limit_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\x00\x01" * 1000)
    digest = hashlib.sha256(b"\x00\x01" * 1000).hexdigest()
    assert file_record(f) == {"size": 2000, "sha256": digest}
    assert list(file_record(f)) == ["size", "sha256"]  # the order manifests and provenance records were written in
    assert file_record(f, hash_limit=2000) == {"size": 2000, "sha256": digest}  # up to the limit: hashed
    assert file_record(f, hash_limit=1999) == {"size": 2000, "mtime": os.stat(f).st_mtime}  # above: not read
    with pytest.raises(FileNotFoundError):
        file_record(tmp_path / "missing")


def test_the_manifest_and_provenance_record_files_alike(tmp_path):
    from mamba_align.model.manifest import file_hashes
    from mamba_align.ops.store.provenance import describe_file

    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "w.bin").write_bytes(b"w" * 10)
    described = describe_file(tmp_path)["files"]
    assert file_hashes(tmp_path) == described == {"config.json": file_record(tmp_path / "config.json"),
                                                  "sub/w.bin": file_record(tmp_path / "sub" / "w.bin")}


def test_progress_files_are_the_outputs_own_beside_it(tmp_path):
    from mamba_align.utils import progress_file, progress_files

    out = tmp_path / "mt_bench_answers.jsonl"
    assert progress_file(out, "0123456789ab") == tmp_path / "mt_bench_answers.jsonl.progress-0123456789ab.jsonl"
    for name in ("mt_bench_answers.jsonl.progress-a.jsonl", "mt_bench_answers.jsonl.progress-b.jsonl",
                 "alpaca_eval_outputs.json.progress-a.jsonl", "mt_bench_answers.jsonl.progress-c.tmp"):
        (tmp_path / name).write_text("")
    assert [p.name for p in progress_files(out)] == ["mt_bench_answers.jsonl.progress-a.jsonl",
                                                     "mt_bench_answers.jsonl.progress-b.jsonl"]
