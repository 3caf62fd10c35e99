from mamba_align.eval.leaderboard.run import fetch_leaderboard_data
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
fetch_leaderboard_data(p.leaderboard, snakemake.output.tasks, p.nltk_dir)

record_snakemake_job(snakemake)
