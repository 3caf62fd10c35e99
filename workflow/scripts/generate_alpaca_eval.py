from pathlib import Path

from mamba_align.eval.generate import generate_alpaca_eval
from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
p = snakemake.params
generate_alpaca_eval(snakemake.input.model, Path(snakemake.input.data) / "alpaca_eval.json", snakemake.output[0],
                     p.generator, p.temperature, p.top_p, p.max_new_tokens, p.batch_size, top_k=p.top_k)

record_snakemake_job(snakemake)
