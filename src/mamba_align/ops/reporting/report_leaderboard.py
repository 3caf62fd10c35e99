"""The report's leaderboard part: base / SFT / DPO per task with stderr and the change from base, beside
published rows, and a plot of the per-task change (what alignment costs or gains in knowledge and reasoning)."""

from __future__ import annotations

import math
from pathlib import Path

from mamba_align.ops.reporting.report_tables import average_cell, table
from mamba_align.ops.store.provenance import stale_reason, stored_run_key
from mamba_align.utils import atomic_path, read_json

# Published numbers in %, each with its source. The first three are the Open LLM Leaderboard v1's settings
# (ARC 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc, TruthfulQA 0-shot mc2; Winogrande 5-shot).
PUBLISHED = [
    {"model": "Zephyr-7B dDPO (paper)", "arc_challenge": 62.03, "hellaswag": 84.52, "mmlu": 61.44,
     "truthfulqa_mc2": 57.44,
     "source": "Tunstall et al. 2023, Zephyr (arXiv:2310.16944), Table 2 (Open LLM Leaderboard)"},
    {"model": "Mistral-Instruct-7B v0.1 dSFT (paper)", "arc_challenge": 54.52, "hellaswag": 75.63, "mmlu": 55.38,
     "truthfulqa_mc2": 56.28,
     "source": "Tunstall et al. 2023, Zephyr (arXiv:2310.16944), Table 2 (Open LLM Leaderboard)"},
    {"model": "Mistral-7B-v0.1 base (leaderboard)", "arc_challenge": 59.98, "hellaswag": 83.31, "mmlu": 64.16,
     "truthfulqa_mc2": 42.15, "winogrande": 78.37,
     "source": "Open LLM Leaderboard v1, as in the mistralai/Mistral-7B-v0.1 model card"},
    {"model": "zephyr-7b-beta (leaderboard)", "arc_challenge": 62.03, "hellaswag": 84.36, "mmlu": 61.07,
     "truthfulqa_mc2": 57.45, "winogrande": 77.74, "gsm8k": 12.74,
     "source": "Open LLM Leaderboard v1, as in the HuggingFaceH4/zephyr-7b-beta model card"},
    {"model": "Mamba-2.8B, Pile (paper; 0-shot, not comparable)", "arc_challenge": 36.3, "hellaswag": 66.1,
     "winogrande": 63.5,
     "source": "Gu & Dao 2023, Mamba (arXiv:2312.00752), Table 3: zero-shot (ARC-C, HellaSwag acc_norm), "
               "not the leaderboard's 25/10/5 shots; no leaderboard entry for a Mamba model was found"},
]
STAGE_ORDER = ("base", "sft", "dpo")


def _pct(x):
    return None if x is None else 100.0 * float(x)


def leaderboard_rows(run_name: str, paths: dict[str, str | Path],
                     current_keys: dict[str, str] | None = None) -> list[dict]:
    """One row per stage with a leaderboard.json: task -> score and stderr in %, the change from base, status."""
    current_keys = current_keys or {}
    rows = []
    for stage in sorted(paths, key=STAGE_ORDER.index):
        path = Path(paths[stage])
        if not path.is_file():
            continue
        data = read_json(path)
        reason = stale_reason(data, current_keys.get(stage))
        row = {"model": f"{run_name}-{stage}", "stage": stage, "source": "this run",
               "model_key": data.get("model_key"), "status": reason or "current",
               "average": _pct(data.get("average")), "lm_eval": data.get("lm_eval"), "provenance": [str(path)]}
        for task, rec in data.get("tasks", {}).items():
            row[task] = _pct(rec["score"])
            row[f"{task}_stderr"] = _pct(rec.get("stderr"))
            row[f"{task}_n"] = rec.get("n")
            row[f"{task}_setting"] = f"{rec['num_fewshot']}-shot {rec['metric']}"
        rows.append(row)
    base = next((r for r in rows if r["stage"] == "base" and r["status"] == "current"), None)
    for r in rows:
        if base is not None and r is not base and r["status"] == "current":
            for task in _tasks(rows):
                if r.get(task) is not None and base.get(task) is not None:
                    r[f"{task}_change"] = r[task] - base[task]
                    ses = (r.get(f"{task}_stderr"), base.get(f"{task}_stderr"))
                    r[f"{task}_change_stderr"] = math.hypot(*ses) if None not in ses else None
    return rows


