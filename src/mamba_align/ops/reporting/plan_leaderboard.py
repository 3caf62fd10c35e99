"""The leaderboard jobs in the plan: GPU time per task from the rates measured on one H200 at the 2.8B shape.

Multiple-choice tasks: seconds per document of the whole task as the job runs it (lm-eval's task building,
tokenisation and scoring through the project's model class `mamba_align`, each shared context read once), measured
by bench/leaderboard_suite.py: the job's own function over the four tasks at their real sizes, shaped like the
real ones (docs/benchmarks.md §18, run Y: random bf16 weights, 26,073 documents, 8.8 minutes end to end). Tasks
not measured are estimated from a measured task of similar shape or, for generation, from the generation engine's
rate with every answer at its cap (an upper bound). Documents per task: the full test (or validation) splits
lm-eval scores.
"""

from __future__ import annotations

import math

# (documents, seconds per document on one H200 at 2.8B, source)
TASK_COST = {
    "arc_challenge": (1172, 0.0381, "measured (25-shot, ~1,070 tokens per request)"),
    "hellaswag": (10042, 0.0332, "measured (10-shot, ~900 tokens per request)"),
    "mmlu": (14042, 0.0076, "measured (5-shot, one-token choices, the few-shot prefix read once)"),
    "truthfulqa_mc2": (817, 0.0207, "measured (0-shot, 4-12 choices)"),
    "winogrande": (1267, 0.0207, "estimated as truthfulqa_mc2 (short contexts, 2 choices)"),
    "gsm8k": (1319, 256 / 14949 / 1.1 + 0.03, "upper bound: 256 generated tokens each at the engine's rate"),
    "ifeval": (541, 1280 / 14949 / 1.1, "upper bound: 1,280 generated tokens each at the engine's rate"),
}
LOAD_MINUTES = 5.0  # per job: 0.4 min measured with local data (run Y); the Hub datasets' cache (MMLU's 57) on top
H200_SPEED = 1.1  # plan.GPUS["H200"]["speed"]: these rates are H200 ones, the plan's speeds are H100-relative


def leaderboard_hours(tasks: list[str], size: float, gpu_speed: float, limit: int | None = None) -> float:
    """Hours of one eval_leaderboard job: the tasks' documents (at most `limit` each) at the measured rates,
    scaled by `size` (parameters / 2.77B) and the GPU's speed relative to an H100."""
    seconds = 0.0
    for task in tasks:
        docs, per_doc, _ = TASK_COST.get(task, (5000, 0.06, "unknown task: 5,000 documents assumed"))
        seconds += min(docs, limit or docs) * per_doc * H200_SPEED / gpu_speed * size
    return seconds / 3600 + LOAD_MINUTES / 60


def leaderboard_job(lb: dict | None, size: float, gpu_speed: float, plan: dict) -> tuple[float, int, str, int]:
    """(hours, minutes to ask for, note, jobs) of eval_leaderboard under eval.leaderboard `lb` and config.plan."""
    if not lb or not lb.get("stages") or not lb.get("tasks"):
        return 0.0, 0, "", 0
    hours = leaderboard_hours(lb["tasks"], size, gpu_speed, lb.get("limit"))
    minutes = math.ceil(hours * 60 * (1 + plan["safety_margin"]) + 10)
    note = ", ".join(lb["tasks"]) + (f" (unmeasured: {', '.join(unknown_tasks(lb['tasks']))})"
                                     if unknown_tasks(lb["tasks"]) else "")
    return hours, minutes, note, len(lb["stages"])


def unknown_tasks(tasks: list[str]) -> list[str]:
    return [t for t in tasks if t not in TASK_COST]


def owned_evals(ev: dict, owns: dict[str, bool]) -> dict:
    """The eval section as one experiment of a grid plans it: only the stages whose model it owns (`owns`: stage
    -> whether it is the first experiment with that model), for the judged benchmarks and the leaderboard alike,
    so that a model experiments share is evaluated once in the grid's plan."""
    out = {**ev, "stages": [s for s in ev["stages"] if owns[s]]}
    if ev.get("leaderboard"):
        out["leaderboard"] = {**ev["leaderboard"], "stages": [s for s in ev["leaderboard"].get("stages", ())
                                                              if owns[s]]}
    return out
