"""DPO's precomputed reference log-probs (training.precompute_ref_log_probs, on by default): the per-step losses,
rewards and margins of the per-step reference forward, from the same SFT weights and data, within fp32 rounding;
a resumed run computes them from the initial weights or reuses its cache, and never trains against a damaged
cache; the setting is operational (not in the run key), resolved from the recipe, then the config, then the
default. CPU, a tiny random Mamba (the fixtures of bench/train_throughput.py)."""

from pathlib import Path

import pytest
import torch
from wfhelpers import bench_module

from mamba_align.train import fit as fit_module
from mamba_align.train.checkpoints import PREEMPTED_EXIT_CODE, last_complete_checkpoint
from mamba_align.train.job import TrainJob
from mamba_align.train.launch import train
from mamba_align.train.recipes import (
    OPERATIONAL_KEYS,
    PRECOMPUTE_REF_DEFAULT,
    as_dict,
    config_recipe,
    learning_settings,
    load_recipe,
    precompute_ref_log_probs,
    recipe_of,
)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "recipes" / "demo"
bench = bench_module("train_throughput")
# What the trainer logs per step from the reference log-probs; compared step by step.
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected")
STEPS = {"max_steps": 6, "logging_steps": 1, "save_steps": 2}
TRAIN_ROWS, BATCH = 64, 4  # the demo recipe's per-device batch: 16 reference batches to precompute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bench.write_model(d / "model", **bench.SHAPES["tiny"])
    vocab = bench.words(512)[:40]
    bench.write_dpo_rows(d / "dpo_train.parquet", TRAIN_ROWS, vocab, seed=0)
    bench.write_dpo_rows(d / "dpo_test.parquet", 8, vocab, seed=1)
    return d


def per_step(metrics) -> dict[str, list[float]]:
    train = [h for h in metrics["log_history"] if "loss" in h]
    return {k: [h[k] for h in train] for k in KEYS}


def assert_same_steps(a, b):
    sa, sb = per_step(a), per_step(b)
    assert len(sa["loss"]) == len(sb["loss"]) == STEPS["max_steps"]
    for k in KEYS:
        assert sa[k] == pytest.approx(sb[k], abs=1e-5), k


@pytest.fixture
def ref_forwards(monkeypatch):
    """Counts the reference forwards TRL's precompute runs (one per batch)."""
    from trl import DPOTrainer

    calls = []
    real = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def run(tiny, out: Path, precompute: bool, **over):
    recipe = load_recipe(DEMO, "dpo", {**STEPS, **over, "precompute_ref_log_probs": precompute})
    return train(TrainJob(stage="dpo", recipe=recipe, model=tiny / "model", train=tiny / "dpo_train.parquet",
                          test=tiny / "dpo_test.parquet", out=out / "dpo", checkpoints=out / "ckpt",
                          metrics=out / "metrics.json"))


@pytest.fixture(scope="module")
def per_step_run(tiny, tmp_path_factory):
    """The published recipes' way: the reference model's forward at every step."""
    return run(tiny, tmp_path_factory.mktemp("per_step"), False)


def test_precomputed_reference_gives_the_per_step_losses(tiny, tmp_path, per_step_run, ref_forwards):
    pre = run(tiny, tmp_path, True)
    assert_same_steps(pre, per_step_run)
    assert pre["final"]["eval_loss"] == pytest.approx(per_step_run["final"]["eval_loss"], abs=1e-5)
    assert pre["final"]["eval_rewards/margins"] == pytest.approx(per_step_run["final"]["eval_rewards/margins"],
                                                                 abs=1e-5)
    # it trained (margins away from 0) and the reference ran once per batch before training, never in a step
    assert abs(per_step(pre)["rewards/margins"][-1]) > 1e-3
    assert len(ref_forwards) == TRAIN_ROWS // BATCH + 2  # + the 8 test rows in 2 batches
    assert pre["recipe"]["precompute_ref_log_probs"] is True  # recorded in the metrics (and provenance)


def stop_at(step: int):
    """fit's stop callback, asked to stop (checkpoint and exit 75) at the end of `step`, as SIGTERM would."""
    real = fit_module.stop_and_timing_callbacks

    def callbacks(stop_file, throughput):
        stopper, timer = real(stop_file, throughput)
        on_step_end = stopper.on_step_end

        def stop(args, state, control, **kw):
            stopper.requested = stopper.requested or state.global_step == step
            return on_step_end(args, state, control, **kw)

        stopper.on_step_end = stop
        return stopper, timer

    return callbacks


