"""Training recipes: one YAML per model x stage x variant under config/recipes/<recipe>/{sft,dpo}.yaml.

Parsed strictly into dataclasses: an unknown or wrongly typed key is an error naming the file and key.
The config's `recipe_overrides` (and the command line of each step) override values. A key is named as the field
of TRL's SFTConfig / DPOConfig it sets; the few that are not are translated in trainer.trl_config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamba_align.utils import UserError


@dataclass
class DatasetSpec:
    source: str
    """Hub dataset id (downloaded at `revision`) or a local directory / parquet / JSONL file in the Hub schema."""
    revision: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    max_train_samples: int | None = None
    """Keep only the first N training rows (None: all)."""
    max_test_samples: int | None = None


@dataclass
class TrainCommon:
    dataset: DatasetSpec
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    global_batch_size: int = 128
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = True
    """bf16 autocast with fp32 master weights (never bf16 weights: SSM recurrences are sensitive)."""
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 100
    """Checkpoint every N optimizer steps (pre-emption safety)."""
    save_total_limit: int = 2
    eval_steps: int | None = None
    """Evaluate every N steps; None: once per epoch."""
    max_grad_norm: float = 1.0
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """Live training metrics: any of transformers' integrations ("tensorboard", "wandb", ...) or []. TensorBoard
    writes under results/logs/tensorboard/; "wandb" needs `pip install wandb` and WANDB_API_KEY / WANDB_PROJECT."""


@dataclass
class SFTRecipe(TrainCommon):
    max_seq_length: int = 2048
    packing: bool = True
    """Pack documents joined with EOS into fixed rows of max_seq_length (TRL's `wrapped` strategy)."""


@dataclass
class DPORecipe(TrainCommon):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_length: int = 1024
    max_prompt_length: int = 512
    precompute_ref_log_probs: bool | None = None
    """Reference log-probs computed once before training (one forward pass of the reference model over the data,
    cached in the run's checkpoint folder) instead of a reference forward at every step: the same loss, ~1.38x
    the tokens/s (9,435 vs 6,820 at 2.8B per H100: README, plan). None: the config's
    `training.precompute_ref_log_probs` decides (PRECOMPUTE_REF_DEFAULT without a config). Operational: what the
    model learns is the same either way."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2.0e-5" as float but "2e-5" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls, data: dict, where: str):
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise UserError naming `where.key`."""
    hints = typing.get_type_hints(cls)
    check_keys(cls, data, where)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from e


def check_keys(cls, data: dict, where: str, prefix: str = "") -> None:
    """An unknown key of dataclass `cls` in `data`, at any depth, raises UserError naming `where` and the key's
    dotted path (`prefix` + key), with the closest known key."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise UserError(f"{where}: unknown key(s) {prefix}{key}{did_you_mean(key, hints)}; "
                            f"allowed: {', '.join(sorted(hints))}")
        inner = next((t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)), None)
        if inner is not None and isinstance(value, dict):
            check_keys(inner, value, where, f"{prefix}{key}.")


def non_finite(data, prefix: str = ""):
    """(dotted key, value) of every NaN or infinite number in `data` (YAML's .nan / .inf), at any depth; list items
    are named key[i]. Walks the few hundred values of a config in microseconds."""
    if isinstance(data, float) and not math.isfinite(data):
        yield prefix, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from non_finite(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from non_finite(value, f"{prefix}[{i}]")


def check_finite(data, where: str, prefix: str = "") -> None:
    """A NaN or infinite number anywhere in `data` raises UserError naming `where` and the key (`prefix` + its
    dotted path): a NaN beta or learning rate trains a model of NaN weights that only fails when it generates."""
    for key, value in non_finite(data, prefix.rstrip(".")):
        raise UserError(f"{where}: {key} is {value!r}; expected a finite number")


def check_config_finite(config: dict, config_files=()) -> None:
    """Every number of the workflow's config (recipe_overrides, experiment grids, evaluation and judge settings)
    finite, checked when the workflow is read; the error names the config files and the key."""
    check_finite(config, f"the config ({', '.join(map(str, config_files))})" if config_files else "the config")


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


RECIPE_CLASSES = {"sft": SFTRecipe, "dpo": DPORecipe}

# Settings that may change between resubmissions of one training run (other GPUs, an OOM retry): they
# change how the run is executed, not what it learns.
# precompute_ref_log_probs is one: the reference log-probs are those of the same fixed model, in the same dtype and
# autocast, attached to each row, so the data order is the sampler's either way; the result differs from the
# per-step reference forward only by rounding (batch composition and padding), as a per-device batch change does.
OPERATIONAL_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_checkpointing",
                    "logging_steps", "save_steps", "save_total_limit", "eval_steps", "report_to",
                    "precompute_ref_log_probs")
# The project's default for a DPO recipe that leaves precompute_ref_log_probs unset (the published recipes do):
# the config's `training.precompute_ref_log_probs` (schema default: this value) overrides it.
PRECOMPUTE_REF_DEFAULT = True


# Operational keys that were learned settings before (issue #33): the run key and the rule's params keep the value
# every run had then, so the models, checkpoints and finished jobs of earlier runs keep their keys (a user does
# not retrain a finished DPO model because precomputation became the default). What a run did is in provenance.
KEY_AS_BEFORE = {"precompute_ref_log_probs": False}


def learning_settings(recipe: dict) -> dict:
    """The recipe without its OPERATIONAL_KEYS (KEY_AS_BEFORE's at their fixed values): what identifies a
    training run's checkpoints."""
    out = {k: v for k, v in recipe.items() if k not in OPERATIONAL_KEYS}
    out.update({k: v for k, v in KEY_AS_BEFORE.items() if k in recipe})
    return out


def recipe_dir(name: str, basedir: str | Path) -> Path:
    """config['recipe']: a folder name under <workflow>/config/recipes/, or a path to a recipe folder."""
    return Path(name) if Path(name).is_dir() else Path(basedir) / "config" / "recipes" / name


def workflow_root(inside: str | Path) -> Path:
    """The workflow folder (holding config/recipes/) that `inside` (a rule's or script's folder) lies in.
    Resolved first: Snakemake gives a script's folder as `workflow/rules/../scripts`, whose `.parents` are not
    the folders it lies in."""
    here = Path(inside).resolve()
    found = next((d for d in (here, *here.parents) if (d / "config" / "recipes").is_dir()), None)
    if found is None:
        raise UserError(f"no workflow folder (one holding config/recipes/) contains {inside} ({here})")
    return found


def config_recipe(config: dict, stage: str, basedir: str | Path, config_files=()) -> TrainCommon:
    """The stage's recipe as the config selects it (config['recipe'], with its recipe_overrides); errors in the
    overrides name the config key (recipe_overrides.<stage>.<key>) and `config_files`, where they came from."""
    overrides = (config.get("recipe_overrides") or {}).get(stage) or {}
    source = f"the config ({', '.join(map(str, config_files))})" if config_files else "the config"
    check_keys(RECIPE_CLASSES[stage], overrides, source, f"recipe_overrides.{stage}.")
    check_finite(overrides, source, f"recipe_overrides.{stage}.")
    recipe = load_recipe(recipe_dir(config["recipe"], basedir), stage, overrides,
                         overridden_by=f"recipe_overrides.{stage} in {source}")
    if isinstance(recipe, DPORecipe) and recipe.precompute_ref_log_probs is None:
        recipe.precompute_ref_log_probs = precompute_ref_log_probs(recipe, config)
    return recipe


def precompute_ref_log_probs(recipe: DPORecipe | dict, config: dict | None = None) -> bool:
    """Whether DPO precomputes its reference log-probs: the recipe's value (with its overrides; a DPORecipe or
    its dict) where it sets one, else the config's `training.precompute_ref_log_probs`, else
    PRECOMPUTE_REF_DEFAULT."""
    own = recipe.get("precompute_ref_log_probs") if isinstance(recipe, dict) else recipe.precompute_ref_log_probs
    if own is not None:
        return bool(own)
    value = ((config or {}).get("training") or {}).get("precompute_ref_log_probs")
    return PRECOMPUTE_REF_DEFAULT if value is None else bool(value)


def recipe_of(stage: str, recipe: dict) -> TrainCommon:
    """The stage's recipe object from the dict the workflow resolved when it was read (as_dict of config_recipe, or
    a grid experiment's): what a training job runs with, its rule's param `job_recipe`. An object, not a dict, on
    purpose: Snakemake records only builtin values of params, so this param is no rerun trigger (the learned settings'
    param `recipe` is), and a changed operational key reruns nothing; a later submission, which reads the workflow
    again, runs with it."""
    return build(RECIPE_CLASSES[stage], recipe, f"recipe {stage}")


def load_recipe(recipe_dir: str | Path, stage: str, overrides: dict | None = None,
                overridden_by: str = "overrides"):
    """Load config/recipes/<name>/<stage>.yaml strictly, apply `overrides`, check the values, return the
    dataclass. Errors name the file, or the file and `overridden_by` when overrides were given."""
    path = Path(recipe_dir) / f"{stage}.yaml"
    if not path.exists():
        raise UserError(f"recipe file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at top level")
    data.pop("chat_template", None)  # the recipe's, not the trainer's: see recipe_chat_template
    check_finite(data, str(path))
    where = f"{path} with {overridden_by}" if overrides else str(path)
    recipe = build(RECIPE_CLASSES[stage], _deep_merge(data, overrides or {}), where)
    validate(recipe, where)
    return recipe


def recipe_chat_template(recipe_dir: str | Path) -> str | None:
    """The chat template a recipe was written for (`chat_template:` in its sft.yaml and dpo.yaml), or None."""
    found = {}
    for stage in RECIPE_CLASSES:
        path = Path(recipe_dir) / f"{stage}.yaml"
        data = yaml.safe_load(path.read_text()) if path.exists() else None
        if isinstance(data, dict) and data.get("chat_template") is not None:
            found[str(path)] = data["chat_template"]
    if len(set(found.values())) > 1:
        raise UserError(f"recipe {recipe_dir}: sft.yaml and dpo.yaml name different chat templates {found}")
    return next(iter(found.values()), None)


def resolve_chat_template(config: dict, basedir: str | Path) -> str:
    """base_model.chat_template: the recipe's when the config leaves it unset; a different one is an error
    (a model trained with one template and evaluated with another scores as if it had not been aligned)."""
    recipe = recipe_chat_template(recipe_dir(config["recipe"], basedir))
    chosen = config["base_model"].get("chat_template")
    if chosen is None:
        return recipe or "zephyr"
    if recipe is not None and chosen != recipe:
        raise UserError(f"base_model.chat_template is {chosen!r} but recipe {config['recipe']!r} is written for "
                        f"{recipe!r}: remove base_model.chat_template (the recipe's applies) or set it to {recipe!r}")
    return chosen


# Numbers a recipe sets that must be > 0, or >= 0 (None: unset, allowed where the type allows it).
POSITIVE = ("learning_rate", "num_train_epochs", "global_batch_size", "per_device_train_batch_size",
            "per_device_eval_batch_size", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
            "max_seq_length", "beta", "max_length", "max_prompt_length", "dataset.max_train_samples",
            "dataset.max_test_samples")
NON_NEGATIVE = ("warmup_ratio", "weight_decay", "max_grad_norm")
# Names the installed transformers / TRL accept: (key, module, how to find the names in its source).
NAMED = {"optim": ("transformers.training_args", "OptimizerNames"),
         "lr_scheduler_type": ("transformers.trainer_utils", "SchedulerType"),
         "loss_type": ("trl.trainer.dpo_trainer", "loss_type ==")}


def validate(recipe: TrainCommon, where: str) -> None:
    """Values a trainer would reject, or choke on after the model is loaded, rejected now, naming `where` and the
    key with the expected value."""
    if not isinstance(recipe.report_to, list) or not all(isinstance(x, str) for x in recipe.report_to):
        raise UserError(f"{where}: report_to: expected a list of names like [tensorboard, wandb], "
                        f"got {recipe.report_to!r}")
    values = {**as_dict(recipe), **{f"dataset.{k}": v for k, v in as_dict(recipe.dataset).items()}}
    check_finite(values, where)  # NaN passes every comparison below
    for key in POSITIVE + NON_NEGATIVE:
        value = values.get(key)
        if value is not None and (value < 0 or (value == 0 and key in POSITIVE)):
            raise UserError(f"{where}: {key} is {value!r}; expected a number {'>' if key in POSITIVE else '>='} 0")
    if recipe.max_steps != -1 and recipe.max_steps <= 0:
        raise UserError(f"{where}: max_steps is {recipe.max_steps}; expected -1 (train num_train_epochs) or > 0")
    if recipe.warmup_ratio > 1:
        raise UserError(f"{where}: warmup_ratio is {recipe.warmup_ratio}; expected a fraction of training in [0, 1]")
    if isinstance(recipe, DPORecipe) and recipe.max_prompt_length >= recipe.max_length:
        raise UserError(f"{where}: max_prompt_length {recipe.max_prompt_length} leaves no room for the reply; "
                        f"expected less than max_length {recipe.max_length}")
    for key in NAMED:  # names not found in the installed library (moved in a new version?): not checked
        if key in values and (names := accepted_names(key)) and values[key] not in names:
            raise UserError(f"{where}: {key} is {values[key]!r}{did_you_mean(values[key], names)}; the installed "
                            f"{NAMED[key][0].split('.')[0]} accepts: {', '.join(names)}")
    if recipe.global_batch_size % recipe.per_device_train_batch_size:
        raise UserError(
            f"{where}: global_batch_size {recipe.global_batch_size} is not divisible by "
            f"per_device_train_batch_size {recipe.per_device_train_batch_size}"
        )


@functools.lru_cache
def accepted_names(key: str) -> tuple[str, ...]:
    """The values of `key` that the installed library accepts, read from its source: importing transformers
    would cost seconds at every workflow parse. An Enum's string members, or the strings compared with a name."""
    module, what = NAMED[key]
    package, *inner = module.split(".")
    spec = importlib.util.find_spec(package)  # finds the package without importing it (a submodule would)
    source = Path(spec.submodule_search_locations[0], *inner).with_suffix(".py") if spec else None
    if source is None or not source.exists():
        return ()  # not installed here (the job that trains will fail on it instead)
    tree = ast.parse(source.read_text(encoding="utf-8"))
    if what.endswith(" =="):
        found = [n.comparators[0].value for n in ast.walk(tree)
                 if isinstance(n, ast.Compare) and isinstance(n.left, ast.Name) and n.left.id == what[:-3]
                 and isinstance(n.ops[0], ast.Eq) and isinstance(n.comparators[0], ast.Constant)]
    else:
        found = [a.value.value for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == what
                 for a in n.body if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant)]
    return tuple(dict.fromkeys(v for v in found if isinstance(v, str)))


def gradient_accumulation_steps(recipe: TrainCommon, num_processes: int) -> int:
    """Accumulation that keeps the recipe's global batch whatever the number of GPUs."""
    per_step = recipe.per_device_train_batch_size * num_processes
    if recipe.global_batch_size % per_step:
        raise UserError(
            f"global_batch_size {recipe.global_batch_size} is not divisible by "
            f"{num_processes} processes x per_device_train_batch_size {recipe.per_device_train_batch_size}"
        )
    return recipe.global_batch_size // per_step


def as_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def parse_overrides(items: list[str] | None) -> dict:
    """Command-line overrides `key=value` / `dataset.revision=abc` as a nested dict (values read as YAML)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out
