"""`mamba-align generate {mt_bench,alpaca_eval}`: a model's MT-Bench answers or AlpacaEval outputs (eval/generate.py),
as the rules generate_mt_bench and generate_alpaca_eval write them."""

from __future__ import annotations

import argparse

from mamba_align.eval import generate
from mamba_align.eval.generate import generate_alpaca_eval, generate_mt_bench
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = generate.__doc__
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("mt_bench", "alpaca_eval"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="transformers model directory")
        s.add_argument("--questions", required=True, help="question.jsonl (MT-Bench) or alpaca_eval.json")
        s.add_argument("--out", required=True)
        s.add_argument("--model-id", required=True)
        s.add_argument("--max-new-tokens", type=int, default=1024 if name == "mt_bench" else 2048)
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--device", default=None)
        s.add_argument("--log", default=None)
        if name == "alpaca_eval":
            s.add_argument("--temperature", type=float, default=0.7)
            s.add_argument("--top-p", type=float, default=1.0)
            s.add_argument("--top-k", type=int, default=50, help="0: no top-k cut (eval.alpaca_eval.top_k)")


def run(a: argparse.Namespace) -> None:
    setup_logging(a.log)
    if a.bench == "mt_bench":
        generate_mt_bench(a.model, a.questions, a.out, a.model_id, a.max_new_tokens, a.batch_size, a.device)
    else:
        generate_alpaca_eval(a.model, a.questions, a.out, a.model_id, a.temperature, a.top_p,
                             a.max_new_tokens, a.batch_size, a.device, top_k=a.top_k)
