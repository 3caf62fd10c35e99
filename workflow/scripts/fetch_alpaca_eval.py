from mamba_align.eval.alpacaeval_data import fetch_alpaca_eval
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
fetch_alpaca_eval(p.revision, p.local_dir, snakemake.output[0], sha256=p.sha256, annotators=p.annotators)

record_snakemake_job(snakemake)
