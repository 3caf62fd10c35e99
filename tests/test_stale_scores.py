"""Issue #28, stale results: every file a rule writes is declared (Snakemake deletes it with the job's outputs,
so an interrupted rerun leaves no old number behind), and every score carries the key of the model it was
computed for, so `mamba-align status` and the report never show a stale score as current."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from wfhelpers import REPO, snakemake

from mamba_align import cli
from mamba_align.ops.reporting.report import build_report
from mamba_align.ops.store import layout, provenance

DEMO = [str(REPO / "config" / "demo.yaml")]
OLD_KEY = "0123456789ab"


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def mtbench(key: str | None, overall: float = 7.0) -> dict:
    s = {"turn_1": overall, "turn_2": overall, "overall": overall}
    return {"benchmark": "mt_bench", "model_id": "demo-dpo", "model_key": key, "model_run_key": None,
            "scores": s, "per_category": {"writing": s, "math": s}, "n_unrated": 0, "judge": {"model": "j"}}


def alpacaeval(key: str | None, win_rate: float = 42.0) -> dict:
    return {"benchmark": "alpaca_eval", "generator": "demo-dpo", "model_key": key, "model_run_key": None,
            "results": {"weighted_alpaca_eval_gpt4_turbo": {
                "version": "2.0", "win_rate": win_rate, "length_controlled_winrate": None, "n": 8}}}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    """The demo config's model keys, as `status` computes them."""
    return provenance.current_model_keys(DEMO, REPO)


def test_keys_follow_what_the_model_learned_from(keys):
    assert len(set(keys.values())) == 3  # base, sft, dpo: each stage's model is another model
    chain = provenance.learned_by("dpo", {"source": "x"}, {"learning_rate": 1.0}, {"beta": 0.1})
    changed = provenance.learned_by("dpo", {"source": "x"}, {"learning_rate": 1.0}, {"beta": 0.2})
    assert provenance.model_key(chain) != provenance.model_key(changed)
    assert provenance.model_key(chain) == provenance.model_key(json.loads(json.dumps(chain)))


# --- bullet 2: a stale AlpacaEval next to a fresh MT-Bench ------------------------------------------------------

@pytest.fixture
def results(tmp_path, keys) -> Path:
    """After a DPO change, `snakemake results/eval/mtbench.json` rebuilt MT-Bench only: AlpacaEval and the report
    still hold the old DPO model's numbers."""
    r = tmp_path / "results"
    write(r / "eval/mtbench.json", mtbench(keys["dpo"], overall=7.0))
    write(r / "eval/alpacaeval.json", alpacaeval(OLD_KEY, win_rate=42.0))
    write(r / "eval/sft/mtbench.json", mtbench(keys["sft"], overall=5.0))
    write(r / "eval/sft/alpacaeval.json", alpacaeval(keys["sft"], win_rate=11.0))
    build_report("demo", {"dpo": {"mtbench": r / "eval/mtbench.json", "alpacaeval": r / "eval/alpacaeval.json"}},
                 {}, r / "report", current_keys={"dpo": OLD_KEY})  # the report of the old model
    return r


def test_status_marks_the_stale_alpacaeval_and_the_stale_report(results, keys, capsys):
    assert cli.main(["status", str(results), "--configfile", *DEMO, "--workflow-dir", str(REPO)]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 2)[1].strip(): line for line in out.splitlines() if line.startswith("eval dpo:")}
    assert "stale" not in lines["MT-Bench"]
    assert f"[stale: computed for model {OLD_KEY}, current config wants {keys['dpo']}]" in lines["AlpacaEval demo-dpo"]
    assert not any("stale" in line for line in out.splitlines() if line.startswith("eval sft:"))
    report = next(line for line in out.splitlines() if line.startswith("report:"))
    assert f"dpo row is stale: computed for model {OLD_KEY}" in report


def test_status_without_keys_in_old_scores_says_so(results, keys, capsys):
    write(results / "eval/alpacaeval.json", alpacaeval(None))  # written before scores carried keys
    cli.main(["status", str(results), "--config", *DEMO, "--workflow-dir", str(REPO)])
    assert "[stale: no model key recorded" in capsys.readouterr().out


