"""MT-Bench: data loading and hashes, FastChat-identical judge requests, rating parsing, averages,
fault tolerance and resume, all against the fake OpenAI server."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import KEY, FakeOpenAI, judge_cfg

from mamba_align import cli
from mamba_align.eval import mtbench
from mamba_align.eval.judge.client import request_key
from mamba_align.ops.reporting.report import plot_radar
from mamba_align.utils import UserError, read_json, read_jsonl

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mt_bench"
DEMO = Path(__file__).resolve().parents[1] / "config" / "demo" / "mt_bench"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason="no ../shared/reference/mt_bench")
PARAMS = {"temperature": 0.0, "max_tokens": 2048}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def data(tmp_path) -> Path:
    """The real MT-Bench files, through fetch_mt_bench's local_dir path."""
    if not REF.is_dir():
        pytest.skip("no ../shared/reference/mt_bench")
    local = tmp_path / "local"
    local.mkdir()
    for src, name in (("question.jsonl", "question.jsonl"), ("judge_prompts.jsonl", "judge_prompts.jsonl"),
                      ("reference_answer_gpt-4.jsonl", "reference_answer.jsonl")):
        shutil.copyfile(REF / src, local / name)
    out = tmp_path / "data"
    mtbench.fetch_mt_bench(mtbench.PINNED_COMMIT, str(local), out)
    return out


