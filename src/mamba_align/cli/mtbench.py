"""`mamba-align mt-bench {fetch,judge}`: the pinned MT-Bench data, or a model's answers graded (eval/mtbench.py), as
the rules fetch_mt_bench and judge_mt_bench do."""

from __future__ import annotations

import argparse

from mamba_align.eval import mtbench
from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.eval.mtbench import PINNED_COMMIT, data_paths, fetch_mt_bench, judge_mt_bench
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = mtbench.__doc__.splitlines()[0]
    p.add_argument("--log", help="log file (the rule's log)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or copy) the MT-Bench data files")
    f.add_argument("--commit", default=PINNED_COMMIT, help="FastChat commit")
    f.add_argument("--local-dir", help="folder with question.jsonl, judge_prompts.jsonl, reference_answer.jsonl")
    f.add_argument("--out-dir", required=True)
    j = sub.add_parser("judge", help="grade a model's answers and write the scores")
    j.add_argument("--answers", required=True, help="the model's answers (FastChat answer JSONL)")
    j.add_argument("--data-dir", required=True, help="out-dir of `fetch`")
    j.add_argument("--judge-config", required=True, help="JSON or YAML file with the judge section, defaults filled")
    j.add_argument("--base-url", help="an already running OpenAI-compatible judge server")
    j.add_argument("--cache", required=True, help="judge cache JSONL (resumes from it)")
    j.add_argument("--judgments", help="judgments JSONL (default: beside --out)")
    j.add_argument("--out", required=True, help="summary JSON")


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log)
    if args.command == "fetch":
        fetch_mt_bench(args.commit, args.local_dir, args.out_dir)
    else:
        judge = JudgeSettings.from_file(args.judge_config)
        d = data_paths(args.data_dir)
        judge_mt_bench(args.answers, d["question"], d["judge_prompts"], d["reference_answer"], judge, args.out,
                       args.cache, judgments_path=args.judgments, base_url=args.base_url)
