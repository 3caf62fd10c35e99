"""One training job, described once: `TrainJob` holds the stage, the resolved recipe (the one the workflow parsed
when it was read, handed over by the rule), the input and output paths, the process count and the rule. The rule
script builds it (`from_snakemake`), `mamba-align train` (cli/train.py) builds it from its options, and every later
step reads it: the model store (ops/store/runs.py), the launcher, `fit` and
`trainer.trl_config`. Ranks of a multi-GPU run read the same job from the JSON file the launcher writes (`save`,
`load`), never the recipe files again.

DPO's `precompute_ref_log_probs` is a bool in every job (`recipes.precompute_ref_log_probs`, the one resolver:
the recipe's value, else the config's `training.precompute_ref_log_probs`, else the project's default); nothing
after the job resolves it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mamba_align.train.recipes import (
    RECIPE_CLASSES,
    DPORecipe,
    TrainCommon,
    as_dict,
    build,
    learning_settings,
    precompute_ref_log_probs,
)
from mamba_align.utils import UserError, read_json, write_json

PATHS = ("model", "ref_model", "train", "test", "out", "checkpoints", "metrics")


@dataclass(frozen=True)
class TrainJob:
    """A training run: `out` is the model folder written when training ends (for a workflow job, the model
    store's link, which ops/store/runs.py replaces by the keyed folder), `checkpoints` the folder of its checkpoints
    (ditto: the checkpoints root, then the run's keyed folder)."""

    stage: str
    recipe: TrainCommon
    model: Path
    train: Path
    test: Path | None
    out: Path
    checkpoints: Path
    metrics: Path
    ref_model: Path | None = None
    """DPO's frozen reference (default: the model itself); None for SFT."""
    num_processes: int = 1
    fsdp: bool = False
    rule: str = ""
    """The rule that rebuilds the model (named in its manifest); default train_<stage>."""

    def __post_init__(self):
        if self.stage not in RECIPE_CLASSES:
            raise UserError(f"training job: stage {self.stage!r}; expected one of {', '.join(RECIPE_CLASSES)}")
        if type(self.recipe) is not RECIPE_CLASSES[self.stage]:
            raise UserError(f"training job: a {type(self.recipe).__name__} for stage {self.stage}; expected "
                            f"{RECIPE_CLASSES[self.stage].__name__}")
        if self.num_processes < 1:
            raise UserError(f"training job: num_processes {self.num_processes}; expected 1 or more")
        ref = self.ref_model or self.model if self.stage == "dpo" else None
        for name, value in {**{p: getattr(self, p) for p in PATHS}, "ref_model": ref}.items():
            object.__setattr__(self, name, None if value is None else Path(value))
        object.__setattr__(self, "rule", self.rule or f"train_{self.stage}")
        recipe = dataclasses.replace(self.recipe)  # the job's own: a caller's later change does not reach it
        if isinstance(recipe, DPORecipe) and recipe.precompute_ref_log_probs is None:  # read without a config
            recipe.precompute_ref_log_probs = precompute_ref_log_probs(recipe)
        object.__setattr__(self, "recipe", recipe)

    def replace(self, **changes) -> TrainJob:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_snakemake(cls, smk, stage: str) -> TrainJob:
        """The job of rule train_<stage> (or its grid variant): the recipe as the workflow resolved it when it was
        read (params.job_recipe, learned and operational keys: Snakemake records nothing of it, so a changed
        operational key reruns nothing, and a submission, which reads the workflow again, runs with the current
        value), checked against the learned settings Snakemake does record (params.recipe, the rerun trigger)."""
        i, o, p = smk.input, smk.output, smk.params
        recipe = p.job_recipe
        if learning_settings(as_dict(recipe)) != dict(p.recipe):
            raise UserError(f"rule {smk.rule}: its params disagree: the recipe it runs with (job_recipe) is not the "
                            f"one whose learned settings it records (recipe); a workflow error, not a config one")
        return cls(stage=stage, recipe=recipe, model=i.model, train=i.train, test=i.test, out=o.model,
                   checkpoints=p.checkpoints, metrics=o.metrics, num_processes=max(1, int(smk.resources.gpu)),
                   fsdp=int(getattr(smk.resources, "fsdp", 0)) > 0, rule=smk.rule)

    def as_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "recipe": as_dict(self.recipe),
                **{p: None if fields[p] is None else str(fields[p]) for p in PATHS}}

    def save(self, path) -> Path:
        write_json(path, self.as_dict())
        return Path(path)

    @classmethod
    def load(cls, path) -> TrainJob:
        """The job `save` wrote (the launcher, for its ranks); the recipe through the recipes' strict builder."""
        data = read_json(path)
        stage = data.get("stage")
        if stage not in RECIPE_CLASSES:
            raise UserError(f"{path}: stage {stage!r}; expected one of {', '.join(RECIPE_CLASSES)}")
        return cls(**{**data, "recipe": build(RECIPE_CLASSES[stage], data["recipe"], f"{path}: recipe")})
