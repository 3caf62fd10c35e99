"""Plan before you spend: GPU-hours, wall time and memory per job, judge requests and cost.

Estimates come from token counts (the prepared data's stats.json, else the dataset's published size),
the recipe, the GPU type and count of each job (from the active profile's resources), and measured
throughput (docs/benchmarks.md). The same numbers size each job's `runtime` resource.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.ops.jobenv.gpu_choice import format_gpu_counts, with_gpu_counts
from mamba_align.ops.reporting.plan_leaderboard import leaderboard_job, owned_evals
from mamba_align.ops.store.layout import MT_BENCH_DATA, TRAIN_DATA, Results
from mamba_align.ops.store.provenance import unpinned
from mamba_align.train.recipes import precompute_ref_log_probs
from mamba_align.train.sizes import REF_PARAMS, disk_gb, memory_fix, params_from_config, stage_memory_gib
from mamba_align.utils import UserError, read_json, write_json

# Training tokens/s per GPU at the 2.8B shape through the pipeline's own train_sft / train_dpo (TRL, fp32 params
# + bf16 autocast, mamba_ssm kernels + the fast path, fused AdamW), one H100, median step, and whether gradient
# checkpointing was on (docs/benchmarks.md section 1, run L): SFT 4 x 2,048 packed tokens per step; DPO 4 pairs
# at max_length 1,024, chosen + rejected tokens, RMSprop, the reference model's forward every step (or
# precomputed once before training).
H100_TRAIN_TOKENS_PER_S_2P8B = {"sft": (15620.0, False), "dpo": (6820.0, True), "dpo_precomputed_ref": (9435.0, True)}
# Gradient checkpointing's cost: fast path at batch 8 with it vs batch 4 without (docs/benchmarks.md section 2, run 0).
CHECKPOINTING_SPEED = 0.82
# Batched CUDA-graph decoding at the 2.8B shape, 128 slots (docs/benchmarks.md section 4).
H100_GENERATE_TOKENS_PER_S_2P8B = 14949.0
# Relative speed and memory per GPU type. A100 figures are derived from H100 ones by the ratio of dense
# bf16 peak (312 / 989 TFLOP/s is 0.32; memory-bound kernels fare better, so 0.45 is used) until measured.
GPUS = {
    "H100-80GB": {"speed": 1.0, "mem_gib": 80},
    "H200": {"speed": 1.1, "mem_gib": 141},
    "A100-80GB": {"speed": 0.45, "mem_gib": 80},
    "A100-40GB": {"speed": 0.45, "mem_gib": 40},
    "cpu": {"speed": 0.0005, "mem_gib": 16},
}
# Published sizes for datasets not yet prepared: rows and mean tokens per row (GPT-NeoX tokenizer, estimated
# from the datasets' character counts at ~4 characters per token).
PUBLISHED = {
    ("HuggingFaceH4/ultrachat_200k", "train_sft"): (207_865, 1_400),
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): (61_135, 520),
    ("HuggingFaceH4/deita-10k-v0-sft", "train_sft"): (9_500, 2_000),
    ("argilla/dpo-mix-7k", "train"): (6_750, 700),
}
# The state-spaces Mamba-1 family (mamba_ssm and -hf checkpoints; the published model cards' sizes).
KNOWN_PARAMS = {"state-spaces/mamba-2.8b-slimpj": 2.77e9} | {
    f"state-spaces/mamba-{size}{hf}": n for size, n in (("2.8b", 2.77e9), ("1.4b", 1.37e9), ("790m", 7.93e8),
                                                       ("370m", 3.72e8), ("130m", 1.29e8)) for hf in ("", "-hf")}
# Per-GPU tokens/s on 2 GPUs (DDP, one host) over 1 GPU, the recipes' per-device batch and accumulation
# (docs/benchmarks.md section 8, runs N/O on 2 x H200): SFT 14,139 / 14,996; DPO 4,856 / 5,378.
MULTI_GPU_EFFICIENCY = {"sft": 0.943, "dpo": 0.903}
# Judge: requests per benchmark and mean tokens per request (prompt, completion), from FastChat's and
# alpaca_eval's prompts with answers of ~300 tokens.
JUDGE_TOKENS = {"mt_bench": (1_300, 250), "alpaca_eval_gpt4": (1_500, 60),
                "weighted_alpaca_eval_gpt4_turbo": (1_500, 1)}
MT_BENCH_TURNS, ALPACA_EVAL_PROMPTS = 160, 805


@dataclass
class JobPlan:
    rule: str
    gpus: int
    gpu_type: str
    hours: float
    gpu_hours: float
    peak_mem_gib: float | None = None
    disk_gb: float | None = None
    runtime_min: int = 0
    resubmissions: int = 0
    note: str = ""


def sft_tokens(recipe: dict, stats: dict | None) -> tuple[float, str]:
    ds = recipe["dataset"]
    if stats and "train" in stats:
        tokens, source = stats["train"]["tokens"], "prepared data (stats.json)"
    else:
        rows, per_row = _published(ds)
        rows = min(rows, ds.get("max_train_samples") or rows)
        tokens, source = rows * per_row, "published dataset size"
    if recipe.get("packing"):  # wrapped packing: every row is max_seq_length tokens
        tokens = math.ceil(tokens / recipe["max_seq_length"]) * recipe["max_seq_length"]
    return tokens * recipe["num_train_epochs"], source


def dpo_tokens(recipe: dict, stats: dict | None) -> tuple[float, str]:
    """Token-equivalents of policy forward+backward (chosen and rejected sequences, every epoch), plus the pass
    that precomputes the reference log-probs where the run does (make_plan resolves the setting)."""
    ds = recipe["dataset"]
    if stats and "train" in stats and "tokens" in stats["train"]:
        pairs, source = stats["train"]["rows_out"], "prepared data"
        per_seq = stats["train"]["tokens"] / pairs
    else:
        pairs, per_seq = _published(ds)
        pairs = min(pairs, ds.get("max_train_samples") or pairs)
        source = "published dataset size"
    per_seq = min(per_seq, recipe["max_length"])
    policy = 2 * pairs * per_seq * recipe["num_train_epochs"]
    # the reference forward every step is inside the measured DPO rate; precomputed, it is one forward pass
    # over the data before training (~1/3 of a training step's cost per token)
    ref = 2 * pairs * per_seq / 3 if recipe.get("precompute_ref_log_probs") else 0.0
    return policy + ref, source


def _published(ds: dict) -> tuple[int, int]:
    """(rows, mean tokens per row) of a train split not yet prepared: counted from local files
    (~4 characters per token), else the table of published sizes."""
    if Path(ds["source"]).is_dir():
        return _count_local(Path(ds["source"]), ds["train_split"])
    key = (ds["source"], ds["train_split"])
    if key not in PUBLISHED:
        raise UserError(f"no token count for dataset {key[0]} split {key[1]}: prepare the data first "
                        f"(snakemake results/data/...) so the plan reads its stats.json")
    return PUBLISHED[key]


def _count_local(folder: Path, split: str) -> tuple[int, int]:
    import pandas as pd

    files = [folder / f"{split}.{ext}" for ext in ("parquet", "jsonl", "json")]
    path = next((f for f in files if f.exists()), None)
    if path is None:
        raise UserError(f"dataset folder {folder} has no {split}.parquet / .jsonl / .json")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=path.suffix == ".jsonl")
    col = "messages" if "messages" in df.columns else "chosen"
    chars = sum(len(m["content"]) for conv in df[col] for m in conv)
    return len(df), max(1, round(chars / 4 / max(1, len(df))))


def train_throughput(params: float, gpu_type: str, stage: str = "sft", checkpointing: bool = False) -> float:
    """Tokens/s per GPU; stage is sft, dpo or dpo_precomputed_ref."""
    rate, measured_with_ckpt = H100_TRAIN_TOKENS_PER_S_2P8B[stage]
    if checkpointing != measured_with_ckpt:
        rate = rate * CHECKPOINTING_SPEED if checkpointing else rate / CHECKPOINTING_SPEED
    return rate * REF_PARAMS / params * _gpu(gpu_type)["speed"]


def _gpu(gpu_type: str) -> dict:
    if gpu_type not in GPUS:
        raise UserError(f"unknown GPU type {gpu_type!r}; known: {', '.join(GPUS)}")
    return GPUS[gpu_type]


def plan_job(rule: str, tokens: float, params: float, gpus: int, gpu_type: str, margin: float,
             max_job_minutes: int, overhead_min: float = 10.0, efficiency: float = MULTI_GPU_EFFICIENCY["sft"],
             per_gpu_speed: float | None = None) -> JobPlan:
    per_gpu = per_gpu_speed if per_gpu_speed is not None else train_throughput(params, gpu_type)
    speed = per_gpu * gpus * (efficiency if gpus > 1 else 1.0)
    hours = tokens / speed / 3600
    runtime = math.ceil(hours * 60 * (1 + margin) + overhead_min)
    jp = JobPlan(rule, gpus, gpu_type, hours, hours * gpus)
    if runtime > max_job_minutes:
        jp.resubmissions = math.ceil(runtime / max_job_minutes) - 1
        jp.note = (f"longer than the {max_job_minutes}-minute job limit: runs as {jp.resubmissions + 1} jobs, "
                   f"each resuming from the last checkpoint (needs --retries >= {jp.resubmissions})")
        runtime = max_job_minutes
    jp.runtime_min = runtime
    return jp


def generation_hours(params: float, gpu_type: str, mt_bench_tokens: int, alpaca_tokens: int) -> dict:
    speed = H100_GENERATE_TOKENS_PER_S_2P8B * REF_PARAMS / params * _gpu(gpu_type)["speed"]
    return {"generate_mt_bench": MT_BENCH_TURNS * mt_bench_tokens / speed / 3600,
            "generate_alpaca_eval": ALPACA_EVAL_PROMPTS * alpaca_tokens / speed / 3600}


def judge_prices(cfg: dict, judge: JudgeSettings | None = None) -> tuple[float, float] | None:
    """USD per million (prompt, completion) tokens of the judge (None for a local judge, which costs nothing);
    `judge` the config's JudgeSettings, built from `cfg` when not given."""
    if (judge or JudgeSettings.from_config(cfg)).backend == "local":
        return None
    return cfg["plan"]["judge_price_per_1m_input"], cfg["plan"]["judge_price_per_1m_output"]


