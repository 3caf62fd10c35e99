"""`mamba-align`: one command for every step of the pipeline and for what a user asks between Snakemake runs.

    mamba-align <command> [options]         `mamba-align <command> --help`: the command's options

A step's command runs that step by hand: its module's `main(argv)` (COMMANDS) with the rest of the command
line, so the module's parser is the one definition of its options and `python -m mamba_align.<module>` runs the
same (accelerate's relaunch of `python -m mamba_align.train` on N GPUs does). Snakemake runs the pipeline; each
rule's script calls the package function that the command calls. Two commands live here:

    mamba-align status [results] [--configfile F ...]
                                            which stages are done, training checkpoints and ETA, eval progress,
                                            scores (each marked stale when computed for another model than the
                                            config's), the report, and the last error of each failed step; for a
                                            grid config (`experiments`), each experiment's stages
    mamba-align rescore [results] --stage S re-score stored MT-Bench judgments (no judge call)
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import re
import sys
from pathlib import Path

from mamba_align.ops.store import layout
from mamba_align.ops.store.provenance import stale_reason, stored_run_key
from mamba_align.utils import UserError, progress_files, read_json, read_jsonl

TRAINED = ("sft", "dpo")
# a step's command: (the module whose main(argv) it runs, its help naming the rules that call the same function)
COMMANDS = {
    "demo-inputs": ("mamba_align.testing.demo",
                    "the tiny demo's synthetic model, tokenizer and data, no network (build_demo_inputs)"),
    "convert": ("mamba_align.model.convert",
                "a Mamba checkpoint -> a verified transformers model folder (prepare_base_model)"),
    "data": ("mamba_align.train.data",
             "SFT or preference data, chat-templated, as parquet (prepare_sft_data, prepare_preference_data)"),
    "train": ("mamba_align.train.launch",
              "SFT or DPO training, resumable, on N GPUs through accelerate (train_sft, train_dpo)"),
    "generate": ("mamba_align.eval.generate",
                 "a model's MT-Bench answers or AlpacaEval outputs (generate_mt_bench, generate_alpaca_eval)"),
    "mt-bench": ("mamba_align.eval.mtbench",
                 "fetch the MT-Bench data, or judge a model's answers (fetch_mt_bench, judge_mt_bench)"),
    "alpaca-eval": ("mamba_align.eval.alpacaeval",
                    "fetch the AlpacaEval data, or judge a model's outputs (fetch_alpaca_eval, judge_alpaca_eval)"),
    "judge-server": ("mamba_align.eval.judge.server",
                     "serve a local chat model as an OpenAI-compatible judge (for the judge commands' --base-url)"),
    "report": ("mamba_align.ops.reporting.report", "the scores table and plots of a run (report)"),
    "plan": ("mamba_align.ops.reporting.plan", "GPU-hours, wall time and judge cost before anything runs (plan)"),
}


# ---------------------------------------------------------------------------------------------- status

def _last_line(path: Path, pattern: str) -> str | None:
    if not path.exists():
        return None
    hits = [line for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    return hits[-1] if hits else None


def _latest_checkpoint(results: Path, stage: str) -> dict | None:
    """The newest complete checkpoint of any run of `stage` (trainer_state.json is written last)."""
    best = None
    runs = layout.checkpoint_dir(layout.Results(str(results)).checkpoints(), stage, "*")
    for state_file in map(Path, glob.glob(f"{runs}/checkpoint-*/trainer_state.json")):
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
    paths = layout.Results(str(results))
    return _training_at(Path(paths.model(stage)), Path(paths.metrics(stage)), Path(paths.log(f"train_{stage}")),
                        stage, _latest_checkpoint(results, stage))


def _checkpoint_of_log(log_file: Path, stage: str) -> dict | None:
    """The newest complete checkpoint of the run the training log names last (runs.train_keyed logs
    '<stage> run <key>: checkpoints in <dir>'): a grid's runs share one checkpoints folder."""
    line = _last_line(log_file, rf"{stage} run \w+: checkpoints in ")
    if line is None:
        return None
    ckpt_dir = Path(line.split(": checkpoints in ", 1)[1].split(" (", 1)[0].strip())
    best = None
    for state_file in ckpt_dir.glob("checkpoint-*/trainer_state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # torn save
        row = {"path": str(state_file.parent), "step": state.get("global_step"), "max_steps": state.get("max_steps")}
        if best is None or (row["step"] or 0) > (best["step"] or 0):
            best = row
    return best


def _training_at(model_dir: Path, metrics: Path, log_file: Path, stage: str, ckpt: dict | None) -> str:
    if (model_dir / "config.json").exists() and metrics.exists():
        m = read_json(metrics)
        final = m.get("final", {})
        hours = (m.get("wall_time_s") or 0) / 3600
        loss = final.get("train_loss", final.get("loss"))
        return f"done ({m.get('global_step')} steps, {hours:.2f} h, final loss {loss})"
    progress = _last_line(log_file, rf"{stage} progress: step")
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


def _run_key(model_dir: Path) -> str | None:
    """provenance.stored_run_key, None also where run.json cannot be read (status reports, never fails)."""
    try:
        return stored_run_key(model_dir)
    except (OSError, ValueError):
        return None


def _marked(line: str, summary: dict, current_key: str | None, run_key: str | None) -> str:
    reason = stale_reason(summary, current_key, run_key)
    return f"{line} [{reason}]" if reason else line


def _eval_status(results: Path, stage: str, current_key: str | None = None) -> list[str]:
    paths = layout.Results(str(results))
    return _eval_rows(Path(paths.stage_eval_dir(stage)), Path(paths.eval_summary(stage, "mtbench")),
                      Path(paths.eval_summary(stage, "alpacaeval")), Path(paths.model(stage)), current_key)


def _eval_rows(eval_dir: Path, mt: Path, ae: Path, model_dir: Path, current_key: str | None) -> list[str]:
    """Scores (marked stale when of another model than `current_key` or the stored model's run), else progress;
    `eval_dir` holds the generations, their progress files and the judge caches."""
    rows = []
    run_key = _run_key(model_dir)
    if mt.exists():
        summary = read_json(mt)
        s = summary["scores"]
        rows.append(_marked(f"MT-Bench: overall {s['overall']}, turn 1 {s['turn_1']}, turn 2 {s['turn_2']}",
                            summary, current_key, run_key))
    else:
        answers = eval_dir / layout.MT_BENCH_ANSWERS
        if answers.exists():
            cache = eval_dir / layout.MT_BENCH_JUDGE_CACHE
            rows.append(f"MT-Bench: answers done; judge cache holds {_count_lines([cache])} judgments")
        elif progress := progress_files(answers):
            rows.append(f"MT-Bench: {_count_lines(progress)} questions answered so far")
    if ae.exists():
        from mamba_align.eval.alpacaeval import summary_line

        summary = read_json(ae)
        rows.append(_marked(summary_line(summary), summary, current_key, run_key))
    else:
        outputs = eval_dir / layout.ALPACA_EVAL_OUTPUTS
        if outputs.exists():
            rows.append("AlpacaEval: outputs done, not yet judged")
        elif progress := progress_files(outputs):
            rows.append(f"AlpacaEval: {_count_lines(progress)} outputs so far")
    return rows


def _ready(path: Path) -> str:
    return "ready" if path.exists() else "not prepared"


def _grid_status(results: Path, grid) -> list[str]:
    """Each experiment's stages in a grid's layout (experiments.Grid): the shared base model, data and SFT run
    under shared/, DPO and the scores under experiments/<name>/, logs under logs/<the same folder>/."""
    from mamba_align.ops.reporting.report_leaderboard import status_line
    from mamba_align.ops.store.provenance import grid_model_key

    paths = layout.Results(str(results))
    out = [f"experiments: {len(grid.exps)} (each under {results}/experiments/<name>/, their shared base model, "
           f"data and SFT runs under {results}/shared/)"]
    for r in grid.exps:
        axes = ", ".join(f"{a} {v}" for a, v in r.exp.axes.items())
        out.append(f"experiment {r.name}" + (f" ({axes})" if axes else "") + ":")
        base = grid.home(r, "base")
        out.append(f"  base model ({base}): {_ready(Path(paths.home_verify(base)))}")
        for stage in TRAINED:
            data = Path(grid.data_dir(r, stage))
            stats = Path(grid.data_files(r, stage)["stats"])
            out.append(f"  {stage} data ({data.relative_to(results)}): {_ready(stats)}")
        for stage in TRAINED:
            home = grid.home(r, stage)
            log_file = Path(paths.log(home, f"train_{stage}"))
            out.append(f"  train {stage} ({home}): " + _training_at(
                Path(paths.home_model(home)), Path(paths.home_metrics(home)), log_file, stage,
                _checkpoint_of_log(log_file, stage)))
        for stage in grid.eval_stages:
            home = grid.home(r, stage)
            rows = _eval_rows(Path(paths.home_eval_dir(home)), Path(grid.eval_summary(r, stage, "mtbench")),
                              Path(grid.eval_summary(r, stage, "alpacaeval")), Path(paths.home_model(home)),
                              grid_model_key(grid, home))
            out += [f"  eval {stage} ({home}): {row}" for row in rows] or [f"  eval {stage} ({home}): not started"]
        for stage in grid.leaderboard_stages:  # the Open LLM Leaderboard tasks (eval.leaderboard.stages)
            home = grid.home(r, stage)
            out.append(f"  leaderboard {stage} ({home}): " + status_line(
                grid.eval_summary(r, stage, layout.LEADERBOARD), grid_model_key(grid, home),
                _run_key(Path(paths.home_model(home)))))
    return out


def _found_experiments_status(results: Path) -> list[str]:
    """A grid's experiments found in the folder when no grid config was given: their DPO training and scores,
    without stale marks (the config says which model each score should be of)."""
    paths = layout.Results(str(results))
    homes = sorted(p for p in Path(paths.path(layout.GRID_HOMES["dpo"])).glob("*") if p.is_dir())
    if not homes:
        return []
    out = [f"experiments found in {results}/experiments/ (pass the grid's --configfile for their shared stages "
           f"and stale marks):"]
    for home in homes:
        rel = layout.home("dpo", home.name)
        log_file = Path(paths.log(rel, "train_dpo"))
        out.append(f"experiment {home.name}:")
        out.append("  train dpo: " + _training_at(Path(paths.home_model(rel)), Path(paths.home_metrics(rel)),
                                                  log_file, "dpo", _checkpoint_of_log(log_file, "dpo")))
        out += [f"  eval: {row}" for row in _eval_rows(Path(paths.home_eval_dir(rel)),
                                                       Path(paths.home_summary(rel, "mtbench")),
                                                       Path(paths.home_summary(rel, "alpacaeval")),
                                                       Path(paths.home_model(rel)), None)]
    return out


def _report_status(results: Path, current: dict[str, str] | None) -> str | None:
    """The report's line: its path, and stale when a row it shows as current is of another model."""
    paths = layout.Results(str(results))
    table, data = Path(paths.report("table")), Path(paths.report("json"))
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
    under `workflow_dir` with `config_files` merged over it, as `snakemake --configfile` reads them). A config with
    `experiments` shows each experiment's stages in the grid's layout (ops.store.experiments), its scores compared with
    each model folder's key; without a config, experiments found under results/experiments/ are listed unmarked."""
    results = Path(results)
    if not results.is_dir():
        raise UserError(f"{results} is not a folder (the config's results_dir, e.g. results)")
    from mamba_align.ops.store.provenance import current_grid, current_model_keys

    out = [f"mamba-align status of {results}/", ""]
    named = ", ".join(map(str, [Path(workflow_dir) / "config" / "config.yaml", *(config_files or [])]))
    try:
        current = current_model_keys(config_files or (), workflow_dir)
        grid = current_grid(results, config_files or (), workflow_dir)
        if grid is None:
            out.append(f"scores compared with the models of {named}: "
                       + ", ".join(f"{s} {k}" for s, k in current.items()))
        else:
            out.append(f"scores compared with the models of the experiments of {named}")
    except Exception as e:  # a config that does not load (missing, invalid) must not hide the folder's status
        current = grid = None
        out.append(f"scores not compared with a config ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    paths = layout.Results(str(results))
    plan = Path(paths.plan("txt"))
    if plan.exists():
        total = _last_line(plan, r"total GPU-hours|judge total")
        out.append(f"plan: {plan}" + (f" ({total.strip()})" if total else ""))
    if grid is not None:
        out += _grid_status(results, grid)
        table = Path(paths.experiments_report("table"))
        if table.exists():
            out.append(f"report: {table}")
        return "\n".join(out + _log_errors(results))
    base = Path(paths.model("base"))
    out.append(f"base model: {'ready' if (base / 'config.json').exists() else 'not prepared'}")
    for name in ("sft", "dpo"):
        stats = Path(paths.train_data(name)["stats"])
        out.append(f"{name} data: {'ready' if stats.exists() else 'not prepared'}")
    for stage in TRAINED:
        out.append(f"train {stage}: {_training_status(results, stage)}")
    for stage in TRAINED:
        for row in _eval_status(results, stage, (current or {}).get(stage)):
            out.append(f"eval {stage}: {row}")
    report = _report_status(results, current)
    if report:
        out.append(report)
    out += _found_experiments_status(results)
    return "\n".join(out + _log_errors(results))


def _log_errors(results: Path) -> list[str]:
    """The newest ERROR line of each log under results/logs/ (a grid's in logs/shared/..., logs/experiments/...)."""
    failures = []
    for log_file in sorted(Path(layout.Results(str(results)).log_dir()).rglob("*.log")):
        last = _last_line(log_file, r" (ERROR|CRITICAL) ")
        if last:
            failures.append(f"  {log_file}: {last.split(' ', 2)[-1]}")
    if failures:
        return ["", "errors in the logs (the newest of each; a rerun may have fixed them):", *failures]
    return []


# ---------------------------------------------------------------------------------------------- rescore

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


# ---------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mamba-align", description=__doc__,
                                 epilog="In parentheses: the workflow rules that call the same package function.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help_text) in COMMANDS.items():  # their options: their module's parser (run_command)
        sub.add_parser(name, help=help_text, add_help=False)
    s = sub.add_parser("status", help="what is done in a results folder, progress, scores, errors")
    s.add_argument("results", nargs="?", default="results")
    s.add_argument("--configfile", "--config", nargs="+", action="extend", default=[], metavar="FILE",
                   help="the config files given to snakemake (merged over config/config.yaml): scores computed "
                        "for other models than these describe are marked stale; with a grid config (experiments), "
                        "each experiment's stages are shown")
    s.add_argument("--workflow-dir", default=".", help="the workflow's folder (its config/ and workflow/schemas/)")
    r = sub.add_parser("rescore", help="re-score stored MT-Bench judgments without judge calls")
    r.add_argument("results", nargs="?", default="results")
    r.add_argument("--stage", choices=TRAINED, default=layout.FINAL_STAGE)
    r.add_argument("--json", action="store_true", help="print the whole result as JSON")
    return ap


def run_command(name: str, argv: list[str]) -> None:
    """A step's command: its module, imported now (heavy imports only for the step that needs them), run with the
    rest of the command line, exactly as `python -m <module> ARGV`."""
    importlib.import_module(COMMANDS[name][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else None
    if name in COMMANDS and name != "plan":
        # a step's error as under `python -m`: its setup_logging's excepthook writes it to the step's log
        run_command(name, argv[1:])
        return 0
    args = build_parser().parse_args(argv) if name != "plan" else None
    try:
        if args is None:  # plan sets up no log: its error as one line here
            run_command("plan", argv[1:])
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
