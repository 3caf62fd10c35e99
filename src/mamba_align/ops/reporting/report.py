"""The report: stages side by side with published reference rows, plots, and provenance links."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from mamba_align.ops.reporting import report_leaderboard
from mamba_align.ops.reporting.report_tables import SE_OF, experiments_doc, scores_doc, se_of_mean, to_html, to_markdown
from mamba_align.ops.store.layout import REPORT, plot_name
from mamba_align.ops.store.provenance import stale_reason
from mamba_align.utils import UserError, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# Published numbers, each with its source. AlpacaEval rows are read from the leaderboard CSVs that the
# alpaca-eval package ships (see leaderboard_rows), so they match the installed package exactly.
PAPER_ROWS = [
    {"model": "zephyr-7b-beta (paper)", "mt_bench_overall": 7.34, "alpaca_eval_1_win_rate": 90.60,
     "source": "Tunstall et al. 2023, Zephyr: Direct Distillation of LM Alignment, Table 1"},
]
LEADERBOARD_MODELS = ("zephyr-7b-beta", "Mistral-7B-Instruct-v0.2")
LEADERBOARDS = {
    "alpaca_eval_1": "leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
    "alpaca_eval_2": "leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv",
}
COLUMNS = ["model", "stage", "mt_bench_turn_1", "mt_bench_turn_2", "mt_bench_overall", "mt_bench_unrated",
           "alpaca_eval_1_win_rate", "alpaca_eval_1_standard_error", "alpaca_eval_2_win_rate",
           "alpaca_eval_2_standard_error", "alpaca_eval_2_lc_win_rate", "alpaca_eval_2_lc_standard_error", "judge",
           "source", "model_key", "status"]
CURRENT = "current"


def leaderboard_rows(models=LEADERBOARD_MODELS) -> list[dict]:
    """Reference rows from the alpaca-eval package's own leaderboard CSVs."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    version = importlib.metadata.version("alpaca-eval")
    rows: dict[str, dict] = {}
    for key, rel in LEADERBOARDS.items():
        path = root / rel
        if not path.exists():
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                name = r.get("") or r.get("name")
                if name not in models:
                    continue
                row = rows.setdefault(name, {"model": f"{name} (leaderboard)",
                                             "source": f"alpaca-eval {version} leaderboard CSVs"})
                row[f"{key}_win_rate"] = round(float(r["win_rate"]), 2)
                if r.get("standard_error"):
                    row[f"{key}_standard_error"] = round(float(r["standard_error"]), 2)
                if key == "alpaca_eval_2" and r.get("length_controlled_winrate"):
                    row["alpaca_eval_2_lc_win_rate"] = round(float(r["length_controlled_winrate"]), 2)
                if key == "alpaca_eval_2" and r.get("lc_standard_error"):
                    row["alpaca_eval_2_lc_standard_error"] = round(float(r["lc_standard_error"]), 2)
    return list(rows.values())


def stage_row(run_name: str, stage: str, mtbench: dict | None, alpacaeval: dict | None) -> dict:
    row = {"model": f"{run_name}-{stage}", "stage": stage, "source": "this run"}
    prov = []
    if mtbench:
        s = mtbench["scores"]
        row.update(mt_bench_turn_1=s.get("turn_1"), mt_bench_turn_2=s.get("turn_2"),
                   mt_bench_overall=s.get("overall"), mt_bench_unrated=mtbench.get("n_unrated"))
        row["judge"] = (mtbench.get("judge") or {}).get("model_reported") or (mtbench.get("judge") or {}).get("model")
        prov.append(mtbench.get("provenance"))
    if alpacaeval:
        for version, res in _alpaca_results(alpacaeval).items():
            row[f"alpaca_eval_{version}_win_rate"] = _round(res.get("win_rate"))
            row[f"alpaca_eval_{version}_standard_error"] = _round(res.get("standard_error"))
            if version == "2":
                row["alpaca_eval_2_lc_win_rate"] = _round(res.get("length_controlled_winrate"))
                row["alpaca_eval_2_lc_standard_error"] = _round(res.get("lc_standard_error"))
        prov.append(alpacaeval.get("provenance"))
    row["provenance"] = [p for p in prov if p]
    keys = {s.get("model_key") for s in (mtbench, alpacaeval) if s}
    row["model_key"] = keys.pop() if len(keys) == 1 else None
    return row


