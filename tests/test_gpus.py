"""GPUs of their own for local jobs (mamba_align.ops.jobenv.gpus), on a CPU machine with a fake nvidia-smi listing two
GPUs: jobs get different GPUs, a third waits until one ends, a job never holds part of what it needs while it waits, and
nothing is claimed inside a scheduler's job or where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamba_align import flock
from mamba_align.ops.jobenv import gpus
from mamba_align.utils import UserError

UUIDS = ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
CLAIM = """
import os, sys, time
from pathlib import Path
from mamba_align.ops.jobenv.gpus import claim
got = claim(int(sys.argv[1]), poll_s=0.05)
print(",".join(got), flush=True)
Path(sys.argv[2]).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo '{i}, {u}'\n" for i, u in enumerate(UUIDS)))
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the lock folder: this test's own
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(gpus, "lock_dir", lambda: tmp_path / "locks")  # in this process (gettempdir is cached)
    for v in ("CUDA_VISIBLE_DEVICES", *gpus.SCHEDULER_ENV):
        monkeypatch.delenv(v, raising=False)
    yield tmp_path
    while gpus._held:  # what this process claimed
        flock.release(gpus._held.pop())


def start(tmp, name, n):
    out, done = tmp / f"{name}.cvd", tmp / f"{name}.done"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(n), str(out), str(done)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out, done


def wait_file(path, proc, timeout=30):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < end, f"{path} not written"
        time.sleep(0.05)
    return path.read_text()


def test_local_jobs_get_gpus_of_their_own_and_wait_for_a_free_one(two_gpus):
    a, a_out, a_done = start(two_gpus, "a", 1)
    b, b_out, b_done = start(two_gpus, "b", 1)
    first, second = wait_file(a_out, a), wait_file(b_out, b)
    assert {first, second} == set(UUIDS)  # one each, as CUDA_VISIBLE_DEVICES by UUID
    c, c_out, c_done = start(two_gpus, "c", 1)
    time.sleep(1.0)
    assert not c_out.exists()  # both held: waits
    a_done.touch()
    a.wait(timeout=30)
    assert wait_file(c_out, c) == first  # a's GPU, freed when a ended
    b_done.touch()
    c_done.touch()
    assert b.wait(timeout=30) == 0 and c.wait(timeout=30) == 0


def test_a_job_needing_two_waits_without_holding_one(two_gpus):
    a, a_out, a_done = start(two_gpus, "a", 1)
    held = wait_file(a_out, a)
    pair, pair_out, pair_done = start(two_gpus, "pair", 2)
    time.sleep(1.0)
    assert not pair_out.exists()
    one, one_out, one_done = start(two_gpus, "one", 1)  # the free GPU is not held by the waiting pair
    assert wait_file(one_out, one) == next(u for u in UUIDS if u != held)
    a_done.touch()
    one_done.touch()
    assert wait_file(pair_out, pair) == ",".join(UUIDS)
    pair_done.touch()
    for p in (a, pair, one):
        assert p.wait(timeout=30) == 0


def test_visible_devices_limit_the_choice(two_gpus):
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert gpus.visible_gpus(env) == [UUIDS[1]]
    assert gpus.claim(1, env) == [UUIDS[1]] and env["CUDA_VISIBLE_DEVICES"] == UUIDS[1]
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": UUIDS[0][:12]}) == [UUIDS[0]]  # a UUID prefix, as CUDA takes
    assert gpus.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_too_many_gpus_asked_names_the_resource(two_gpus):
    with pytest.raises(UserError, match=r"asks for 3 GPUs \(its `gpu` resource\) but this machine shows 2"):
        gpus.claim(3, {})


@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "42"}, {"_CONDOR_JOB_AD": "/scratch/.job.ad"}])
def test_nothing_claimed_inside_a_schedulers_job(two_gpus, env):
    assert gpus.claim(1, env) == [] and "CUDA_VISIBLE_DEVICES" not in env


def test_nothing_claimed_without_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    env: dict = {}
    assert gpus.claim(1, env) == [] and env == {}
    assert gpus.claim(0, env) == []


def test_every_gpu_rule_claims_its_gpus():
    """The scripts of the rules that may hold a GPU claim them before anything else."""
    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    for name in ("train_sft", "train_dpo", "generate_mt_bench", "generate_alpaca_eval", "judge_mt_bench",
                 "judge_alpaca_eval"):
        lines = (scripts / f"{name}.py").read_text().splitlines()
        i = lines.index("setup_logging(snakemake.log[0])")
        assert lines[i + 1].startswith("claim_gpus(int(snakemake.resources.gpu))"), name


def test_a_second_claim_in_one_process_takes_another_gpu(two_gpus):
    first, second = {}, {}
    assert gpus.claim(1, first) != gpus.claim(1, second)  # its own earlier claim is not a free GPU
