"""Inputs are identified by content (issue #28 §3): a local dataset edited after the data step reruns it; a Hub
dataset's commit is recorded and checked before training; a damaged model fails naming its file and the rule that
rebuilds it, before anything runs; a key whose model is stored is not trained again; a data file rewritten
byte-identically keeps its time, so nothing downstream reruns."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from wfhelpers import planned_jobs, snakemake

from mamba_align.model import manifest
from mamba_align.testing.demo import ultrachat_rows
from mamba_align.train import data
from mamba_align.utils import UserError, write_json

DEMO = Path(__file__).resolve().parents[1] / "config" / "recipes" / "demo"
LOCAL_SFT = {"recipe_overrides": {"sft": {"dataset": {"source": "local_uc", "revision": None,
                                                      "train_split": "train_sft", "test_split": "test_sft"}}}}


def _write_rows(folder, seed):
    folder.mkdir(exist_ok=True)
    pd.DataFrame(ultrachat_rows(24, seed)).to_parquet(folder / "train_sft.parquet", index=False)
    pd.DataFrame(ultrachat_rows(4, 99)).to_parquet(folder / "test_sft.parquet", index=False)


@pytest.mark.slow  # runs the demo's jobs up to SFT, then the data step twice more: 4.4 min under pytest -n 2
def test_local_source_edits_rerun_the_data_step_and_identical_rewrites_rerun_nothing(workflow_copy):
    wf = workflow_copy
    (wf / "local.yaml").write_text(yaml.safe_dump(LOCAL_SFT))
    cfg = ["--configfile", "config/demo.yaml", "local.yaml"]
    sft, train = "results/models/sft", wf / "results" / "data" / "sft" / "train.parquet"
    _write_rows(wf / "local_uc", seed=0)
    original = (wf / "local_uc" / "train_sft.parquet").read_bytes()
    t0 = time.time()
    snakemake(wf, "--cores", "2", sft, *cfg)
    first_run = time.time() - t0
    assert planned_jobs(snakemake(wf, "-n", sft, *cfg).stdout) == {}

    # the local source is edited: the data step (and so SFT) is to run
    _write_rows(wf / "local_uc", seed=1)
    jobs = planned_jobs(snakemake(wf, "-n", sft, *cfg).stdout)
    assert jobs.get("prepare_sft_data") == 1 and jobs.get("train_sft") == 1, jobs

    # undone: the data step reruns (its source changed again) and writes the same bytes as before
    (wf / "local_uc" / "train_sft.parquet").write_bytes(original)
    kept = train.stat().st_mtime_ns
    snakemake(wf, "--cores", "2", sft, *cfg, "--until", "prepare_sft_data")
    assert planned_jobs(snakemake(wf, "-n", sft, *cfg).stdout) == {}  # a later invocation sees nothing newer
    assert train.stat().st_mtime_ns == kept

    # in one invocation Snakemake runs SFT after a rerun data step anyway: the stored model of that key is reused
    t0 = time.time()
    snakemake(wf, "--cores", "2", sft, *cfg, "--forcerun", "prepare_sft_data")
    rerun = time.time() - t0
    log = (wf / "results" / "logs" / "train_sft.log").read_text()
    assert "reusing it, not retraining" in log, log[-2000:]
    assert planned_jobs(snakemake(wf, "-n", sft, *cfg).stdout) == {}
    print(f"first run {first_run:.0f} s; rerun with reuse {rerun:.0f} s")


# --- Hub revisions -----------------------------------------------------------------------------------------------

SHA_A, SHA_B = "a" * 40, "b" * 40


def _prepared(tmp_path, revision="main", resolved=SHA_A):
    write_json(tmp_path / "stats.json", {"source": "HuggingFaceH4/ultrachat_200k", "revision": revision,
                                         "resolved_revision": resolved})
    return tmp_path / "train.parquet"


def test_a_hub_revision_that_moved_since_the_data_was_prepared_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    train = _prepared(tmp_path)
    assert data.check_source_revision(train, resolve=lambda source, rev: SHA_A) == SHA_A
    with pytest.raises(UserError, match=rf"dataset HuggingFaceH4/ultrachat_200k: revision 'main' now points at "
                                        rf"commit {SHA_B}, but .* was prepared from commit {SHA_A}"):
        data.check_source_revision(train, resolve=lambda source, rev: SHA_B)


def test_the_hub_revision_check_is_skipped_offline_with_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(source, rev):
        raise AssertionError("the Hub was asked while offline")

    caplog.set_level(logging.INFO)
    assert data.check_source_revision(_prepared(tmp_path), resolve=no_network) is None
    assert "offline (HF_HUB_OFFLINE=1), so not checked against the Hub" in caplog.text


def test_prepare_records_the_resolved_commit_and_a_pinned_commit_needs_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.resolve_revision("some/dataset", SHA_B) == SHA_B  # no network even online
    assert data.resolve_revision("some/dataset", "main") is None  # offline: unresolved, logged
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(data, "resolve_revision", lambda source, rev: SHA_A)
    spec = data.DatasetSpec(source="some/dataset", revision="main")
    assert data._source_record(spec) == {"resolved_revision": SHA_A}


# --- byte-identical rewrites keep their time ---------------------------------------------------------------------

def _touch_like_snakemake(path):
    os.utime(path)  # after every job Snakemake touches its outputs


def test_a_byte_identical_rewrite_keeps_its_earlier_mtime(tmp_path):
    out, inp = tmp_path / "out", tmp_path / "in.txt"
    out.mkdir()
    inp.write_text("input")
    f = out / "train.parquet"
    f.write_bytes(b"version A")
    data.record_outputs(out, ["train.parquet"], [inp])
    _touch_like_snakemake(f)
    data.settle_kept_mtimes(out)  # the next parse
    first = f.stat().st_mtime_ns

    time.sleep(0.05)
    f.unlink()  # Snakemake removes a job's outputs before it runs
    f.write_bytes(b"version A")
    assert data.record_outputs(out, ["train.parquet"], [inp]) == {"train.parquet": first}
    _touch_like_snakemake(f)
    assert f.stat().st_mtime_ns != first
    data.settle_kept_mtimes(out)
    assert f.stat().st_mtime_ns == first

    time.sleep(0.05)
    f.write_bytes(b"version B")  # other bytes: a new time, as usual
    assert data.record_outputs(out, ["train.parquet"], [inp]) == {}
    _touch_like_snakemake(f)
    data.settle_kept_mtimes(out)
    assert f.stat().st_mtime_ns > first

    time.sleep(0.05)
    f.write_bytes(b"version A")  # a change undone: A's time again
    assert data.record_outputs(out, ["train.parquet"], [inp]) == {"train.parquet": first}


def test_an_identical_rewrite_older_than_a_newer_input_takes_a_new_time(tmp_path):
    out, inp = tmp_path / "out", tmp_path / "in.txt"
    out.mkdir()
    f = out / "train.parquet"
    f.write_bytes(b"A")
    data.record_outputs(out, ["train.parquet"], [])
    data.settle_kept_mtimes(out)
    time.sleep(0.05)
    inp.write_text("newer input")  # the old time would make the output stale for ever
    f.write_bytes(b"A")
    assert data.record_outputs(out, ["train.parquet"], [inp]) == {}


# --- damaged models ----------------------------------------------------------------------------------------------

@pytest.fixture
def sft_model(tmp_path):
    """A tiny model as train_sft publishes it (with its manifest), and DPO data."""
    from wfhelpers import bench_module

    bench = bench_module("train_throughput")
    model = tmp_path / "models" / "sft-0123456789ab"
    bench.write_model(model, **bench.SHAPES["tiny"])
    manifest.write_manifest(model, "train_sft")
    bench.write_dpo_rows(tmp_path / "dpo.parquet", 8, bench.words(512)[:40], seed=0)
    return model


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def test_a_truncated_model_fails_dpo_naming_the_file_and_the_rule_before_anything_runs(sft_model, tmp_path,
                                                                                     monkeypatch):
    from mamba_align.ops.store import runs
    from mamba_align.train.job import TrainJob
    from mamba_align.train.recipes import load_recipe

    monkeypatch.setattr("mamba_align.train.launch.train", lambda *a, **k: pytest.fail("DPO started"))
    _truncate(sft_model / "model.safetensors")
    recipe = load_recipe(DEMO, "dpo", {"max_steps": 1})
    with pytest.raises(UserError, match=rf"{sft_model / 'model.safetensors'} is \d+ bytes, expected \d+ \(truncated\)"
                                        r".*rebuild it with `snakemake --forcerun train_sft`"):
        runs.train_keyed(TrainJob(stage="dpo", recipe=recipe, model=sft_model, train=tmp_path / "dpo.parquet",
                                  test=None, out=tmp_path / "models" / "dpo", checkpoints=tmp_path / "checkpoints",
                                  metrics=tmp_path / "dpo.json"))
    assert not (tmp_path / "checkpoints").exists()  # no empty checkpoint folder left behind


def test_an_altered_model_file_is_named_by_its_hash(sft_model):
    config = sft_model / "config.json"
    text = config.read_text()
    config.write_text(text.replace("{", "[", 1))  # same size, other bytes
    with pytest.raises(UserError, match=r"config.json has sha256 \w+…, expected \w+….*--forcerun train_sft"):
        manifest.verify_model(sft_model)


def test_generation_checks_the_model_before_loading_an_engine(sft_model, tmp_path, monkeypatch):
    from mamba_align.eval import generate

    monkeypatch.setattr(generate, "load_engine", lambda *a, **k: pytest.fail("the engine was loaded"))
    q = tmp_path / "question.jsonl"
    q.write_text('{"question_id": 1, "category": "writing", "turns": ["hi"]}\n')
    _truncate(sft_model / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is \d+ bytes.*--forcerun train_sft"):
        generate.generate_mt_bench(sft_model, q, tmp_path / "answers.jsonl", "m")


def test_the_identity_of_a_model_is_unchanged_by_its_manifest(sft_model):
    from mamba_align.ops.store import runs

    identity = runs.model_identity(sft_model)
    (sft_model / "manifest.json").unlink()
    assert runs.model_identity(sft_model) == identity  # keys of runs made before manifests stay the same
