from mamba_align.eval.alpacaeval import judge_alpaca_eval
from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.reporting.plan import judge_prices
from mamba_align.ops.store.provenance import record_snakemake_job, scored_model
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
p = snakemake.params
judge_alpaca_eval(snakemake.input.outputs, snakemake.input.data, p.annotators, p.judge, snakemake.output[0], p.cache,
                  model=scored_model(p.model, p.model_dir), prices=judge_prices(snakemake.config))

record_snakemake_job(snakemake)
