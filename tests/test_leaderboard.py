"""The leaderboard stage's workflow side: settings from config, lm-eval invoked as the Open LLM Leaderboard v1 ran
its tasks, scores read back (MMLU as the mean of its subjects), resume after a preemption, IFEval's NLTK data never
fetched on a node, and the report's table. The model class itself: test_leaderboard_lm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mamba_align.eval.leaderboard import run as lb_run
from mamba_align.eval.leaderboard.tasks import TaskSpec, check_against_task, score, task_specs
from mamba_align.ops.reporting import report_leaderboard
from mamba_align.utils import UserError, read_json

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())

# The Open LLM Leaderboard (v1)'s settings as Hugging Face documented them (the leaderboard's About page): task,
# shots, the metric reported, and how MMLU's subjects are combined. Written here independently of config/config.yaml,
# which the workflow reads, so that a change there that departs from the leaderboard fails this test.
LEADERBOARD_V1 = {
    "arc_challenge": (25, "acc_norm"),
    "hellaswag": (10, "acc_norm"),
    "mmlu": (5, "acc"),  # averaged over the 57 subjects
    "truthfulqa_mc2": (0, "acc"),  # lm-eval's truthfulqa_mc2 computes mc2 as "acc"
    "winogrande": (5, "acc"),
    "gsm8k": (5, "exact_match"),
}


def test_config_runs_the_leaderboard_v1_settings():
    lb = CONFIG["eval"]["leaderboard"]
    assert lb["tasks"] == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]  # the paper's four
    for spec in task_specs({**lb, "tasks": list(LEADERBOARD_V1)}):
        assert (spec.num_fewshot, spec.metric) == LEADERBOARD_V1[spec.task], spec.task
        assert spec.chat_template is False  # the leaderboard prompted without chat templates
    assert lb["settings"]["mmlu"]["aggregate"] == "subtask_mean"
    assert lb["settings"]["gsm8k"]["filter"] == "strict-match"
    assert lb["stages"] == ["base", "sft", "dpo"]


def test_lm_eval_tasks_compute_the_configured_metrics():
    """Checked against lm-eval's own task index (no data needed): each configured metric is one the task computes,
    and MMLU is 57 subjects."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    for spec in task_specs({**CONFIG["eval"]["leaderboard"], "tasks": [*LEADERBOARD_V1, "ifeval"]}):
        entry = tm.task_index[spec.task]
        if spec.task == "mmlu":
            leaves = [k for k, e in tm.task_index.items() if e.tags & {"mmlu_stem_tasks", "mmlu_other_tasks",
                      "mmlu_social_sciences_tasks", "mmlu_humanities_tasks"}]
            assert len(leaves) == 57
            cfgs = [tm.task_index[k].cfg for k in leaves]
        else:
            cfgs = [entry.cfg]
        for cfg in cfgs:
            metrics = {m["metric"] for m in cfg.get("metric_list", [])}
            filters = {"none", *(f["name"] for f in cfg.get("filter_list") or [])}
            check_against_task(spec, metrics, filters)


def test_unconfigured_task_and_bad_metric_are_one_line_errors():
    with pytest.raises(UserError, match=r"eval.leaderboard.tasks lists 'arc_easy'.*no entry"):
        task_specs({"tasks": ["arc_easy"], "settings": {}})
    with pytest.raises(UserError, match=r"settings.hellaswag: metric 'acc_nrom'.*it has: acc, acc_norm"):
        check_against_task(TaskSpec("hellaswag", 10, "acc_nrom"), {"acc", "acc_norm"}, {"none"})
    with pytest.raises(UserError, match=r"settings.gsm8k.filter: 'strict'"):
        check_against_task(TaskSpec("gsm8k", 5, "exact_match", filter="strict"), {"exact_match"},
                           {"none", "strict-match"})


def _results(accs: dict[str, tuple[float, float, int]], group: str | None = None) -> dict:
    res = {t: {"acc,none": a, "acc_stderr,none": se} for t, (a, se, _) in accs.items()}
    out = {"results": res, "n-samples": {t: {"original": n, "effective": n} for t, (_, _, n) in accs.items()},
           "versions": {t: 1.0 for t in accs}, "group_subtasks": {}}
    if group:
        weighted = sum(a * n for a, _, n in accs.values()) / sum(n for *_, n in accs.values())
        out["groups"] = {group: {"acc,none": weighted, "acc_stderr,none": 0.01}}
        out["group_subtasks"] = {group: sorted(accs)}
    return out


