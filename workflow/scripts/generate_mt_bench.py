from mamba_align.eval.generate import generate_mt_bench
from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
p = snakemake.params
generate_mt_bench(snakemake.input.model, snakemake.input.questions, snakemake.output[0], p.model_id,
                  max_new_tokens=p.max_new_tokens, batch_size=p.batch_size)

record_snakemake_job(snakemake)
