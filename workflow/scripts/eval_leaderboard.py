from mamba_align.eval.leaderboard.run import evaluate_leaderboard
from mamba_align.ops.jobenv.gpus import claim as claim_gpus
from mamba_align.ops.store.provenance import record_snakemake_job, scored_model
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
claim_gpus(int(snakemake.resources.gpu))  # GPUs of its own under the local executor
p = snakemake.params
evaluate_leaderboard(snakemake.input.model, snakemake.output[0], p.leaderboard, snakemake.input.tasks, p.nltk_dir,
                     model=scored_model(p.model, p.model_dir))

record_snakemake_job(snakemake)
