"""The `mamba-align` command: what a user asks between Snakemake runs.

    mamba-align status [results] [--configfile F ...]
                                            which stages are done, training checkpoints and ETA, eval progress,
                                            scores (each marked stale when computed for another model than the
                                            config's), the report, and the last error of each failed step
    mamba-align rescore [results] --stage S re-score stored MT-Bench judgments (no judge call)
    mamba-align plan [--config ...]         GPU-hours, wall time and judge cost before anything runs

The workflow itself runs with snakemake (README: "The real run"); each step also runs alone as
`python -m mamba_align.<module>`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mamba_align.ops import layout
from mamba_align.ops.provenance import stale_reason
from mamba_align.utils import UserError, read_json, read_jsonl

TRAINED = ("sft", "dpo")


# ---------------------------------------------------------------------------------------------- status

def _last_line(path: Path, pattern: str) -> str | None:
    if not path.exists():
        return None
    hits = [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    return hits[-1] if hits else None


def _latest_checkpoint(results: Path, stage: str) -> dict | None:
    """The newest complete checkpoint of any run of `stage` (trainer_state.json is written last)."""
    best = None
    for state_file in (results / "checkpoints").glob(f"{stage}-*/checkpoint-*/trainer_state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # torn save
        row = {"path": str(state_file.parent), "step": state.get("global_step"), "max_steps": state.get("max_steps"),
               "mtime": state_file.stat().st_mtime}
        if best is None or row["mtime"] > best["mtime"]:
            best = row
    return best


def _training_status(results: Path, stage: str) -> str:
    metrics = results / "metrics" / f"{stage}.json"
    if (Path(layout.model_dir(str(results), stage)) / "config.json").exists() and metrics.exists():
        m = read_json(metrics)
        final = m.get("final", {})
        hours = (m.get("wall_time_s") or 0) / 3600
        loss = final.get("train_loss", final.get("loss"))
        return f"done ({m.get('global_step')} steps, {hours:.2f} h, final loss {loss})"
    ckpt = _latest_checkpoint(results, stage)
    progress = _last_line(results / "logs" / f"train_{stage}.log", rf"{stage} progress: step")
    if ckpt is None and progress is None:
        return "not started"
    parts = []
    if ckpt:
        parts.append(f"checkpoint at step {ckpt['step']}/{ckpt['max_steps']} ({ckpt['path']})")
    if progress:
        parts.append("last log: " + progress.split(" progress: ", 1)[1])
    return "; ".join(parts)


def _count_lines(paths) -> int:
    return sum(len(read_jsonl(p)) for p in paths)


def _run_key(results: Path, stage: str) -> str | None:
    """The key in the stored model's run.json (runs.py), None for the base model or no model."""
    run = Path(layout.model_dir(str(results), stage)) / "run.json"
    try:
        return read_json(run).get("key") if run.is_file() else None
    except (OSError, ValueError):
        return None


def _marked(line: str, summary: dict, current_key: str | None, run_key: str | None) -> str:
    reason = stale_reason(summary, current_key, run_key)
    return f"{line} [{reason}]" if reason else line


def _eval_status(results: Path, stage: str, current_key: str | None = None) -> list[str]:
    rows = []
    eval_dir = results / "eval" / stage
    run_key = _run_key(results, stage)
    mt = Path(layout.eval_summary(str(results), stage, "mtbench"))
    if mt.exists():
        summary = read_json(mt)
        s = summary["scores"]
        rows.append(_marked(f"MT-Bench: overall {s['overall']}, turn 1 {s['turn_1']}, turn 2 {s['turn_2']}",
                            summary, current_key, run_key))
    else:
        answers = eval_dir / "mt_bench_answers.jsonl"
        if answers.exists():
            cache = eval_dir / "mt_bench_judge_cache.jsonl"
            rows.append(f"MT-Bench: answers done; judge cache holds {_count_lines([cache])} judgments")
        elif list(eval_dir.glob("mt_bench_answers.jsonl.progress-*.jsonl")):
            rows.append(f"MT-Bench: {_count_lines(eval_dir.glob('mt_bench_answers.jsonl.progress-*.jsonl'))} "
                        f"questions answered so far")
    ae = Path(layout.eval_summary(str(results), stage, "alpacaeval"))
    if ae.exists():
        from mamba_align.eval.alpacaeval import summary_line

        summary = read_json(ae)
        rows.append(_marked(summary_line(summary), summary, current_key, run_key))
    else:
        outputs = eval_dir / "alpaca_eval_outputs.json"
        if outputs.exists():
            rows.append("AlpacaEval: outputs done, not yet judged")
        elif list(eval_dir.glob("alpaca_eval_outputs.json.progress-*.jsonl")):
            rows.append(f"AlpacaEval: {_count_lines(eval_dir.glob('alpaca_eval_outputs.json.progress-*.jsonl'))} "
                        f"outputs so far")
    return rows