def test_subtask_mean_is_the_unweighted_mean_of_subjects():
    """The leaderboard's MMLU: each subject counts once, however many questions it has (lm-eval's group
    weights by size)."""
    results = _results({"m_a": (1.0, 0.0, 100), "m_b": (0.0, 0.1, 10), "m_c": (0.5, 0.2, 10)}, group="m")
    rec = score(TaskSpec("m", 5, "acc", aggregate="subtask_mean"), results)
    assert rec["score"] == pytest.approx(0.5)
    assert rec["stderr"] == pytest.approx((0.1**2 + 0.2**2) ** 0.5 / 3)
    assert rec["n"] == 120 and set(rec["subtasks"]) == {"m_a", "m_b", "m_c"}
    plain = score(TaskSpec("m", 5, "acc"), results)  # without aggregate: lm-eval's size-weighted group score
    assert plain["score"] == pytest.approx(105 / 120)


def test_a_missing_metric_in_the_results_names_what_there_is():
    with pytest.raises(UserError, match=r"no 'acc_norm,none'.*acc,none"):
        score(TaskSpec("t", 0, "acc_norm"), _results({"t": (0.5, 0.1, 4)}))


@pytest.fixture
def fake_lm_eval(monkeypatch, tmp_path):
    """simple_evaluate replaced by a recorder (lm-eval's own path runs in the demo and test_leaderboard_lm)."""
    calls = []

    def simple_evaluate(**kw):
        calls.append(kw)
        task = kw["tasks"][0]
        if task in fail_on:
            raise RuntimeError(f"preempted during {task}")
        return _results({task: (0.25, 0.05, 8)})

    fail_on: set[str] = set()
    monkeypatch.setattr("lm_eval.simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lb_run, "_load_model", lambda *a, **k: object())
    monkeypatch.setattr(lb_run, "_task_manager", lambda include_path: "tm")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    fetched = tmp_path / "tasks.json"
    return calls, fail_on, model, fetched


def _lb(tasks):
    return {"tasks": tasks, "settings": {t: {"num_fewshot": n, "metric": "acc"} for t, n in
                                         zip(tasks, (25, 10, 5))}, "seed": 1234, "bootstrap_iters": 10}


def test_invocation_per_task_and_resume_after_a_preemption(fake_lm_eval, tmp_path):
    calls, fail_on, model, fetched = fake_lm_eval
    lb = _lb(["a", "b", "c"])
    fetched.write_text(json.dumps({"tasks": {t: {"datasets": {t: {"path": "x"}}} for t in "abc"}}))
    out = tmp_path / "eval" / "leaderboard.json"
    fail_on.add("b")
    with pytest.raises(RuntimeError, match="preempted during b"):
        lb_run.evaluate_leaderboard(str(model), out, lb, fetched, tmp_path / "nltk")
    assert [c["tasks"] for c in calls] == [["a"], ["b"]] and not out.exists()
    first = calls[0]
    assert first["num_fewshot"] == 25 and first["fewshot_random_seed"] == 1234 and first["random_seed"] == 1234
    assert first["apply_chat_template"] is False and first["log_samples"] is False
    assert first.get("use_cache") is None  # a task resumes from its start: no SQLite commit per request
    fail_on.clear()
    calls.clear()
    summary = lb_run.evaluate_leaderboard(str(model), out, lb, fetched, tmp_path / "nltk",
                                          model={"model_key": "k" * 12, "model_run_key": None})
    assert [c["tasks"] for c in calls] == [["b"], ["c"]]  # a: done before the preemption, kept
    assert [c["num_fewshot"] for c in calls] == [10, 5]
    written = read_json(out)
    assert written == json.loads(json.dumps(summary)) and written["model_key"] == "k" * 12
    assert set(written["tasks"]) == {"a", "b", "c"} and written["average"] == pytest.approx(0.25)
    assert written["tasks"]["a"]["datasets"] == {"a": {"path": "x"}}
    assert not list(out.parent.glob("leaderboard.json.work-*"))  # the work folder goes with a complete output


def test_another_model_never_resumes_this_ones_tasks(fake_lm_eval, tmp_path):
    calls, fail_on, model, fetched = fake_lm_eval
    fetched.write_text(json.dumps({"tasks": {t: {"datasets": {}} for t in "ab"}}))
    out = tmp_path / "leaderboard.json"
    fail_on.add("b")
    with pytest.raises(RuntimeError):
        lb_run.evaluate_leaderboard(str(model), out, _lb(["a", "b"]), fetched, tmp_path / "nltk")
    (model / "config.json").write_text('{"retrained": true}')
    fail_on.clear()
    calls.clear()
    lb_run.evaluate_leaderboard(str(model), out, _lb(["a", "b"]), fetched, tmp_path / "nltk")
    assert [c["tasks"] for c in calls] == [["a"], ["b"]]


def test_ifeval_without_fetched_punkt_fails_before_the_model_loads(fake_lm_eval, tmp_path, monkeypatch):
    calls, _, model, fetched = fake_lm_eval
    monkeypatch.setenv("NLTK_DATA", "")
    lb = {"tasks": ["ifeval"], "settings": {"ifeval": {"num_fewshot": 0, "metric": "prompt_level_strict_acc",
                                                       "chat_template": True}}}
    fetched.write_text(json.dumps({"tasks": {"ifeval": {"datasets": {}}}}))
    with pytest.raises(UserError, match=r"punkt_tab in .*nltk.*forcerun fetch_leaderboard_data"):
        lb_run.evaluate_leaderboard(str(model), tmp_path / "lb.json", lb, fetched, tmp_path / "nltk")
    assert not calls


def test_fetch_checks_the_demo_tasks_and_records_their_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo's data_files are relative to the workflow folder, where jobs run
    lb = DEMO["eval"]["leaderboard"]
    out = tmp_path / "tasks.json"
    rec = lb_run.fetch_leaderboard_data(lb, out, tmp_path / "nltk")
    assert set(rec["tasks"]) == {"demo_arc", "demo_mmlu", "demo_gen"}
    assert rec["tasks"]["demo_mmlu"]["subtasks"] == ["demo_mmlu_counting", "demo_mmlu_numbers"]
    files = rec["tasks"]["demo_arc"]["datasets"]["demo_arc"]["files"]
    assert set(files) == {"config/demo/leaderboard/arc_train.jsonl", "config/demo/leaderboard/arc_test.jsonl"}
    bad = {**lb, "settings": {**lb["settings"], "demo_arc": {"num_fewshot": 3, "metric": "acc_nrom"}}}
    with pytest.raises(UserError, match=r"settings.demo_arc: metric 'acc_nrom'"):
        lb_run.fetch_leaderboard_data(bad, out, tmp_path / "nltk")


def _stage_file(tmp_path, stage, scores, key):
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps({
        "model_key": key, "lm_eval": "0.4.13", "average": sum(scores.values()) / len(scores),
        "tasks": {t: {"score": v, "stderr": 0.01, "n": 100, "num_fewshot": 25, "metric": "acc_norm"}
                  for t, v in scores.items()}}))
    return path


