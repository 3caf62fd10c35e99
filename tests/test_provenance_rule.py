"""Provenance as a real rule writes it: Snakemake hands the script its folder as `workflow/rules/../scripts`, which
the unit tests of provenance.record (called with the workflow folder directly) never see."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from wfhelpers import REPO, copy_workflow, snakemake

from mamba_align.ops.store import provenance
from mamba_align.train.recipes import workflow_root
from mamba_align.utils import UserError, read_json


def test_workflow_root_of_a_scriptdir_as_snakemake_gives_it():
    assert workflow_root(REPO / "workflow" / "rules" / ".." / "scripts") == REPO
    assert workflow_root(REPO / "workflow" / "scripts") == REPO


def test_workflow_root_outside_any_workflow_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"contains {tmp_path}"):
        workflow_root(tmp_path)


def test_a_record_whose_recipe_cannot_be_read_fails_naming_it(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["recipe"] = "no-such-recipe"
    with pytest.raises(UserError, match=r"cannot read recipe 'no-such-recipe' at .*config/recipes/no-such-recipe"):
        provenance.record("plan", {}, {}, {}, cfg, tmp_path / "rec.json", REPO)
    assert not (tmp_path / "rec.json").exists()


def test_record_snakemake_job_reads_the_recipes_from_the_workflow_folder(tmp_path, monkeypatch):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # a job runs in the working directory, not necessarily the workflow's
    smk = SimpleNamespace(rule="fetch_mt_bench", scriptdir=str(REPO / "workflow" / "rules" / ".." / "scripts"),
                          input=_Files(), output=_Files(provenance=str(tmp_path / "rec.json")), params={},
                          config=cfg, wildcards={})
    rec = read_json(provenance.record_snakemake_job(smk))
    assert {"recipe sft dataset", "recipe dpo dataset"} <= {a["key"] for a in rec["unpinned"]}


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
    listed = {a["key"]: a["artefact"] for a in rec["unpinned"]}
    assert listed["recipe sft dataset"] == "hf-dataset:HuggingFaceH4/ultrachat_200k"
    assert listed["recipe dpo dataset"] == "hf-dataset:HuggingFaceH4/ultrafeedback_binarized"
