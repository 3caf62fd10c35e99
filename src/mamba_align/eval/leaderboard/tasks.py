"""The leaderboard tasks as the config names them, and lm-eval's results turned into the scores we report.

`eval.leaderboard.settings.<task>` says how a task is run and scored (shots, metric, filter, how a group's subtasks
are combined, chat template); `eval.leaderboard.tasks` says which run. Both live in config (the Open LLM
Leaderboard v1's settings are written out once there): this module only reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mamba_align.utils import UserError

AGGREGATES = ("subtask_mean",)


@dataclass(frozen=True)
class TaskSpec:
    """One task as the config runs it (eval.leaderboard.settings.<task>)."""

    task: str
    num_fewshot: int
    metric: str
    filter: str = "none"
    aggregate: str | None = None  # subtask_mean: the unweighted mean over a group's tasks (MMLU's 57 subjects)
    chat_template: bool = False
    also: tuple[str, ...] = field(default_factory=tuple)  # further metrics recorded beside the score

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"

    def as_dict(self) -> dict:
        return {"task": self.task, "num_fewshot": self.num_fewshot, "metric": self.metric, "filter": self.filter,
                "aggregate": self.aggregate, "chat_template": self.chat_template, "also": list(self.also)}


def task_specs(leaderboard: dict) -> list[TaskSpec]:
    """The specs of the tasks `eval.leaderboard.tasks` lists, from `eval.leaderboard.settings`."""
    settings = leaderboard.get("settings") or {}
    specs = []
    for name in leaderboard.get("tasks") or []:
        if name not in settings:
            raise UserError(f"eval.leaderboard.tasks lists {name!r}, but eval.leaderboard.settings has no entry for it "
                            f"(it has: {', '.join(sorted(settings)) or 'none'}): add its num_fewshot and metric")
        s = dict(settings[name])
        if s.get("aggregate") not in (None, *AGGREGATES):
            raise UserError(f"eval.leaderboard.settings.{name}.aggregate: {s['aggregate']!r} is not one of "
                            f"{', '.join(AGGREGATES)}")
        specs.append(TaskSpec(task=name, num_fewshot=int(s["num_fewshot"]), metric=s["metric"],
                              filter=s.get("filter", "none"), aggregate=s.get("aggregate"),
                              chat_template=bool(s.get("chat_template", False)), also=tuple(s.get("also", ()))))
    return specs


def check_against_task(spec: TaskSpec, metrics: set[str], filters: set[str]) -> None:
    """A configured metric or filter that lm-eval's task does not produce: one line naming the setting."""
    for m in (spec.metric, *spec.also):
        if m not in metrics:
            raise UserError(f"eval.leaderboard.settings.{spec.task}: metric {m!r} is not one that lm-eval's task "
                            f"{spec.task} computes (it has: {', '.join(sorted(metrics))})")
    if spec.filter not in filters:
        raise UserError(f"eval.leaderboard.settings.{spec.task}.filter: {spec.filter!r} is not a filter of lm-eval's "
                        f"task {spec.task} (it has: {', '.join(sorted(filters))})")


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for c in children for leaf in _leaves(c, group_subtasks)]


def _metric(row: dict, spec: TaskSpec, metric: str, where: str) -> tuple[float, float | None]:
    key = f"{metric},{spec.filter}"
    if key not in row:
        raise UserError(f"lm-eval's results for {where} have no {key!r} (they have: "
                        f"{', '.join(sorted(k for k in row if ',' in k))})")
    value = float(row[key])
    se = row.get(f"{metric}_stderr,{spec.filter}")
    se = float(se) if isinstance(se, (int, float)) and math.isfinite(float(se)) else None
    if not math.isfinite(value):
        raise UserError(f"lm-eval's {key} for {where} is {value}: not a score")
    return value, se


def score(spec: TaskSpec, results: dict) -> dict:
    """The record of one task from simple_evaluate's output: score, stderr, n, version, shots, and per-subtask
    scores for a group. A group scored as `subtask_mean` is the unweighted mean of its leaf tasks (the Open LLM
    Leaderboard v1's MMLU: the mean of 57 subject accuracies), its stderr from the subjects' stderrs."""
    rows = {**results.get("results", {}), **results.get("groups", {})}
    groups = results.get("group_subtasks", {})
    n_samples = results.get("n-samples", {})
    leaves = _leaves(spec.task, groups)
    record = {**spec.as_dict(), "n": sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves)}
    versions = results.get("versions", {})
    record["version"] = versions.get(spec.task)
    if spec.aggregate == "subtask_mean":
        if len(leaves) < 2:
            raise UserError(f"eval.leaderboard.settings.{spec.task}.aggregate: subtask_mean, but lm-eval's "
                            f"{spec.task} is not a group of tasks")
        subs = {t: _metric(rows[t], spec, spec.metric, t) for t in leaves}
        record["score"] = sum(v for v, _ in subs.values()) / len(subs)
        ses = [se for _, se in subs.values()]
        record["stderr"] = (math.sqrt(sum(se * se for se in ses)) / len(ses)) if all(
            se is not None for se in ses) else None
        record["subtasks"] = {t: {"score": v, "stderr": se, "version": versions.get(t),
                                  "n": int(n_samples.get(t, {}).get("effective", 0))}
                              for t, (v, se) in sorted(subs.items())}
    else:
        record["score"], record["stderr"] = _metric(rows[spec.task], spec, spec.metric, spec.task)
    record["also"] = {m: dict(zip(("score", "stderr"), _metric(rows[spec.task], spec, m, spec.task)))
                      for m in spec.also}
    return record