def test_report_table_shows_change_from_base_and_published_rows(tmp_path):
    paths = {"base": _stage_file(tmp_path, "base", {"arc_challenge": 0.30, "hellaswag": 0.60}, "b" * 12),
             "sft": _stage_file(tmp_path, "sft", {"arc_challenge": 0.33, "hellaswag": 0.59}, "s" * 12),
             "dpo": _stage_file(tmp_path, "dpo", {"arc_challenge": 0.35, "hellaswag": 0.61}, "old")}
    rows = report_leaderboard.leaderboard_rows("run", paths, {"base": "b" * 12, "sft": "s" * 12, "dpo": "d" * 12})
    base, sft, dpo = rows
    assert sft["arc_challenge_change"] == pytest.approx(3.0)
    assert sft["arc_challenge_change_stderr"] == pytest.approx(2 ** 0.5)
    assert dpo["status"].startswith("stale") and "arc_challenge_change" not in dpo
    from mamba_align.ops.reporting.report_tables import to_markdown

    md = to_markdown(report_leaderboard.leaderboard_doc(rows, demo=False))
    assert "| run-sft | 33.00 ± 1.00 (+3.00) | 59.00 ± 1.00 (-1.00) |" in md
    assert "Zephyr-7B dDPO (paper) | 62.03 | 84.52 |" in md and "arXiv:2310.16944" in md
    assert "Stale" in md and "run-dpo: stale" in md
    report_leaderboard.plot_changes(rows, tmp_path / "changes.png")
    assert (tmp_path / "changes.png").stat().st_size > 1000


def test_templates_compile_once_and_render_as_lm_eval():
    import lm_eval.utils

    from mamba_align.eval.leaderboard import run as lb_run

    stock = lm_eval.utils.apply_template
    doc = {"question": "Why?", "choices": ["a", "b"], "ctx": "x  "}
    templates = ["Question: {{question}}\nAnswer:", "{{choices}}", "{{ctx | regex_replace('\\s+$', '')}}!"]
    want = [stock(t, doc) for t in templates]
    try:
        lb_run.compile_templates_once()
        lb_run._template.cache_clear()
        got = [lm_eval.utils.apply_template(t, doc) for t in templates * 3]
        assert got == want * 3
        assert lb_run._template.cache_info().misses == len(templates)  # each compiled once
        with pytest.raises(Exception, match="undefined"):  # lm-eval's StrictUndefined still holds
            lm_eval.utils.apply_template("{{missing}}", doc)
    finally:
        lm_eval.utils.apply_template = stock


def test_the_suite_bench_runs_tiny_on_cpu(tmp_path):
    """bench/leaderboard_suite.py (the whole job's GPU timing, docs/benchmarks.md §18) end to end at the tiny
    shape: config.yaml's leaderboard settings map onto its tasks, so no device time is lost to a broken bench."""
    import subprocess
    import sys

    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "bench/leaderboard_suite.py", "--tiny", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["documents"] == 12 and set(result["tasks"]) == {
        "synth_arc_c", "synth_hellaswag", "synth_mmlu", "synth_truthfulqa"}
    assert result["process_s"] >= result["tasks_s"] > 0