def stage_rows(run_name: str, stage: str, mtbench: dict | None, alpacaeval: dict | None,
               current_key: str | None = None) -> list[dict]:
    """A stage's rows: one of the scores computed for the current config's model (`current_key`), and one per
    other model that some score was computed for, marked stale. Scores of different models never share a row;
    without `current_key`, scores of different models are each marked as not comparable."""
    summaries = {"mtbench": mtbench, "alpacaeval": alpacaeval}
    by_model: dict[str | None, dict] = {}
    for bench, summary in summaries.items():
        if summary:
            by_model.setdefault(summary.get("model_key"), {})[bench] = summary
    if current_key is None and len(by_model) <= 1:
        return [{**stage_row(run_name, stage, mtbench, alpacaeval), "status": CURRENT}]
    rows = []
    if current_key is not None:
        fresh = by_model.pop(current_key, {})
        rows.append({**stage_row(run_name, stage, fresh.get("mtbench"), fresh.get("alpacaeval")),
                     "model_key": current_key, "status": CURRENT})
    for key, found in by_model.items():
        summary = next(iter(found.values()))
        reason = (stale_reason(summary, current_key) if current_key is not None else
                  f"stale?: computed for model {key}; this stage's other scores are for another model")
        row = stage_row(run_name, stage, found.get("mtbench"), found.get("alpacaeval"))
        row.update(model=f"{run_name}-{stage} ({reason.split(':')[0]})", model_key=key, status=reason)
        rows.append(row)
    return rows


def _round(x):
    return None if x is None else round(float(x), 2)


def _alpaca_results(data: dict) -> dict[str, dict]:
    """{"1": {...}, "2": {...}} from the AlpacaEval summary (keyed by annotator config name)."""
    out = {}
    for name, res in (data.get("results") or {}).items():
        if not isinstance(res, dict):
            continue
        out["1" if name == "alpaca_eval_gpt4" or res.get("version") == "1.0" else "2"] = res
    return out


