from mamba_align.testing.demo import build_demo_inputs
from mamba_align.ops.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
build_demo_inputs(snakemake.output[0], vocab_files=snakemake.input.vocab)

record_snakemake_job(snakemake)