def judge_cost(cfg: dict, n_stages: int, judge: JudgeSettings | None = None) -> dict:
    """Requests, tokens and dollars per benchmark; question counts from local data folders when set.
    A local judge costs nothing."""
    judge = judge or JudgeSettings.from_config(cfg)
    ev, turns, prompts = cfg["eval"], MT_BENCH_TURNS, ALPACA_EVAL_PROMPTS
    if (ev["mt_bench"].get("local_dir")
            and (q := Path(ev["mt_bench"]["local_dir"]) / MT_BENCH_DATA["questions"]).exists()):
        turns = sum(len(json.loads(line)["turns"]) for line in q.read_text().splitlines() if line.strip())
    if (ev["alpaca_eval"].get("local_dir")
            and (a := Path(ev["alpaca_eval"]["local_dir"]) / "alpaca_eval.json").exists()):
        prompts = len(json.loads(a.read_text()))
    price = judge_prices(cfg, judge) or (0.0, 0.0)
    rows = {}
    items = [("mt_bench", turns * judge.repeats)]
    items += [(a, prompts) for a in ev["alpaca_eval"]["annotators"]]
    for name, n in items:
        tin, tout = JUDGE_TOKENS.get(name, (1_500, 100))
        n *= n_stages
        cost = n * (tin * price[0] + tout * price[1]) / 1e6
        rows[name] = {"requests": n, "input_tokens": n * tin, "output_tokens": n * tout, "usd": round(cost, 2)}
    return rows