def write_tables(rows: list[dict], out_dir: Path, demo: bool, more: list[tuple] = ()) -> None:
    """scores.csv, and the table (and `more` blocks: the leaderboard's) as scores.md and scores.html (the one
    Snakemake's report shows inline)."""
    with atomic_path(out_dir / REPORT["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    doc = scores_doc(rows, demo) + list(more)
    with atomic_path(out_dir / REPORT["table"]) as tmp:
        tmp.write_text(to_markdown(doc))
    with atomic_path(out_dir / REPORT["html"]) as tmp:
        tmp.write_text(to_html(doc, "Scores"))


def plot_training_curves(metrics: dict[str, str], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sft", ["loss", "eval_loss"]), ("dpo", ["loss", "eval_loss"]),
              ("dpo", ["rewards/accuracies", "eval_rewards/accuracies"]),
              ("dpo", ["rewards/margins", "rewards/chosen", "rewards/rejected"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (stage, keys) in zip(axes, panels):
        history = read_json(metrics[stage]).get("log_history", []) if stage in metrics else []
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=key)
        ax.set_title(f"{stage.upper()}: {keys[0].split('/')[-1]}")
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_radar(runs: list[tuple[str, str | Path]], out_png: str | Path) -> None:
    """Per-category MT-Bench scores (0-10) of several runs (label, mtbench.json) on one radar."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(label, read_json(path)["per_category"]) for label, path in runs]
    if not data:
        raise UserError("plot_radar: no runs given")
    categories = list(data[0][1])
    angles = [2 * math.pi * i / len(categories) for i in range(len(categories))]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"projection": "polar"})
    for label, per_cat in data:
        values = [(per_cat.get(c) or {}).get("overall") or 0.0 for c in categories]
        ax.plot(angles + angles[:1], values + values[:1], label=label)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    ax.set_xticks(angles)
    ax.set_xticklabels(categories)
    ax.set_ylim(0, 10)
    ax.set_title("MT-Bench score per category")
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_report(run_name: str, evals: dict[str, dict[str, str]], metrics: dict[str, str], out_dir,
                 demo: bool = False, current_keys: dict[str, str] | None = None,
                 leaderboards: dict[str, str] | None = None) -> list[dict]:
    """evals: {stage: {"mtbench": path, "alpacaeval": path}}; metrics: {"sft": path, "dpo": path};
    current_keys: {stage: model key of the current config} (provenance.model_key): scores of other models are
    shown apart, as stale; leaderboards: {stage: leaderboard.json}. Writes scores.md, scores.csv, scores.json,
    mt_bench_radar.png, training_curves.png, and with leaderboards leaderboard.json and leaderboard_changes.png."""
    out_dir = Path(out_dir)
    current_keys = current_keys or {}
    summaries = {stage: {b: read_json(p[b]) if p.get(b) else None for b in ("mtbench", "alpacaeval")}
                 for stage, p in evals.items()}
    rows = [r for stage, s in summaries.items()
            for r in stage_rows(run_name, stage, s["mtbench"], s["alpacaeval"], current_keys.get(stage))]
    rows += PAPER_ROWS + leaderboard_rows()
    lb_rows = report_leaderboard.leaderboard_rows(run_name, leaderboards or {}, current_keys)
    write_tables(rows, out_dir, demo, report_leaderboard.leaderboard_doc(lb_rows, demo))
    if leaderboards is not None:
        write_json(out_dir / REPORT["leaderboard"], {"rows": lb_rows, "published": report_leaderboard.PUBLISHED})
        report_leaderboard.plot_changes(lb_rows, out_dir / REPORT["leaderboard_changes"])
    radar = []
    for stage, p in evals.items():
        mt = summaries[stage]["mtbench"]
        if mt:
            reason = stale_reason(mt, current_keys.get(stage))
            radar.append((f"{stage} (stale: model {mt.get('model_key')})" if reason else stage, p["mtbench"]))
    plot_radar(radar, out_dir / REPORT["radar"])
    plot_training_curves(metrics, out_dir / REPORT["curves"])
    write_json(out_dir / REPORT["json"], rows)
    return rows


# --- experiments of a grid, side by side -------------------------------------------------------------------

SCORE_KEYS = ["mt_bench_overall", *SE_OF]


def experiment_row(entry: dict, stage: str) -> dict:
    """One experiment's scores at `stage`: MT-Bench overall and per category, AlpacaEval 1.0 and 2.0 LC with SEs,
    the leaderboard's tasks and average (report_leaderboard.experiment_columns)."""
    paths = entry["evals"].get(stage, {})  # a stage scored on the leaderboard only: no judged scores
    mt = read_json(paths["mtbench"]) if paths and Path(paths["mtbench"]).exists() else None
    ae = read_json(paths["alpacaeval"]) if paths and Path(paths["alpacaeval"]).exists() else None
    row = {"experiment": entry["name"], "stage": stage, **{f"axis:{a}": v for a, v in entry["axes"].items()},
           **stage_row(entry["name"], stage, mt, ae), **report_leaderboard.experiment_columns(entry, stage)}
    row["model"] = f"{entry['name']} ({stage})"
    for cat, s in ((mt or {}).get("per_category") or {}).items():
        row[f"mt_bench:{cat}"] = _round(s.get("overall"))
    return row


def _mean_spread(values: list) -> tuple[float | None, float | None]:
    import statistics

    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def seed_groups(rows: list[dict]) -> list[dict]:
    """Experiments equal but for their seed, as one row each: mean ± spread (sample std) of every score, and
    the judging standard error of each mean that has one (`<score>_se`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "axis:seed" not in r:
            continue
        key = (r["stage"], *sorted((k, str(v)) for k, v in r.items() if k.startswith("axis:") and k != "axis:seed"))
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        g = {"stage": key[0], "n_seeds": len(members), "seeds": [m["axis:seed"] for m in members],
             **{k: v for k, v in members[0].items() if k.startswith("axis:") and k != "axis:seed"}}
        g["model"] = ", ".join(f"{k[5:]}={v}" for k, v in g.items() if k.startswith("axis:")) or "all"
        g["model"] += f" ({key[0]}, {len(members)} seeds)"
        for k in SCORE_KEYS + ["leaderboard_average"] + sorted({c for m in members for c in m
                                                                 if c.startswith("mt_bench:")}):
            g[k], g[f"{k}_spread"] = _mean_spread([m.get(k) for m in members])
        for k, se in SE_OF.items():
            g[f"{k}_se"] = se_of_mean([m.get(se) for m in members])
        out.append(g)
    return out


def plot_axis(rows: list[dict], axis: str, out_png: Path) -> None:
    """Scores of the final models against one swept axis, mean and spread over seeds (error bars); the leaderboard's
    average (in %) where the grid scores its final models there (eval.leaderboard.stages has dpo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in rows if r["stage"] == "dpo" and f"axis:{axis}" in r]
    values = list(dict.fromkeys(r[f"axis:{axis}"] for r in final))
    numeric = all(isinstance(v, (int, float)) for v in values)
    values = sorted(values) if numeric else values
    panels = [("mt_bench_overall", "MT-Bench overall"), ("alpaca_eval_1_win_rate", "AlpacaEval 1.0 win %"),
              ("alpaca_eval_2_lc_win_rate", "AlpacaEval 2.0 LC win %")]
    if not any(r.get("alpaca_eval_2_lc_win_rate") is not None for r in final):
        panels[2] = ("alpaca_eval_2_win_rate", "AlpacaEval 2.0 win % (no LC)")  # LC needs more prompts
    if any("leaderboard_status" in r for r in final):  # scored there, or a panel saying not (yet)
        panels.append(("leaderboard_average", "Open LLM Leaderboard avg %"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        if not any(r.get(key) is not None for r in final):
            ax.text(0.5, 0.5, "not scored in this run", ha="center", va="center", transform=ax.transAxes)
        xs, ys, es = [], [], []
        for i, v in enumerate(values):
            m, s = _mean_spread([r.get(key) for r in final if r[f"axis:{axis}"] == v])
            if m is not None:
                xs.append(v if numeric else i)
                ys.append(m)
                es.append(s)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20)
        ax.set_xlabel(axis)
        ax.set_title(title)
    fig.suptitle(f"final model against {axis} (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _unique_rows(entries: list[dict]) -> list[dict]:
    """One row per evaluated model: a model that experiments share (their SFT model) once, named by the
    experiments that share it, without the axes that it does not depend on."""
    users: dict[str, list[dict]] = {}
    for e in entries:  # a model by its score's path: MT-Bench's, or the leaderboard's where it is scored there only
        scored = {s: p["mtbench"] for s, p in e["evals"].items()}
        scored.update({s: ref["path"] for s, ref in (e.get("leaderboard") or {}).items() if s not in scored})
        for stage in sorted(scored, key=report_leaderboard.STAGE_ORDER.index):
            users.setdefault(scored[stage], []).append((e, stage))
    rows = []
    for shared in users.values():
        e, stage = shared[0]
        row = experiment_row(e, stage)
        if len(shared) > 1:
            names = [x["name"] for x, _ in shared]
            for a in list(e["axes"]):
                if len({json.dumps(x["axes"].get(a), default=str) for x, _ in shared}) > 1:
                    del row[f"axis:{a}"]
            row["experiment"] = f"{stage} shared by {len(names)}: {', '.join(names)}"
        rows.append(row)
    return rows


def build_experiments_report(entries: list[dict], axes: list[str], out_dir, demo: bool = False) -> list[dict]:
    """entries: experiments.Grid.report_entries(); axes: the swept axes (one plot each)."""

    out_dir = Path(out_dir)
    rows = _unique_rows(entries)
    cats = list(dict.fromkeys(c for r in rows for c in r if c.startswith("mt_bench:")))
    axis_cols = list(dict.fromkeys(c for r in rows for c in r if c.startswith("axis:")))
    cols = ["experiment", "stage", *axis_cols, "mt_bench_overall", *cats,
            *(k for value, se in SE_OF.items() for k in (value, se)),
            *report_leaderboard.experiment_csv_columns(rows), "judge", "source"]
    with atomic_path(out_dir / REPORT["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    groups = seed_groups(rows)
    published = PAPER_ROWS + leaderboard_rows()
    doc = experiments_doc(rows, groups, published, axes, [plot_name(a) for a in axes], demo,
                          report_leaderboard.experiments_leaderboard_doc(rows, demo))
    with atomic_path(out_dir / REPORT["table"]) as tmp:
        tmp.write_text(to_markdown(doc))
    with atomic_path(out_dir / REPORT["html"]) as tmp:
        tmp.write_text(to_html(doc, "Experiments"))
    for a in axes:
        plot_axis(rows, a, out_dir / plot_name(a))
    write_json(out_dir / REPORT["json"], {"experiments": rows, "over_seeds": groups, "published": published})
    return rows
