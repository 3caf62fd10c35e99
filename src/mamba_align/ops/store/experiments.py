"""Experiments: the config's grid (or list) of recipes x learned settings x seeds x base models, expanded into
named experiments, and the keys that let experiments share work.

A config without `experiments` is one experiment in the classic layout (results/models/, results/eval/...);
nothing here is used for it. With experiments, each job's outputs live under a folder named by what it learns
from, so that Snakemake runs shared work once:

- base conversion per base model:          results/shared/base/<key>/      (key: the base_model settings)
- data preparation per (dataset, revision, tokenizer, template, length): results/shared/data/<stage>/<key>/
- SFT per distinct SFT settings:           results/shared/sft/<key>/       (key: base, data, learned settings)
- DPO and everything after it, per experiment: results/experiments/<name>/

A model's folder ("home") holds `model/` (the symlink runs.train_keyed points), `metrics.json` or
`verify.json`, and `eval/` with the generations, the judge caches and the scores.

The `seed` axis sets the DPO recipe's seed: SFT stays shared across seeds (set `sft: {seed: [...]}` as a grid
axis to vary SFT's too).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field

from mamba_align.ops.store import layout
from mamba_align.ops.store.provenance import model_key
from mamba_align.utils import UserError

STAGE_AXES = ("sft", "dpo")
NAME = re.compile(rf"^{layout.NAME_PATTERN}$")


def key_of(what) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_grid(config: dict) -> bool:
    ex = config.get("experiments") or {}
    grid = ex.get("grid") or {}
    return bool(ex.get("list") or any(grid.get(k) for k in ("base_model", "recipe", "seed"))
                or any(v for s in STAGE_AXES for v in (grid.get(s) or {}).values()))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _label(value) -> str:
    if isinstance(value, dict):
        value = value.get("source", "")
    s = str(value).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def _axis_label(axis: str) -> str:
    return axis.split(".", 1)[-1]  # dpo.beta -> beta


def _base_model(config: dict, value) -> dict:
    """A base_model axis value: a source (Hub id or folder) or a mapping of base_model keys, over the config's."""
    over = {"source": value} if isinstance(value, str) else dict(value or {})
    return _merge(config["base_model"], over)


@dataclass
class Experiment:
    name: str
    base_model: dict
    recipe: str
    recipe_overrides: dict  # {"sft": {...}, "dpo": {...}}
    axes: dict = field(default_factory=dict)  # {"dpo.beta": 0.05, "seed": 1}: what the report plots against

    def config(self, config: dict) -> dict:
        """The config as this experiment sees it (what recipes.config_recipe and the plan read)."""
        return {**config, "base_model": self.base_model, "recipe": self.recipe,
                "recipe_overrides": self.recipe_overrides, "experiments": {}}


def expand(config: dict) -> list[Experiment]:
    """The config's experiments: its `list`, then the product of its `grid` axes. [] without experiments."""
    ex = config.get("experiments") or {}
    base_over = config.get("recipe_overrides") or {}
    out: list[Experiment] = []
    for i, item in enumerate(ex.get("list") or []):
        over = {s: _merge(base_over.get(s) or {}, (item.get("recipe_overrides") or {}).get(s) or {})
                for s in STAGE_AXES}
        if item.get("seed") is not None:
            over["dpo"] = {**over["dpo"], "seed": item["seed"]}
        out.append(Experiment(item["name"], _base_model(config, item.get("base_model")),
                              item.get("recipe") or config["recipe"], over,
                              {k: item[k] for k in ("seed", "recipe") if item.get(k) is not None}))
    grid = ex.get("grid") or {}
    axes: list[tuple[str, list]] = []
    for k in ("base_model", "recipe"):
        if grid.get(k):
            axes.append((k, list(grid[k])))
    for stage in STAGE_AXES:
        for k, values in (grid.get(stage) or {}).items():
            axes.append((f"{stage}.{k}", list(values)))
    if grid.get("seed"):
        axes.append(("seed", list(grid["seed"])))
    for combo in itertools.product(*(v for _, v in axes)) if axes else ():
        point = dict(zip((a for a, _ in axes), combo))
        over = {s: dict(base_over.get(s) or {}) for s in STAGE_AXES}
        for axis, value in point.items():
            if axis == "seed":
                over["dpo"]["seed"] = value
            elif "." in axis:
                stage, k = axis.split(".", 1)
                over[stage][k] = value
        name = "-".join(_label(v) if a in ("base_model", "recipe") else f"{_axis_label(a)}{_label(v)}"
                        for a, v in point.items())
        plot_axes = {a: (_label(v) if a == "base_model" else v) for a, v in point.items()}
        out.append(Experiment(name, _base_model(config, point.get("base_model")),
                              point.get("recipe") or config["recipe"], over, plot_axes))
    names = [e.name for e in out]
    for e in out:
        if not NAME.match(e.name):
            raise UserError(f"experiments: name {e.name!r} is not usable in a path (letters, digits, . _ = + -)")
        if names.count(e.name) > 1:
            raise UserError(f"experiments: two experiments are named {e.name!r}; names must be unique")
    return out


