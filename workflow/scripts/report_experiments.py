from pathlib import Path

from mamba_align.ops.reporting.report import build_experiments_report
from mamba_align.ops.store.provenance import record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
build_experiments_report(p.experiments, p.axes, Path(snakemake.output.table).parent, demo=p.demo)
record_snakemake_job(snakemake)
