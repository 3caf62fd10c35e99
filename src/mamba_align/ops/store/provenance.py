"""Provenance: what produced an output (code, config, data, packages, hardware, scheduler job)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

from mamba_align.ops.store import layout
from mamba_align.ops.store.rerun import whole
from mamba_align.utils import UserError, file_record, read_json, sha256_file, write_json

PACKAGES = ("mamba-align", "torch", "transformers", "trl", "accelerate", "datasets", "mamba-ssm", "causal-conv1d",
            "alpaca-eval", "openai", "snakemake", "snakemake-executor-plugin-slurm",
            "snakemake-executor-plugin-htcondor")
HASH_LIMIT = 2 << 30  # hash files up to 2 GiB; larger ones (model weights) are listed with size and mtime


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | Path) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or broken CUDA: record what we can
        pass
    info.setdefault("gpus", [])
    return info


def scheduler_job() -> dict:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST",
            "_CONDOR_JOB_AD", "CONDOR_ID", "_CONDOR_SLOT_NAME")
    return {k: os.environ[k] for k in keys if k in os.environ}


def describe_file(path) -> dict | list:
    if isinstance(path, (list, tuple)):
        return [describe_file(p) for p in path]
    p = Path(path)
    if p.is_dir():
        return {"path": str(p), "files": {str(f.relative_to(p)): describe_file(f) for f in sorted(p.rglob("*"))
                                          if f.is_file() and not f.name.startswith(".")}}
    if not p.exists():
        return {"path": str(p), "missing": True}
    return file_record(p, HASH_LIMIT)


COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _hub_id(source) -> bool:
    """A Hub id (owner/name) rather than a local path."""
    return bool(source) and HUB_ID.fullmatch(str(source)) is not None and not Path(str(source)).exists()


def hub_artifacts(config: dict, sft: dict | None = None, dpo: dict | None = None) -> list[dict]:
    """Every remote artefact a run reads, with the revision it is read at and whether that is a commit.

    `sft`/`dpo`: the stage recipes as dicts (their datasets); without them only the config's artefacts."""
    base, ev = config.get("base_model") or {}, config.get("eval") or {}
    mt_bench, alpaca_eval = ev.get("mt_bench") or {}, ev.get("alpaca_eval") or {}
    items = []
    if _hub_id(base.get("source")):
        items.append(("base_model.source", f"hf:{base['source']}", base.get("revision")))
    if _hub_id(base.get("tokenizer")):
        items.append(("base_model.tokenizer", f"hf:{base['tokenizer']}", base.get("tokenizer_revision")))
    for stage, recipe in (("sft", sft), ("dpo", dpo)):
        ds = (recipe or {}).get("dataset") or {}
        if _hub_id(ds.get("source")):
            items.append((f"recipe {stage} dataset", f"hf-dataset:{ds['source']}", ds.get("revision")))
    if mt_bench and not mt_bench.get("local_dir"):
        items.append(("eval.mt_bench.fastchat_commit", "github:lm-sys/FastChat", mt_bench.get("fastchat_commit")))
    if alpaca_eval and not alpaca_eval.get("local_dir"):
        items.append(("eval.alpaca_eval.revision", "hf-dataset:tatsu-lab/alpaca_eval", alpaca_eval.get("revision")))
    return [{"key": key, "artefact": what, "revision": rev, "pinned": bool(rev and COMMIT.fullmatch(str(rev)))}
            for key, what, rev in items]


def unpinned(config: dict, sft: dict | None = None, dpo: dict | None = None) -> list[dict]:
    """The artefacts read at a branch (e.g. `main`) instead of a commit: a rerun may read other bytes."""
    return [a for a in hub_artifacts(config, sft, dpo) if not a["pinned"]]


def unpinned_of_run(config: dict, sft: dict, dpo: dict, grid=None) -> list[dict]:
    """unpinned() of the config, and of each experiment of its grid (their base models and recipes may differ), from
    the recipes as the workflow parsed them (`grid`: its experiments.Grid, None for one experiment)."""
    runs = [(config, sft, dpo)] + [(r.exp.config(config), r.sft, r.dpo) for r in (grid.exps if grid else [])]
    out: list[dict] = []
    for c, s, d in runs:
        out += [a for a in unpinned(c, s, d) if a not in out]
    return out


def write_run_unpinned(path: str | Path, config: dict, sft: dict, dpo: dict, grid=None) -> Path:
    """Write the run's unpinned artefacts (unpinned_of_run) to `path`, layout's `Results.unpinned()`: once per run,
    by the workflow's onstart before any job, so it always holds the list of the run that last started jobs. Every
    job's record points at it by path and sha256 (unpinned_pointer) instead of parsing the recipes again."""
    write_json(path, {"unpinned": unpinned_of_run(config, sft, dpo, grid)})
    return Path(path)


