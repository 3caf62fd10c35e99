"""A rerun's reason names the setting that changed (mamba_align.ops.store.rerun): one Snakemake param per setting, the
whole value recorded as a digest; what reruns is unchanged; records of the earlier form (whole dicts) are
translated when the workflow is read, so a finished run does not rerun and a changed setting still does."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import yaml
from wfhelpers import copy_workflow, planned_jobs, snakemake, stand_in_outputs

from mamba_align.ops.store import rerun

DEMO = ("--configfile", "config/demo.yaml")
# train_dpo (a static recipe param) and the DPO model's MT-Bench answers (a model param that is a function of the
# stage wildcard)
TARGETS = ("results/metrics/dpo.json", "results/eval/dpo/mt_bench_answers.jsonl")
RECIPE = {"dataset": {"source": "HuggingFaceH4/ultrafeedback_binarized", "revision": "main"},
          "beta": 0.1, "learning_rate": 5e-07, "max_steps": -1, "bf16": True, "seed": 42}


# --- the form ---------------------------------------------------------------------------------------------------

def test_each_setting_is_one_short_string():
    s = rerun.settings({**RECIPE, "annotators": ["a", "b"], "empty": {}, "rows": [{"x": 1}]})
    assert s["beta"] == "beta=0.1"
    assert s["dataset.source"] == "dataset.source='HuggingFaceH4/ultrafeedback_binarized'"
    assert s["annotators"] == "annotators=['a', 'b']"  # a list of plain values is one setting
    assert s["empty"] == "empty={}"
    assert s["rows.0.x"] == "rows.0.x=1"  # a list of dicts is followed


def test_the_script_gets_the_whole_dict_and_snakemake_records_a_digest():
    wrapped = rerun.wrap(RECIPE)
    assert wrapped == RECIPE and isinstance(wrapped, dict)
    assert repr(wrapped) == rerun.digest(RECIPE) and repr(wrapped).startswith("'settings#")
    assert pickle.loads(pickle.dumps(wrapped)) == RECIPE  # the script job unpickles it
    assert json.loads(json.dumps(wrapped)) == RECIPE  # provenance records every key
    assert rerun.digest({**RECIPE, "beta": 0.05}) != rerun.digest(RECIPE)
    assert rerun.wrap(None) is None and rerun.wrap(["a"]) == ["a"]


class Wildcards(dict):
    pass


def test_params_of_a_function_of_the_wildcards_are_named_by_like():
    values = {"sft": {"base": {"source": "m"}, "sft": {"beta": 0.0}},
              "dpo": {"base": {"source": "m"}, "sft": {"beta": 0.0}, "dpo": {"beta": 0.1}}}
    params = rerun.settings_params("model", lambda w: values[w["stage"]], like=[values["dpo"]])
    assert set(params) == {"model", "model.base.source", "model.sft.beta", "model.dpo.beta"}
    sft = Wildcards(stage="sft")
    assert params["model"](sft) == values["sft"] and params["model.sft.beta"](sft) == "sft.beta=0.0"
    assert params["model.dpo.beta"](sft) is rerun.ABSENT  # not a builtin: Snakemake records nothing for it
    static = rerun.settings_params("recipe", RECIPE)
    assert static["recipe.beta"](Wildcards()) == "beta=0.1"  # every param a function: no {..} formatting
    assert rerun.whole({**static, "checkpoints": "c"}) == {"recipe": static["recipe"], "checkpoints": "c"}


def test_a_record_of_the_earlier_form_translates_to_what_this_form_records():
    old = sorted([repr(RECIPE), repr("results/checkpoints"), repr(24)])
    new = sorted([*rerun.recorded(RECIPE), repr("results/checkpoints"), repr(24)])
    assert rerun.translate(old) == new
    assert rerun.translate(new) is None  # this form already: left alone
    assert rerun.translate([repr("results/checkpoints"), "None"]) is None  # nothing to translate
    changed = rerun.translate(sorted([repr({**RECIPE, "beta": 0.05}), repr("results/checkpoints"), repr(24)]))
    assert set(changed) ^ set(new) == {"'beta=0.05'", "'beta=0.1'", rerun.digest(RECIPE),
                                       rerun.digest({**RECIPE, "beta": 0.05})}


# what the grid's training rules recorded before their `config` param was dropped (rerun.DROPPED_PARAMS)
GRID_CONFIG = {"recipe": "demo", "recipe_overrides": {"dpo": {"save_steps": 3, "beta": 0.05}, "sft": {}}}


def test_a_dropped_param_leaves_the_record_with_its_settings_and_digest():
    ours = sorted([*rerun.recorded(RECIPE), repr("results/checkpoints")])
    assert rerun.drop(sorted([*ours, *rerun.recorded(GRID_CONFIG)]), ("recipe", "recipe_overrides")) == ours
    assert rerun.drop(ours, ("recipe", "recipe_overrides")) is None  # none there
    stray = sorted([*ours, repr("recipe_overrides.dpo.beta=0.05")])  # no digest of them: left alone
    assert rerun.drop(stray, ("recipe", "recipe_overrides")) is None


def test_migrate_records_rewrites_only_earlier_records_of_known_rules(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    old = {"rule": "train_dpo", "params": [repr(RECIPE)], "record_format_version": 6}
    (meta / "cmVzdWx0cy9tZXRyaWNzL2Rwby5qc29u").write_text(json.dumps(old))  # results/metrics/dpo.json
    (meta / "b3RoZXI=").write_text(json.dumps({**old, "rule": "eval_leaderboard"}))  # not a rule of the old form
    (meta / "dG9ybg==").write_text('{"rule": "train_dpo", "par')  # being written
    done = rerun.migrate_records(meta)
    assert done == {"train_dpo": ["results/metrics/dpo.json"]}
    assert json.loads((meta / "cmVzdWx0cy9tZXRyaWNzL2Rwby5qc29u").read_text()) == {
        **old, "params": sorted(rerun.recorded(RECIPE))}
    assert json.loads((meta / "b3RoZXI=").read_text())["params"] == [repr(RECIPE)]
    assert rerun.migrate_records(meta) == {}  # once
    assert "results/metrics/dpo.json" in rerun.migration_note(done)


# --- the workflow -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The demo workflow with train_dpo and the DPO model's MT-Bench answers recorded as done: empty files stand
    in for every output of the chain, and --touch records the two jobs' params as a run would."""
    wf = copy_workflow(tmp_path_factory.mktemp("rerun") / "wf")
    stand_in_outputs(wf, snakemake(wf, *TARGETS, "-n", *DEMO).stdout)
    snakemake(wf, *TARGETS, "--touch", "--cores", "1", "--forcerun", "train_dpo", "generate_mt_bench", *DEMO)
    assert planned_jobs(snakemake(wf, *TARGETS, "-n", *DEMO).stdout) == {}
    return wf


