"""Generation steps with a scripted engine: FastChat's answer format, turns, temperatures, resumption."""

from __future__ import annotations

import json
import os

import pytest

from mamba_align.eval import generate
from mamba_align.utils import read_jsonl


class StubTokenizer:
    """Token ids are the UTF-8 bytes of the conversation's JSON (enough to see what was asked)."""

    chat_template = "{{ user }}"  # a template without a system turn

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return list(json.dumps(messages).encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode()


class ScriptedEngine:
    def __init__(self, fail_after_calls=None):
        self.tokenizer = StubTokenizer()
        self.calls = []
        self.fail_after_calls = fail_after_calls

    def generate(self, prompts, sampling):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("node lost")
        self.calls.append((len(prompts), sampling.temperature))
        outs = []
        for p in prompts:
            msgs = json.loads(bytes(p).decode())
            outs.append(list(f"A{len(msgs)}:{msgs[-1]['content']}@{sampling.temperature}".encode()))
        return outs


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["w1", "w2"]},
    {"question_id": 2, "category": "math", "turns": ["m1", "m2"]},
    {"question_id": 3, "category": "stem", "turns": ["s1", "s2"]},
]


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    qpath = tmp_path / "question.jsonl"
    qpath.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return tmp_path, qpath


def test_mt_bench_answers_in_fastchat_format_with_per_category_temperature(setup):
    tmp, qpath = setup
    out = tmp / "answers.jsonl"
    generate.generate_mt_bench(tmp / "model", qpath, out, "m-dpo", engine=ScriptedEngine())
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    by_id = {r["question_id"]: r["choices"][0]["turns"] for r in rows}
    assert by_id[1] == ["A1:w1@0.7", "A3:w2@0.7"]  # turn 2 sees user 1, answer 1, user 2
    assert by_id[2] == ["A1:m1@0.0", "A3:m2@0.0"]
    assert by_id[3] == ["A1:s1@0.1", "A3:s2@0.1"]


def test_mt_bench_resumes_after_a_crash_and_never_reuses_another_models_answers(setup, monkeypatch):
    tmp, qpath = setup
    monkeypatch.setattr(generate, "CHUNK", 1)  # one question per engine round (2 turns = 2 calls)
    out = tmp / "answers.jsonl"
    with pytest.raises(RuntimeError):
        generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1,
                                   engine=ScriptedEngine(fail_after_calls=2))
    assert not out.exists()
    engine = ScriptedEngine()
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1, engine=engine)
    assert len(engine.calls) == 4  # the first question was kept; two questions x two turns remain
    assert len(read_jsonl(out)) == 3
    assert not list(tmp.glob("answers.jsonl.progress-*"))  # the output is complete: its progress file went
    # the model is retrained: its files change, so nothing of the old progress is reused
    (tmp / "model" / "config.json").write_text('{"retrained": true}')
    engine = ScriptedEngine()
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1, engine=engine)
    assert len(engine.calls) == 6


def _crash_after_one_question(tmp, qpath, out):
    with pytest.raises(RuntimeError):
        generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1,
                                   engine=ScriptedEngine(fail_after_calls=2))


def test_a_model_changed_after_a_crash_resumes_nothing_and_its_stale_progress_goes(setup, monkeypatch):
    tmp, qpath = setup
    monkeypatch.setattr(generate, "CHUNK", 1)
    out = tmp / "answers.jsonl"
    _crash_after_one_question(tmp, qpath, out)
    [stale] = tmp.glob("answers.jsonl.progress-*")
    (tmp / "model" / "config.json").write_text('{"retrained": true}')  # retrained between the crash and the rerun
    engine = ScriptedEngine()
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1, engine=engine)
    assert len(engine.calls) == 6  # every question answered by the new model: none of the old model's kept
    assert not stale.exists() and not list(tmp.glob("answers.jsonl.progress-*"))


def test_an_unchanged_model_resumes_whatever_its_files_times_and_records(setup, monkeypatch):
    """The progress key is the model's identity (its files' contents): a byte-identical rewrite (a reused stored
    model, a copy) or a manifest / run.json written beside it keeps the answers."""
    from mamba_align.model.manifest import write_manifest

    tmp, qpath = setup
    monkeypatch.setattr(generate, "CHUNK", 1)
    out = tmp / "answers.jsonl"
    _crash_after_one_question(tmp, qpath, out)
    config = tmp / "model" / "config.json"
    config.write_bytes(config.read_bytes())
    os.utime(config, ns=(0, 10**18))  # another modification time, the same bytes
    write_manifest(tmp / "model", "train_sft")
    (tmp / "model" / "run.json").write_text('{"key": "0123456789ab"}')
    engine = ScriptedEngine()
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=1, engine=engine)
    assert len(engine.calls) == 4  # the first question was kept