def unpinned_pointer(config: dict) -> dict:
    """A job's record of its run's unpinned artefacts: the run-level file's path and content (size, sha256; or
    `missing`). A later run of another config rewrites the file; the sha256 then no longer matches."""
    path = layout.Results(config.get("results_dir", "results")).unpinned()
    return {"path": path, **describe_file(path)}


def recorded_unpinned(rec: dict, workdir: str | Path = ".") -> list[dict] | None:
    """The unpinned artefacts of the run that wrote `rec` (a job's record), read through its pointer from the run's
    working folder; None when the run-level file is missing or was rewritten since (a list that is not this job's)."""
    pointer = rec.get("unpinned") or {}
    if isinstance(pointer, list):  # a record written before the run-level file held the list itself
        return pointer
    path = Path(workdir) / pointer.get("path", "")
    if "sha256" not in pointer or not path.is_file() or sha256_file(path) != pointer["sha256"]:
        return None
    return read_json(path)["unpinned"]


def record(step: str, inputs: dict, outputs: dict, params: dict, config: dict, out_path: str | Path,
           workflow_dir: str | Path = ".") -> Path:
    """Write the provenance record of one step and add a `provenance` key to its JSON outputs."""
    rec = {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(workflow_dir),
        "inputs": {k: describe_file(v) for k, v in inputs.items()},
        "outputs": {k: str(v) for k, v in outputs.items()},
        "params": params,
        "config": config,
        "unpinned": unpinned_pointer(config) if "base_model" in config else None,
        "packages": package_versions(),
        "hardware": hardware(),
        "scheduler": scheduler_job(),
    }
    write_json(out_path, rec)
    for path in outputs.values():
        if (isinstance(path, str) and path.endswith(".json") and Path(path).is_file()
                and Path(path).resolve() != Path(out_path).resolve()):
            data = read_json(path)
            if isinstance(data, dict):
                data["provenance"] = str(out_path)
                write_json(path, data)
    return Path(out_path)


def record_path(smk) -> str:
    """Where a Snakemake job's record goes: its declared output `provenance` (Snakemake then deletes it with the
    job's other outputs when the job fails or is to rerun), else results/provenance/<rule>[-<wildcards>].json.
    Every rule declares its record, most at that same path, where earlier versions wrote it undeclared: a
    record declared elsewhere would be missing in an earlier results folder and rerun the finished job."""
    declared = dict(smk.output.items()).get("provenance")
    if declared:
        return str(declared)
    wc = "-".join(str(v).strip("/") for v in dict(smk.wildcards).values() if str(v).strip("/"))
    name = smk.rule + (f"-{wc}" if wc else "")
    return layout.Results(smk.config.get("results_dir", "results")).provenance(name)


def record_snakemake_job(smk) -> Path:
    """`record` for a Snakemake `script:` job, at record_path(smk). Its workflow folder (for the git commit) is found
    from the script's folder, which Snakemake gives as `workflow/rules/../scripts`. No recipe is read: the run's
    unpinned artefacts are the onstart's file (write_run_unpinned), which the record points at."""
    from mamba_align.train.recipes import workflow_root

    workflow_dir = workflow_root(getattr(smk, "scriptdir", "workflow/scripts"))
    outputs = {k: v for k, v in _named(smk.output).items() if k != "provenance"}
    # a training job's recipe object (params.job_recipe: operational keys too) recorded key by key
    params = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in whole(smk.params).items()}
    return record(smk.rule, _named(smk.input), outputs, params, dict(smk.config), record_path(smk), workflow_dir)


def _named(files) -> dict:
    """Named inputs/outputs by name, the unnamed ones by position."""
    named = {k: (list(v) if isinstance(v, list) else str(v)) for k, v in files.items()}
    covered = {str(f) for v in named.values() for f in (v if isinstance(v, list) else [v])}
    named.update({str(i): str(f) for i, f in enumerate(files) if str(f) not in covered})
    return named


# --- which model a score belongs to -----------------------------------------------------------------------------

def learned_by(stage: str, base: dict, sft: dict, dpo: dict) -> dict:
    """What the model of `stage` learned from, as known before anything runs: the base model config and each
    stage's learning settings up to `stage` (recipes as dicts). Its model_key is what a score is computed for."""
    from mamba_align.train.recipes import learning_settings

    chain = {"base": base}
    for s, recipe in (("sft", sft), ("dpo", dpo)):
        if layout.STAGES.index(s) <= layout.STAGES.index(stage):
            chain[s] = learning_settings(recipe)
    return chain


