from mamba_align.alpacaeval import fetch_alpaca_eval
from mamba_align.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
fetch_alpaca_eval(snakemake.params.revision, snakemake.params.local_dir, snakemake.output[0])

record_snakemake_job(snakemake)