def is_configured(recorded: dict, source: str, revision: str | None) -> bool:
    """Whether what was recorded when a model or dataset was prepared (its verify.json / stats.json: `source`,
    `revision`) is the configured one. A local folder's revision is ignored (the config schema says so); a Hub
    revision matches by name or by the commit it resolved to."""
    rec = recorded.get("source")
    if rec is None:
        return False
    if str(rec) != str(source) and not (Path(rec).is_dir() and Path(rec).resolve() == Path(source).resolve()):
        return False
    if Path(source).is_dir():
        return True
    return revision in (recorded.get("revision"), recorded.get("resolved_commit"), recorded.get("resolved_revision"))


def _read_recorded(path: Path) -> dict:
    try:
        recorded = read_json(path)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it and prepare again") from None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(recorded).__name__}; delete it and prepare again")
    return recorded


def _other_than_configured(what: str, recorded: dict, source: str, revision: str | None, planned_from: str) -> str:
    rec = recorded.get("source", "of unrecorded source")
    if str(rec) == str(source):  # the revision differs
        rec, source = f"{rec}@{recorded.get('revision')}", f"{source}@{revision}"
    return f"{what} is {rec}, not the configured {source}: planned from the {planned_from}"


def base_params(cfg: dict, results: str, verify: str | Path | None = None, notes: list[str] | None = None) -> float:
    """The base model's parameter count: recorded when it was prepared if that is the configured model (a demo
    run leaves its tiny one in results/), else from the configured source. Why a recorded one was passed over
    is appended to `notes`."""
    verify = Path(verify if verify else Results(str(results)).base_verify())
    src, revision = cfg["base_model"]["source"], cfg["base_model"].get("revision")
    if verify.exists():
        recorded = _read_recorded(verify)
        if is_configured(recorded, src, revision):
            return float(recorded["n_params"])
        model = (str(verify)[:-len(".verify.json")] if verify.name.endswith(".verify.json")
                 else str(verify.parent / "model"))
        if notes is not None:
            notes.append(_other_than_configured(model, recorded, src, revision, "configured model"))
    if src in KNOWN_PARAMS:
        return KNOWN_PARAMS[src]
    if (Path(src) / "config.json").exists():
        return params_from_config(read_json(Path(src) / "config.json"))
    raise UserError(f"unknown size of base model {src} (not a known Hub model, no {src}/config.json): prepare it "
                    f"first (snakemake {verify}; for the demo, snakemake --configfile config/demo.yaml "
                    f"results/plan.json builds its inputs and plans)")


