"""`mamba-align status [results] [--configfile F ...]`: which stages are done, training checkpoints and ETA, eval
progress, scores (each marked stale when computed for another model than the config's), the report, and the last
error of each failed step; for a grid config (`experiments`), each experiment's stages. Reads files only."""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

from mamba_align.ops.store import layout
from mamba_align.ops.store.provenance import stale_reason, stored_run_key
from mamba_align.utils import UserError, progress_files, read_json, read_jsonl

TRAINED = ("sft", "dpo")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--configfile", "--config", nargs="+", action="extend", default=[], metavar="FILE",
                   help="the config files given to snakemake (merged over config/config.yaml): scores computed "
                        "for other models than these describe are marked stale; with a grid config (experiments), "
                        "each experiment's stages are shown")
    p.add_argument("--workflow-dir", default=".", help="the workflow's folder (its config/ and workflow/schemas/)")


def run(args: argparse.Namespace) -> None:
    print(status(args.results, args.configfile, args.workflow_dir))


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