@dataclass
class Resolved:
    """An experiment with its recipes loaded and the keys of the work it shares."""
    exp: Experiment
    sft: dict
    dpo: dict
    base_key: str
    data_keys: dict  # {"sft": key, "dpo": key}
    sft_key: str

    @property
    def name(self) -> str:
        return self.exp.name


def data_settings(stage: str, recipe: dict) -> dict:
    if stage == "sft":
        return {"dataset": recipe["dataset"], "max_seq_length": recipe["max_seq_length"],
                "packing": recipe["packing"]}
    return {"dataset": recipe["dataset"], "max_length": recipe["max_length"],
            "max_prompt_length": recipe["max_prompt_length"]}


def resolve(exp: Experiment, sft: dict, dpo: dict, learning_settings) -> Resolved:
    b = exp.base_model
    base_key = key_of(b)
    tok = {k: b.get(k) for k in ("tokenizer", "tokenizer_revision", "chat_template")}
    data = {s: key_of({**tok, **data_settings(s, r)}) for s, r in (("sft", sft), ("dpo", dpo))}
    sft_key = key_of({"base": base_key, "data": data["sft"], "sft": learning_settings(sft)})
    return Resolved(exp, sft, dpo, base_key, data, sft_key)


class Grid:
    """The resolved experiments and where everything of theirs lives under `results`."""

    def __init__(self, results: str, resolved: list[Resolved], eval_stages, leaderboard_stages=()):
        """eval_stages: the stages judged on MT-Bench and AlpacaEval (eval.stages); leaderboard_stages: those
        scored on the leaderboard tasks (eval.leaderboard.stages; none: no leaderboard jobs)."""
        self.R, self.exps, self.eval_stages = results, resolved, list(eval_stages)
        self.paths = layout.Results(results)
        self.leaderboard_stages = list(leaderboard_stages)
        self.by_name = {r.name: r for r in resolved}
        self.first_base, self.first_data, self.first_sft = {}, {}, {}
        for r in resolved:
            self.first_base.setdefault(r.base_key, r)
            self.first_sft.setdefault(r.sft_key, r)
            for s, k in r.data_keys.items():
                self.first_data.setdefault((s, k), r)

    def to_dict(self) -> dict:
        """Plain data (a rule's params, which Snakemake compares between runs); from_dict rebuilds the grid."""
        return {"results": self.R, "eval_stages": self.eval_stages, "leaderboard_stages": self.leaderboard_stages,
                "experiments": [asdict(r) for r in self.exps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(d["results"], [Resolved(**{**r, "exp": Experiment(**r["exp"])}) for r in d["experiments"]],
                   d["eval_stages"], d.get("leaderboard_stages", ()))

    # folders
    def home(self, r: Resolved, stage: str) -> str:
        """The folder of `r`'s model of `stage`, relative to results (layout.home)."""
        return layout.home(stage, {"base": r.base_key, "sft": r.sft_key, "dpo": r.name}[stage])

    def data_dir(self, r: Resolved, stage: str) -> str:
        return self.paths.train_data_dir(stage, r.data_keys[stage])

    def data_files(self, r: Resolved, stage: str) -> dict[str, str]:
        return self.paths.train_data(stage, r.data_keys[stage])

    def model(self, r: Resolved, stage: str) -> str:
        return self.paths.home_model(self.home(r, stage))

    def base_verify(self, r: Resolved) -> str:
        return self.paths.home_verify(self.home(r, "base"))

    def eval_summary(self, r: Resolved, stage: str, bench: str) -> str:
        return self.paths.home_summary(self.home(r, stage), bench)

    # reverse look-ups from wildcards
    def owner(self, home: str) -> tuple[Resolved, str]:
        """(an experiment that has the model of `home`, its stage)."""
        kind, key = home.split("/")[-2:]
        if kind == "base" and key in self.first_base:
            return self.first_base[key], "base"
        if kind == "sft" and key in self.first_sft:
            return self.first_sft[key], "sft"
        if home.startswith(f"{layout.GRID_HOMES['dpo']}/") and key in self.by_name:
            return self.by_name[key], "dpo"
        raise UserError(f"no experiment of the config has the model folder {self.R}/{home}")

    def plan_owner(self, rule: str, wildcards) -> Resolved:
        """The experiment whose plan sizes a grid job of `rule`: by its SFT key (train_sft), its model folder
        (evaluations: the first experiment with that model) or its name (train_dpo)."""
        if rule == "train_sft":
            return self.first_sft[wildcards.key]
        return self.owner(wildcards.home)[0] if hasattr(wildcards, "home") else self.by_name[wildcards.name]

    def data_owner(self, stage: str, key: str) -> Resolved:
        try:
            return self.first_data[(stage, key)]
        except KeyError:
            raise UserError(f"no experiment of the config prepares {self.paths.train_data_dir(stage, key)}") from None

    def learned_by(self, home: str, learning_settings) -> dict:
        """What the model of `home` learned from (a generation rule's rerun trigger)."""
        r, stage = self.owner(home)
        chain = {"base": r.exp.base_model}
        if stage in ("sft", "dpo"):
            chain["sft"] = learning_settings(r.sft)
        if stage == "dpo":
            chain["dpo"] = learning_settings(r.dpo)
        return chain

    # targets
    def eval_targets(self, r: Resolved | None = None) -> list[str]:
        """The judged scores of each eval stage, then the leaderboard's of each leaderboard stage: a model that
        experiments share once."""
        out = []
        for x in ([r] if r else self.exps):
            out += [self.eval_summary(x, s, b) for s in self.eval_stages for b in layout.BENCHMARKS]
            out += [self.eval_summary(x, s, layout.LEADERBOARD) for s in self.leaderboard_stages]
        return list(dict.fromkeys(out))

    def metrics(self, r: Resolved) -> dict[str, str]:
        return {s: self.paths.home_metrics(self.home(r, s)) for s in ("sft", "dpo")}

    def swept_axes(self) -> list[str]:
        """Axes with more than one value, seeds excepted (seeds are averaged): one plot each."""
        axes: dict[str, set] = {}
        for r in self.exps:
            for a, v in r.exp.axes.items():
                axes.setdefault(a, set()).add(json.dumps(v, default=str))
        return [a for a, vs in axes.items() if len(vs) > 1 and a != "seed"]

    def report_entries(self, learning_settings=None) -> list[dict]:
        """What the report reads per experiment: its axes, the eval summaries of each stage and, with a
        leaderboard, each leaderboard stage's score with its model folder and the key of the model the config
        describes there (with `learning_settings`; provenance.model_key), so that a score of another model is
        shown as missing."""
        def leaderboard(r: Resolved, s: str) -> dict:
            home = self.home(r, s)
            key = model_key(self.learned_by(home, learning_settings)) if learning_settings else None
            return {"path": self.eval_summary(r, s, layout.LEADERBOARD), "model": self.model(r, s), "model_key": key}

        entries = [{"name": r.name, "axes": r.exp.axes, "recipe": r.exp.recipe,
                    "base_model": r.exp.base_model["source"],
                    "evals": {s: {b: self.eval_summary(r, s, b) for b in layout.BENCHMARKS} for s in self.eval_stages},
                    "metrics": self.metrics(r)} for r in self.exps]
        if self.leaderboard_stages:  # absent without: the params Snakemake recorded for such grids stay the same
            for e, r in zip(entries, self.exps):
                e["leaderboard"] = {s: leaderboard(r, s) for s in self.leaderboard_stages}
        return entries
