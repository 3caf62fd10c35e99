from mamba_align.eval.mtbench import judge_mt_bench
from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.reporting.plan import judge_prices
from mamba_align.ops.store.provenance import record_snakemake_job, scored_model
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
i, p, o = snakemake.input, snakemake.params, dict(snakemake.output.items())
judge_mt_bench(i.answers, i.questions, i.judge_prompts, i.reference, p.judge, snakemake.output[0], p.cache,
               judgments_path=o.get("judgments") or p.judgments, prices=judge_prices(snakemake.config),
               model=scored_model(p.model, p.model_dir))

record_snakemake_job(snakemake)
