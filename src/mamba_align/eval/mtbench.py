"""MT-Bench: pinned FastChat data, single-answer grading exactly as FastChat's
`gen_judgment.py --mode single`, and the averages of its `show_result.py`.

For each question the judge sees turn 1 (prompt "single-v1", or "single-math-v1" with the GPT-4
reference answer for math, reasoning and coding) and the whole two-turn conversation
("single-v1-multi-turn" / "single-math-v1-multi-turn"): 160 judgments for 80 questions. The
judge's system message is the prompt's `system_prompt`, the user message its `prompt_template`
filled with str.format, sent with n=1, temperature 0, max_tokens 2048 (FastChat's values, also
the judge config's defaults). Ratings are parsed with FastChat's two patterns; a judgment with no
rating scores -1, is left out of the means as in show_result, and is counted in `n_unrated`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import statistics
import time
from pathlib import Path

from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.utils import UserError, fetch_file, sha256_file, write_json, write_jsonl

log = logging.getLogger(__name__)

PINNED_COMMIT = "0e6d3e4beaab66f4d3f93db72541a4abab8af28d"
RAW_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/{commit}/fastchat/llm_judge/data/{path}"
# our file name (<name>.jsonl, as ops/store/layout.MT_BENCH_DATA has them) -> (path under FastChat's data/, sha256 at
# PINNED_COMMIT); eval/ does not import ops/, a test pins the two
DATA_FILES = {
    "question": ("mt_bench/question.jsonl",
                 "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "judge_prompts": ("judge_prompts.jsonl",
                      "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "reference_answer": ("mt_bench/reference_answer/gpt-4.jsonl",
                         "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # FastChat common.py
PROMPT_NAMES = {  # (needs reference, multi-turn) -> judge prompt
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


# ---------------------------------------------------------------------------------------- data
def data_paths(data_dir: str | Path) -> dict[str, Path]:
    """{question, judge_prompts, reference_answer}: the files of a fetched (or local) MT-Bench data folder."""
    return {name: Path(data_dir) / f"{name}.jsonl" for name in DATA_FILES}


def fetch_mt_bench(commit: str, local_dir: str | None, out_dir: str | Path) -> dict:
    """Write out_dir/{question,judge_prompts,reference_answer}.jsonl and out_dir/hashes.json.

    From `local_dir` (files question.jsonl, judge_prompts.jsonl, reference_answer.jsonl) when
    given, else downloaded from FastChat at `commit`; the sha256s are checked when `commit` is
    the pinned one and recorded in every case.
    """
    out_dir = Path(out_dir)
    check = local_dir is None and commit == PINNED_COMMIT
    if local_dir is None and not check:
        log.warning("FastChat commit %s is not the pinned %s: file hashes are recorded, not checked",
                    commit, PINNED_COMMIT)
    hashes, dest, local = {}, data_paths(out_dir), data_paths(local_dir) if local_dir else {}
    for name, (remote, sha) in DATA_FILES.items():
        fetch_file(RAW_URL.format(commit=commit, path=remote), dest[name], sha if check else None, local.get(name))
        hashes[name] = sha256_file(dest[name])
    load_questions(dest["question"])
    load_judge_prompts(dest["judge_prompts"])
    load_answers(dest["reference_answer"])
    info = {"source": str(local_dir) if local_dir else RAW_URL.format(commit=commit, path=""),
            "commit": None if local_dir else commit, "sha256": hashes}
    write_json(out_dir / "hashes.json", info)
    return info


def _rows(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _two_turns(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(t, str) for t in value)


def load_questions(path: str | Path) -> list[dict]:
    """FastChat question file: question_id, category, turns (2 strings) on every line."""
    questions, seen = [], set()
    for i, q in _rows(path):
        for key, ok, expected in (("question_id", lambda v: isinstance(v, int), "an integer"),
                                  ("category", lambda v: isinstance(v, str), "a string"),
                                  ("turns", _two_turns, "a list of 2 strings")):
            if not isinstance(q, dict) or key not in q or not ok(q[key]):
                raise UserError(f"{path}:{i}: key '{key}' must be {expected}")
        if q["question_id"] in seen:
            raise UserError(f"{path}:{i}: question_id {q['question_id']} appears twice")
        seen.add(q["question_id"])
        questions.append(q)
    if not questions:
        raise UserError(f"{path}: no questions")
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    prompts = {}
    for i, p in _rows(path):
        for key in ("name", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(p, dict) or not isinstance(p.get(key), str):
                raise UserError(f"{path}:{i}: key '{key}' must be a string")
        prompts[p["name"]] = p
    missing = [n for n in PROMPT_NAMES.values() if n not in prompts]
    if missing:
        raise UserError(f"{path}: judge prompts {missing} are missing")
    for name in PROMPT_NAMES.values():
        if prompts[name]["output_format"] != "[[rating]]":
            raise UserError(f"{path}: prompt {name} has output_format "
                            f"{prompts[name]['output_format']!r}, expected '[[rating]]'")
    return prompts


def load_answers(path: str | Path) -> dict[int, dict]:
    """FastChat answer file (model answers or reference answers) -> {question_id: row}.

    As FastChat's load_model_answers, a later line for the same question replaces an earlier one.
    """
    answers = {}
    for i, a in _rows(path):
        if not isinstance(a, dict) or not isinstance(a.get("question_id"), int):
            raise UserError(f"{path}:{i}: key 'question_id' must be an integer")
        choices = a.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and _two_turns(choices[0].get("turns"))):
            raise UserError(f"{path}:{i}: key 'choices' must be [{{'index': 0, 'turns': [2 strings]}}]")
        answers[a["question_id"]] = a
    return answers


# ------------------------------------------------------------------------------------- judging
def build_matches(questions: list[dict], answers: dict[int, dict], refs: dict[int, dict],
                  prompts: dict[str, dict]) -> list[dict]:
    """One entry per judgment, in gen_judgment.py's order: turn 1 of the general questions, of
    the reference-based ones, then turn 2 of each. Holds the messages the judge is sent."""
    matches = []
    for multi_turn in (False, True):
        for needs_ref in (False, True):
            name = PROMPT_NAMES[(needs_ref, multi_turn)]
            tmpl = prompts[name]
            for q in questions:
                if (q["category"] in NEED_REF_CATS) != needs_ref:
                    continue
                a = answers[q["question_id"]]["choices"][0]["turns"]
                kwargs = {}
                if needs_ref:
                    ref = refs[q["question_id"]]["choices"][0]["turns"]
                    kwargs["ref_answer_1"] = ref[0]
                    if multi_turn:
                        kwargs["ref_answer_2"] = ref[1]
                if multi_turn:
                    user_prompt = tmpl["prompt_template"].format(
                        question_1=q["turns"][0], question_2=q["turns"][1],
                        answer_1=a[0], answer_2=a[1], **kwargs)
                else:
                    user_prompt = tmpl["prompt_template"].format(
                        question=q["turns"][0], answer=a[0], **kwargs)
                matches.append({
                    "question_id": q["question_id"], "category": q["category"],
                    "turn": 2 if multi_turn else 1, "prompt_name": name, "user_prompt": user_prompt,
                    "messages": [{"role": "system", "content": tmpl["system_prompt"]},
                                 {"role": "user", "content": user_prompt}],
                })
    return matches


def parse_rating(judgment: str) -> float:
    """FastChat's rating: [[x]], else [x], else -1."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    return ast.literal_eval(match.groups()[0]) if match else -1


