from mamba_align.ops.gpus import claim as claim_gpus
from mamba_align.ops.provenance import record_snakemake_job
from mamba_align.ops.runs import train_stage
from mamba_align.train.data import check_source_revision
from mamba_align.train.recipes import stage_recipe, workflow_root
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
i, o, p = snakemake.input, snakemake.output, snakemake.params
# what is learned from params (the rerun trigger), operational keys from the config as it is now
# (an experiment of a grid passes its own recipe and overrides as params.config; `training` is the workflow's)
config = {**snakemake.config, **(getattr(p, "config", None) or {})}
check_source_revision(i.train)  # a Hub dataset still at the commit its data was prepared from
recipe = stage_recipe(config, "dpo", workflow_root(snakemake.scriptdir), p.recipe)
train_stage("dpo", i.model, i.train, i.test, recipe, o.model, p.checkpoints, o.metrics,
            num_processes=max(1, int(snakemake.resources.gpu)),
            fsdp=int(getattr(snakemake.resources, "fsdp", 0)) > 0, rule=snakemake.rule)

record_snakemake_job(snakemake)
