from mamba_align.recipes import DPORecipe, build
from mamba_align.train import train_dpo
from mamba_align.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
i, o, p = snakemake.input, snakemake.output, snakemake.params
train_dpo(i.model, i.model, i.train, i.test, build(DPORecipe, p.recipe, "recipe dpo"), o.model, p.checkpoints,
          o.metrics, num_processes=max(1, int(snakemake.resources.gpu)))

record_snakemake_job(snakemake)