def test_report_never_shows_the_stale_alpacaeval_in_the_current_row(results, keys):
    rows = build_report("demo", {s: {"mtbench": results / f"eval/{d}mtbench.json",
                                     "alpacaeval": results / f"eval/{d}alpacaeval.json"}
                                 for s, d in (("sft", "sft/"), ("dpo", ""))},
                        {}, results / "report", current_keys={s: keys[s] for s in ("sft", "dpo")})
    ours = [r for r in rows if r["source"] == "this run"]
    current = {r["stage"]: r for r in ours if r["status"] == "current"}
    stale = [r for r in ours if r["status"] != "current"]
    assert current["dpo"]["mt_bench_overall"] == 7.0 and current["dpo"]["model_key"] == keys["dpo"]
    assert current["dpo"].get("alpaca_eval_2_win_rate") is None  # not beside the fresh MT-Bench
    assert current["sft"]["alpaca_eval_2_win_rate"] == 11.0  # the sft row is one model's
    assert [(r["stage"], r["model_key"], r["alpaca_eval_2_win_rate"], r.get("mt_bench_overall")) for r in stale] \
        == [("dpo", OLD_KEY, 42.0, None)]
    assert stale[0]["status"] == f"stale: computed for model {OLD_KEY}, current config wants {keys['dpo']}"
    md = (results / "report/scores.md").read_text()
    main_table, stale_part = md.split("## Stale scores")
    assert "42.00" not in main_table and "42.00" in stale_part
    assert json.loads((results / "report/scores.json").read_text()) == json.loads(json.dumps(rows, default=str))


def test_report_without_current_keys_keeps_different_models_apart(results):
    rows = build_report("demo", {"dpo": {"mtbench": results / "eval/mtbench.json",
                                         "alpacaeval": results / "eval/alpacaeval.json"}}, {}, results / "report")
    ours = [r for r in rows if r["source"] == "this run"]
    assert len(ours) == 2 and all(r["status"].startswith("stale?") for r in ours)


# --- bullet 1: every file a rule writes is declared ----------------------------------------------------------

def rule_blocks() -> dict[str, tuple[str, str]]:
    """{rule: (its .smk body, the rule it is a `use rule` of, or itself)} of every rule of the workflow."""
    blocks = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", text, re.S | re.M):
            blocks[name] = (body, name)
        for base, name, body in re.findall(r"^use rule (\w+) as (\w+) with:\n(.*?)(?=^\S|\Z)", text, re.S | re.M):
            blocks[name] = (body, base)
    return blocks


def section(body: str, key: str) -> str:
    m = re.search(rf"^    {key}:\n(.*?)(?=^    \w+:|\Z)", body, re.S | re.M)
    return m.group(1) if m else ""


@pytest.mark.parametrize("rule", sorted(rule_blocks()))
def test_every_provenance_record_is_a_declared_output(rule):
    blocks = rule_blocks()
    body, base = blocks[rule]
    script = re.search(r'"\.\./scripts/(\w+\.py)"', section(blocks[base][0], "script"))
    if not script or "record_snakemake_job" not in (REPO / "workflow" / "scripts" / script.group(1)).read_text():
        pytest.skip("writes no provenance record")
    output = section(body, "output") or section(blocks[base][0], "output")
    assert re.search(r'^        provenance=PATHS\.provenance\(', output, re.M), f"{rule} writes an undeclared record"


