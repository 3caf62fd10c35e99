import os

from mamba_align.layout import tensorboard_dir
from mamba_align.recipes import stage_recipe, workflow_root
from mamba_align.train import train_dpo
from mamba_align.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
i, o, p = snakemake.input, snakemake.output, snakemake.params
# live curves (recipe key report_to): `tensorboard --logdir results/logs/tensorboard`
os.environ.setdefault("TENSORBOARD_LOGGING_DIR", tensorboard_dir(snakemake.config["results_dir"], p.checkpoints))
# what is learned from params (the rerun trigger), operational keys from the config as it is now
recipe = stage_recipe(snakemake.config, "dpo", workflow_root(snakemake.scriptdir), p.recipe)
train_dpo(i.model, i.model, i.train, i.test, recipe, o.model, p.checkpoints, o.metrics,
          num_processes=max(1, int(snakemake.resources.gpu)))

record_snakemake_job(snakemake)