def prepared_stats(data_dir: str | Path, recipe: dict, notes: list[str] | None = None) -> dict | None:
    """The prepared data's stats.json if it was prepared from the recipe's dataset, else None (planned from the
    dataset's size); why it was passed over is appended to `notes`."""
    f = Path(data_dir) / TRAIN_DATA["stats"]
    if not f.exists():
        return None
    stats, ds = _read_recorded(f), recipe["dataset"]
    if is_configured(stats, ds["source"], ds.get("revision")):
        return stats
    if notes is not None:
        notes.append(_other_than_configured(str(data_dir), stats, ds["source"], ds.get("revision"),
                                            "configured dataset"))
    return None


def make_plan(cfg: dict, sft: dict, dpo: dict, gpus: dict[str, int], gpu_type: str, results: str,
              verify: str | None = None, data_dirs: dict | None = None, train_sft: bool = True) -> dict:
    """gpus: GPUs per rule (from the active profile's resources). An experiment of a grid passes where its
    base model's verify.json and its data folders are, and train_sft=False when another experiment's plan
    holds the SFT run they share."""
    p, notes = cfg["plan"], []
    dpo = {**dpo, "precompute_ref_log_probs": precompute_ref_log_probs(dpo, cfg)}  # unset: the config's setting
    params = base_params(cfg, results, verify, notes)
    data_dirs = data_dirs or {s: Path(Results(str(results)).train_data_dir(s)) for s in ("sft", "dpo")}
    stats = {s: prepared_stats(data_dirs[s], recipe, notes) for s, recipe in (("sft", sft), ("dpo", dpo))}
    jobs, sources, train_speeds = [], {}, {}
    stages = [("train_sft", sft_tokens(sft, stats["sft"]), sft)] if train_sft else []
    for rule, (tokens, source), recipe in stages + [("train_dpo", dpo_tokens(dpo, stats["dpo"]), dpo)]:
        n = max(1, gpus.get(rule, 1))
        stage = "sft" if rule == "train_sft" else \
            "dpo_precomputed_ref" if recipe.get("precompute_ref_log_probs") else "dpo"
        per_gpu = train_throughput(params, gpu_type, stage, recipe["gradient_checkpointing"])
        jp = plan_job(rule, tokens, params, n, gpu_type, p["safety_margin"], p["max_job_minutes"],
                      efficiency=MULTI_GPU_EFFICIENCY[stage[:3]], per_gpu_speed=per_gpu)
        jp.disk_gb = round(disk_gb(params, recipe), 1)
        jp.peak_mem_gib = round(stage_memory_gib(params, recipe, stage[:3]), 1)
        fix = memory_fix(params, recipe, stage[:3], n, _gpu(gpu_type)["mem_gib"])
        jp.note = f"{jp.note} DOES NOT FIT: {fix}".strip() if fix else jp.note
        jobs.append(with_gpu_counts(jp, recipe.get("global_batch_size", 0), MULTI_GPU_EFFICIENCY[stage[:3]]))
        train_speeds[rule], sources[rule] = round(per_gpu), {"tokens": tokens, "from": source}
    ev = cfg["eval"]
    for rule, hours in generation_hours(params, gpu_type, ev["mt_bench"]["max_new_tokens"],
                                       ev["alpaca_eval"]["max_new_tokens"]).items():
        per_stage = JobPlan(rule, 1, gpu_type, hours, hours,
                            runtime_min=math.ceil(hours * 60 * (1 + p["safety_margin"]) + 10),
                            note="upper bound: every answer at max_new_tokens")
        jobs += [per_stage] * len(ev["stages"])
    h, minutes, note, n = leaderboard_job(ev.get("leaderboard"), params / REF_PARAMS, _gpu(gpu_type)["speed"], p)
    jobs += [JobPlan("eval_leaderboard", 1, gpu_type, h, h, runtime_min=minutes, note=note)] * n
    judge = judge_cost(cfg, len(ev["stages"]))
    return {
        "gpu_type": gpu_type,
        "base_params": params,
        # results prepared for another model or dataset than the configured ones (a demo run's), not used
        "notes": notes,
        "unpinned": unpinned(cfg, sft, dpo),
        "assumptions": {
            "train_tokens_per_s_per_gpu": train_speeds,
            "gpu_speed_vs_h100": _gpu(gpu_type)["speed"],
            "safety_margin": p["safety_margin"],
            "max_job_minutes": p["max_job_minutes"],
            "multi_gpu_efficiency": MULTI_GPU_EFFICIENCY,
            "token_sources": sources,
        },
        "jobs": [vars(j) | {"hours": round(j.hours, 2), "gpu_hours": round(j.gpu_hours, 2)} for j in jobs],
        "total_gpu_hours": round(sum(j.gpu_hours for j in jobs), 1),
        "judge": judge,
        "judge_usd": round(sum(r["usd"] for r in judge.values()), 2),
    }


