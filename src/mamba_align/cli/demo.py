"""`mamba-align demo-inputs`: the tiny demo's inputs (testing/demo.py), as the rule build_demo_inputs makes them."""

from __future__ import annotations

import argparse

from mamba_align.testing import demo
from mamba_align.testing.demo import build_demo_inputs
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = demo.__doc__
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-files", nargs="*", default=[], help="texts the tokenizer must cover")
    p.add_argument("--log", default=None)


def run(a: argparse.Namespace) -> None:
    setup_logging(a.log)
    build_demo_inputs(a.out, a.vocab_files)
