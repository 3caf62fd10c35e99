"""Provenance as a real rule writes it: Snakemake hands the script its folder as `workflow/rules/../scripts`, which
the unit tests of provenance.record (called with the workflow folder directly) never see."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from wfhelpers import REPO, copy_workflow, snakemake

from mamba_align.ops.store import layout, provenance
from mamba_align.train import recipes
from mamba_align.train.recipes import as_dict, config_recipe, workflow_root
from mamba_align.utils import UserError, file_record, read_json


def test_workflow_root_of_a_scriptdir_as_snakemake_gives_it():
    assert workflow_root(REPO / "workflow" / "rules" / ".." / "scripts") == REPO
    assert workflow_root(REPO / "workflow" / "scripts") == REPO


def test_workflow_root_outside_any_workflow_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"contains {tmp_path}"):
        workflow_root(tmp_path)


def test_a_job_record_reads_no_recipe_and_points_at_the_run_file(tmp_path, monkeypatch):
    """The run's unpinned list is written once (onstart: write_run_unpinned, from the recipes the workflow parsed);
    a job's record points at that file, parsing no recipe, and a list rewritten by a later run is not shown as
    this job's."""
    cfg = {**yaml.safe_load((REPO / "config" / "config.yaml").read_text()), "results_dir": "results"}  # the default
    sft, dpo = (as_dict(config_recipe(cfg, s, REPO)) for s in ("sft", "dpo"))
    monkeypatch.chdir(tmp_path)  # a job runs in the working directory, not necessarily the workflow's
    run_file = provenance.write_run_unpinned(layout.Results(cfg["results_dir"]).unpinned(), cfg, sft, dpo)

    def no_recipes(*args, **kwargs):
        raise AssertionError("a job's provenance record parsed a recipe")

    monkeypatch.setattr(recipes, "config_recipe", no_recipes)
    monkeypatch.setattr(recipes, "load_recipe", no_recipes)
    smk = SimpleNamespace(rule="fetch_mt_bench", scriptdir=str(REPO / "workflow" / "rules" / ".." / "scripts"),
                          input=_Files(), output=_Files(provenance=str(tmp_path / "rec.json")), params={},
                          config=cfg, wildcards={})
    rec = read_json(provenance.record_snakemake_job(smk))
    assert rec["unpinned"] == {"path": "results/provenance/unpinned.json", **file_record(run_file)}
    assert {"recipe sft dataset", "recipe dpo dataset"} <= {a["key"] for a in provenance.recorded_unpinned(rec)}
    # a later run of another config rewrites the run's file: this job's record no longer claims that list
    pinned = {**cfg, "base_model": {**cfg["base_model"], "revision": "0" * 40}}
    provenance.write_run_unpinned(run_file, pinned, sft, dpo)
    assert provenance.recorded_unpinned(rec) is None


def test_a_training_jobs_record_holds_the_recipe_it_ran_with_key_by_key(tmp_path):
    cfg = {**yaml.safe_load((REPO / "config" / "config.yaml").read_text()), "results_dir": str(tmp_path / "r"),
           "recipe_overrides": {"dpo": {"save_steps": 7}}}
    dpo = as_dict(config_recipe(cfg, "dpo", REPO))
    params = {"recipe": recipes.learning_settings(dpo), "job_recipe": recipes.recipe_of("dpo", dpo)}
    smk = SimpleNamespace(rule="train_dpo", scriptdir=str(REPO / "workflow" / "scripts"), input=_Files(),
                          output=_Files(provenance=str(tmp_path / "rec.json")), config=cfg, wildcards={},
                          params=params)
    rec = read_json(provenance.record_snakemake_job(smk))
    assert rec["params"]["job_recipe"] == dpo and rec["params"]["job_recipe"]["save_steps"] == 7


class _Files(list):
    """snakemake's Namedlist, as far as provenance reads it."""

    def __init__(self, **named):
        super().__init__(named.values())
        self._named = named

    def items(self):
        return self._named.items()

    def __getattr__(self, name):
        try:
            return self._named[name]
        except KeyError:
            raise AttributeError(name) from None


def test_a_real_rule_run_records_the_recipe_datasets_as_unpinned(tmp_path):
    """fetch_mt_bench of the real config (recipe zephyr-7b-beta: UltraChat and UltraFeedback at `main`), its
    questions taken from the demo's local copy so that nothing is downloaded."""
    wf = copy_workflow(tmp_path / "wf")
    overlay = wf / "offline-mt-bench.yaml"
    overlay.write_text(yaml.safe_dump({"eval": {"mt_bench": {"local_dir": "config/demo/mt_bench"}}}))
    snakemake(wf, "--configfile", "config/config.yaml", str(overlay), "--cores", "1", "fetch_mt_bench",
              timeout=600)
    records = sorted(Path(wf).rglob("provenance/fetch_mt_bench.json"))
    assert len(records) == 1, records
    rec = read_json(records[0])
    assert (wf / rec["unpinned"]["path"]).is_file()  # written by the run's onstart, pointed at by the record
    listed = {a["key"]: a["artefact"] for a in provenance.recorded_unpinned(rec, wf)}
    assert listed["recipe sft dataset"] == "hf-dataset:HuggingFaceH4/ultrachat_200k"
    assert listed["recipe dpo dataset"] == "hf-dataset:HuggingFaceH4/ultrafeedback_binarized"
    # the next run, of a config that pins the base model, rewrites the list before its job: the file stays current
    overlay.write_text(yaml.safe_dump({"eval": {"mt_bench": {"local_dir": "config/demo/mt_bench"}},
                                       "base_model": {"revision": "0" * 40}}))
    snakemake(wf, "--configfile", "config/config.yaml", str(overlay), "--cores", "1", "--force",
              "fetch_mt_bench", timeout=600)
    assert provenance.recorded_unpinned(rec, wf) is None  # the first run's record: its list is no longer stored
    again = provenance.recorded_unpinned(read_json(records[0]), wf)
    assert "base_model.source" in listed and "base_model.source" not in {a["key"] for a in again}
