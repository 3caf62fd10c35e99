"""Issue #29.4: Snakemake's HTML report shows the numbers inline. A .md report item is only a download
(data:text/markdown); the scores table and the grid's tables are also written as HTML pages, which the report shows
in a frame, with the standard errors that exist (AlpacaEval 1.0 and 2.0 win rate and 2.0 LC, from alpacaeval.json;
over seeds, mean ± SD and the judging SE of the mean). Checked by hand in headless Chromium:
docs/report-screenshot.png."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from wfhelpers import snakemake

from mamba_align.ops.reporting.report import build_experiments_report, build_report, seed_groups
from mamba_align.ops.reporting.report_tables import se_of_mean
from mamba_align.ops.store import provenance


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def mtbench(key, overall: float) -> dict:
    s = {"turn_1": overall + 0.25, "turn_2": overall - 0.25, "overall": overall}
    return {"benchmark": "mt_bench", "model_key": key, "scores": s, "per_category": {"writing": s, "math": s},
            "n_unrated": 1, "judge": {"model": "gpt-4"}}


def alpacaeval(key, win_rate: float, se: float | None = 1.17) -> dict:
    """Both versions as judge_alpaca_eval writes them: win rate, its SE, 2.0's LC win rate and its SE."""
    return {"benchmark": "alpaca_eval", "model_key": key, "results": {
        "alpaca_eval_gpt4": {"version": "1.0", "win_rate": win_rate + 60, "standard_error": 1.41},
        "weighted_alpaca_eval_gpt4_turbo": {"version": "2.0", "win_rate": win_rate, "standard_error": se,
                                            "length_controlled_winrate": win_rate + 3, "lc_standard_error": 0.62}}}


def cells(html: str) -> list[list[str]]:
    """The rows of every table in an HTML page, as the text of their cells."""
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def write_run(r: Path, keys: dict[str, str]) -> None:
    for stage, d, mt, ae in (("sft", "sft/", 5.125, 11.0), ("dpo", "", 6.875, 17.5)):
        write(r / f"eval/{d}mtbench.json", mtbench(keys.get(stage), mt))
        write(r / f"eval/{d}alpacaeval.json", alpacaeval(keys.get(stage), ae))
        write(r / f"metrics/{stage}.json", {"log_history": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})
    for stage, d, acc in (("base", "base/", 0.25), ("sft", "sft/", 0.3), ("dpo", "", 0.375)):
        write(r / f"eval/{d}leaderboard.json", {"model_key": keys.get(stage), "lm_eval": "0.4.13", "average": acc,
                                                "tasks": {"demo_arc": {"score": acc, "stderr": 0.125, "n": 8,
                                                                       "num_fewshot": 3, "metric": "acc_norm"}}})


EVALS = {s: {"mtbench": f"eval/{d}mtbench.json", "alpacaeval": f"eval/{d}alpacaeval.json"}
         for s, d in (("sft", "sft/"), ("dpo", ""))}


def test_scores_html_shows_every_score_with_its_standard_error(tmp_path):
    write_run(tmp_path, {})
    evals = {s: {b: tmp_path / p for b, p in paths.items()} for s, paths in EVALS.items()}
    rows = build_report("demo", evals, {s: tmp_path / f"metrics/{s}.json" for s in EVALS}, tmp_path / "report",
                        demo=True)
    dpo = next(r for r in rows if r.get("stage") == "dpo")
    assert (dpo["alpaca_eval_2_standard_error"], dpo["alpaca_eval_2_lc_standard_error"]) == (1.17, 0.62)
    page = (tmp_path / "report/scores.html").read_text()
    table = {row[0]: row for row in cells(page)}
    head = table["model"]
    got = dict(zip(head, table["demo-dpo"]))
    assert got["MT-Bench T1"] == "7.12" and got["overall"] == "6.88" and got["unrated"] == "1"
    assert got["AE 1.0 win % ± SE"] == "77.50 ± 1.41"
    assert got["AE 2.0 win % ± SE"] == "17.50 ± 1.17"
    assert got["AE 2.0 LC % ± SE"] == "20.50 ± 0.62"
    assert dict(zip(head, table["demo-sft"]))["AE 2.0 LC % ± SE"] == "14.00 ± 0.62"
    # the published rows, with their SEs where the leaderboard has one
    paper = dict(zip(head, table["zephyr-7b-beta (paper)"]))
    assert paper["overall"] == "7.34" and paper["AE 2.0 win % ± SE"] == "–"
    assert "<strong>Demo run" in page and "<script" not in page
    # the Markdown table (to paste) has the same cells
    assert "| 77.50 ± 1.41 | 17.50 ± 1.17 | 20.50 ± 0.62 |" in (tmp_path / "report/scores.md").read_text()
    header = (tmp_path / "report/scores.csv").read_text().splitlines()[0].split(",")
    assert {"alpaca_eval_2_standard_error", "alpaca_eval_2_lc_standard_error"} <= set(header)


def test_a_score_without_standard_error_shows_the_score_alone(tmp_path):
    write_run(tmp_path, {})
    write(tmp_path / "eval/alpacaeval.json", alpacaeval(None, 17.5, se=None))
    evals = {"dpo": {b: tmp_path / p for b, p in EVALS["dpo"].items()}}
    build_report("demo", evals, {}, tmp_path / "report")
    table = {row[0]: row for row in cells((tmp_path / "report/scores.html").read_text())}
    assert dict(zip(table["model"], table["demo-dpo"]))["AE 2.0 win % ± SE"] == "17.50"