def make_grid_plan(cfg: dict, grid, gpus: dict[str, int], gpu_type: str) -> dict:
    """One plan per experiment of `grid` (experiments.Grid) and their sums. A job that experiments share (the
    SFT run and the SFT and base models' evaluations, the leaderboard's too) is in the plan of the first experiment
    that needs it only, so the totals are the sums of the experiments' own plans and count every job once."""
    plans, seen_sft = {}, set()
    for r in grid.exps:
        owns_sft = r.sft_key not in seen_sft
        seen_sft.add(r.sft_key)
        owns = {"base": grid.first_base[r.base_key] is r, "sft": owns_sft, "dpo": True}
        ecfg = r.exp.config(cfg) | {"eval": owned_evals(cfg["eval"], owns)}
        plans[r.name] = make_plan(ecfg, r.sft, r.dpo, gpus, gpu_type, grid.R,
                                  verify=f"{grid.R}/{grid.home(r, 'base')}/verify.json",
                                  data_dirs={s: grid.data_dir(r, s) for s in ("sft", "dpo")}, train_sft=owns_sft)
        plans[r.name]["shares_sft_with"] = None if owns_sft else grid.first_sft[r.sft_key].name
    return {"gpu_type": gpu_type, "experiments": plans,
            "total_gpu_hours": round(sum(p["total_gpu_hours"] for p in plans.values()), 1),
            "judge_usd": round(sum(p["judge_usd"] for p in plans.values()), 2)}