def dry_run(wf: Path, overrides: dict | None = None, args=(*TARGETS, *DEMO)):
    """A dry run of `args` (the two targets of the demo by default), with `overrides` as a further config file."""
    extra = ()
    if overrides:
        (wf / "change.yaml").write_text(yaml.safe_dump(overrides))
        extra = ("change.yaml",)
    return snakemake(wf, "-n", *args, *extra)


def params_reasons(out: str) -> dict[str, str]:
    """{rule: its 'Params have changed' reason} of a dry run's output."""
    reasons = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    reason: (.*)$", out, re.M)
    return {rule: r[r.index("Params have changed"):] for rule, r in reasons if "Params have changed" in r}


def test_a_learned_setting_change_names_the_key_shortly(finished):
    out = dry_run(finished, {"recipe_overrides": {"dpo": {"beta": 0.05}}}).stdout
    assert planned_jobs(out) == {"train_dpo": 1, "generate_mt_bench": 1}, out
    reason = params_reasons(out)["train_dpo"]  # (generate_mt_bench's names its updated input first)
    assert "before: " in reason and "'beta=0.1'" in reason and "'beta=0.05'" in reason
    assert len(reason) < 300 and "learning_rate" not in reason, reason  # was: the whole recipe, before and now

    # the model chain of the answers, a function of the stage wildcard (base_model is part of the chain; its
    # preparation and the training runs have no record here, so only the answers rerun)
    out = dry_run(finished, {"base_model": {"verify": False}}).stdout
    assert planned_jobs(out) == {"generate_mt_bench": 1}, out
    reason = params_reasons(out)["generate_mt_bench"]
    assert "'base.verify=True'" in reason and "'base.verify=False'" in reason
    assert len(reason) < 300 and "dpo.beta" not in reason, reason


