"""`mamba-align data {sft,dpo}`: SFT or preference data, chat-templated, as parquet (train/data.py), as the rules
prepare_sft_data and prepare_preference_data make them."""

from __future__ import annotations

import argparse

from mamba_align.train import data
from mamba_align.train.data import prepare_preference_data, prepare_sft_data
from mamba_align.train.recipes import load_recipe
from mamba_align.utils import setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    p.description = data.__doc__
    p.add_argument("stage", choices=["sft", "dpo"])
    p.add_argument("--recipe-dir", required=True, help="config/recipes/<name>")
    p.add_argument("--model", required=True, help="prepared base model dir (its tokenizer is used)")
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)


def run(a: argparse.Namespace) -> None:
    setup_logging(a.log)
    recipe = load_recipe(a.recipe_dir, a.stage)
    if a.stage == "sft":
        prepare_sft_data(recipe.dataset, a.model, a.out, recipe.max_seq_length, recipe.packing)
    else:
        prepare_preference_data(recipe.dataset, a.model, a.out, recipe.max_length, recipe.max_prompt_length)
