from mamba_align.recipes import SFTRecipe, build
from mamba_align.train import train_sft
from mamba_align.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
i, o, p = snakemake.input, snakemake.output, snakemake.params
train_sft(i.model, i.train, i.test, build(SFTRecipe, p.recipe, "recipe sft"), o.model, p.checkpoints,
          o.metrics, num_processes=max(1, int(snakemake.resources.gpu)))

record_snakemake_job(snakemake)
