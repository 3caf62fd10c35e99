"""Reproducibility: every remote artefact read at a branch instead of a commit is listed, in the plan and in the
run's results/provenance/unpinned.json, which each provenance record points at."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from mamba_align.ops.reporting.plan import format_plan, make_plan
from mamba_align.ops.store import experiments, provenance
from mamba_align.ops.store.experiments import Grid
from mamba_align.ops.store.layout import Results
from mamba_align.train.recipes import as_dict, config_recipe, learning_settings
from mamba_align.utils import file_record, read_json

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def recipes(cfg):
    return [as_dict(config_recipe(cfg, s, REPO)) for s in ("sft", "dpo")]


def test_the_real_config_lists_what_it_reads_at_main():
    cfg = load("config.yaml")
    listed = {a["artefact"]: a["revision"] for a in provenance.unpinned(cfg, *recipes(cfg))}
    assert listed == {"hf:state-spaces/mamba-2.8b-slimpj": "main", "hf:EleutherAI/gpt-neox-20b": "main",
                      "hf-dataset:HuggingFaceH4/ultrachat_200k": "main",
                      "hf-dataset:HuggingFaceH4/ultrafeedback_binarized": "main",
                      "hf-dataset:tatsu-lab/alpaca_eval": "main"}
    # FastChat's data is pinned by commit (sha256-checked on fetch)
    pinned = [a for a in provenance.hub_artifacts(cfg, *recipes(cfg)) if a["pinned"]]
    assert [a["artefact"] for a in pinned] == ["github:lm-sys/FastChat"]


def test_a_pinned_commit_is_not_listed():
    cfg = load("config.yaml")
    cfg = copy.deepcopy(cfg)
    cfg["base_model"]["revision"] = "0" * 40
    listed = [a["key"] for a in provenance.unpinned(cfg, *recipes(cfg))]
    assert "base_model.source" not in listed and "base_model.tokenizer" in listed


def test_the_demo_reads_nothing_remote():
    cfg = load("demo.yaml")
    assert provenance.unpinned(cfg, *recipes(cfg)) == []


def test_plan_txt_lists_the_unpinned(tmp_path):
    cfg = load("config.yaml")
    sft, dpo = recipes(cfg)
    text = format_plan(make_plan(cfg, sft, dpo, {"train_sft": 8, "train_dpo": 8}, "A100-80GB", str(tmp_path)))
    assert "unpinned (read at a branch, not a commit" in text
    assert "hf-dataset:HuggingFaceH4/ultrachat_200k @ main  (recipe sft dataset)" in text


def test_the_run_file_lists_the_unpinned_and_each_record_points_at_it(tmp_path):
    cfg = {**load("config.yaml"), "results_dir": str(tmp_path / "results")}
    run_file = provenance.write_run_unpinned(Results(cfg["results_dir"]).unpinned(), cfg, *recipes(cfg))
    assert {a["key"] for a in read_json(run_file)["unpinned"]} >= {"base_model.source", "recipe sft dataset",
                                                                   "eval.alpaca_eval.revision"}
    rec = read_json(provenance.record("fetch_mt_bench", {}, {}, {}, cfg, tmp_path / "rec.json", REPO))
    assert rec["unpinned"] == {"path": str(run_file), **file_record(run_file)}
    assert provenance.recorded_unpinned(rec) == read_json(run_file)["unpinned"]
    earlier = {**rec, "unpinned": read_json(run_file)["unpinned"]}  # a record that embedded the list, before the file
    assert provenance.recorded_unpinned(earlier) == read_json(run_file)["unpinned"]


def test_a_grid_run_lists_what_each_experiment_reads(tmp_path):
    """An experiment's recipe (or base model) may differ from the config's: its datasets are listed too."""
    cfg = load("config.yaml")
    cfg["experiments"] = {"list": [{"name": "gemma", "recipe": "zephyr-7b-gemma",
                                    "base_model": {"source": "state-spaces/mamba-130m"}}]}
    grid = Grid(str(tmp_path), [experiments.resolve(e, *recipes(e.config(cfg)), learning_settings)
                                for e in experiments.expand(cfg)], cfg["eval"]["stages"])
    run_file = provenance.write_run_unpinned(tmp_path / "unpinned.json", cfg, *recipes(cfg), grid)
    gemma = provenance.unpinned({**cfg, "recipe": "zephyr-7b-gemma"}, *recipes({**cfg, "recipe": "zephyr-7b-gemma"}))
    listed = [a["artefact"] for a in read_json(run_file)["unpinned"]]
    assert {a["artefact"] for a in gemma} <= set(listed) and "hf:state-spaces/mamba-130m" in listed
    assert "hf-dataset:HuggingFaceH4/ultrachat_200k" in listed and len(listed) == len(set(listed))
