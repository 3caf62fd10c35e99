"""The demo end to end on CPU in a temp dir: every target, trained weights changed, incremental reruns, and
what a user lives through: a setting change, an interrupted retrain, a mistaken --forcerun, a killed snakemake.

Every snakemake here runs as a normal user would: as root, through setpriv without root's permission override
(wfhelpers.as_normal_user); the one test that needs that says so when setpriv is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from wfhelpers import SNAKEMAKE, as_normal_user, copy_workflow, planned_jobs, snakemake

pytestmark = pytest.mark.slow
DEMO = ("--workflow-profile", "profiles/local", "--configfile", "config/demo.yaml")
USER = as_normal_user()


def sm(wf, *args, **kw):
    return snakemake(wf, *args, prefix=USER, **kw)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wf = copy_workflow(tmp_path_factory.mktemp("demo") / "wf")
    t0 = time.time()
    proc = sm(wf, *DEMO, "--cores", "2", timeout=1500)
    wall = time.time() - t0
    print(f"demo wall time: {wall:.0f} s")
    (wf / "demo_wall_time_s.txt").write_text(f"{wall:.1f}\n")
    return wf, proc


def test_every_target_exists(demo_run):
    wf, _ = demo_run
    r = wf / "results"
    for path in ["eval/mtbench.json", "eval/alpacaeval.json", "eval/sft/mtbench.json", "eval/sft/alpacaeval.json",
                 "models/base.verify.json", "metrics/sft.json", "metrics/dpo.json", "report/scores.md",
                 "report/scores.csv", "report/mt_bench_radar.png", "report/training_curves.png"]:
        assert (r / path).is_file(), path
    for stage in ("base", "sft", "dpo"):
        assert (r / "models" / stage / "config.json").is_file()
        assert list((r / "models" / stage).glob("*.safetensors"))
    mt = json.loads((r / "eval/mtbench.json").read_text())
    assert mt["n_questions"] == 8 and "provenance" in mt
    prov = json.loads((wf / mt["provenance"]).read_text())
    assert prov["packages"]["torch"] and prov["config"]["recipe"] == "demo"
    assert "mean nothing" in (r / "report/scores.md").read_text()


def test_conversion_was_exact(demo_run):
    wf, _ = demo_run
    verify = json.loads((wf / "results/models/base.verify.json").read_text())["verify"]
    assert verify["max_abs_logit_diff"] < 1e-4
    assert verify["greedy_continuation_identical"]


def _weights(model_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_trainable_parameter_changed(demo_run):
    wf, _ = demo_run
    base, sft, dpo = (_weights(wf / "results/models" / s) for s in ("base", "sft", "dpo"))
    assert base.keys() == sft.keys() == dpo.keys()
    for name in base:
        if name == "lm_head.weight":  # tied to the embedding
            continue
        assert not (base[name] == sft[name]).all(), f"SFT did not change {name}"
        assert not (sft[name] == dpo[name]).all(), f"DPO did not change {name}"
    metrics = json.loads((wf / "results/metrics/sft.json").read_text())
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert losses and losses[-1] < losses[0]


def test_second_run_is_a_no_op(demo_run):
    wf, _ = demo_run
    out = sm(wf, *DEMO, "-n").stdout
    assert "Nothing to be done" in out


def test_dpo_change_reruns_dpo_and_evals_only(demo_run):
    """As a normal user (no ProtectedOutputException): a DPO setting reruns DPO, its evaluations and the report."""
    wf, _ = demo_run
    out = sm(wf, *DEMO, "-n", "--config", "recipe_overrides={'dpo': {'beta': 0.2}}").stdout
    jobs = planned_jobs(out)
    assert jobs.get("train_dpo") == 1 and jobs.get("report") == 1
    assert "train_sft" not in jobs and "prepare_sft_data" not in jobs and "prepare_base_model" not in jobs
    for rule in ("generate_mt_bench", "judge_mt_bench", "generate_alpaca_eval", "judge_alpaca_eval"):
        assert jobs.get(rule) == 1, rule  # the DPO model's only


def test_operational_change_of_a_finished_stage_reruns_nothing(demo_run):
    wf, _ = demo_run
    (wf / "ops.yaml").write_text("recipe_overrides:\n  sft: {save_steps: 7, per_device_train_batch_size: 2}\n"
                                 "  dpo: {logging_steps: 3}\n")
    jobs = planned_jobs(sm(wf, "-n", *DEMO, "ops.yaml").stdout)
    assert set(jobs) <= {"plan", "all"}  # only the plan, whose memory estimate depends on the batch size
    (wf / "ops.yaml").write_text("recipe_overrides:\n  sft: {learning_rate: 0.002}\n")  # what is learned: retrain
    jobs = planned_jobs(sm(wf, "-n", *DEMO, "ops.yaml").stdout)
    assert jobs.get("train_sft") == 1 and jobs.get("train_dpo") == 1


def test_report_matches_the_eval_jsons_with_provenance(demo_run):
    import csv

    wf, _ = demo_run
    r = wf / "results"
    rows = {row["model"]: row for row in csv.DictReader(open(r / "report/scores.csv"))}
    for stage, prefix in (("sft", "sft/"), ("dpo", "")):
        row = rows[f"demo-{stage}"]
        mt = json.loads((r / f"eval/{prefix}mtbench.json").read_text())
        ae = json.loads((r / f"eval/{prefix}alpacaeval.json").read_text())
        assert float(row["mt_bench_overall"]) == pytest.approx(mt["scores"]["overall"])
        assert float(row["mt_bench_turn_1"]) == pytest.approx(mt["scores"]["turn_1"])
        assert int(row["mt_bench_unrated"]) == mt["n_unrated"]
        win = ae["results"]["weighted_alpaca_eval_gpt4_turbo"]["win_rate"]
        assert float(row["alpaca_eval_2_win_rate"]) == pytest.approx(win, abs=0.005)
        for summary in (mt, ae):  # every number has a provenance record
            prov = json.loads((wf / summary["provenance"]).read_text())
            assert "git_commit" in prov  # None here: the temp copy is no git checkout
            assert prov["packages"]["transformers"] and prov["config"]["run_name"] == "demo"
            assert prov["hardware"]["cpus"] and prov["inputs"]
    assert any("paper" in m for m in rows) and any("leaderboard" in m for m in rows)


def test_snakemake_report_builds_html(demo_run):
    wf, _ = demo_run
    sm(wf, *DEMO, "--report", "results/report.html")
    html = (wf / "results/report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "scores.md" in html


def test_the_demo_runs_as_a_normal_user(tmp_path):
    """The tier's premise: as root, the prefix really drops root's permission override."""
    if USER is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop root's permission override")
    locked = tmp_path / "read-only"
    locked.write_text("x")
    locked.chmod(0o444)
    proc = subprocess.run([*USER, "python3", "-c", f"open({str(locked)!r}, 'a')"], capture_output=True, text=True)
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


def test_models_are_links_into_a_keyed_store_and_checkpoints_are_gone(demo_run):
    wf, _ = demo_run
    r = wf / "results"
    for stage in ("sft", "dpo"):
        link = r / "models" / stage
        key = json.loads((r / f"metrics/{stage}.json").read_text())["run"]["key"]
        assert link.is_symlink() and os.readlink(link) == f"{stage}-{key}"
        assert json.loads((link / "run.json").read_text())["key"] == key
    assert not list((r / "checkpoints").glob("*-*")), "a finished run's checkpoints were kept"
    assert not list((r / "eval").rglob("*.progress-*")), "a finished generation's progress file was kept"


def test_editing_code_reruns_nothing(demo_run):
    """rerun-triggers mtime,params,input (profiles/local): a fresh checkout or an edited script retrains nothing."""
    wf, _ = demo_run
    for f in [*(wf / "workflow").rglob("*"), *(wf / "src").rglob("*.py"), wf / "Snakefile"]:
        if f.is_file():
            os.utime(f)
    assert "Nothing to be done" in sm(wf, *DEMO, "-n").stdout


# ---------------------------------------------------------------------------------------------- faults
# Each on its own copy of the finished demo, so the tests above keep theirs.

@pytest.fixture
def finished(demo_run, tmp_path):
    wf, _ = demo_run
    copy = tmp_path / "wf"
    shutil.copytree(wf, copy, symlinks=True)  # copy2 keeps every mtime, so the copy is as up to date
    return copy


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(d.name))
    return out


def _descendants(pid: int) -> list[int]:
    children, out, todo = _children(), [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start(wf, *args):
    """snakemake in its own process group (as a terminal or a batch script would run it)."""
    log = open(wf / "snakemake.out", "w")
    return subprocess.Popen([*(USER or []), *SNAKEMAKE, *args], cwd=wf, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_checkpoint(wf, stage, proc, timeout=900):
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [c for c in (wf / "results/checkpoints").glob(f"{stage}-*/checkpoint-*")
                if (c / "trainer_state.json").exists()]
        if done:
            return done[0]
        assert proc.poll() is None, f"snakemake ended before a {stage} checkpoint:\n" + \
            (wf / "snakemake.out").read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {stage} checkpoint after {timeout} s")


def test_interrupted_retrain_leaves_no_stale_summary(finished):
    """The issue's case: a DPO setting changes, train_dpo is SIGTERMed (checkpoint, exit 75). The old scores are
    gone, not served as the new setting's; the plain rerun reruns DPO and its evaluations."""
    wf = finished
    r = wf / "results"
    old_dpo = (r / "models/dpo").resolve()
    (wf / "beta.yaml").write_text("recipe_overrides:\n  dpo: {beta: 0.2}\n")
    proc = _start(wf, *DEMO, "beta.yaml", "--cores", "2")
    try:
        _wait_for_checkpoint(wf, "dpo", proc)
        trainers = [p for p in _descendants(proc.pid) if "train_dpo.py" in _cmdline(p)]
        assert trainers, "no train_dpo process found"
        for p in trainers:
            os.kill(p, signal.SIGTERM)
        assert proc.wait(timeout=600) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for stale in ("eval/mtbench.json", "eval/alpacaeval.json", "report/scores.md"):
        assert not (r / stale).exists(), f"{stale} of the beta=0.1 model survived the interrupted retrain"
    assert (r / "eval/sft/mtbench.json").exists()  # the SFT model's scores are still current
    assert (old_dpo / "model.safetensors").exists()  # the finished beta=0.1 model is kept
    jobs = planned_jobs(sm(wf, *DEMO, "beta.yaml", "-n").stdout)
    assert jobs.get("train_dpo") == 1 and "train_sft" not in jobs
    for rule in ("generate_mt_bench", "judge_mt_bench", "generate_alpaca_eval", "judge_alpaca_eval"):
        assert jobs.get(rule) == 1, rule


