"""`mamba-align judge-server`: a local chat model served as an OpenAI-compatible judge (eval/judge/server.py), as the
judge rules start it for `judge.backend: local`; its URL for the judge commands' --base-url."""

from __future__ import annotations

import argparse
import threading

from mamba_align.eval.judge.server import serve_local_judge
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = "Serve a local chat model as an OpenAI-compatible judge."
    p.add_argument("--model-name", default="local-judge", help="name the server reports")
    p.add_argument("--model-path", help="a transformers model folder (or the folder of --gguf-file)")
    p.add_argument("--gguf-package", help="installed Python package whose folder holds --gguf-file")
    p.add_argument("--gguf-file", help="GGUF file name (or path, without the other two options)")
    p.add_argument("--rating-from-logprobs", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log", help="log file")


def run(args: argparse.Namespace) -> None:
    setup_logging(args.log)
    local_cfg = {"model_path": args.model_path, "gguf_package": args.gguf_package,
                 "gguf_file": args.gguf_file, "rating_from_logprobs": args.rating_from_logprobs,
                 "device": args.device}
    with serve_local_judge(local_cfg, args.model_name) as url:
        print(url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
