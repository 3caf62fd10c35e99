"""`mamba-align report`: the scores table and plots of a run (ops/reporting/report.py), as the rule report writes
them."""

from __future__ import annotations

import argparse

from mamba_align.ops.reporting import report
from mamba_align.ops.reporting.report import build_report
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = report.__doc__
    p.add_argument("--run-name", required=True)
    p.add_argument("--eval", nargs=3, action="append", metavar=("STAGE", "MTBENCH_JSON", "ALPACAEVAL_JSON"),
                   default=[])
    p.add_argument("--metrics", nargs=2, action="append", metavar=("STAGE", "METRICS_JSON"), default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--model-key", nargs=2, action="append", metavar=("STAGE", "KEY"), default=[],
                   help="the current config's model key of STAGE: scores of another model are shown as stale")
    p.add_argument("--leaderboard", nargs=2, action="append", metavar=("STAGE", "LEADERBOARD_JSON"), default=[])
    p.add_argument("--demo", action="store_true")
    p.add_argument("--log", default=None)


def run(a: argparse.Namespace) -> None:
    setup_logging(a.log)
    build_report(a.run_name, {s: {"mtbench": m, "alpacaeval": e} for s, m, e in a.eval}, dict(a.metrics),
                 a.out, a.demo, dict(a.model_key), leaderboards=dict(a.leaderboard))
