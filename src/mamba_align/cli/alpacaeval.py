"""`mamba-align alpaca-eval {fetch,judge}`: the pinned AlpacaEval data, or a model's outputs judged
(eval/alpacaeval.py), as the rules fetch_alpaca_eval and judge_alpaca_eval do."""

from __future__ import annotations

import argparse

from mamba_align.eval.alpacaeval import judge_alpaca_eval
from mamba_align.eval.alpacaeval_data import ANNOTATORS, fetch_alpaca_eval
from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("AlpacaEval through the `alpaca_eval` library: a configurable judge, resumable annotation, and "
                     "the stage's CLI.")
    p.add_argument("--log", help="log file (the rule's log)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or copy) the AlpacaEval data files")
    f.add_argument("--revision", default="main", help="HF dataset revision; pin a commit sha")
    f.add_argument("--local-dir", help="folder with the same files (offline clusters, the demo)")
    f.add_argument("--out-dir", required=True)
    f.add_argument("--sha256", action="append", default=[], metavar="FILE=HASH", help="pin a file's content")
    f.add_argument("--annotators", nargs="+", choices=list(ANNOTATORS), help="only their reference files (default all)")
    j = sub.add_parser("judge", help="annotate a model's outputs and write the win rates")
    j.add_argument("--outputs", required=True, help="model outputs JSON (alpaca_eval format)")
    j.add_argument("--data-dir", required=True, help="out-dir of `fetch`")
    j.add_argument("--annotators", nargs="+", default=list(ANNOTATORS), choices=list(ANNOTATORS))
    j.add_argument("--judge-config", required=True, help="JSON or YAML file with the judge section")
    j.add_argument("--base-url", help="an already running OpenAI-compatible judge server")
    j.add_argument("--cache-dir", required=True, help="annotation caches and generated annotator configs")
    j.add_argument("--out", required=True, help="metrics JSON")


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log)
    if args.command == "fetch":
        pins = dict(s.split("=", 1) for s in args.sha256)
        fetch_alpaca_eval(args.revision, args.local_dir, args.out_dir, sha256=pins, annotators=args.annotators)
    else:
        judge = JudgeSettings.from_file(args.judge_config)
        judge_alpaca_eval(args.outputs, args.data_dir, args.annotators, judge, args.out, args.cache_dir,
                          base_url=args.base_url)
