from mamba_align.ops.reporting.plan import make_grid_plan, make_plan, write_plan
from mamba_align.ops.store.experiments import Grid
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
if p.experiments:
    plan = make_grid_plan(snakemake.config, Grid.from_dict(p.experiments), p.gpus, p.gpu_type)
else:
    plan = make_plan(snakemake.config, p.sft, p.dpo, p.gpus, p.gpu_type, snakemake.config["results_dir"])
write_plan(plan, snakemake.output.json, snakemake.output.table)
record_snakemake_job(snakemake)