def _tasks(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k.endswith("_setting") and k[: -len("_setting")] not in seen:
                seen.append(k[: -len("_setting")])
    return seen


def _cell(r: dict, task: str) -> str:
    v = r.get(task)
    if v is None:
        return "–"
    se = r.get(f"{task}_stderr")
    out = f"{v:.2f} ± {se:.2f}" if se is not None else f"{v:.2f}"
    change = r.get(f"{task}_change")
    return f"{out} ({change:+.2f})" if change is not None else out


def leaderboard_doc(rows: list[dict], demo: bool) -> list[tuple]:
    """Blocks for the report (report_tables' document format): this run's stages, then published rows."""
    if not rows:
        return []
    tasks = _tasks(rows)
    settings = {t: next(r[f"{t}_setting"] for r in rows if f"{t}_setting" in r) for t in tasks}
    head = ["model", *[f"{t} ({settings[t]})" for t in tasks], "average", "model key"]
    current = [r for r in rows if r["status"] == "current"]
    stale = [r for r in rows if r["status"] != "current"]

    def cells(rs):
        return [[r["model"], *[_cell(r, t) for t in tasks],
                 f"{r['average']:.2f}" if r.get("average") is not None else "–", r.get("model_key") or "–"]
                for r in rs]

    doc = [("h2", "Open LLM Leaderboard tasks (lm-eval)")]
    if demo:
        doc.append(("p", "**Demo run: tiny local tasks scored by a tiny random model. These numbers mean nothing; "
                         "they show that every stage ran through lm-eval.**"))
    doc += [table(head, cells(current)),
            ("p", "Scores in % ± lm-eval's standard error; in brackets the change from the base model (what "
                  "alignment cost or gained). lm-eval " + str(current[0].get("lm_eval") if current else "") + ".")]
    if stale:
        doc += [("p", "Stale (not of the current config's models):"), table(head, cells(stale)),
                ("ul", [f"{r['model']}: {r['status']}" for r in stale])]
    return doc + _published_doc(tasks)


def _published_doc(tasks: list[str]) -> list[tuple]:
    published = [p for p in PUBLISHED if any(p.get(t) is not None for t in tasks)]
    if not published:
        return []
    return [("p", "**Published rows** (each with its own source and settings):"),
            table(["model", *tasks, "source"],
                  [[p["model"], *[f"{p[t]:.2f}" if p.get(t) is not None else "–" for t in tasks], p["source"]]
                   for p in published])]


def plot_changes(rows: list[dict], out_png: str | Path) -> None:
    """Per task, the change from base of each later stage (percentage points, ± the stderr of the difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(rows)
    stages = [r for r in rows if any(r.get(f"{t}_change") is not None for t in tasks)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks)), 3.2))
    width = 0.8 / max(1, len(stages))
    for i, r in enumerate(stages):
        xs = [j + i * width for j in range(len(tasks))]
        ys = [r.get(f"{t}_change") or 0.0 for t in tasks]
        errs = [r.get(f"{t}_change_stderr") or 0.0 for t in tasks]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=r["stage"])
    ax.axhline(0, color="#444", lw=0.8)
    ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("change from base (points)")
    if stages:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no base model scores to compare with", ha="center", transform=ax.transAxes)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- experiments of a grid: the same numbers as columns of each experiment's row ---------------------------------

PREFIX = "leaderboard:"  # leaderboard:<task>, leaderboard:<task>_stderr, leaderboard:<task>_change, ...


def _scored(ref: dict) -> tuple[dict | None, str]:
    """(the leaderboard.json of `ref` = {path, model, model_key}, "current"), or (None, "missing" or why stale):
    a score of another model than the one the config describes there, or than the stored model's run."""
    path = Path(ref["path"])
    if not path.is_file():
        return None, "missing"
    data = read_json(path)
    reason = stale_reason(data, ref.get("model_key"), stored_run_key(ref.get("model")))
    return (None, reason) if reason else (data, "current")


def experiment_columns(entry: dict, stage: str) -> dict:
    """The leaderboard columns of an experiment's model at `stage` (entry: experiments.Grid.report_entries()):
    `leaderboard_status` (current, missing, or why stale), `leaderboard_average` and `leaderboard:<task>` with
    `_stderr` in %, and `_change` (with `_change_stderr`) from the experiment's base model where base is scored
    too. {} when the stage is not scored; a missing or stale score gives no number, never one of another model."""
    refs = entry.get("leaderboard") or {}
    if stage not in refs:
        return {}
    data, status = _scored(refs[stage])
    cols = {"leaderboard_status": status, "leaderboard_model_key": refs[stage].get("model_key")}
    if data is None:
        return cols
    cols["leaderboard_average"] = _pct(data.get("average"))
    for task, rec in (data.get("tasks") or {}).items():
        cols[f"{PREFIX}{task}"], cols[f"{PREFIX}{task}_stderr"] = _pct(rec["score"]), _pct(rec.get("stderr"))
        cols[f"{PREFIX}{task}_setting"] = f"{rec['num_fewshot']}-shot {rec['metric']}"
    base = _scored(refs["base"])[0] if stage != "base" and "base" in refs else None
    if base is None:
        return cols
    for task, rec in (base.get("tasks") or {}).items():
        k = f"{PREFIX}{task}"
        if cols.get(k) is not None:
            cols[f"{k}_change"] = cols[k] - _pct(rec["score"])
            ses = (cols[f"{k}_stderr"], _pct(rec.get("stderr")))
            cols[f"{k}_change_stderr"] = math.hypot(*ses) if None not in ses else None
    if set(base.get("tasks") or {}) == set(data.get("tasks") or {}) and None not in (
            cols["leaderboard_average"], base.get("average")):
        cols["leaderboard_average_change"] = cols["leaderboard_average"] - _pct(base["average"])
    return cols


def experiment_tasks(rows: list[dict]) -> list[str]:
    """The leaderboard tasks that some row has a score of, in the order first seen."""
    return list(dict.fromkeys(k[len(PREFIX):-len("_setting")] for r in rows for k in r
                              if k.startswith(PREFIX) and k.endswith("_setting")))


def experiment_csv_columns(rows: list[dict]) -> list[str]:
    """The leaderboard's columns of the grid's scores.csv ([] without a leaderboard)."""
    if not any("leaderboard_status" in r for r in rows):
        return []
    return ["leaderboard_average", "leaderboard_average_change",
            *(f"{PREFIX}{t}{x}" for t in experiment_tasks(rows) for x in ("", "_stderr", "_change")),
            "leaderboard_status", "leaderboard_model_key"]


def experiments_leaderboard_doc(rows: list[dict], demo: bool) -> list[tuple]:
    """The grid report's leaderboard block: each scored model's tasks (% ± stderr, in brackets the change from its
    base model), its average, the rows without a current score named with why, and the published rows."""
    scored = [r for r in rows if "leaderboard_status" in r]
    if not scored:
        return []
    tasks = experiment_tasks(scored)
    settings = {t: next(r[f"{PREFIX}{t}_setting"] for r in scored if f"{PREFIX}{t}_setting" in r) for t in tasks}
    head = ["experiment", "stage", *(f"{t} ({settings[t]})" for t in tasks), "average"]
    cells = [[r["experiment"], r["stage"], *(_cell(r, f"{PREFIX}{t}") for t in tasks), average_cell(r)]
             for r in scored]
    doc = [("h2", "Open LLM Leaderboard tasks (lm-eval)")]
    if demo:
        doc.append(("p", "**Demo run: tiny local tasks scored by tiny random models. These numbers mean nothing.**"))
    doc += [table(head, cells),
            ("p", "Scores in % ± lm-eval's standard error; in brackets the change from the experiment's base model "
                  "(what alignment cost or gained); – where a score is missing or not of the model the config "
                  "describes (below).")]
    absent = [f"{r['experiment']} ({r['stage']}): {r['leaderboard_status']}" for r in scored
              if r["leaderboard_status"] != "current"]
    if absent:
        doc += [("p", "Without a current score:"), ("ul", absent)]
    return doc + _published_doc(tasks)


def status_line(path: str | Path, current_key: str | None, run_key: str | None = None) -> str:
    """`mamba-align status`'s line of one model's leaderboard.json: the average and each task in %, marked stale
    when of another model than `current_key` (or the stored model's run `run_key`); else the tasks finished so far
    (eval_leaderboard's work folder beside it), else not started."""
    path = Path(path)
    if not path.is_file():
        done = len(list(path.parent.glob(f"{path.name}.work-*/*.json")))
        return f"{done} task(s) done so far" if done else "not started"
    data = read_json(path)
    avg = _pct(data.get("average"))
    line = f"average {avg:.2f}%" if avg is not None else "average –"
    tasks = [f"{t} {_pct(rec['score']):.2f}" for t, rec in (data.get("tasks") or {}).items()]
    line += f" ({', '.join(tasks)})" if tasks else ""
    reason = stale_reason(data, current_key, run_key)
    return f"{line} [{reason}]" if reason else line