def format_grid_plan(plan: dict) -> str:
    lines = [f"Plan of {len(plan['experiments'])} experiments on {plan['gpu_type']}; a job that experiments "
             "share is planned once, in the first one that needs it.", "",
             f"{'experiment':<40}{'params':>8}{'GPU-h':>9}{'judge USD':>11}  note"]
    for name, p in plan["experiments"].items():
        note = f"SFT shared with {p['shares_sft_with']}" if p.get("shares_sft_with") else ""
        lines.append(f"{name:<40}{_size(p['base_params']):>8}{p['total_gpu_hours']:>9.1f}"
                     f"{p['judge_usd']:>11.2f}  {note}")
    lines += ["", f"total GPU-hours: {plan['total_gpu_hours']}", f"judge total: ${plan['judge_usd']}"]
    for name, p in plan["experiments"].items():
        lines += ["", f"== {name}", format_plan(p)]
    return "\n".join(lines)


def _size(params: float) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def format_plan(plan: dict) -> str:
    if "experiments" in plan:
        return format_grid_plan(plan)
    lines = [f"Plan on {plan['gpu_type']} ({_size(plan['base_params'])} parameters):"]
    lines += [f"  note: {n}" for n in plan.get("notes", [])]
    lines += ["",
              f"{'rule':<22}{'GPUs':>5}{'wall h':>9}{'GPU-h':>9}{'peak GiB':>10}{'disk GB':>9}{'--time min':>11}  note"]
    for j in plan["jobs"]:
        mem = f"{j['peak_mem_gib']:.1f}" if j.get("peak_mem_gib") else "–"
        disk = f"{j['disk_gb']:.0f}" if j.get("disk_gb") else "–"
        lines.append(f"{j['rule']:<22}{j['gpus']:>5}{j['hours']:>9.2f}{j['gpu_hours']:>9.2f}{mem:>10}{disk:>9}"
                     f"{j['runtime_min']:>11}  {j['note']}")
    lines += format_gpu_counts(plan)
    lines += ["", f"total GPU-hours: {plan['total_gpu_hours']}", "",
              f"{'judge':<34}{'requests':>9}{'tokens in':>12}{'tokens out':>12}{'USD':>9}"]
    for name, r in plan["judge"].items():
        lines.append(f"{name:<34}{r['requests']:>9}{r['input_tokens']:>12}{r['output_tokens']:>12}{r['usd']:>9.2f}")
    lines.append(f"judge total: ${plan['judge_usd']}")
    if plan.get("unpinned"):
        lines += ["", "unpinned (read at a branch, not a commit: a rerun may read other data; pin a verified sha):"]
        lines += [f"  {a['artefact']} @ {a['revision']}  ({a['key']})" for a in plan["unpinned"]]
    return "\n".join(lines)


def write_plan(plan: dict, out_json, out_txt=None) -> None:
    write_json(out_json, plan)
    if out_txt:
        Path(out_txt).write_text(format_plan(plan) + "\n")
    print(format_plan(plan))