def test_stale_scores_are_a_table_of_their_own_in_the_html(tmp_path):
    write_run(tmp_path, {"sft": "aaaaaaaaaaaa", "dpo": "bbbbbbbbbbbb"})
    write(tmp_path / "eval/alpacaeval.json", alpacaeval("0123456789ab", 42.0))
    evals = {s: {b: tmp_path / p for b, p in paths.items()} for s, paths in EVALS.items()}
    build_report("demo", evals, {}, tmp_path / "report", current_keys={"sft": "aaaaaaaaaaaa", "dpo": "bbbbbbbbbbbb"})
    page = (tmp_path / "report/scores.html").read_text()
    main, stale = page.split("<h2>Stale scores")
    assert "42.00 ± 1.17" not in main and "42.00 ± 1.17" in stale and stale.count("<table>") == 1


def test_the_grid_tables_show_seed_sd_and_the_standard_error_of_the_mean(tmp_path):
    entries = []
    for beta, seed, mt, ae in ((0.05, 1, 5.0, 10.0), (0.05, 2, 6.0, 14.0), (0.2, 1, 4.0, 20.0)):
        name = f"beta{beta}-seed{seed}"
        d = tmp_path / name
        entries.append({"name": name, "axes": {"dpo.beta": beta, "seed": seed}, "recipe": "r", "base_model": "m",
                        "evals": {"dpo": {"mtbench": str(write(d / "mtbench.json", mtbench(None, mt))),
                                          "alpacaeval": str(write(d / "alpacaeval.json", alpacaeval(None, ae)))}},
                        "metrics": {}})
    rows = build_experiments_report(entries, ["dpo.beta"], tmp_path / "report")
    groups = {g["axis:dpo.beta"]: g for g in seed_groups(rows)}
    assert groups[0.05]["alpaca_eval_2_win_rate_se"] == pytest.approx(se_of_mean([1.17, 1.17]))
    assert groups[0.05]["alpaca_eval_2_lc_win_rate_se"] == pytest.approx((2 * 0.62**2) ** 0.5 / 2)
    assert "mt_bench_overall_se" not in groups[0.05]
    page = (tmp_path / "report/scores.html").read_text()
    table = {row[0]: row for row in cells(page)}
    exp = dict(zip(table["experiment"], table["beta0.05-seed1"]))
    assert (exp["MT-Bench"], exp["AE 1.0 win % ± SE"], exp["AE 2.0 win % ± SE"], exp["AE 2.0 LC % ± SE"]) \
        == ("5.00", "70.00 ± 1.41", "10.00 ± 1.17", "13.00 ± 0.62")
    seeds = dict(zip(table["experiments"], table["dpo.beta=0.05 (dpo, 2 seeds)"]))
    assert seeds["MT-Bench"] == "5.50 ± 0.71"  # MT-Bench's summary has no SE
    assert seeds["AE 2.0 win %"] == "12.00 ± 2.83 (SE 0.83)"
    assert seeds["AE 2.0 LC %"] == "15.00 ± 2.83 (SE 0.44)"
    published = dict(zip(table["model"], table["zephyr-7b-beta (paper)"]))
    assert published["MT-Bench"] == "7.34" and published["AE 1.0 win % ± SE"] == "90.60"
    md = (tmp_path / "report/scores.md").read_text()
    assert "12.00 ± 2.83 (SE 0.83)" in md and "![dpo.beta](dpo.beta.png)" in md


def test_snakemake_report_embeds_the_scores_table_as_html(workflow_copy):
    """The report rule run by Snakemake on hand-made scores, then `snakemake --report`: the scores item is an
    HTML page (shown inline, not offered as a download) whose table holds the numbers and their SEs."""
    demo = ["--configfile", "config/demo.yaml"]
    keys = provenance.current_model_keys([str(workflow_copy / "config/demo.yaml")], workflow_copy)
    write_run(workflow_copy / "results", keys)
    target = ["results/report/scores.html", "--allowed-rules", "report", *demo]
    snakemake(workflow_copy, *target, "--cores", "1")
    snakemake(workflow_copy, *target, "--report", "results/report.html")
    report = (workflow_copy / "results/report.html").read_text()
    uris = dict(re.findall(r'"data_uri": "data:([a-z/+]+);charset=utf8;filename=([^;]+);', report))
    assert {v: k for k, v in uris.items()}["scores.html"] == "text/html"  # the report's viewer frames it
    assert "text/markdown" not in uris  # no table that is only a download
    embedded = re.search(r'"data_uri": "data:text/html;charset=utf8;filename=scores.html;base64,([^"]+)"', report)
    page = base64.b64decode(embedded.group(1)).decode()
    table = {row[0]: row for row in cells(page.split("Open LLM Leaderboard tasks")[0])}
    got = dict(zip(table["model"], table["demo-dpo"]))
    assert (got["overall"], got["AE 2.0 win % ± SE"], got["AE 2.0 LC % ± SE"]) == ("6.88", "17.50 ± 1.17",
                                                                                   "20.50 ± 0.62")
    # the leaderboard table beside it: base / SFT / DPO with stderr and the change from base
    assert "37.50 ± 12.50 (+12.50)" in page and "Open LLM Leaderboard tasks" in page