def test_another_batch_size_after_a_crash_resumes_nothing(setup, monkeypatch):
    """Sampled answers depend on how prompts were batched (each engine call seeds its sampling): a rerun at
    another batch size answers everything again rather than mixing answers of two batchings in one file."""
    tmp, qpath = setup
    monkeypatch.setattr(generate, "CHUNK", 1)
    out = tmp / "answers.jsonl"
    _crash_after_one_question(tmp, qpath, out)
    engine = ScriptedEngine()
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", batch_size=2, engine=engine)
    assert len(engine.calls) == 6  # three questions x two turns: none of the batch-1 answers kept
    assert not list(tmp.glob("answers.jsonl.progress-*"))  # the batch-1 progress went with the complete output


def test_the_progress_key_is_the_model_stores_identity(setup):
    from mamba_align.model.manifest import model_identity
    from mamba_align.ops.store import runs

    tmp, _ = setup
    model, out = tmp / "model", tmp / "answers.jsonl"
    assert runs.model_identity is model_identity  # one notion: the training key's parent model is this identity
    first = generate.progress_path(out, model, "m", 1024)
    assert generate.progress_path(out, model, "m", 1024) == first
    assert generate.progress_path(out, model, "m", 512) != first  # other settings: another progress file
    original = model_identity(model)
    (model / "config.json").write_text('{"retrained": true}')
    assert model_identity(model) != original and generate.progress_path(out, model, "m", 1024) != first


def test_alpaca_eval_outputs_in_order_and_resumable(setup, monkeypatch):
    tmp, _ = setup
    monkeypatch.setattr(generate, "CHUNK", 2)
    data = tmp / "alpaca_eval.json"
    data.write_text(json.dumps([{"instruction": f"i{k}", "output": "ref", "generator": "ref", "dataset": "d"}
                                for k in range(5)]))
    out = tmp / "outputs.json"
    with pytest.raises(RuntimeError):
        generate.generate_alpaca_eval(tmp / "model", data, out, "m-sft", batch_size=2,
                                      engine=ScriptedEngine(fail_after_calls=1))
    engine = ScriptedEngine()
    generate.generate_alpaca_eval(tmp / "model", data, out, "m-sft", batch_size=2, engine=engine)
    assert [n for n, _ in engine.calls] == [2, 1]  # the first chunk of two was kept
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [f"i{k}" for k in range(5)]
    assert rows[3] == {"instruction": "i3", "output": "A1:i3@0.7", "generator": "m-sft", "dataset": "d"}


def test_bad_question_file_is_named(tmp_path):
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["x"]}\n')
    with pytest.raises(Exception, match="category"):
        generate.load_mt_bench_questions(bad)


def test_prompts_get_the_empty_system_turn_training_had(setup):
    tmp, qpath = setup
    tok = StubTokenizer()
    tok.chat_template = "<|system|> <|user|> <|assistant|>"
    engine = ScriptedEngine()
    engine.tokenizer = tok
    out = tmp / "answers.jsonl"
    generate.generate_mt_bench(tmp / "model", qpath, out, "m", engine=engine)
    turns = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(out)}
    assert turns[2] == ["A2:m1@0.0", "A4:m2@0.0"]  # system + user; system + user + assistant + user


def test_mt_bench_samples_with_fastchat_top_k(setup):
    tmp, qpath = setup
    seen = []

    class Recording(ScriptedEngine):
        def generate(self, prompts, sampling):
            seen.append(sampling.top_k)
            return super().generate(prompts, sampling)

    generate.generate_mt_bench(tmp / "model", qpath, tmp / "a.jsonl", "m", engine=Recording())
    assert set(seen) == {50}


def _tear_last_line(path) -> None:
    """What a crash mid-append leaves: the last row cut short, without its newline."""
    data = path.read_text()
    path.write_text(data[: data.rstrip("\n").rfind("\n") + 1 + 12])


@pytest.mark.parametrize("bench", ["mt_bench", "alpaca_eval"])
def test_a_torn_progress_line_is_dropped_repaired_and_regenerated_once(setup, monkeypatch, caplog, bench):
    tmp, qpath = setup
    monkeypatch.setattr(generate, "CHUNK", 1)
    if bench == "mt_bench":
        run = lambda engine: generate.generate_mt_bench(tmp / "model", qpath, tmp / "out", "m",  # noqa: E731
                                                        batch_size=1, engine=engine)
        calls_per_item = 2  # two turns
    else:
        data = tmp / "alpaca_eval.json"
        data.write_text(json.dumps([{"instruction": f"i{k}"} for k in range(3)]))
        run = lambda engine: generate.generate_alpaca_eval(tmp / "model", data, tmp / "out", "m",  # noqa: E731
                                                           batch_size=1, engine=engine)
        calls_per_item = 1
    with pytest.raises(RuntimeError):
        run(ScriptedEngine(fail_after_calls=2 * calls_per_item))
    [progress] = tmp.glob("out.progress-*.jsonl")
    _tear_last_line(progress)
    engine = ScriptedEngine()
    run(engine)  # the torn item (the second) and the third are generated again, once each
    assert len(engine.calls) == 2 * calls_per_item
    assert "progress" in caplog.text and ":2: dropping a torn last line" in caplog.text
    out = tmp / "out"
    assert len(json.loads(out.read_text()) if bench == "alpaca_eval" else read_jsonl(out)) == 3
    assert not progress.exists()  # the output is complete: its progress file goes
