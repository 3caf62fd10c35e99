"""A checkpoint written by N ranks resumes on M ranks (issue #32): the same global batch, the same rows per
optimizer step and the same optimizer state, so the resumed steps' losses equal an uninterrupted run's within the
1- vs 2-process tolerance of tests/test_train.py::test_two_ranks_keep_the_global_batch. DDP over gloo on CPU."""

from __future__ import annotations

import subprocess

import pytest
import test_train
from test_train import ENV, cli, losses, wait_for

from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, last_complete_checkpoint
from mamba_align.utils import read_json

OVER = ("max_steps=8", "logging_steps=1", "save_steps=1000")
tiny_model = test_train.tiny  # the tiny model and data of tests/test_train.py (the fixture, by this name)
TOLERANCE = 1e-4  # 1 process x 2 accumulation vs 2 processes x 1 (test_two_ranks_keep_the_global_batch)


def run(tiny, out, n, **kw):
    cmd = [*cli(tiny, out, "sft", *OVER), "--num-processes", str(n)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(tiny_model, out, 1).wait(timeout=300) == 0
    m = read_json(out / "m.json")
    return {h["step"]: h["loss"] for h in m["log_history"] if "loss" in h}


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_of_n_ranks_resumes_on_m(tiny_model, tmp_path, uninterrupted, first, then):
    log = tmp_path / "log.txt"
    proc = run(tiny_model, tmp_path, first)
    wait_for(lambda: log.exists() and "step 3:" in log.read_text(), proc, timeout=300)
    (tmp_path / "ckpt" / "STOP").touch()  # how the launcher passes SIGTERM on to its ranks
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE
    ckpt = last_complete_checkpoint(tmp_path / "ckpt")
    stopped = int(ckpt.name.split("-")[1])
    assert 3 <= stopped < 8

    assert run(tiny_model, tmp_path, then).wait(timeout=300) == 0
    m = read_json(tmp_path / "m.json")
    assert m["resumed_from"] == str(ckpt) and m["global_step"] == 8
    assert (m["num_processes"], m["gradient_accumulation_steps"]) == (then, 2 // then)
    resumed = {h["step"]: h["loss"] for h in m["log_history"] if "loss" in h and h["step"] > stopped}
    assert sorted(resumed) == list(range(stopped + 1, 9))
    print(f"{first} -> {then} ranks, resumed after step {stopped}: "
          + ", ".join(f"{s}: {resumed[s]:.5f} vs {uninterrupted[s]:.5f}" for s in sorted(resumed)))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([uninterrupted[s] for s in sorted(resumed)],
                                                                  abs=TOLERANCE)
    assert losses(m)  # the history before the stop comes back from the checkpoint too