def _report_status(results: Path, current: dict[str, str] | None) -> str | None:
    """The report's line: its path, and stale when a row it shows as current is of another model."""
    table, data = results / "report" / "scores.md", results / "report" / "scores.json"
    if not table.exists():
        return None
    rows = read_json(data) if data.exists() else []
    ours = [r for r in rows if isinstance(r, dict) and r.get("source") == "this run" and r.get("stage")]
    stale = []
    for r in ours:
        if r.get("status", "current") != "current" or current is None or r["stage"] not in current:
            continue  # a stale row the report itself marks, or nothing to compare with
        reason = stale_reason(r, current[r["stage"]])
        if reason:
            stale.append(f"its {r['stage']} row is {reason}")
    if current is not None and not ours:
        stale.append("stale: it records no model keys (written before keys were)")
    if stale:
        return f"report: {table} [STALE: {'; '.join(stale)}]; rebuild it with snakemake {table}"
    return f"report: {table}"


def status(results: str | Path, config_files=None, workflow_dir: str | Path = ".") -> str:
    """A plain-text report of a results folder; reads files only (safe while Snakemake runs).

    Scores are compared with the model keys of the config (provenance.current_model_keys: config/config.yaml
    under `workflow_dir` with `config_files` merged over it, as `snakemake --configfile` reads them)."""
    results = Path(results)
    if not results.is_dir():
        raise UserError(f"{results} is not a folder (the config's results_dir, e.g. results)")
    from mamba_align.ops.provenance import current_model_keys

    out = [f"mamba-align status of {results}/", ""]
    named = ", ".join(map(str, [Path(workflow_dir) / "config" / "config.yaml", *(config_files or [])]))
    try:
        current = current_model_keys(config_files or (), workflow_dir)
        out.append(f"scores compared with the models of {named}: "
                   + ", ".join(f"{s} {k}" for s, k in current.items()))
    except Exception as e:  # a config that does not load (missing, invalid) must not hide the folder's status
        current = None
        out.append(f"scores not compared with a config ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    plan = results / "plan.txt"
    if plan.exists():
        total = _last_line(plan, r"total GPU-hours|judge total")
        out.append(f"plan: {plan}" + (f" ({total.strip()})" if total else ""))
    base = Path(layout.model_dir(str(results), "base"))
    out.append(f"base model: {'ready' if (base / 'config.json').exists() else 'not prepared'}")
    for name in ("sft", "dpo"):
        stats = results / "data" / name / "stats.json"
        out.append(f"{name} data: {'ready' if stats.exists() else 'not prepared'}")
    for stage in TRAINED:
        out.append(f"train {stage}: {_training_status(results, stage)}")
    for stage in TRAINED:
        for row in _eval_status(results, stage, (current or {}).get(stage)):
            out.append(f"eval {stage}: {row}")
    report = _report_status(results, current)
    if report:
        out.append(report)
    failures = []
    for log_file in sorted((results / "logs").rglob("*.log")):
        last = _last_line(log_file, r" (ERROR|CRITICAL) ")
        if last:
            failures.append(f"  {log_file}: {last.split(' ', 2)[-1]}")
    if failures:
        out += ["", "errors in the logs (the newest of each; a rerun may have fixed them):", *failures]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- rescore

def rescore(results: str | Path, stage: str) -> dict:
    """MT-Bench scores recomputed from the stored judgments' text (FastChat's rating parser), without any
    judge call: for a changed parser, or to check a summary against its judgments."""
    from mamba_align.eval.mtbench import combine_ratings, parse_rating, summarize

    results = Path(results)
    stored_path = Path(layout.eval_summary(str(results), stage, "mtbench"))
    # beside the summary (the judge rule's declared output); earlier runs kept it in eval/<stage>/
    judgments_path = stored_path.with_name("mt_bench_judgments.jsonl")
    if not judgments_path.exists() and (results / "eval" / stage / "mt_bench_judgments.jsonl").exists():
        judgments_path = results / "eval" / stage / "mt_bench_judgments.jsonl"
    questions_path = results / "data" / "mt_bench" / "question.jsonl"
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


# ---------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mamba-align", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="what is done in a results folder, progress, scores, errors")
    s.add_argument("results", nargs="?", default="results")
    s.add_argument("--configfile", "--config", nargs="+", action="extend", default=[], metavar="FILE",
                   help="the config files given to snakemake (merged over config/config.yaml): scores computed "
                        "for other models than these describe are marked stale")
    s.add_argument("--workflow-dir", default=".", help="the workflow's folder (its config/ and workflow/schemas/)")
    r = sub.add_parser("rescore", help="re-score stored MT-Bench judgments without judge calls")
    r.add_argument("results", nargs="?", default="results")
    r.add_argument("--stage", choices=TRAINED, default=layout.FINAL_STAGE)
    r.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sub.add_parser("plan", help="GPU-hours and judge cost (python -m mamba_align.ops.plan --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv) if argv[:1] != ["plan"] else None
    try:
        if args is None:  # plan: its own options
            from mamba_align.ops.plan import main as plan_main

            plan_main(argv[1:])
        elif args.command == "status":
            print(status(args.results, args.configfile, args.workflow_dir))
        elif args.command == "rescore":
            r = rescore(args.results, args.stage)
            if args.json:
                print(json.dumps(r, indent=2))
            else:
                s = r["scores"]
                print(f"MT-Bench {args.stage} rescored from {r['n']} judgments: overall {s['overall']}, "
                      f"turn 1 {s['turn_1']}, turn 2 {s['turn_2']} ({r['n_unrated']} unrated)")
                if r["stored_scores"] is not None:
                    print("differs from" if r["changed"] else "same as", "the stored summary")
    except (UserError, OSError) as e:  # OSError: a file named on the command line that cannot be read or written
        print(f"mamba-align: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
