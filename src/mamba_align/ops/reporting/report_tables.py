"""The report's tables as documents: one list of blocks rendered as Markdown (scores.md, to paste) and as a
self-contained HTML page (scores.html, which Snakemake's HTML report shows inline; a .md is only a download)."""

from __future__ import annotations

import html
import math

# (header, value key, standard-error key or None) of the scores table; a cell shows "value ± SE"
SCORE_CELLS = [("model", "model", None), ("MT-Bench T1", "mt_bench_turn_1", None),
               ("T2", "mt_bench_turn_2", None), ("overall", "mt_bench_overall", None),
               ("unrated", "mt_bench_unrated", None),
               ("AE 1.0 win % ± SE", "alpaca_eval_1_win_rate", "alpaca_eval_1_standard_error"),
               ("AE 2.0 win % ± SE", "alpaca_eval_2_win_rate", "alpaca_eval_2_standard_error"),
               ("AE 2.0 LC % ± SE", "alpaca_eval_2_lc_win_rate", "alpaca_eval_2_lc_standard_error"),
               ("judge", "judge", None), ("model key", "model_key", None), ("source", "source", None)]
# AlpacaEval's standard error of each score that has one (MT-Bench's summary has none)
SE_OF = {value: se for _, value, se in SCORE_CELLS if se}
DEMO_NOTE = ("**Demo run: {what} judged by a 135M model. These numbers mean nothing; "
             "they show that every {unit} ran.**")


def fmt(v) -> str:
    if v is None or v == "":
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def pm(mean, err) -> str:
    """'mean ± err', or the mean alone where there is no error."""
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {err:.2f}" if err is not None else fmt(mean)


def average_cell(r: dict) -> str:
    """A grid row's leaderboard average, with its change from base in brackets: '–' where missing or stale."""
    v, change = r.get("leaderboard_average"), r.get("leaderboard_average_change")
    if v is None:
        return "–"
    return f"{v:.2f} ({change:+.2f})" if change is not None else f"{v:.2f}"


def se_of_mean(errors: list) -> float | None:
    """The judging standard error of a mean over n independent scores, sqrt(sum SE_i^2) / n; None unless every
    score has one."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(float(e) ** 2 for e in errors)) / len(errors)


def table(head: list[str], rows: list[list[str]]) -> tuple:
    return ("table", head, rows)


def scores_doc(rows: list[dict], demo: bool) -> list[tuple]:
    """The run's report: current rows, stale rows apart with their reasons, provenance links."""
    head = [h for h, _, _ in SCORE_CELLS]

    def cells(rs):
        return [[pm(r.get(k), r.get(se)) if se else fmt(r.get(k)) for _, k, se in SCORE_CELLS] for r in rs]

    current = [r for r in rows if r.get("status", "current") == "current"]
    stale = [r for r in rows if r.get("status", "current") != "current"]
    doc = [("h1", "Scores")]
    if demo:
        doc.append(("p", DEMO_NOTE.format(what="a tiny random model", unit="stage")))
    doc.append(table(head, cells(current)))
    if stale:
        doc += [("h2", "Stale scores: not of the current config's models"),
                ("p", "Computed for a model that the current config no longer describes (a retrain or a config "
                      "change since); rerun their judge rules to replace them."),
                table(head, cells(stale)), ("ul", [f"{r['model']}: {r['status']}" for r in stale])]
    doc += [("p", "MT-Bench: mean judge rating (1–10). AlpacaEval: win rate against the reference in %, ± its "
                  "standard error as alpaca_eval reports it; – where a score or SE does not exist.")]
    linked = [f"{r['model']}: " + ", ".join(f"`{p}`" for p in r["provenance"]) for r in rows if r.get("provenance")]
    if linked:
        doc += [("p", "Rows from this run link their provenance records (git commit, config, data hashes, package "
                      "versions, hardware, scheduler job):"), ("ul", linked)]
    return doc


