from pathlib import Path

from mamba_align.eval.mtbench import fetch_mt_bench
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
fetch_mt_bench(snakemake.params.commit, snakemake.params.local_dir, Path(snakemake.output.questions).parent)

record_snakemake_job(snakemake)
