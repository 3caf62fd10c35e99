"""Kills leave nothing behind (issue #28 §4): a job's processes die with the snakemake that started it (kill -9
included, through accelerate's ranks), a rerun's log keeps the earlier attempts and the lines of a writer still
running, a killed step's temporary output is removed at the next start and the log says so, SIGTERM is logged, and
trained models are readable by the project group as the umask says. CPU only: tiny models, 2 gloo ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from wfhelpers import bench_module

from mamba_align.process import pid_running
from mamba_align.testing.demo import build_tiny_mamba_ssm_checkpoint
from mamba_align.train.checkpoints import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
bench = bench_module("train_throughput")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bench.write_model(d / "model", **bench.SHAPES["tiny"])
    bench.write_sft_rows(d / "sft_train.parquet", 320, bench.words(512)[:40], seed=0)
    return d


def script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def wait_for(predicate, what: str, timeout: float = 180) -> None:
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------- processes die together

@pytest.mark.parametrize("killed", ["snakemake", "job", "launcher"])
def test_kill_9_takes_the_job_and_its_ranks_with_it(tiny, tmp_path, killed):
    """A stand-in for Snakemake's local executor (the script's process started from a worker thread, the script
    with a `snakemake` object, as Snakemake's preamble makes it) runs 2-rank training; kill -9 of snakemake, of the
    job, or of accelerate's launcher: every process below it is gone soon after, the ranks having saved a
    checkpoint at the end of their step."""
    log = tmp_path / "train_sft.log"
    job = script(tmp_path / "job.py", f"""
        import types
        from mamba_align.utils import setup_logging
        snakemake = types.SimpleNamespace(log=[{str(log)!r}])
        setup_logging(snakemake.log[0])
        from mamba_align.train.job import TrainJob
        from mamba_align.train.launch import train
        from mamba_align.train.recipes import load_recipe
        recipe = load_recipe({str(DEMO)!r}, "sft", {{"max_steps": 100000, "save_steps": 100000, "logging_steps": 1,
                                                     "num_train_epochs": 1000}})
        train(TrainJob(stage="sft", recipe=recipe, model={str(tiny / "model")!r},
                       train={str(tiny / "sft_train.parquet")!r}, test=None, out={str(tmp_path / "model")!r},
                       checkpoints={str(tmp_path / "ckpt")!r}, metrics={str(tmp_path / "m.json")!r},
                       num_processes=2))
        """)
    executor = script(tmp_path / "snakemake.py", f"""
        import subprocess, sys, threading, time
        threading.Thread(target=subprocess.call, args=([sys.executable, {str(job)!r}],)).start()
        time.sleep(3600)
        """)
    parent = subprocess.Popen([sys.executable, str(executor)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    everyone: list[int] = []
    try:
        wait_for(lambda: log.exists() and "step 2:" in log.read_text(), "training to start")
        everyone = children(parent.pid)
        assert len(everyone) >= 4, everyone  # the job, accelerate's launcher, 2 ranks
        launcher = next(p for p in everyone if b"accelerate.commands.launch" in Path(f"/proc/{p}/cmdline").read_bytes())
        victim = {"snakemake": parent.pid, "job": everyone[0], "launcher": launcher}[killed]
        os.kill(victim, signal.SIGKILL)
        parent.wait(timeout=10) if killed == "snakemake" else None
        wait_for(lambda: not any(pid_running(p) for p in everyone), "the job's processes to exit", timeout=90)
    finally:
        for p in [*everyone, parent.pid]:
            if pid_running(p):
                os.kill(p, signal.SIGKILL)
        parent.wait()
    assert last_complete_checkpoint(tmp_path / "ckpt") is not None  # they stopped as at a pre-emption: resumable
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------------------------ the log

def test_a_rerun_keeps_the_log_of_a_writer_still_running(tmp_path):
    """Snakemake deletes the rule's log when the job starts again; a writer of the earlier attempt still running
    goes on writing into the same log file as the new attempt, and nothing of either is lost."""
    log, go = tmp_path / "logs" / "prepare_base_model.log", tmp_path / "go"
    old = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import logging, pathlib, time
        from mamba_align.utils import setup_logging
        setup_logging({str(log)!r})
        logging.getLogger("old").info("old attempt: before the rerun")
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.05)
        logging.getLogger("old").info("old attempt: after the rerun")
        """)], env=ENV)
    try:
        wait_for(lambda: log.exists() and "before the rerun" in log.read_text(), "the old attempt's line")
        log.unlink()  # what Snakemake's Job.prepare does to a rule's log (jobs.py remove_existing_output)
        subprocess.run([sys.executable, "-c", f"import logging; from mamba_align.utils import setup_logging; "
                        f"setup_logging({str(log)!r}); logging.getLogger('new').info('new attempt')"],
                       env=ENV, check=True)
        go.touch()
        assert old.wait(timeout=60) == 0
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    text = log.read_text()
    assert "old attempt: before the rerun" in text and "old attempt: after the rerun" in text, text
    lines = [line.split(": ", 1)[1] for line in text.splitlines()]
    old_start, new_start = [i for i, line in enumerate(lines) if line.startswith("attempt started: pid")]
    assert lines.index("old attempt: before the rerun") < new_start < lines.index("new attempt")
    assert "is still running" in lines[new_start + 1]  # the new attempt says an old writer is still there
    assert text.count("attempt ended") == 2