def experiments_doc(rows: list[dict], groups: list[dict], published: list[dict], axes: list[str],
                    plot_names: list[str], demo: bool, leaderboard: list[tuple] = ()) -> list[tuple]:
    """The grid's report: every evaluated model, seed groups (mean ± SD, and the judging SE of the mean), the
    `leaderboard` blocks (report_leaderboard.experiments_leaderboard_doc), the published rows, the plots. With a
    leaderboard, the tables gain its average (in brackets the change from base)."""
    cats = list(dict.fromkeys(c for r in rows for c in r if c.startswith("mt_bench:")))
    axis_cols = list(dict.fromkeys(c for r in rows for c in r if c.startswith("axis:")))
    lb = any("leaderboard_status" in r for r in rows)
    doc = [("h1", "Experiments")]
    if demo:
        doc.append(("p", DEMO_NOTE.format(what="tiny random models", unit="experiment")))
    head = ["experiment", "stage", *(c[5:] for c in axis_cols), "MT-Bench", *(c[9:] for c in cats),
            "AE 1.0 win % ± SE", "AE 2.0 win % ± SE", "AE 2.0 LC % ± SE", *(["leaderboard avg %"] if lb else [])]
    doc.append(table(head, [[r["experiment"], r["stage"], *(fmt(r.get(c)) for c in axis_cols),
                             fmt(r.get("mt_bench_overall")), *(fmt(r.get(c)) for c in cats),
                             *(pm(r.get(k), r.get(se)) for k, se in SE_OF.items()),
                             *([average_cell(r)] if lb else [])] for r in rows]))
    if groups:
        keys = ("mt_bench_overall", *SE_OF, *(["leaderboard_average"] if lb else []))

        def cell(g, k):
            se = g.get(f"{k}_se")
            return pm(g[k], g[f"{k}_spread"]) + (f" (SE {se:.2f})" if se is not None else "")

        doc += [("h2", "Over seeds"),
                ("p", "Mean ± sample standard deviation over the seeds; (SE x) is the judging standard error of "
                      "that mean, sqrt(Σ SE²)/n, where every seed's score has one."),
                table(["experiments", "seeds", "MT-Bench", "AE 1.0 win %", "AE 2.0 win %", "AE 2.0 LC %",
                       *(["leaderboard avg %"] if lb else [])],
                      [[g["model"], ", ".join(map(str, g["seeds"])), *(cell(g, k) for k in keys)] for g in groups])]
    doc += [*leaderboard, ("h2", "Published"),
            table(["model", "MT-Bench", "AE 1.0 win % ± SE", "AE 2.0 win % ± SE", "AE 2.0 LC % ± SE", "source"],
                  [[r["model"], fmt(r.get("mt_bench_overall")), *(pm(r.get(k), r.get(se)) for k, se in SE_OF.items()),
                    r["source"]] for r in published])]
    if axes:
        doc += [("h2", "Plots"), *(("img", a, name) for a, name in zip(axes, plot_names))]
    return doc


def to_markdown(doc: list[tuple]) -> str:
    lines: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            lines += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(row) + " |" for row in block[2]] + [""]
        elif kind == "img":
            lines.append(f"![{block[1]}]({block[2]})")
    return "\n".join(lines).rstrip("\n") + "\n"


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px}th{background:#f0f3f7;text-align:left}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafafa}
p,li{max-width:70em;font-size:14px}code{font-size:12px}"""


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` of our own texts, as HTML."""
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _td(cell: str) -> str:
    numeric = cell[:1].isdigit() or cell[:1] == "-" and cell[1:2].isdigit() or cell == "–"
    return f'<td class="num">{html.escape(cell)}</td>' if numeric else f"<td>{html.escape(cell)}</td>"


def to_html(doc: list[tuple], title: str) -> str:
    """A standalone page (no scripts, no external files): Snakemake's report shows it in a frame."""
    body: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul" and block[1]:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":  # the plots are report items of their own; a data: frame cannot load a relative path
            body.append(f"<p>Plot against {html.escape(block[1])}: <code>{html.escape(block[2])}</code> "
                        "(its own entry in this category)</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
