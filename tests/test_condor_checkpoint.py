"""profiles/condor/self_checkpoint.sh, the training jobs' HTCondor wrapper: exit 75 (the submit description's
checkpoint_exit_code) exactly when the trainer stopped with a checkpoint, and HTCondor's SIGTERM passed to every
process of the job. A fake `python` stands for the job's snakemake and trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER_ENV, exit_preempted

WRAPPER = Path(__file__).resolve().parents[1] / "profiles" / "condor" / "self_checkpoint.sh"
FAKE = """#!/usr/bin/env bash
# $1 $2 = -m snakemake; FAKE_MODE says what the job does
case "$FAKE_MODE" in
  ok) exit 0 ;;
  fail) exit 1 ;;
  preempted) touch "$MAMBA_ALIGN_PREEMPTED_MARKER"; exit 1 ;;  # what Snakemake's job exits after the trainer's 75
  wait)  # the trainer: a child process of its own, which saves and marks on SIGTERM
    bash -c 'trap "touch \\"$MAMBA_ALIGN_PREEMPTED_MARKER\\"; exit 75" TERM; while :; do sleep 0.05; done' &
    trainer=$!
    trap '' TERM  # snakemake itself waits for its job
    echo ready > "$READY"
    wait "$trainer"
    exit 1 ;;
esac
"""


@pytest.fixture
def fake_python(tmp_path):
    f = tmp_path / "python"
    f.write_text(FAKE)
    f.chmod(0o755)
    return f


def wrapper(fake_python, tmp_path, mode, **kw):
    env = {**os.environ, "FAKE_MODE": mode, "READY": str(tmp_path / "ready"), "TMPDIR": str(tmp_path)}
    return subprocess.Popen(["bash", str(WRAPPER), str(fake_python), "-m", "snakemake", "--snakefile", "S"],
                            env=env, **kw)


@pytest.mark.parametrize("mode, rc", [("ok", 0), ("fail", 1), ("preempted", PREEMPTED_EXIT_CODE)])
def test_exit_75_only_when_the_trainer_stopped_with_a_checkpoint(fake_python, tmp_path, mode, rc):
    assert wrapper(fake_python, tmp_path, mode).wait(timeout=30) == rc
    assert not list(tmp_path.glob("mamba-align-preempted.*"))  # the marker is removed


def test_sigterm_reaches_the_trainer_and_the_job_restarts(fake_python, tmp_path):
    proc = wrapper(fake_python, tmp_path, "wait")
    t0 = time.time()
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.time() - t0 < 30
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # HTCondor's soft kill goes to the job's process only
    assert proc.wait(timeout=30) == PREEMPTED_EXIT_CODE


def test_the_trainer_marks_its_preempted_exit(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(PREEMPTED_MARKER_ENV, str(marker))
    with pytest.raises(SystemExit) as e:
        exit_preempted()
    assert e.value.code == PREEMPTED_EXIT_CODE and marker.exists()
