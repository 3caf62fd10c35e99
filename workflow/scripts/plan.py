from mamba_align.plan import write_plan
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
write_plan(snakemake.params.plan, snakemake.output.json, snakemake.output.table)