def ref_cache(ckpt: Path) -> Path:
    """The cached reference log-probs of the training rows: in the run's checkpoint folder."""
    from datasets import Dataset

    found = [p for p in ckpt.rglob("cache-*.arrow")
             if Dataset.from_file(str(p)).column_names == ["ref_chosen_logps", "ref_rejected_logps"]
             and Dataset.from_file(str(p)).num_rows == TRAIN_ROWS]
    assert len(found) == 1, found
    return found[0]


def write_with_a_nan(cache: Path) -> None:
    import os

    import pyarrow as pa

    with pa.memory_map(str(cache)) as source:
        table = pa.ipc.open_stream(source).read_all()
    values = table.column("ref_chosen_logps").to_pylist()
    values[5] = float("nan")
    table = table.set_column(0, table.schema.field(0), pa.array(values, type=table.schema.field(0).type))
    tmp = cache.with_name("damaged.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, cache)


@pytest.mark.parametrize("damage", [None, "truncated", "nan"])
def test_a_resumed_run_uses_the_initial_weights_and_never_a_damaged_cache(tiny, tmp_path, per_step_run, monkeypatch,
                                                                         ref_forwards, damage):
    """Stopped after step 3 (checkpoint-3) and resumed: the reference log-probs are those of the SFT weights, not
    of the checkpoint's (TRL computes them before train() loads it), read from the cache the first job wrote when
    it is sound, computed again when it is not; the losses are the uninterrupted per-step run's."""
    real = fit_module.stop_and_timing_callbacks
    monkeypatch.setattr(fit_module, "stop_and_timing_callbacks", stop_at(3))
    with pytest.raises(SystemExit) as stopped:
        run(tiny, tmp_path, True)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert last_complete_checkpoint(tmp_path / "ckpt").name == "checkpoint-3"
    monkeypatch.setattr(fit_module, "stop_and_timing_callbacks", real)
    cache = ref_cache(tmp_path / "ckpt")
    if damage == "truncated":  # what a torn write would leave (datasets renames complete files into place)
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "nan":  # readable, every row, one value not finite
        write_with_a_nan(cache)
    ref_forwards.clear()

    resumed = run(tiny, tmp_path, True)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps_this_run"] == 3
    assert_same_steps(resumed, per_step_run)
    # the eval rows' cache is sound in every case: only the damaged train cache is computed again
    assert len(ref_forwards) == (0 if damage is None else TRAIN_ROWS // BATCH)


def test_the_setting_is_operational_and_resolved_recipe_then_config_then_default():
    assert "precompute_ref_log_probs" in OPERATIONAL_KEYS  # a change reruns nothing
    config = {"recipe": "zephyr-7b-beta"}
    assert config_recipe(config, "dpo", ROOT).precompute_ref_log_probs is PRECOMPUTE_REF_DEFAULT is True
    off = {**config, "training": {"precompute_ref_log_probs": False}}
    assert config_recipe(off, "dpo", ROOT).precompute_ref_log_probs is False
    recipe_says = {**off, "recipe_overrides": {"dpo": {"precompute_ref_log_probs": True}}}
    assert config_recipe(recipe_says, "dpo", ROOT).precompute_ref_log_probs is True
    # the published recipes leave it unset
    for name in ("zephyr-7b-beta", "zephyr-7b-beta-2024", "zephyr-7b-gemma", "demo"):
        assert load_recipe(ROOT / "config" / "recipes" / name, "dpo").precompute_ref_log_probs is None
    assert precompute_ref_log_probs(load_recipe(DEMO, "dpo")) is PRECOMPUTE_REF_DEFAULT
    assert precompute_ref_log_probs({"precompute_ref_log_probs": None}, off) is False
    on, not_on = (as_dict(config_recipe(c, "dpo", ROOT)) for c in (config, off))
    assert on != not_on and learning_settings(on) == learning_settings(not_on)
    # the key holds the value every run had before the default changed: earlier runs keep their keys
    assert learning_settings(on)["precompute_ref_log_probs"] is False
    # ... and the recipe a job runs with (params.job_recipe) still has the effective value
    for c, want in ((config, True), (off, False)):
        assert recipe_of("dpo", as_dict(config_recipe(c, "dpo", ROOT))).precompute_ref_log_probs is want


def test_the_schema_default_is_the_code_default():
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["properties"]["training"]["properties"]["precompute_ref_log_probs"]["default"] \
        is PRECOMPUTE_REF_DEFAULT
