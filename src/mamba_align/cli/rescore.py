"""`mamba-align rescore [results] --stage S`: MT-Bench scores recomputed from the stored judgments (no judge call)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mamba_align.cli.status import TRAINED
from mamba_align.ops.store import layout
from mamba_align.utils import UserError, read_json, read_jsonl


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--stage", choices=TRAINED, default=layout.FINAL_STAGE)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")


def run(args: argparse.Namespace) -> None:
    r = rescore(args.results, args.stage)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        s = r["scores"]
        print(f"MT-Bench {args.stage} rescored from {r['n']} judgments: overall {s['overall']}, "
              f"turn 1 {s['turn_1']}, turn 2 {s['turn_2']} ({r['n_unrated']} unrated)")
        if r["stored_scores"] is not None:
            print("differs from" if r["changed"] else "same as", "the stored summary")


def rescore(results: str | Path, stage: str) -> dict:
    """MT-Bench scores recomputed from the stored judgments' text (FastChat's rating parser), without any
    judge call: for a changed parser, or to check a summary against its judgments."""
    from mamba_align.eval.mtbench import combine_ratings, parse_rating, summarize

    results = Path(results)
    paths = layout.Results(str(results))
    stored_path = Path(paths.eval_summary(stage, "mtbench"))
    # beside the summary (the judge rule's declared output); earlier runs kept it in eval/<stage>/
    judgments_path = Path(paths.scored(layout.MT_BENCH_JUDGMENTS, layout.stage_dir(stage)))
    if not judgments_path.exists() and Path(paths.stage_eval(stage, layout.MT_BENCH_JUDGMENTS)).exists():
        judgments_path = Path(paths.stage_eval(stage, layout.MT_BENCH_JUDGMENTS))
    questions_path = Path(paths.mt_bench_data()["questions"])
    for p in (judgments_path, questions_path):
        if not p.exists():
            raise UserError(f"{p} does not exist: judge the {stage} model first (results/eval/... mtbench.json)")
    try:
        categories = {q["question_id"]: q["category"] for q in read_jsonl(questions_path)}
    except KeyError as e:
        raise UserError(f"{questions_path}: a question without {e} (not MT-Bench's question.jsonl)") from None
    rows = []
    for i, j in enumerate(read_jsonl(judgments_path), 1):
        if missing := [k for k in ("question_id", "judgment") if k not in j]:
            raise UserError(f"{judgments_path}:{i}: no {' or '.join(missing)} (not an MT-Bench judgment)")
        texts = j.get("repeat_judgments") or [j["judgment"]]
        if j["question_id"] not in categories:
            raise UserError(f"{judgments_path}:{i}: question {j['question_id']} is not in {questions_path}")
        rows.append({**j, "category": categories[j["question_id"]],
                     "score": combine_ratings([parse_rating(t) for t in texts])})
    summary = summarize(rows, list(dict.fromkeys(categories.values())))
    try:
        stored = read_json(stored_path)["scores"] if stored_path.exists() else None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{stored_path}: not an MT-Bench summary ({type(e).__name__}: {e}); rebuild it with "
                        f"snakemake {stored_path}") from None
    return {"stage": stage, "judgments": str(judgments_path), "n": len(rows), **summary,
            "stored_scores": stored, "changed": stored is not None and stored != summary["scores"]}
