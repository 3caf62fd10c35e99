from pathlib import Path

from mamba_align.ops.reporting.report import build_report
from mamba_align.ops.store import layout
from mamba_align.ops.store.provenance import model_key, record_snakemake_job
from mamba_align.utils import setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
paths = layout.Results(snakemake.config["results_dir"])
evals = {s: {b: paths.eval_summary(s, b) for b in layout.BENCHMARKS} for s in p.stages}
metrics = {Path(m).stem: m for m in snakemake.input.metrics}
build_report(p.run_name, evals, metrics, Path(snakemake.output.table).parent, demo=p.demo,
             current_keys={s: model_key(m) for s, m in p.models.items()},
             leaderboards={s: paths.eval_summary(s, layout.LEADERBOARD) for s in p.leaderboard_stages})
record_snakemake_job(snakemake)
