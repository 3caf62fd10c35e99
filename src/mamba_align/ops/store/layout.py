"""Where every output lives under the results folder: the one spelling of each path, which the rules, the steps,
`status`, the plan and the report all ask for.

`Results(root)` gives the paths under one results folder, grouped by what they hold (data, models, eval, logs,
plan and report). A rule's path with a wildcard is asked for with the wildcard in braces (`"{stage}"`,
`"{stagedir}"`, `"{key}"`, `"{home}"`): the methods only join strings. A grid's model folders ("homes",
experiments.py) are `home(stage, key)`, relative to the results folder.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("base", "sft", "dpo")
FINAL_STAGE = "dpo"
BENCHMARKS = ("mtbench", "alpacaeval")  # the judged chat benchmarks
LEADERBOARD = "leaderboard"  # the lm-eval tasks: results/eval/<stage>/leaderboard.json
TRAIN_DATA = {"train": "train.parquet", "test": "test.parquet", "stats": "stats.json"}  # a prepared data folder
MT_BENCH_DATA = {"questions": "question.jsonl", "judge_prompts": "judge_prompts.jsonl",
                 "reference": "reference_answer.jsonl"}
# a model's evaluation files (results/eval/<stage>/ or a grid home's eval/)
MT_BENCH_ANSWERS = "mt_bench_answers.jsonl"
MT_BENCH_JUDGMENTS = "mt_bench_judgments.jsonl"
MT_BENCH_JUDGE_CACHE = "mt_bench_judge_cache.jsonl"
ALPACA_EVAL_OUTPUTS = "alpaca_eval_outputs.json"
ALPACA_EVAL_CACHE = "alpaca_eval_cache"
# the report's files (results/report/; a grid's scores under results/report/experiments/, with a plot per axis)
REPORT = {"table": "scores.md", "html": "scores.html", "csv": "scores.csv", "json": "scores.json",
          "radar": "mt_bench_radar.png", "curves": "training_curves.png", "leaderboard": "leaderboard.json",
          "leaderboard_changes": "leaderboard_changes.png"}


def stage_dir(stage: str) -> str:
    """Prefix of a stage's eval summaries: '' for the final model (results/eval/mtbench.json), else 'sft/'."""
    return "" if stage == FINAL_STAGE else f"{stage}/"


def stage_of(stagedir: str) -> str:
    return stagedir.rstrip("/") or FINAL_STAGE


# where a grid's model folders of each stage lie, relative to results
GRID_HOMES = {"base": "shared/base", "sft": "shared/sft", "dpo": "experiments"}
# the grid rules' wildcards: a key of shared work (12 hex digits of a sha256), an experiment's name
KEY_PATTERN = "[0-9a-f]{12}"
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._=+-]*"


def home_pattern() -> str:
    """The regex of a grid's model folder (home(stage, key)): a key under shared/base and shared/sft, an
    experiment's name under experiments/."""
    return "|".join(f"{GRID_HOMES[s]}/{NAME_PATTERN if s == FINAL_STAGE else KEY_PATTERN}" for s in STAGES)


def plot_name(axis: str) -> str:
    """A grid report's plot of one swept axis."""
    return f"{axis}.png"


def home(stage: str, key: str) -> str:
    """A grid's model folder of `stage`, relative to results: shared/base/<key>, shared/sft/<key> (keyed by what
    the model learns from), experiments/<name> (a DPO model and everything after it, per experiment)."""
    return f"{GRID_HOMES[stage]}/{key}"


def data_home(stage: str, key: str | None = None) -> str:
    """A stage's prepared data folder, relative to results: data/<stage>, or a grid's shared/data/<stage>/<key>."""
    return f"data/{stage}" if key is None else f"shared/data/{stage}/{key}"


