"""`mamba-align plan`: GPU-hours, wall time and judge cost of a config before anything runs (ops/reporting/plan.py),
as the rule plan writes them (a grid's plan only through the rule)."""

from __future__ import annotations

import argparse

from mamba_align.ops.reporting import plan
from mamba_align.ops.reporting.plan import GPUS, make_plan, write_plan
from mamba_align.ops.store.layout import Results
from mamba_align.ops.store.provenance import load_config
from mamba_align.train.recipes import as_dict, config_recipe


def configure(p: argparse.ArgumentParser) -> None:
    p.description = plan.__doc__
    p.add_argument("--config", default="config/config.yaml",
                   help="a config file, merged over config/config.yaml as snakemake --configfile does")
    p.add_argument("--workflow-dir", default=".", help="the workflow's folder (its config/ and workflow/schemas/)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per training job")
    p.add_argument("--gpu-type", default="A100-80GB", choices=sorted(GPUS))
    p.add_argument("--out", default=Results("results").plan("json"))


def run(a: argparse.Namespace) -> None:
    cfg, _ = load_config([a.config], a.workflow_dir, resolve_template=False)
    sft, dpo = (as_dict(config_recipe(cfg, s, a.workflow_dir)) for s in ("sft", "dpo"))
    gpus = {"train_sft": a.gpus, "train_dpo": a.gpus}
    write_plan(make_plan(cfg, sft, dpo, gpus, a.gpu_type, cfg["results_dir"]), a.out)