def test_sigterm_is_logged_and_the_temporary_output_removed(tmp_path):
    log, out = tmp_path / "logs" / "step.log", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mamba_align.utils import atomic_path, setup_logging
        setup_logging({str(log)!r})
        with atomic_path({str(out)!r}) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"half written")
            print("writing", flush=True)
            time.sleep(600)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "ERROR mamba_align: terminated by SIGTERM" in text, text
    assert f"attempt ended: pid {proc.pid}" in text
    assert list(tmp_path.iterdir()) == [tmp_path / "logs"]  # no `.out.tmp-PID`, no output


def test_a_killed_steps_leftover_is_removed_at_the_next_start_and_logged(tmp_path):
    """prepare_base_model killed with -9 while writing its model folder; the rerun removes the folder it left,
    and the rule's log says the earlier attempt was killed and what was removed."""
    log, out = tmp_path / "logs" / "prepare_base_model.log", tmp_path / "models" / "base"
    killed = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mamba_align.utils import atomic_path, setup_logging
        setup_logging({str(log)!r})
        with atomic_path({str(out)!r}) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(bytes(1 << 20))
            print("writing", flush=True)
            time.sleep(600)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline() == "writing\n"
    killed.kill()
    killed.wait()
    leftover = out.with_name(f".base.tmp-{killed.pid}")
    assert leftover.is_dir()
    log.unlink()  # Snakemake's job start

    build_tiny_mamba_ssm_checkpoint(tmp_path / "ssm", d_model=32, n_layer=1)
    subprocess.run([sys.executable, "-m", "mamba_align.cli", "convert", "--source", str(tmp_path / "ssm"),
                    "--out-dir", str(out), "--report", str(tmp_path / "report.json"), "--log", str(log)],
                   env=ENV, check=True, capture_output=True)
    assert not leftover.exists() and (out / "model.safetensors").exists()
    text = log.read_text()
    host = socket.gethostname()
    assert f"previous attempt (pid {killed.pid} on {host}) was killed: it logged no end" in text, text
    assert f"previous attempt (pid {killed.pid}) was killed: removed its leftover {leftover}" in text, text


def test_leftovers_of_running_processes_are_kept(tmp_path):
    from mamba_align.utils import atomic_path

    running, dead = (tmp_path / f".out.tmp-{pid}" for pid in (os.getppid(), dead_pid()))
    for p in (running, dead):
        p.write_text("x")
    with atomic_path(tmp_path / "out") as tmp:
        tmp.write_text("done")
    assert (tmp_path / "out").read_text() == "done"
    assert running.exists() and not dead.exists()


# ------------------------------------------------------------------------------------------------------- permissions

def test_a_trained_model_follows_the_umask(tiny, tmp_path):
    """safetensors writes 0600; a published model is readable by the project group, as the base model."""
    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train
    from mamba_align.train.recipes import load_recipe

    recipe = load_recipe(DEMO, "sft", {"max_steps": 1, "save_steps": 1000})
    previous = os.umask(0o022)
    try:
        train(TrainJob(stage="sft", recipe=recipe, model=tiny / "model", train=tiny / "sft_train.parquet", test=None,
                       out=tmp_path / "model", checkpoints=tmp_path / "ckpt", metrics=tmp_path / "m.json"))
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "model").iterdir()}
    assert modes.pop("model.safetensors") == "0o644"
    assert set(modes.values()) == {"0o644"}, modes
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == "0o755"
