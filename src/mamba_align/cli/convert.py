"""`mamba-align convert`: a Mamba checkpoint -> a verified transformers model folder (model/convert.py), as the rule
prepare_base_model makes it."""

from __future__ import annotations

import argparse

from mamba_align.model.convert import prepare_base_model
from mamba_align.model.tokenizer import CHAT_TEMPLATES
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = "Convert a Mamba checkpoint to a transformers MambaForCausalLM dir."
    p.add_argument("--source", required=True, help="local directory or Hub id (owner/name)")
    p.add_argument("--revision", help="Hub commit sha or tag (required for a Hub source)")
    p.add_argument("--tokenizer", help="local directory or Hub id; omit to skip the tokenizer")
    p.add_argument("--tokenizer-revision")
    p.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--report", required=True, help="JSON report path")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the CPU check against model/reference.py (slow for 2.8B)")
    p.add_argument("--log", help="log file")


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log)
    prepare_base_model(args.source, args.revision, args.tokenizer, args.tokenizer_revision, args.chat_template,
                       args.out_dir, args.report, verify=args.verify)