def model_key(learned: dict) -> str:
    """A short hash of learned_by(...): the same config gives the same key, in the workflow and in `status`."""
    return hashlib.sha256(json.dumps(learned, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stored_run_key(model_dir: str | Path | None) -> str | None:
    """The key in a trained model's run.json (runs.run_key: settings, data and parent model hashed); None for the
    base model or no model."""
    run_file = Path(model_dir) / "run.json" if model_dir else None
    return read_json(run_file).get("key") if run_file is not None and run_file.is_file() else None


def scored_model(learned: dict | None, model_dir: str | Path | None = None) -> dict:
    """What a score file records about its model: `model_key` (of the config) and `model_run_key` (the trained
    model's run key, stored_run_key), each None when unknown."""
    return {"model_key": model_key(learned) if learned is not None else None,
            "model_run_key": stored_run_key(model_dir)}


def load_config(config_files=(), workflow_dir: str | Path = ".", resolve_template: bool = True
                ) -> tuple[dict, list[Path]]:
    """(config, files) as a workflow run with `--configfile config_files` reads it: the Snakefile's
    config/config.yaml first, each file merged over it, validated and defaulted by the workflow's schema (the same
    defaults as a workflow run, not a copy of them), and with `resolve_template` the recipe's chat template resolved
    (common.smk; the plan does not ask for it). Reads YAML only: no model, no data. Errors are one line (UserError)."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import update_config, validate

    from mamba_align.ops.schema import config_error
    from mamba_align.train.recipes import resolve_chat_template

    workflow_dir = Path(workflow_dir)
    base, schema = workflow_dir / "config" / "config.yaml", workflow_dir / "workflow" / "schemas" / "config.schema.yaml"
    files = [base, *(Path(f) for f in config_files if Path(f).resolve() != base.resolve())]
    for f in [*files, schema]:
        if not f.is_file():
            raise UserError(f"{f} does not exist (run from the workflow's folder, or pass --config / --workflow-dir)")
    config: dict = {}
    for f in files:
        try:
            loaded = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{f}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{f}: expected a mapping of config keys, found {type(loaded).__name__}")
        update_config(config, loaded)
    try:
        validate(config, str(schema))
    except WorkflowError as e:
        raise UserError(f"{files[-1]}: {config_error(e)}") from None
    if resolve_template:
        config["base_model"]["chat_template"] = resolve_chat_template(config, workflow_dir)
    return config, files


def current_model_keys(config_files=(), workflow_dir: str | Path = ".") -> dict[str, str]:
    """{stage: model_key} of the config a workflow run with `--configfile config_files` would use (load_config),
    as `mamba-align plan` reads it."""
    from mamba_align.train.recipes import as_dict, config_recipe

    config, files = load_config(config_files, workflow_dir)
    sft, dpo = (as_dict(config_recipe(config, s, workflow_dir, files)) for s in ("sft", "dpo"))
    return {s: model_key(learned_by(s, config["base_model"], sft, dpo)) for s in layout.STAGES}


def current_grid(results: str | Path, config_files=(), workflow_dir: str | Path = "."):
    """The experiments.Grid of that config with its folders under `results` (as common.smk builds it), or None
    when the config names no experiments. Its model keys: grid_model_key."""
    from mamba_align.ops.store import experiments
    from mamba_align.train.recipes import as_dict, config_recipe, learning_settings

    config, files = load_config(config_files, workflow_dir)
    if not experiments.is_grid(config):
        return None
    resolved = []
    for exp in experiments.expand(config):
        ecfg = exp.config(config)
        sft, dpo = (as_dict(config_recipe(ecfg, s, workflow_dir, files)) for s in ("sft", "dpo"))
        resolved.append(experiments.resolve(exp, sft, dpo, learning_settings))
    return experiments.Grid(str(results), resolved, config["eval"]["stages"], config["eval"]["leaderboard"]["stages"])


def grid_model_key(grid, home: str) -> str:
    """The model key of a grid's model folder (`home`, e.g. experiments/<name>), as its judge rules record it."""
    from mamba_align.train.recipes import learning_settings

    return model_key(grid.learned_by(home, learning_settings))


def stale_reason(summary: dict, current_key: str | None, current_run_key: str | None = None) -> str | None:
    """Why a score file does not belong to the current model (None when it does, or when nothing is known to
    compare it with)."""
    key = summary.get("model_key")
    if current_key is not None:
        if key is None:
            return f"stale: no model key recorded (written before keys were), current config wants {current_key}"
        if key != current_key:
            return f"stale: computed for model {key}, current config wants {current_key}"
    run_key = summary.get("model_run_key")
    if run_key and current_run_key and run_key != current_run_key:
        return f"stale: computed for model run {run_key}, the stored model is run {current_run_key}"
    return None