def write_answers(path: Path, questions_path: Path, model_id: str = "demo-dpo") -> Path:
    """Answers in FastChat's format; braces and backslashes check that only the template is formatted."""
    rows = [{"question_id": q["question_id"], "answer_id": f"a{q['question_id']}", "model_id": model_id,
             "choices": [{"index": 0, "turns": [f"Answer {q['question_id']}.1 {{x}} \\n",
                                                f"Answer {q['question_id']}.2 {{}}"]}], "tstamp": 0.0}
            for q in read_jsonl(questions_path)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(data: Path, tmp_path: Path, fake: FakeOpenAI, **cfg) -> dict:
    answers = tmp_path / "answers.jsonl"
    if not answers.exists():
        write_answers(answers, data / "question.jsonl")
    return mtbench.judge_mt_bench(answers, data / "question.jsonl", data / "judge_prompts.jsonl",
                                  data / "reference_answer.jsonl", judge_cfg(**cfg), tmp_path / "mtbench.json",
                                  tmp_path / "cache.jsonl", tmp_path / "judgments.jsonl", base_url=fake.base_url)


def rating_by_question(body) -> str:
    """A deterministic judge: rating (qid % 10) + 1 for turn 1, one less for turn 2; none for qid 81 turn 2."""
    user = body["messages"][1]["content"]
    qid = int(user.split("Answer ")[1].split(".")[0])
    turn2 = "Assistant A's Conversation" in user
    if qid == 81 and turn2:
        return "I cannot rate this."
    return f"Explanation. Rating: [[{qid % 10 + 1 - turn2}]]"


# ------------------------------------------------------------------------------------ data
@needs_ref
def test_fetch_downloads_pinned_files_and_checks_hashes(tmp_path, monkeypatch):
    import urllib.request

    base = f"https://raw.githubusercontent.com/lm-sys/FastChat/{mtbench.PINNED_COMMIT}/fastchat/llm_judge/data"
    served = {f"{base}/{p}": f
              for p, f in (("mt_bench/question.jsonl", "question.jsonl"),
                           ("judge_prompts.jsonl", "judge_prompts.jsonl"),
                           ("mt_bench/reference_answer/gpt-4.jsonl", "reference_answer_gpt-4.jsonl"))}
    urls = []

    def urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO((REF / served[url]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    info = mtbench.fetch_mt_bench(mtbench.PINNED_COMMIT, None, tmp_path / "d")
    assert sorted(urls) == sorted(served)
    assert info["sha256"] == {k: sha for k, (_, sha) in mtbench.DATA_FILES.items()}
    assert read_json(tmp_path / "d" / "hashes.json")["commit"] == mtbench.PINNED_COMMIT
    assert len(mtbench.load_questions(tmp_path / "d" / "question.jsonl")) == 80

    # a changed upstream file is refused
    served = {u: "judge_prompts.jsonl" for u in served}
    with pytest.raises(UserError, match="question.jsonl: sha256 is .*, expected 119565ad"):
        mtbench.fetch_mt_bench(mtbench.PINNED_COMMIT, None, tmp_path / "e")


def test_demo_data_loads(tmp_path):
    info = mtbench.fetch_mt_bench(mtbench.PINNED_COMMIT, str(DEMO), tmp_path / "d")
    assert info["commit"] is None and set(info["sha256"]) == {"question", "judge_prompts", "reference_answer"}


@pytest.mark.parametrize("line, key", [
    ({"category": "math", "turns": ["a", "b"]}, "question_id"),
    ({"question_id": "81", "category": "math", "turns": ["a", "b"]}, "question_id"),
    ({"question_id": 81, "turns": ["a", "b"]}, "category"),
    ({"question_id": 81, "category": "math", "turns": ["a"]}, "turns"),
    ({"question_id": 81, "category": "math", "turns": ["a", 2]}, "turns"),
])
def test_bad_question_names_file_line_and_key(tmp_path, line, key):
    path = tmp_path / "question.jsonl"
    good = {"question_id": 80, "category": "writing", "turns": ["a", "b"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=rf"question.jsonl:2: key '{key}'"):
        mtbench.load_questions(path)


@needs_ref
def test_missing_answer_is_named(data, tmp_path):
    answers = write_answers(tmp_path / "answers.jsonl", data / "question.jsonl")
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[1:]))  # drop question 81
    with FakeOpenAI() as fake, pytest.raises(UserError, match=r"no answer to question\(s\) \[81\]"):
        run(data, tmp_path, fake)
    assert fake.log == []


# ---------------------------------------------------------------------- parsing, averaging
@pytest.mark.parametrize("judgment, rating", [
    ("The answer is good. Rating: [[8]]", 8),
    ("Rating: [[6.5]]", 6.5),
    ("[[10]]", 10),
    ("Rating: [[7.]]", 7.0),
    ("first [[3]] then [[9]]", 3),
    ("only single brackets: Rating: [4]", 4),
    ("[2] before [[5]]", 5),  # the double-bracket pattern wins wherever it is
    ("Rating: [[ 5 ]]", -1),
    ("Rating: 5/10", -1),
    ("[[five]]", -1),
])
def test_parse_rating_as_fastchat(judgment, rating):
    got = mtbench.parse_rating(judgment)
    assert got == rating and type(got) is type(rating)


def test_summarize_matches_hand_computed_table():
    rows = [  # category, turn, score
        ("writing", 1, 8), ("writing", 2, 6), ("math", 1, 3), ("math", 2, -1),
        ("math", 1, 5), ("math", 2, 2), ("coding", 1, -1), ("coding", 2, -1),
    ]
    s = mtbench.summarize([{"question_id": i, "category": c, "turn": t, "score": x}
                           for i, (c, t, x) in enumerate(rows)])
    assert s["scores"] == {"turn_1": (8 + 3 + 5) / 3, "turn_2": (6 + 2) / 2, "overall": (8 + 6 + 3 + 5 + 2) / 5}
    assert s["per_category"] == {
        "writing": {"turn_1": 8, "turn_2": 6, "overall": 7},
        "math": {"turn_1": 4, "turn_2": 2, "overall": 10 / 3},
        "coding": {"turn_1": None, "turn_2": None, "overall": None},
    }
    assert s["n_unrated"] == 3 and s["unrated"] == [[3, 2], [6, 1], [7, 2]]


def test_median_of_repeats():
    assert mtbench.combine_ratings([7, -1, 3]) == 5
    assert mtbench.combine_ratings([7, 2, 9]) == 7
    assert mtbench.combine_ratings([-1, -1]) == -1


# ------------------------------------------------------------------------ judge requests
def fastchat_body(q: dict, ans: list[str], ref: list[str] | None, prompts: dict, turn: int) -> dict:
    """The body FastChat's run_judge_single + chat_completion_openai send (chatgpt template:
    the judge prompt's system_prompt as the system message)."""
    if turn == 1:
        p = prompts["single-math-v1" if ref else "single-v1"]
        kw = {"ref_answer_1": ref[0]} if ref else {}
        user = p["prompt_template"].format(question=q["turns"][0], answer=ans[0], **kw)
    else:
        p = prompts["single-math-v1-multi-turn" if ref else "single-v1-multi-turn"]
        kw = {"ref_answer_1": ref[0], "ref_answer_2": ref[1]} if ref else {}
        user = p["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                           answer_1=ans[0], answer_2=ans[1], **kw)
    return {"model": "gpt-4", "messages": [{"role": "system", "content": p["system_prompt"]},
                                           {"role": "user", "content": user}],
            "n": 1, "temperature": 0.0, "max_tokens": 2048}


def canon(body) -> str:
    return json.dumps(body, sort_keys=True)


@needs_ref
def test_full_run_sends_exactly_fastchats_160_requests(data, tmp_path):
    with FakeOpenAI(rating_by_question, delay_s=0.02) as fake:
        t0 = time.monotonic()
        out = run(data, tmp_path, fake)
        wall = time.monotonic() - t0
    print(f"\n80-question MT-Bench run, concurrency 8, fake judge latency 20 ms: {wall:.2f} s "
          f"({len(fake.log)} requests)")
    assert 1 < fake.max_in_flight <= 8  # concurrent, and bounded by judge.concurrency

    questions = read_jsonl(REF / "question.jsonl")
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(REF / "reference_answer_gpt-4.jsonl")}
    prompts = {p["name"]: p for p in read_jsonl(REF / "judge_prompts.jsonl")}
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(tmp_path / "answers.jsonl")}
    expected = [fastchat_body(q, answers[q["question_id"]],
                              refs[q["question_id"]] if q["category"] in ("math", "reasoning", "coding") else None,
                              prompts, turn)
                for q in questions for turn in (1, 2)]
    assert len(fake.log) == 160
    assert Counter(r.raw.count(b'"model"') for r in fake.log) == {1: 160}
    assert sorted(map(canon, fake.bodies())) == sorted(map(canon, expected))

    # two prompts spelled out by hand, not through str.format
    b81 = next(b for b in fake.bodies() if "Answer 81.1" in b["messages"][1]["content"]
               and "Conversation" not in b["messages"][1]["content"])
    q81 = questions[0]["turns"][0]
    assert b81["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
         "response provided by an AI assistant to the user question displayed below. Your evaluation should consider "
         "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
         "response. "
         "Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your "
         "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
         "\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n" + q81 + "\n\n[The Start of Assistant's "
         "Answer]\nAnswer 81.1 {x} \\n\n[The End of Assistant's Answer]"}]
    b101 = next(b for b in fake.bodies() if "Answer 101.2" in b["messages"][1]["content"])
    q101 = questions[20]
    assert q101["question_id"] == 101 and q101["category"] == "reasoning"
    assert b101["messages"][0]["content"].startswith("Please act as an impartial judge and evaluate the quality of "
                                                     "the response provided by an AI assistant to the user question. "
                                                     "Your evaluation should consider correctness and helpfulness.")
    assert b101["messages"][1]["content"] == (
        "<|The Start of Reference Answer|>\n\n### User:\n" + q101["turns"][0] + "\n\n### Reference answer:\n"
        + refs[101][0] + "\n\n### User:\n" + q101["turns"][1] + "\n\n### Reference answer:\n" + refs[101][1]
        + "\n\n<|The End of Reference Answer|>\n\n\n<|The Start of Assistant A's Conversation with User|>\n\n"
        "### User:\n" + q101["turns"][0] + "\n\n### Assistant A:\nAnswer 101.1 {x} \\n\n\n### User:\n"
        + q101["turns"][1] + "\n\n### Assistant A:\nAnswer 101.2 {}\n\n<|The End of Assistant A's Conversation "
        "with User|>")

    # scores: turn 1 = qid % 10 + 1 over all 80, turn 2 one less, except q81 turn 2 (unrated)
    t1 = [q % 10 + 1 for q in range(81, 161)]
    t2 = [q % 10 for q in range(82, 161)]
    assert out["scores"]["turn_1"] == pytest.approx(sum(t1) / 80)
    assert out["scores"]["turn_2"] == pytest.approx(sum(t2) / 79)
    assert out["scores"]["overall"] == pytest.approx((sum(t1) + sum(t2)) / 159)
    assert out["n_unrated"] == 1 and out["unrated"] == [[81, 2]]
    assert out["per_category"]["writing"]["turn_2"] == pytest.approx(sum(q % 10 for q in range(82, 91)) / 9)
    assert list(out["per_category"]) == ["writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                         "stem", "humanities"]
    assert (out["n_questions"], out["n_requests"], out["n_sent_this_run"]) == (80, 160, 160)
    assert out["judge"] == {"model_requested": "gpt-4", "model_reported": "fake-judge-0613", "backend": "openai",
                            "repeats": 1, "temperature": 0.0, "max_tokens": 2048}
    assert out["usage"]["total_tokens"] > 0 and out["model_id"] == "demo-dpo"
    assert out["data_hashes"]["question"] == mtbench.DATA_FILES["question"][1]

    # judgments in FastChat's shape, readable by its show_result
    judgments = read_jsonl(tmp_path / "judgments.jsonl")
    assert len(judgments) == 160
    assert set(judgments[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert judgments[0]["judge"] == ["gpt-4", "single-v1"]
    assert next(j for j in judgments if j["question_id"] == 81 and j["turn"] == 2)["score"] == -1
    assert KEY not in (tmp_path / "mtbench.json").read_text() + (tmp_path / "cache.jsonl").read_text()

    # a second run is answered from the cache
    fake2 = FakeOpenAI(rating_by_question)
    with fake2:
        again = run(data, tmp_path, fake2)
    assert fake2.log == [] and again["scores"] == out["scores"] and again["n_sent_this_run"] == 0


@needs_ref
def test_full_run_with_30_percent_faults(data, tmp_path):
    faults = {"429": 0.1, "500": 0.1, "timeout": 0.05, "garbage": 0.05}
    with FakeOpenAI(rating_by_question, faults=faults, seed=4, hang_s=1.0, retry_after_s=0.01) as fake:
        out = run(data, tmp_path, fake, timeout_s=0.3)
    assert sum(r.fault is not None for r in fake.log) >= 30
    answered = Counter(canon(b) for b in fake.answered_bodies())
    assert len(answered) == 160 and max(answered.values()) == 1
    assert out["n_unrated"] == 1 and len(read_jsonl(tmp_path / "judgments.jsonl")) == 160


@needs_ref
def test_repeats_take_the_median(data, tmp_path):
    seen = Counter()

    def responder(body):
        seen[canon(body)] += 1
        return ["Rating: [[2]]", "no rating", "Rating: [[9]]"][seen[canon(body)] - 1]

    with FakeOpenAI(responder) as fake:
        out = run(data, tmp_path, fake, repeats=3)
    assert len(fake.log) == 480 and out["n_requests"] == 480
    assert out["scores"]["overall"] == 5.5 and out["n_unrated"] == 0
    j = read_jsonl(tmp_path / "judgments.jsonl")[0]
    assert sorted(j["repeat_scores"]) == [-1, 2, 9] and j["score"] == 5.5


CRASH_SCRIPT = """
import sys
from mamba_align.eval import mtbench
d, tmp, url = sys.argv[1:4]
cfg = {"backend": "openai", "model": "gpt-4", "base_url": None, "api_key_env": "OPENAI_API_KEY",
       "concurrency": 4, "repeats": 1, "max_retries": 8, "timeout_s": 5, "temperature": 0.0, "max_tokens": 2048}
mtbench.judge_mt_bench(f"{tmp}/answers.jsonl", f"{d}/question.jsonl", f"{d}/judge_prompts.jsonl",
                       f"{d}/reference_answer.jsonl", cfg, f"{tmp}/mtbench.json", f"{tmp}/cache.jsonl",
                       base_url=url)
"""


@needs_ref
def test_killed_run_resumes_with_only_the_missing_requests(data, tmp_path):
    write_answers(tmp_path / "answers.jsonl", data / "question.jsonl")
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAI(rating_by_question, delay_s=0.01) as fake:
        proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(data), str(tmp_path), fake.base_url],
                                env={**os.environ, "OPENAI_API_KEY": KEY}, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while len(read_jsonl(cache)) < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "mtbench.json").exists()
        done = {r["key"] for r in read_jsonl(cache)}
        assert 40 <= len(done) < 160
        first = len(fake.log)
        out = run(data, tmp_path, fake)
        # a request the kill cut short can reach the server after `first` was taken (under load, as with -n 2):
        # its body is incomplete (None) and it was never answered
        resent = [b for b in fake.bodies()[first:] if b is not None]
    assert len(resent) == 160 - len(done) == out["n_sent_this_run"]
    assert not {request_key("gpt-4", b["messages"], PARAMS, 0) for b in resent} & done
    assert len(read_jsonl(cache)) == 160 and out["n_unrated"] == 1


def test_demo_data_through_the_cli(tmp_path):
    """The demo's own prompts and questions, driven through the command as a user would."""
    cli.main(["mt-bench", "fetch", "--local-dir", str(DEMO), "--out-dir", str(tmp_path / "d")])
    answers = write_answers(tmp_path / "answers.jsonl", tmp_path / "d" / "question.jsonl")
    cfg_path = tmp_path / "judge.json"
    cfg_path.write_text(json.dumps(judge_cfg()))
    with FakeOpenAI(rating_by_question) as fake:
        cli.main(["mt-bench", "judge", "--answers", str(answers), "--data-dir", str(tmp_path / "d"),
                  "--judge-config", str(cfg_path), "--base-url", fake.base_url,
                  "--cache", str(tmp_path / "cache.jsonl"), "--out", str(tmp_path / "mtbench.json")])
    out = read_json(tmp_path / "mtbench.json")
    n = len(read_jsonl(tmp_path / "d" / "question.jsonl"))
    assert len(fake.log) == out["n_requests"] == 2 * n
    assert (tmp_path / "mtbench_judgments.jsonl").exists()

    # the report's radar reads the summary as written
    plot_radar([("sft", tmp_path / "mtbench.json"), ("dpo", tmp_path / "mtbench.json")], tmp_path / "radar.png")
    assert (tmp_path / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_records_the_scored_models_keys(data, tmp_path):
    """Issue #28: a score names the model it was computed for (status and the report compare it with the config's)."""
    from mamba_align.ops.store.provenance import scored_model

    model_dir = tmp_path / "models" / "dpo"
    model_dir.mkdir(parents=True)
    (model_dir / "run.json").write_text(json.dumps({"key": "feedbeef0001"}))
    learned = {"base": {"source": "x"}, "sft": {"learning_rate": 1e-5}, "dpo": {"beta": 0.01}}
    answers = write_answers(tmp_path / "answers.jsonl", data / "question.jsonl")
    with FakeOpenAI(lambda body: "Rating: [[5]]") as fake:
        mtbench.judge_mt_bench(answers, data / "question.jsonl", data / "judge_prompts.jsonl",
                               data / "reference_answer.jsonl", judge_cfg(), tmp_path / "mtbench.json",
                               tmp_path / "cache.jsonl", tmp_path / "judgments.jsonl", base_url=fake.base_url,
                               model=scored_model(learned, model_dir))
    out = read_json(tmp_path / "mtbench.json")
    assert out["model_run_key"] == "feedbeef0001" and len(out["model_key"]) == 12
    assert scored_model(learned, tmp_path / "nowhere") == {"model_key": out["model_key"], "model_run_key": None}


def test_the_fetched_file_names_are_the_results_layouts():
    """eval/ does not import ops/: mtbench names its data files itself, and they must be layout's."""
    from mamba_align.ops.store import layout

    assert sorted(p.name for p in mtbench.data_paths("d").values()) == sorted(layout.MT_BENCH_DATA.values())
