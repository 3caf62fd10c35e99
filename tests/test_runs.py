"""mamba_align.ops.store.runs and the checkpoint-folder lock on a tiny random Mamba (CPU, offline): a training run is
keyed by its settings, data and parent model; a finished run stores its model, points the stage's path at it and
deletes its checkpoints; the same key reuses its stored model, a damaged one is retrained and kept; two jobs
never share a checkpoint folder, and a killed one leaves no stale lock."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from wfhelpers import bench_module

from mamba_align.ops.store import runs
from mamba_align.train.checkpoints import lock_checkpoint_dir, release_checkpoint_dir
from mamba_align.train.job import TrainJob
from mamba_align.train.recipes import load_recipe
from mamba_align.utils import UserError, read_json

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
bench = bench_module("train_throughput")
SHORT = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bench.write_model(d / "model", **bench.SHAPES["tiny"])
    vocab = bench.words(512)[:40]
    bench.write_sft_rows(d / "sft_a.parquet", 64, vocab, seed=0)
    bench.write_sft_rows(d / "sft_b.parquet", 64, vocab, seed=7)  # "other data"
    bench.write_dpo_rows(d / "dpo_train.parquet", 32, vocab, seed=0)
    return d


def sft(tiny, tmp_path, data="sft_a.parquet", **over):
    return runs.train_keyed(store_job(tmp_path, "sft", tiny / "model", tiny / data,
                                      load_recipe(DEMO, "sft", {**SHORT, **over})))


def store_job(tmp_path, stage, model, data, recipe) -> TrainJob:
    """A workflow job of `stage`: its model link under tmp_path/models, the checkpoints root, the metrics."""
    return TrainJob(stage=stage, recipe=recipe, model=model, train=data, test=None, out=tmp_path / "models" / stage,
                    checkpoints=tmp_path / "checkpoints", metrics=tmp_path / f"{stage}.json")


def test_the_key_is_what_the_stage_learns_from(tiny, tmp_path):
    recipe = load_recipe(DEMO, "sft")
    key = runs.run_key("sft", recipe, [tiny / "sft_a.parquet"], tiny / "model")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny / "model", moved / "model")
    shutil.copy(tiny / "sft_a.parquet", moved / "data.parquet")
    assert runs.run_key("sft", recipe, [moved / "data.parquet"], moved / "model") == key  # contents, not paths
    # operational keys change nothing; settings, data and the parent model each make another run
    assert runs.run_key("sft", load_recipe(DEMO, "sft", {"save_steps": 1, "per_device_train_batch_size": 2}),
                        [tiny / "sft_a.parquet"], tiny / "model") == key
    assert runs.run_key("sft", load_recipe(DEMO, "sft", {"learning_rate": 0.01}),
                        [tiny / "sft_a.parquet"], tiny / "model") != key
    assert runs.run_key("sft", recipe, [tiny / "sft_b.parquet"], tiny / "model") != key
    (moved / "model" / "config.json").write_text((moved / "model" / "config.json").read_text() + " ")
    assert runs.run_key("sft", recipe, [tiny / "sft_a.parquet"], moved / "model") != key


def test_a_finished_stage_is_stored_by_key_linked_and_its_checkpoints_removed(tiny, tmp_path):
    m = sft(tiny, tmp_path)
    link = tmp_path / "models" / "sft"
    key = m["run"]["key"]
    assert link.is_symlink() and os.readlink(link) == f"sft-{key}"
    assert (link / "model.safetensors").is_file() and read_json(link / "run.json")["key"] == key
    assert not (tmp_path / "checkpoints" / f"sft-{key}").exists()
    assert read_json(tmp_path / "sft.json")["resumed_from"] is None


def test_the_same_key_reuses_the_stored_model_without_training(tiny, tmp_path, monkeypatch):
    first = sft(tiny, tmp_path)
    link = tmp_path / "models" / "sft"
    store = link.resolve()
    assert (store / "manifest.json").is_file() and read_json(store / "run.json")["metrics"]["run"]["key"]

    def no_training(*args, **kwargs):
        raise AssertionError("the trainer was called for a key whose model is stored")

    monkeypatch.setattr("mamba_align.train.launch.train", no_training)
    link.unlink()  # what --forcerun train_sft, or an upstream rewrite, does before the job
    started = time.monotonic()
    m = sft(tiny, tmp_path)
    assert time.monotonic() - started < 5
    assert m["run"]["reused"] and m["run"]["key"] == first["run"]["key"]
    assert read_json(tmp_path / "sft.json") == m  # the rule's metrics output is written again
    assert link.resolve() == store and not (tmp_path / "checkpoints" / f"sft-{m['run']['key']}").exists()
    assert not store.with_name(store.name + ".previous").exists()


def test_a_damaged_stored_model_is_retrained_and_kept_as_previous(tiny, tmp_path):
    sft(tiny, tmp_path)
    link = tmp_path / "models" / "sft"
    store = link.resolve()
    weights = store / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    sft(tiny, tmp_path)
    m = read_json(tmp_path / "sft.json")
    assert m["resumed_from"] is None and m["steps_this_run"] == 4 and not m["run"].get("reused")
    assert link.resolve() == store and weights.stat().st_size == size
    assert (store.with_name(store.name + ".previous") / "model.safetensors").stat().st_size == size // 2


def test_sft_on_other_data_gives_dpo_a_fresh_checkpoint_folder(tiny, tmp_path):
    """SFT retrained on other data -> DPO's key changes, so DPO starts fresh instead of resuming the old run."""
    dpo_recipe = load_recipe(DEMO, "dpo", {"max_steps": 2, "save_steps": 1, "logging_steps": 1})
    link = tmp_path / "models" / "sft"
    sft(tiny, tmp_path, data="sft_a.parquet")
    old_key = runs.run_key("dpo", dpo_recipe, [tiny / "dpo_train.parquet", None], link)
    # an unfinished DPO run of the old SFT model: resuming it would crash on this fake checkpoint
    stale = tmp_path / "checkpoints" / f"dpo-{old_key}" / "checkpoint-1"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    sft(tiny, tmp_path, data="sft_b.parquet")
    new_key = runs.run_key("dpo", dpo_recipe, [tiny / "dpo_train.parquet", None], link)
    assert new_key != old_key
    runs.train_keyed(store_job(tmp_path, "dpo", link, tiny / "dpo_train.parquet", dpo_recipe))
    m = read_json(tmp_path / "dpo.json")
    assert m["resumed_from"] is None and m["run"]["key"] == new_key
    assert stale.exists()  # the old run's folder is left alone (not this run's to delete)