def test_forcerun_keeps_the_finished_model_and_a_killed_snakemake_recovers(finished):
    """--forcerun train_sft at the same key reuses the stored model (nothing is trained again); with that model
    deleted (README: the way to retrain a key), the retrain starts from scratch; snakemake's process group SIGKILLed
    mid-training: the rerun needs `snakemake --unlock` (README), then resumes and cleans up."""
    from safetensors.torch import load_file

    wf = finished
    r = wf / "results"
    link = r / "models/sft"
    store = link.resolve()
    before = load_file(link / "model.safetensors")
    log = r / "logs/train_sft.log"
    sm(wf, *DEMO, "--cores", "2", "--forcerun", "train_sft", "--", "results/models/sft")
    assert "reusing it, not retraining" in log.read_text()
    assert link.resolve() == store and not list((r / "checkpoints").glob("sft-*"))
    kept = load_file(link / "model.safetensors")
    assert all((before[k] == kept[k]).all() for k in before)  # the same model, not a retrained one
    shutil.rmtree(store)
    proc = _start(wf, *DEMO, "--cores", "2", "--forcerun", "train_sft", "--", "results/models/sft")
    try:
        _wait_for_checkpoint(wf, "sft", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    starts = [line for line in log.read_text().splitlines() if "sft run " in line and "checkpoints in" in line]
    assert starts and "from scratch" in starts[-1]  # a retrain, not a resume from the finished run
    locked = sm(wf, *DEMO, "--cores", "2", "results/models/sft", check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    sm(wf, *DEMO, "--unlock")
    sm(wf, *DEMO, "--cores", "2", "results/models/sft")
    metrics = json.loads((r / "metrics/sft.json").read_text())
    assert metrics["resumed_from"] and link.resolve() == store  # same key: resumed the killed retrain
    assert not list((r / "checkpoints").glob("sft-*"))
    jobs = planned_jobs(sm(wf, *DEMO, "-n").stdout)  # what learned from the SFT model reruns
    assert jobs.get("train_dpo") == 1 and jobs.get("judge_mt_bench") == 2