def test_an_operational_change_reruns_nothing(finished):
    out = dry_run(finished, {"recipe_overrides": {"dpo": {"save_steps": 7, "per_device_train_batch_size": 1}}})
    assert planned_jobs(out.stdout) == {}, out.stdout


def _old_form(wf: Path, rule: str, value) -> list[Path]:
    """Rewrite `rule`'s records as the earlier version wrote them for `value`: its whole repr in place of what
    this form records of it (the other params stay). Returns the record files."""
    files = []
    for path in (wf / ".snakemake" / "metadata").rglob("*"):
        record = json.loads(path.read_text()) if path.is_file() else {}
        if record.get("rule") == rule:
            ours = set(rerun.recorded(value))
            assert ours <= set(record["params"]), (rule, record["params"])  # exactly what this form records
            record["params"] = sorted([*(set(record["params"]) - ours), repr(value)])
            path.write_text(json.dumps(record))
            files.append(path)
    assert files, rule
    return files


def _current(wf: Path) -> tuple[dict, dict]:
    """(train_dpo's learned settings, the DPO model's chain) of the demo config, as common.smk computes them."""
    from mamba_align.ops.store.provenance import learned_by, load_config
    from mamba_align.train.recipes import as_dict, config_recipe, learning_settings

    config, files = load_config(["config/demo.yaml"], wf)
    sft, dpo = (as_dict(config_recipe(config, s, wf, files)) for s in ("sft", "dpo"))
    return learning_settings(dpo), learned_by("dpo", config["base_model"], sft, dpo)


def test_records_of_the_earlier_form_rerun_only_what_changed(finished):
    recipe, chain = _current(finished)
    files = _old_form(finished, "train_dpo", recipe) + _old_form(finished, "generate_mt_bench", chain)
    proc = dry_run(finished)
    assert planned_jobs(proc.stdout) == {}, proc.stdout + proc.stderr
    assert "translated to this version's form" in proc.stderr and "results/metrics/dpo.json" in proc.stderr
    for f in files:
        assert any(p.startswith("'settings#") for p in json.loads(f.read_text())["params"])

    _old_form(finished, "train_dpo", recipe)  # the earlier form again, and a setting changed since
    out = dry_run(finished, {"recipe_overrides": {"dpo": {"beta": 0.05}}}).stdout
    assert planned_jobs(out) == {"train_dpo": 1, "generate_mt_bench": 1}, out
    assert "'beta=0.05'" in params_reasons(out)["train_dpo"]


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory) -> Path:
    """The demo grid with its training runs recorded as done (as `finished`), their records as the version before
    this one wrote them: with the experiment's recipe name and overrides (GRID_CONFIG) as a param."""
    wf = copy_workflow(tmp_path_factory.mktemp("rerun-grid") / "wf")
    stand_in_outputs(wf, snakemake(wf, "-n", *GRID).stdout)
    snakemake(wf, "--touch", "--cores", "1", "--forcerun", *GRID_TRAINING, *GRID)
    for path in (wf / ".snakemake" / "metadata").rglob("*"):
        record = json.loads(path.read_text()) if path.is_file() else {}
        if record.get("rule") in GRID_TRAINING:
            path.write_text(json.dumps({**record, "params": sorted([*record["params"], *rerun.recorded(GRID_CONFIG)])}))
    return wf


GRID = (*DEMO, "config/demo-grid.yaml")
GRID_TRAINING = ("train_sft_grid", "train_dpo_grid")


def _grid_training(wf: Path, change: dict | None = None) -> tuple[dict, str]:
    proc = dry_run(wf, change, GRID)
    return {r: n for r, n in planned_jobs(proc.stdout).items() if r in GRID_TRAINING}, proc.stderr


def test_a_grid_run_keeps_its_training_and_an_operational_change_reruns_none(finished_grid):
    planned, err = _grid_training(finished_grid)
    assert planned == {}, err
    assert "translated to this version's form" in err and "train_dpo_grid" in err
    # an operational override reran every training run of the grid while the rules recorded the overrides
    assert _grid_training(finished_grid, {"recipe_overrides": {"sft": {"save_steps": 7},
                                                                 "dpo": {"logging_steps": 3}}})[0] == {}
    assert _grid_training(finished_grid, {"recipe_overrides": {"dpo": {"learning_rate": 1e-6}}})[0] == \
        {"train_dpo_grid": 4}