def combine_ratings(ratings: list[float]) -> float:
    """Median over the repeats that gave a rating; -1 if none did."""
    rated = [r for r in ratings if r != -1]
    return statistics.median(rated) if rated else -1


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], categories: list[str] | None = None) -> dict:
    """show_result.py's single-mode means (turn 1, turn 2, overall over rated rows) plus the
    same per category and the rows without a rating. `rows` have category, turn and score."""
    rated = [r for r in rows if r["score"] != -1]

    def means(rs):
        return {"turn_1": _mean([r["score"] for r in rs if r["turn"] == 1]),
                "turn_2": _mean([r["score"] for r in rs if r["turn"] == 2]),
                "overall": _mean([r["score"] for r in rs])}

    categories = categories or list(dict.fromkeys(r["category"] for r in rows))
    return {
        "scores": means(rated),
        "per_category": {c: means([r for r in rated if r["category"] == c]) for c in categories},
        "n_unrated": len(rows) - len(rated),
        "unrated": [[r["question_id"], r["turn"]] for r in rows if r["score"] == -1],
    }


def judge_mt_bench(answers_path, question_path, judge_prompts_path, reference_path, judge: JudgeSettings | dict,
                   out_json, cache_path, judgments_path=None, base_url: str | None = None,
                   prices: tuple[float, float] | None = None, model: dict | None = None) -> dict:
    """Grade a model's MT-Bench answers; write out_json (the summary) and the judgments JSONL.

    `model`: what the summary records about the scored model (provenance.scored_model: model_key,
    model_run_key), for `mamba-align status` and the report to tell a stale score from a current one.

    Judge calls go through JudgeClient (cached in `cache_path`, so a rerun only sends what is
    missing); with backend "local" and no base_url the local judge server is started as needed.
    `judge`: the judge settings, or judge.* as a dict (a rule's params).
    """
    from mamba_align.eval.judge.client import JudgeClient

    judge = JudgeSettings.from_params(judge)

    t0 = time.monotonic()
    questions = load_questions(question_path)
    prompts = load_judge_prompts(judge_prompts_path)
    refs = load_answers(reference_path)
    answers = load_answers(answers_path)
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise UserError(f"{answers_path}: no answer to question(s) {missing}")
    missing = [q["question_id"] for q in questions
               if q["category"] in NEED_REF_CATS and q["question_id"] not in refs]
    if missing:
        raise UserError(f"{reference_path}: no reference answer to question(s) {missing}")
    model_ids = sorted({str(answers[q["question_id"]].get("model_id")) for q in questions})
    if len(model_ids) != 1:
        raise UserError(f"{answers_path}: answers from several models {model_ids}; expected one")
    model_id = model_ids[0]

    matches = build_matches(questions, answers, refs, prompts)
    with JudgeClient(judge, cache_path, base_url=base_url, prices=prices) as client:
        n_to_send = client.pending(matches)
        results = client.complete_many([{"messages": m["messages"]} for m in matches])

    judgments = []
    for m, res in zip(matches, results):
        ratings = [parse_rating(r["content"]) for r in res]
        row = {"question_id": m["question_id"], "model": model_id,
               "judge": [judge.model, m["prompt_name"]], "user_prompt": m["user_prompt"],
               "judgment": res[0]["content"], "score": combine_ratings(ratings), "turn": m["turn"],
               "tstamp": res[0]["tstamp"]}
        if len(res) > 1:
            row["repeat_scores"] = ratings
            row["repeat_judgments"] = [r["content"] for r in res]
        judgments.append(row)
    summary = summarize([dict(j, category=m["category"]) for j, m in zip(judgments, matches)],
                        list(dict.fromkeys(q["category"] for q in questions)))
    reported = sorted({r["model_reported"] for res in results for r in res})
    usage = {}
    for res in results:
        for r in res:
            for k, v in (r.get("usage") or {}).items():
                if isinstance(v, (int, float)):
                    usage[k] = usage.get(k, 0) + v

    if judgments_path is None:
        judgments_path = Path(out_json).with_name(Path(out_json).stem + "_judgments.jsonl")
    write_jsonl(judgments_path, judgments)
    out = {
        "benchmark": "mt_bench",
        "model_id": model_id,
        **(model or {"model_key": None, "model_run_key": None}),
        "judge": {"model_requested": judge.model,
                  "model_reported": reported[0] if len(reported) == 1 else reported,
                  "backend": judge.backend, "repeats": judge.repeats,
                  "temperature": judge.temperature, "max_tokens": judge.max_tokens},
        "n_questions": len(questions),
        "n_requests": sum(len(r) for r in results),
        "n_sent_this_run": n_to_send,
        **summary,
        "usage": usage,
        "data_hashes": {"answers": sha256_file(answers_path), "question": sha256_file(question_path),
                        "judge_prompts": sha256_file(judge_prompts_path),
                        "reference_answer": sha256_file(reference_path)},
        "judgments": str(judgments_path),
        "wall_time_s": round(time.monotonic() - t0, 3),
    }
    if judge.backend == "local":
        out["judge"]["local"] = dataclasses.asdict(judge.local)
    write_json(out_json, out)
    s = out["scores"]
    log.info("MT-Bench %s: turn 1 %s, turn 2 %s, overall %s (%d unrated)", model_id,
             s["turn_1"], s["turn_2"], s["overall"], out["n_unrated"])
    return out
