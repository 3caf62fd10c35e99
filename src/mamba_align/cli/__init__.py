"""`mamba-align`: one command for every step of the pipeline and for what a user asks between Snakemake runs.

Each command is a module of mamba_align.cli (COMMANDS): the one definition of its options (`configure`) and a thin
`run` calling the package function that the command's rules call through their scripts. `python -m mamba_align.cli`
runs the same (accelerate's relaunch of `mamba-align train` on N GPUs does). What a user reads is USAGE.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from mamba_align.utils import UserError

USAGE = """\
Run one step of the pipeline by hand, or ask about a results folder between Snakemake runs. Snakemake runs the
whole pipeline (`snakemake --profile profiles/slurm results/eval/mtbench.json`); a step's command runs the same code
as its rule (in parentheses below).

    mamba-align <command> [options]         `mamba-align <command> --help`: the command's options
    mamba-align status [results] [--configfile F ...]
                                            which stages are done, training checkpoints and ETA, eval progress,
                                            scores (each marked stale when computed for another model than the
                                            config's), the report, and the last error of each failed step; for a
                                            grid config (`experiments`), each experiment's stages
    mamba-align rescore [results] --stage S re-score stored MT-Bench judgments (no judge call)
"""

# a command: (its module in mamba_align.cli, its help naming the rules that call the same function)
COMMANDS = {
    "demo-inputs": ("demo", "the tiny demo's synthetic model, tokenizer and data, no network (build_demo_inputs)"),
    "convert": ("convert", "a Mamba checkpoint -> a verified transformers model folder (prepare_base_model)"),
    "data": ("data", "SFT or preference data, chat-templated, as parquet (prepare_sft_data, prepare_preference_data)"),
    "train": ("train", "SFT or DPO training, resumable, on N GPUs through accelerate (train_sft, train_dpo)"),
    "generate": ("generate",
                 "a model's MT-Bench answers or AlpacaEval outputs (generate_mt_bench, generate_alpaca_eval)"),
    "mt-bench": ("mtbench", "fetch the MT-Bench data, or judge a model's answers (fetch_mt_bench, judge_mt_bench)"),
    "alpaca-eval": ("alpacaeval",
                    "fetch the AlpacaEval data, or judge a model's outputs (fetch_alpaca_eval, judge_alpaca_eval)"),
    "judge-server": ("judge_server",
                     "serve a local chat model as an OpenAI-compatible judge (for the judge commands' --base-url)"),
    "report": ("report", "the scores table and plots of a run (report)"),
    "plan": ("plan", "GPU-hours, wall time and judge cost before anything runs (plan)"),
    "status": ("status", "what is done in a results folder, progress, scores, errors"),
    "rescore": ("rescore", "re-score stored MT-Bench judgments without judge calls"),
}
# commands whose errors (UserError, OSError) are one line here; a step's go to its log through setup_logging
ONE_LINE_ERRORS = ("plan", "status", "rescore")


def command(name: str) -> ModuleType:
    """The module of a command, imported now: heavy imports only for the command that runs."""
    return importlib.import_module(f"mamba_align.cli.{COMMANDS[name][0]}")


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    """`mamba-align`'s parser, listing every command with its help; with `name`, that command's parser (prog
    `mamba-align <name>`), its options from its module's `configure`."""
    ap = argparse.ArgumentParser(prog="mamba-align", description=USAGE,
                                 epilog="In parentheses: the workflow rules that call the same package function.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    parsers = {cmd: sub.add_parser(cmd, help=help_text) for cmd, (_, help_text) in COMMANDS.items()}
    if name is None:
        return ap
    command(name).configure(parsers[name])
    return parsers[name]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else None
    if name not in COMMANDS:
        build_parser().parse_args(argv[:1])  # exits: --help lists the commands, anything else is an error naming them
    args = build_parser(name).parse_args(argv[1:])
    if name not in ONE_LINE_ERRORS:  # a step's error as a workflow job's: its setup_logging writes it to its log
        command(name).run(args)
        return 0
    try:
        command(name).run(args)
    except (UserError, OSError) as e:  # OSError: a file named on the command line that cannot be read or written
        print(f"mamba-align: {e}", file=sys.stderr)
        return 2
    return 0
