from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.testing.demo import build_demo_inputs
from mamba_align.testing.rehearsal import build_rehearsal_inputs
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
if snakemake.params.shape:  # config `demo_inputs`: the rehearsal's shape and sizes
    build_rehearsal_inputs(snakemake.output[0], snakemake.params.shape, snakemake.input.judge_prompts)
else:
    build_demo_inputs(snakemake.output[0], vocab_files=snakemake.input.vocab)

record_snakemake_job(snakemake)