HOLD = """
import sys, time
from pathlib import Path
from mamba_align.train.checkpoints import lock_checkpoint_dir
lock_checkpoint_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_job_on_one_checkpoint_folder_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "checkpoints" / "sft-abc"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"sft-abc is being written by host \S+ pid {holder.pid} job 4242"):
            lock_checkpoint_dir(folder)
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (SIGKILL): the kernel dropped its lock, so nothing stale blocks the retry
    lock_checkpoint_dir(folder)
    assert f"pid {os.getpid()}" in (folder / "LOCK").read_text()
    release_checkpoint_dir(folder)


def test_a_link_to_a_deleted_model_is_dropped_so_the_key_retrains(tmp_path):
    from mamba_align.ops.store.runs import drop_dangling_links

    r = tmp_path / "results"
    (r / "models/sft-abc").mkdir(parents=True)
    (r / "models/dpo-def").mkdir()
    (r / "experiments/e1").mkdir(parents=True)
    for link, target in [("models/sft", "sft-abc"), ("models/dpo", "dpo-gone"), ("experiments/e1/model", "gone")]:
        (r / link).symlink_to(target)
    assert sorted(p.relative_to(r).as_posix() for p in drop_dangling_links(r)) == ["experiments/e1/model",
                                                                                   "models/dpo"]
    assert (r / "models/sft").is_symlink() and (r / "models/dpo-def").is_dir()