def dry_run_jobs(wf: Path, *config: str) -> list[tuple[str, dict, list[str]]]:
    """(rule, wildcards, outputs) of every job a dry run of the whole workflow plans."""
    out = snakemake(wf, "-n", "--configfile", *config).stdout
    jobs = []
    for block in re.split(r"^rule ", out, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        outputs = re.search(r"^    output: (.*)$", block, re.M)
        wildcards = re.search(r"^    wildcards: (.*)$", block, re.M)
        jobs.append((rule, dict(w.split("=", 1) for w in wildcards.group(1).split(", ")) if wildcards else {},
                     outputs.group(1).split(", ") if outputs else []))
    return jobs


# Moved by the change that declared them (6fbecfb): the sft stage's judge records went from
# judge_*-sft.json to sft/judge_*.json; an earlier run's judge reruns once, from its judge cache.
MOVED = {"judge_mt_bench", "judge_alpaca_eval"}
# New with its declaration (#30), laid out as the judges' ([base/|sft/]<rule>.json): no earlier folder has one
NEW = {"eval_leaderboard"}


def test_declared_records_are_where_undeclared_ones_were(workflow_copy):
    """A record declared at another path than the one record_path chose without a declaration would be a missing
    output in every earlier results folder, and Snakemake would rerun the finished training or evaluation."""
    blocks = rule_blocks()
    checked = set()
    for config in (["config/demo.yaml"], ["config/demo.yaml", "config/demo-grid.yaml"]):
        for rule, wildcards, outputs in dry_run_jobs(workflow_copy, *config):
            if rule not in blocks or rule in MOVED | NEW or not any("/provenance/" in f for f in outputs):
                continue
            undeclared = SimpleNamespace(rule=rule, output={}, wildcards=wildcards, config={"results_dir": "results"})
            assert provenance.record_path(undeclared) in outputs, (rule, wildcards, outputs)
            checked.add(rule)
    assert {"train_sft", "train_dpo_grid", "generate_mt_bench_grid", "build_demo_inputs", "plan",
            "report_experiments"} <= checked


@pytest.mark.parametrize("rule", ["judge_mt_bench", "judge_mt_bench_grid"])
def test_judgments_of_mt_bench_are_declared(rule):
    body, _ = rule_blocks()[rule]
    assert "judgments=" in section(body, "output") and "judgments=" not in section(body, "params")


def run_rule(wf: Path, rule: str, target: str, *args: str) -> tuple[set[str], set[str]]:
    """Run `rule` alone for `target` with Snakemake: (the files it declares as outputs, log and benchmark, the
    files under results/ it wrote). A log's hidden attempt history (.<log>.history) belongs to the log. The run's
    list of unpinned artefacts is no rule's: onstart rewrites it before any job, so no rerun leaves an old one."""
    r = wf / "results"
    time.sleep(0.01)
    before = {p: p.stat().st_mtime_ns for p in r.rglob("*") if p.is_file()}
    args = [target, "--allowed-rules", rule, *args]
    dry = snakemake(wf, "-n", *args).stdout
    block = dry[dry.index(f"rule {rule}:"):]
    declared = {f.strip() for key in ("output", "log", "benchmark")
                for f in re.search(rf"^    {key}: (.*)$", block, re.M).group(1).split(",")}
    snakemake(wf, "--cores", "1", *args)
    written = {str(p.relative_to(wf)) for p in r.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns}
    written.remove(layout.Results("results").unpinned())
    declared |= {str(Path(f).with_name(f".{Path(f).name}.history")) for f in declared if f.endswith(".log")}
    return declared, written


def test_report_rule_writes_only_declared_files(workflow_copy, keys):
    """The report rule run by Snakemake on hand-made scores (no model, no judge): every file that appears under
    results/ is a declared output, log or benchmark; its rows are current (the workflow's keys are status's)."""
    r = workflow_copy / "results"
    for stage, d in (("sft", "sft/"), ("dpo", "")):
        write(r / f"eval/{d}mtbench.json", mtbench(keys[stage]))
        write(r / f"eval/{d}alpacaeval.json", alpacaeval(keys[stage]))
        write(r / f"metrics/{stage}.json", {"log_history": [{"step": 1, "loss": 1.0}]})
    for stage, d in (("base", "base/"), ("sft", "sft/"), ("dpo", "")):
        write(r / f"eval/{d}leaderboard.json", {"model_key": keys.get(stage), "tasks": {}, "average": None})
    write(r / "report/scores.json", [{"model": "demo-dpo", "stage": "dpo", "source": "this run"}])  # an old one
    declared, written = run_rule(workflow_copy, "report", "results/report/scores.md", "--configfile",
                                 "config/demo.yaml")
    assert {"results/report/scores.json", "results/provenance/report.json"} <= declared
    assert "results/report/scores.json" in written and written - declared == set()
    rows = json.loads((r / "report/scores.json").read_text())
    ours = [x for x in rows if x["source"] == "this run"]
    assert [(x["stage"], x["status"]) for x in ours] == [("sft", "current"), ("dpo", "current")]
    assert json.loads((r / "eval/mtbench.json").read_text()).get("provenance") is None  # inputs are not rewritten
    assert json.loads((r / "provenance/report.json").read_text())["step"] == "report"


def test_report_experiments_writes_only_declared_files(workflow_copy):
    """The grid's report run by Snakemake on hand-made scores of the demo grid: its scores.json and provenance
    record are declared outputs, and nothing else appears under results/; the leaderboard's scores (the shared
    base model's and each DPO model's) are its columns."""
    r = workflow_copy / "results"
    grid = ["config/demo.yaml", "config/demo-grid.yaml"]
    for beta, seed in ((b, s) for b in ("0.05", "0.2") for s in (1, 2)):
        d = r / f"experiments/beta{beta}-seed{seed}"
        write(d / "eval/mtbench.json", mtbench(None))
        write(d / "eval/alpacaeval.json", alpacaeval(None))
    g = provenance.current_grid(r, [str(workflow_copy / f) for f in grid], workflow_copy)
    for x in g.exps:
        for stage in g.leaderboard_stages:
            write(Path(g.eval_summary(x, stage, "leaderboard")), {
                "model_key": provenance.grid_model_key(g, g.home(x, stage)), "average": 0.25, "tasks": {
                    "demo_arc": {"score": 0.25, "stderr": 0.125, "num_fewshot": 3, "metric": "acc_norm"}}})
    declared, written = run_rule(workflow_copy, "report_experiments", "results/report/experiments/scores.md",
                                 "--configfile", *grid)
    assert {"results/report/experiments/scores.json", "results/provenance/report_experiments.json"} <= declared
    assert "results/report/experiments/scores.json" in written and written - declared == set()
    assert json.loads((r / "provenance/report_experiments.json").read_text())["step"] == "report_experiments"
    rows = json.loads((r / "report/experiments/scores.json").read_text())["experiments"]
    assert [(x["stage"], x["leaderboard_status"], x["leaderboard:demo_arc"]) for x in rows] == [
        ("base", "current", 25.0)] + [("dpo", "current", 25.0)] * 4
