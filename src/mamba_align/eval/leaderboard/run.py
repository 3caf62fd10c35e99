"""The leaderboard stage: fetch the tasks' data (login node), then score one model on them with lm-eval.

`fetch_leaderboard_data` instantiates every configured task through lm-eval's TaskManager where the internet is
reachable, so the datasets land in the Hugging Face cache (HF_HOME) and compute nodes read them offline; it checks
each configured metric and filter against the task (a typo fails here, before any GPU time), records the datasets
and their Hub commits, and fetches NLTK's punkt_tab for IFEval into the results folder (never downloaded on a node).

`evaluate_leaderboard` runs lm_eval.simple_evaluate once per task with the task's own shot count (the Open LLM
Leaderboard's per-task settings), through the project's model class (leaderboard/lm.py: one pass over each shared
context) or lm-eval's stock `hf` one. A preempted job resumes from its finished tasks, each kept in a work folder
keyed by the model's content and the settings (the task that was running starts again: at most HellaSwag's ~6
minutes on an H200). lm-eval's request cache (`use_cache`) is not used: it commits an SQLite transaction per
answered request, minutes over the suite's ~108,000 requests, and our model class answers a task's requests in one
call anyway (docs/benchmarks.md §18).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from mamba_align.eval.leaderboard.tasks import TaskSpec, check_against_task, score, task_specs
from mamba_align.model.manifest import model_identity
from mamba_align.utils import UserError, read_json, write_json

log = logging.getLogger(__name__)

PUNKT = "tokenizers/punkt_tab"
NEEDS_PUNKT = ("ifeval",)
MODEL_CLASSES = ("mamba_align", "hf")


@functools.lru_cache(maxsize=1024)
def _template(text: str):
    import lm_eval.utils

    return lm_eval.utils.env.from_string(text)  # lm-eval's environment: its filters, StrictUndefined


def _apply_template(template: str, doc: dict) -> str:
    return _template(template).render(**doc)


def compile_templates_once() -> None:
    """lm-eval compiles a task's Jinja template at every use (`lm_eval.utils.apply_template`: per document, choice
    and few-shot example): 36 of 166 s for 2,500 10-shot HellaSwag documents on an H200 host, ~6 minutes over the
    suite (docs/benchmarks.md §18). A template compiles to the same object each time: compile each once.
    Idempotent (it installs the same function); called by the fetch, by evaluate_leaderboard and by every
    MambaAlignLM (leaderboard/lm.py), so `lm_eval --model mamba_align` outside the workflow has it too."""
    import lm_eval.utils

    lm_eval.utils.apply_template = _apply_template


def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def _needs_punkt(specs: list[TaskSpec]) -> bool:
    return any(s.task.startswith(NEEDS_PUNKT) for s in specs)


def use_nltk_data(nltk_dir: str | Path, specs: list[TaskSpec], *, fetch: bool = False) -> None:
    """Point NLTK at the results folder's copy; on the login node (`fetch`) download punkt_tab into it first.
    A job whose tasks need it and do not find it fails before the model loads (lm-eval would download it)."""
    if not _needs_punkt(specs):
        return
    os.environ["NLTK_DATA"] = str(Path(nltk_dir).resolve())
    import nltk

    nltk.data.path[:0] = [os.environ["NLTK_DATA"]]
    try:
        nltk.data.find(PUNKT)
        return
    except LookupError:
        if not fetch:
            raise UserError(f"IFEval needs NLTK's punkt_tab in {nltk_dir}, which fetch_leaderboard_data writes: "
                            f"rerun it where the internet is reachable (snakemake --forcerun "
                            f"fetch_leaderboard_data)") from None
    if not nltk.download("punkt_tab", download_dir=str(nltk_dir), quiet=True, raise_on_error=True):
        raise UserError(f"could not download NLTK's punkt_tab into {nltk_dir}")


def _dataset_record(task) -> dict:
    cfg = task.config
    kwargs = dict(cfg.dataset_kwargs or {})
    record = {"path": cfg.dataset_path, "name": cfg.dataset_name, "revision": kwargs.get("revision")}
    if "data_files" in kwargs:  # a local task (the demo's): its files, hashed
        from mamba_align.utils import sha256_file

        files = kwargs["data_files"]
        files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
        record["files"] = {str(f): sha256_file(f) for f in files}
        return record
    record["commit"] = _hub_commit(cfg.dataset_path, record["revision"])
    return record


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The Hub commit the dataset resolves to now (None offline): recorded, so a later change is visible."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        log.info("dataset %s: offline (HF_HUB_OFFLINE=1), its commit is not resolved", repo)
        return None
    try:
        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - the data is already fetched; the commit is provenance only
        log.warning("dataset %s: commit not resolved (%s)", repo, e)
        return None


def fetch_leaderboard_data(leaderboard: dict, out: str | Path, nltk_dir: str | Path) -> dict:
    """Instantiate every configured task (downloading its data to the HF cache), check the configured metrics
    against it, fetch punkt_tab where a task needs it, and write `out`: each task's datasets, versions and
    subtasks."""
    specs = task_specs(leaderboard)
    use_nltk_data(nltk_dir, specs, fetch=True)
    compile_templates_once()
    tm = _task_manager(leaderboard.get("include_path"))
    record = {"tasks": {}}
    for spec in specs:
        log.info("task %s: loading (its datasets download into the Hugging Face cache)", spec.task)
        try:
            loaded = tm.load([spec.task])
        except Exception as e:  # noqa: BLE001 - lm-eval raises KeyError/ValueError/... for an unknown task
            raise UserError(f"eval.leaderboard.tasks: lm-eval cannot load task {spec.task!r} ({type(e).__name__}: "
                            f"{e})") from None
        tasks = loaded["tasks"]
        metrics, filters = set(), {"none"}
        for task in tasks.values():
            metrics |= {m["metric"] if isinstance(m["metric"], str) else m["metric"].__name__
                        for m in (task.config.metric_list or [])}
            filters |= {f["name"] for f in (task.config.filter_list or [])}
        check_against_task(spec, metrics, filters)
        record["tasks"][spec.task] = {
            "subtasks": sorted(tasks),
            "datasets": {name: _dataset_record(t) for name, t in sorted(tasks.items())},
            "versions": {name: (t.config.metadata or {}).get("version") for name, t in sorted(tasks.items())},
        }
        log.info("task %s: %d task(s), metric %s checked", spec.task, len(tasks), spec.metric)
    write_json(out, record)
    return record


def _work_dir(out: Path, model_dir: str | Path, settings: dict) -> Path:
    """Where this run's finished tasks and request cache live: keyed by the model's content and the settings, so
    an earlier model's (or other settings') partial results are never resumed into this one."""
    model_id = model_identity(model_dir)
    h = hashlib.sha256(json.dumps([model_id, settings], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return out.with_name(f"{out.name}.work-{h}")


def _load_model(model_class: str, model_dir: str, batch_size: int, device: str | None):
    if model_class == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model_dir, batch_size=batch_size, device=device or ("cuda" if _cuda() else "cpu"))
    if model_class == "mamba_align":
        from mamba_align.eval.leaderboard.lm import MambaAlignLM

        return MambaAlignLM(pretrained=model_dir, batch_size=batch_size, device=device)
    raise UserError(f"eval.leaderboard.model_class: {model_class!r} is not one of {', '.join(MODEL_CLASSES)}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate_leaderboard(model_dir: str, out: str | Path, leaderboard: dict, fetched: str | Path,
                         nltk_dir: str | Path, *, model: dict | None = None, device: str | None = None) -> dict:
    """Score `model_dir` on every configured task and write `out` (atomically, when all are done)."""
    import lm_eval

    out = Path(out)
    specs = task_specs(leaderboard)
    use_nltk_data(nltk_dir, specs)
    data = read_json(fetched)
    missing = [s.task for s in specs if s.task not in data["tasks"]]
    if missing:
        raise UserError(f"{fetched} has no data for {', '.join(missing)}: rerun fetch_leaderboard_data")
    seed = int(leaderboard.get("seed", 1234))
    limit = leaderboard.get("limit")
    model_class = leaderboard.get("model_class", "mamba_align")
    batch_size = int(leaderboard.get("batch_size", 32))
    bootstrap = int(leaderboard.get("bootstrap_iters", 100000))
    settings = {"lm_eval": lm_eval.__version__, "seed": seed, "limit": limit, "model_class": model_class,
                "bootstrap_iters": bootstrap, "include_path": leaderboard.get("include_path")}
    work = _work_dir(out, model_dir, settings)
    work.mkdir(parents=True, exist_ok=True)
    compile_templates_once()
    tm = _task_manager(leaderboard.get("include_path"))
    lm = None
    records, started = {}, time.monotonic()
    for i, spec in enumerate(specs, 1):
        done = work / f"{spec.task}.json"
        if done.is_file() and read_json(done).get("spec") == spec.as_dict():
            records[spec.task] = read_json(done)["record"]
            log.info("[%d/%d] %s: done earlier (%s), kept", i, len(specs), spec.task, done)
            continue
        if lm is None:
            lm = _load_model(model_class, model_dir, batch_size, device)
        log.info("[%d/%d] %s: %d-shot, %s%s", i, len(specs), spec.task, spec.num_fewshot, spec.key,
                 ", chat template" if spec.chat_template else "")
        t0 = time.monotonic()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[spec.task], num_fewshot=spec.num_fewshot, task_manager=tm, limit=limit,
            log_samples=False, bootstrap_iters=bootstrap,
            apply_chat_template=spec.chat_template, fewshot_as_multiturn=spec.chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        record = score(spec, results)
        record["datasets"] = data["tasks"][spec.task]["datasets"]
        record["wall_seconds"] = round(time.monotonic() - t0, 1)
        write_json(done, {"spec": spec.as_dict(), "record": record})
        records[spec.task] = record
        log.info("[%d/%d] %s: %s = %.4f%s (n=%d, %.0f s)", i, len(specs), spec.task, spec.metric, record["score"],
                 f" ± {record['stderr']:.4f}" if record["stderr"] is not None else "", record["n"],
                 record["wall_seconds"])
    summary = {
        "suite": leaderboard.get("suite", "leaderboard"),
        "tasks": records,
        "average": sum(r["score"] for r in records.values()) / len(records) if records else None,
        "model_dir": str(model_dir),
        **(model or {"model_key": None, "model_run_key": None}),
        **settings,
        "fewshot_seed": seed,
        "batch_size": batch_size,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    write_json(out, summary)
    shutil.rmtree(work, ignore_errors=True)
    for stale in out.parent.glob(f"{out.name}.work-*"):  # an earlier model's or settings' partial results
        shutil.rmtree(stale, ignore_errors=True)
    return summary