@dataclass(frozen=True)
class Results:
    """The paths under one results folder (`root`, the config's results_dir)."""

    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # data: the demo's inputs, prepared training data, benchmark data
    def demo(self) -> str:
        return self.path("demo")

    def train_data_dir(self, stage: str, key: str | None = None) -> str:
        return self.path(data_home(stage, key))

    def train_data(self, stage: str, key: str | None = None) -> dict[str, str]:
        """{train, test, stats} of a prepared data folder (data_home)."""
        return {k: self.path(data_home(stage, key), f) for k, f in TRAIN_DATA.items()}

    def mt_bench_data(self) -> dict[str, str]:
        return {k: self.path("data", "mt_bench", f) for k, f in MT_BENCH_DATA.items()}

    def alpaca_eval_data(self) -> str:
        return self.path("data", "alpaca_eval")

    def leaderboard_tasks(self) -> str:
        return self.path("data", "leaderboard", "tasks.json")

    def nltk_dir(self) -> str:
        return self.path("data", "leaderboard", "nltk_data")

    # models: the stage's model (a symlink into the keyed store), its metrics, the checkpoints folder
    def models_dir(self) -> str:
        return self.path("models")

    def model(self, stage: str) -> str:
        return self.path("models", stage)

    def base_verify(self) -> str:
        return self.path("models", "base.verify.json")

    def metrics(self, stage: str) -> str:
        return self.path("metrics", f"{stage}.json")

    def checkpoints(self) -> str:
        return self.path("checkpoints")

    # a grid's model folder (home): its model, training metrics or base model check, and eval/
    def home_model(self, home_dir: str) -> str:
        return self.path(home_dir, "model")

    def home_metrics(self, home_dir: str) -> str:
        return self.path(home_dir, "metrics.json")

    def home_verify(self, home_dir: str) -> str:
        return self.path(home_dir, "verify.json")

    # eval: a model's generations and judge caches, the scores
    def stage_eval_dir(self, stage: str) -> str:
        """results/eval/<stage>: a stage's generations and judge caches."""
        return self.path("eval", stage)

    def stage_eval(self, stage: str, name: str) -> str:
        return self.path("eval", stage, name)

    def home_eval_dir(self, home_dir: str) -> str:
        """<home>/eval: a grid model's generations, judge caches and scores."""
        return self.path(home_dir, "eval")

    def home_eval(self, home_dir: str, name: str) -> str:
        return self.path(home_dir, "eval", name)

    def home_summary(self, home_dir: str, bench: str) -> str:
        """A grid model's scores of a benchmark (BENCHMARKS, LEADERBOARD): <home>/eval/<bench>.json."""
        return self.home_eval(home_dir, f"{bench}.json")

    def scored(self, name: str, stagedir: str = "{stagedir}") -> str:
        """results/eval/<stagedir><name>: the scores and judgments of a stage (stage_dir: the final one at the
        top)."""
        return self.path("eval", f"{stagedir}{name}")

    def summary(self, bench: str, stagedir: str = "{stagedir}") -> str:
        """A benchmark's scores (BENCHMARKS, LEADERBOARD) of a stage: results/eval/<stagedir><bench>.json."""
        return self.scored(f"{bench}.json", stagedir)

    def eval_summary(self, stage: str, bench: str) -> str:
        return self.summary(bench, stage_dir(stage))

    # logs, benchmarks and provenance records, named by the job
    def log(self, *name: str) -> str:
        return self.path("logs", *name[:-1], f"{name[-1]}.log")

    def log_dir(self, *parts: str) -> str:
        return self.path("logs", *parts)

    def benchmark(self, *name: str) -> str:
        return self.path("benchmarks", *name[:-1], f"{name[-1]}.tsv")

    def provenance(self, name: str) -> str:
        return self.path("provenance", f"{name}.json")

    def unpinned(self) -> str:
        """results/provenance/unpinned.json: what the run reads at a branch instead of a commit, written once per run
        (provenance.write_run_unpinned); each job's record points at it."""
        return self.path("provenance", "unpinned.json")

    # plan and report
    def plan(self, suffix: str) -> str:
        """results/plan.json (the numbers), results/plan.txt (the table)."""
        return self.path(f"plan.{suffix}")

    def report(self, kind: str) -> str:
        """results/report/<file>: the report's file of `kind` (REPORT)."""
        return self.path("report", REPORT[kind])

    def experiments_report(self, kind: str) -> str:
        """results/report/experiments/<file>: a grid's scores table as `kind` (REPORT: table, html, csv, json)."""
        return self.path("report", "experiments", REPORT[kind])

    def experiments_plot(self, axis: str) -> str:
        return self.path("report", "experiments", plot_name(axis))


def checkpoint_dir(checkpoints: str, stage: str, key: str) -> str:
    """Checkpoints of one training run under the checkpoints folder, keyed by what it learns from (runs.run_key):
    another recipe, other data or another parent model never resumes an old run. Lives beside (not inside) the
    declared outputs, so Snakemake never deletes it after a failure."""
    return f"{checkpoints}/{stage}-{key}"


def stored_model_dir(model_link: str, key: str) -> str:
    """Where a trained model lives: results/models/sft-<key>/; results/models/sft is a symlink to it."""
    return f"{model_link}-{key}"


def tensorboard_dir(results: str, checkpoints: str) -> str:
    """TensorBoard event files of one training run (named like its checkpoint folder: one run per recipe).

    `tensorboard --logdir results/logs/tensorboard` shows every run."""
    return Results(results).log_dir("tensorboard", checkpoints.rstrip("/").rsplit("/", 1)[-1])
