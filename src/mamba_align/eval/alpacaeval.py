"""AlpacaEval through the `alpaca_eval` library: a configurable judge and resumable annotation.

`judge_alpaca_eval` runs `alpaca_eval.evaluate` once per annotator on the data that `fetch_alpaca_eval`
(eval/alpacaeval_data.py) pinned. Everything alpaca_eval would write by default into its own package directory
(annotation caches, GLM weights, leaderboards) goes to `cache_dir`. The judge is reached through alpaca_eval's
client configs, whose `client_class` is our `openai_client` (eval/alpacaeval_client.py: it bounds re-asks, counts
the spend, stops a failing judge and keeps every answer as it arrives); what alpaca_eval 0.6.6 cannot be told
through its arguments is in eval/alpacaeval_compat.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from mamba_align.eval.alpacaeval_client import JudgeSession, judge_session, openai_client
from mamba_align.eval.alpacaeval_compat import annotator_class, lc_file_from, metric
from mamba_align.eval.alpacaeval_data import ANNOTATORS, DATA_FILES, LC_FILE, validate_records
from mamba_align.eval.judge.client import JudgeCalls
from mamba_align.eval.judge.settings import JudgeSettings
from mamba_align.utils import (
    ProgressLog,
    UserError,
    read_json,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

LOGPROB_ANNOTATORS = {"weighted_alpaca_eval_gpt4_turbo"}
# a judge without logprobs still ranks in text, with the 1.0 annotator's prompt and parser
RANKING_FALLBACK = "alpaca_eval_gpt4"


# ---------------------------------------------------------------- judge


def _load_outputs(outputs_path: str | os.PathLike, references: dict[str, Path]) -> list[dict]:
    """The model's outputs: one per reference instruction, in the reference's order, one generator."""
    outputs = validate_records(outputs_path, keys=("instruction", "output", "generator"))
    for ref_path in references.values():
        reference = validate_records(ref_path)
        if len(outputs) != len(reference):
            raise UserError(f"{outputs_path}: {len(outputs)} outputs but {ref_path} has {len(reference)} "
                            f"instructions (expected one output per instruction, in the reference's order)")
        for i, (out, ref) in enumerate(zip(outputs, reference)):
            if out["instruction"] != ref["instruction"]:
                raise UserError(f"{outputs_path}: record {i} 'instruction' differs from {ref_path} record {i}")
    generators = {o["generator"] for o in outputs}
    if len(generators) != 1:
        raise UserError(f"{outputs_path}: expected one 'generator' for all records, found {sorted(generators)}")
    return outputs


def _package_config(config_name: str) -> tuple[dict, Path]:
    import yaml
    from alpaca_eval import constants

    path = constants.EVALUATORS_CONFIG_DIR / config_name / "configs.yaml"
    return yaml.safe_load(path.read_text())[config_name], constants.EVALUATORS_CONFIG_DIR


def _write_annotator_config(config_name: str, model: str, judge: JudgeSettings, work_dir: Path) -> Path:
    """Copy a package annotator config (yaml + prompt) into work_dir with our judge model and client settings."""
    import yaml

    cfg, package_dir = _package_config(config_name)
    kwargs = cfg["completions_kwargs"]
    # alpaca_eval builds its clients from a client_config_path yaml: `client_class` and its kwargs; "default"
    # applies to every model name (alpaca_eval 0.6.6 takes clients only this way: a file, the class by its dotted
    # name). The kwargs name the key's variable, never the key.
    client = {"client_class": "mamba_align.eval.alpacaeval_client.openai_client", "api_key_env": judge.api_key_env,
              **judge.client_kwargs(), **({"base_url": judge.base_url} if judge.base_url else {})}
    client_cfg = work_dir / "client_configs.yaml"
    client_cfg.write_text(yaml.safe_dump({"default": [client]}))
    kwargs.update(model_name=model, client_config_path=str(client_cfg), num_procs=judge.concurrency,
                  requires_chatml=True)  # chat endpoint for any model name (alpaca_eval guesses from the name)
    # prompt paths are relative to the parent of the config's folder, as in the package
    folder = work_dir / "configs" / config_name
    folder.mkdir(parents=True, exist_ok=True)
    prompt = package_dir / cfg["prompt_template"]
    shutil.copyfile(prompt, folder / prompt.name)
    cfg["prompt_template"] = f"{config_name}/{prompt.name}"
    (folder / "configs.yaml").write_text(yaml.safe_dump({config_name: cfg}, sort_keys=False))
    return folder / "configs.yaml"


def _has_logprobs(judge: JudgeSettings, model: str, probe_path: Path) -> bool:
    """One 1-token request with top_logprobs; the answer is remembered in probe_path (restarts send none)."""
    if probe_path.exists():
        probe = read_json(probe_path)
        if probe.get("model") == model:
            return probe["logprobs"]
    import openai

    client = openai_client(judge.api_key_env, base_url=judge.base_url, **judge.client_kwargs())
    try:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Reply with one letter: m or M."}],
            max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
        content = r.choices[0].logprobs.content if r.choices and r.choices[0].logprobs else None
        ok = bool(content and content[0].top_logprobs)
    except openai.BadRequestError as e:  # "logprobs not supported" and the like
        log.warning("the judge rejected a logprobs request: %s", e)
        ok = False
    except openai.OpenAIError as e:
        raise UserError(f"judge {model} at {judge.base_url or 'api.openai.com'} is not usable: {e}") from e
    write_json(probe_path, {"model": model, "logprobs": ok})
    return ok


def _caching_path(work_dir: Path, config_name: str, model: str) -> Path:
    return work_dir / f"annotations_{config_name}_{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.json"


def _not_annotated(path: Path, outputs: list[dict]) -> int:
    """How many of `outputs` alpaca_eval's cache at `path` holds no preference for."""
    try:
        rows = read_json(path)
    except (OSError, ValueError):
        rows = []
    seen = {(r.get("instruction"), r.get("output_2")) for r in rows if isinstance(r, dict)
            and r.get("preference") is not None and r.get("preference") == r.get("preference")}
    return sum((o["instruction"], o["output"]) not in seen for o in outputs)


def _check_cache(path: Path) -> None:
    """alpaca_eval writes its cache in place; a kill mid-write leaves it unreadable. Say so plainly."""
    if path.exists():
        try:
            read_json(path)
        except ValueError as e:
            raise UserError(f"annotation cache {path} is corrupt ({e}); delete it to re-annotate") from e


def _clean(value: Any) -> Any:
    """numpy scalars -> Python, NaN -> None (strict JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class _Once(logging.Filter):
    """Lets the first record whose message starts with each of `prefixes` through, and no other: alpaca_eval logs
    once per annotation that it has no price for the judge model and which client it uses (1,610 and 796 lines in
    the rehearsals' judge logs)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes, self.seen = prefixes, set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        prefix = next((p for p in self.prefixes if msg.startswith(p)), None)
        if prefix is None:
            return True
        seen = prefix in self.seen
        self.seen.add(prefix)
        return not seen


def _run_annotator(name: str, outputs: list[dict], data_dir: Path, judge: JudgeSettings, cache_dir: Path,
                   calls: JudgeCalls) -> dict:
    work_dir = cache_dir / name
    work_dir.mkdir(parents=True, exist_ok=True)
    with judge_session(calls, work_dir) as session:
        try:
            return _annotate(name, outputs, data_dir, judge, work_dir, session)
        except UserError:
            if calls.stopped:  # said again now that the calls in flight at the stop have landed: the final spend
                raise UserError(session.stopped()) from None
            raise


def _annotate(name: str, outputs: list[dict], data_dir: Path, judge: JudgeSettings, work_dir: Path,
              session: JudgeSession) -> dict:
    from alpaca_eval import main as alpaca_eval_main

    version, reference_file = ANNOTATORS[name]
    package_model = _package_config(name)[0]["completions_kwargs"]["model_name"]
    model = judge.model or package_model
    if model != package_model:
        log.warning("%s: judging with %s instead of the package's %s; scores are not comparable to the public "
                    "leaderboard", name, model, package_model)
    config_name, fallback = name, None
    if name in LOGPROB_ANNOTATORS and _not_annotated(_caching_path(work_dir, name, model), outputs):
        # (every output already annotated with logprobs: no probe, no request at all)
        if not _has_logprobs(judge, model, work_dir / "logprobs_probe.json"):
            config_name = RANKING_FALLBACK
            fallback = (f"the judge server returned no logprobs, so {name} (m/M logprob weights) was replaced by "
                        f"the ranking annotator {RANKING_FALLBACK} against the {version} reference")
            log.warning(fallback)
    config_path = _write_annotator_config(config_name, model, judge, work_dir)
    caching_path = _caching_path(work_dir, config_name, model)
    _check_cache(caching_path)
    session.cache_path = caching_path
    session.progress = ProgressLog(f"judge {config_name} {model}", _not_annotated(caching_path, outputs), logger=log,
                                   extra=lambda: f"{session.calls.spend()}, {session.calls.n_retries} retries")

    lc = version == "2.0" and (data_dir / LC_FILE).exists()
    if version == "2.0" and not lc:
        log.warning("no %s in %s: no length-controlled win rate", LC_FILE, data_dir)
    generator = outputs[0]["generator"]
    log.info("AlpacaEval %s: %s vs %s with %s (%s)", version, generator, reference_file, config_name, model)
    once = _Once("Unknown model ", "Using OAI client number ")
    logging.getLogger().addFilter(once)  # alpaca_eval logs through the root logger
    with lc_file_from(data_dir), contextlib.ExitStack() as stack:
        stack.callback(logging.getLogger().removeFilter, once)
        leaderboard, _ = alpaca_eval_main.evaluate(
            model_outputs=outputs,
            reference_outputs=str(data_dir / reference_file),
            annotators_config=str(config_path),
            name=generator,
            output_path=work_dir / "output",
            precomputed_leaderboard=None,  # "auto" would read, and is_cache_leaderboard write, package files
            is_cache_leaderboard=False,
            is_return_instead_of_print=True,
            fn_metric=metric(lc),
            metric_kwargs={"save_weights_dir": work_dir / "lc_weights"} if lc else None,  # "auto" = package dir
            sort_by="win_rate",
            annotation_kwargs={"chunksize": judge.annotations_per_write},
            caching_path=str(caching_path),
            Annotator=annotator_class(),
        )
    row = {k: _clean(v) for k, v in leaderboard.loc[generator].items()}
    return {
        "version": version,
        "reference": reference_file,
        "annotator": name,
        "annotator_used": config_name,
        "judge_model": model,
        "package_judge_model": package_model,  # what the public leaderboard used
        "judge_base_url": judge.base_url,
        "win_rate": row.get("win_rate"),
        "standard_error": row.get("standard_error"),
        "discrete_win_rate": row.get("discrete_win_rate"),
        "length_controlled_winrate": row.get("length_controlled_winrate"),
        "lc_standard_error": row.get("lc_standard_error"),
        "n": row.get("n_total"),  # annotated pairs; unparsable judge answers are left out
        "n_instructions": len(outputs),
        "n_wins": row.get("n_wins"),
        "n_wins_base": row.get("n_wins_base"),
        "n_draws": row.get("n_draws"),
        "avg_length": row.get("avg_length"),
        "fallback": fallback,
        "annotations": str(work_dir / "output" / "annotations.json"),
    }


def judge_alpaca_eval(outputs_path: str | os.PathLike, data_dir: str | os.PathLike, annotators: list[str],
                      judge: JudgeSettings | dict, out_json: str | os.PathLike, cache_dir: str | os.PathLike,
                      base_url: str | None = None, model: dict | None = None,
                      prices: tuple[float, float] | None = None) -> dict:
    """Score a model's AlpacaEval outputs with each annotator and write the metrics to out_json.

    `model`: what the summary records about the scored model (provenance.scored_model: model_key,
    model_run_key), for `mamba-align status` and the report to tell a stale score from a current one.

    `judge`: the settings AlpacaEval judges with (`JudgeSettings.for_alpaca_eval`: eval.alpaca_eval.judge_model in
    place of judge.model, None for each annotator's own), or the same as a dict (a rule's params).
    Resumable: annotations are cached in cache_dir, so a rerun only sends requests for missing items.
    `base_url` overrides the settings'; without either, backend "local" starts the local judge server.
    `prices`: USD per million (prompt, completion) tokens, for the spend in the progress lines.
    """
    start = time.time()
    # absolute: alpaca_eval resolves relative config paths against its own package folder
    data_dir, cache_dir = Path(data_dir).resolve(), Path(cache_dir).resolve()
    unknown = [a for a in annotators if a not in ANNOTATORS]
    if unknown or not annotators:
        raise UserError(f"unknown AlpacaEval annotators {unknown}; expected some of {list(ANNOTATORS)}")
    references = {name: data_dir / ANNOTATORS[name][1] for name in annotators}
    for path in references.values():
        if not path.exists():
            raise UserError(f"{path} does not exist (fetch the AlpacaEval data first)")
    outputs = _load_outputs(outputs_path, references)

    judge = JudgeSettings.from_params(judge)
    judge = dataclasses.replace(judge, base_url=base_url or judge.base_url)
    judge.check_environment()
    log.info("AlpacaEval judge model: %s", judge.model or "each annotator's own (eval.alpaca_eval.judge_model null)")
    results = {}
    calls = JudgeCalls(os.environ.get(judge.api_key_env, "").strip(), prices)
    with contextlib.ExitStack() as stack:
        if judge.starts_local_judge:
            from mamba_align.eval.judge.server import (
                serve_local_judge,  # transformers only when a local judge is asked for
            )

            url = stack.enter_context(serve_local_judge(dataclasses.asdict(judge.local), judge.model))
            judge = dataclasses.replace(judge, base_url=url)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name in annotators:
            results[name] = _run_annotator(name, outputs, data_dir, judge, cache_dir, calls)
    log.info("judge %s: %s, %d retries", judge.model, calls.spend(), calls.n_retries)

    hashes_path = data_dir / "hashes.json"
    data = read_json(hashes_path) if hashes_path.exists() else {
        "files": {p.name: sha256_file(p) for p in (data_dir / f for f in DATA_FILES) if p.exists()}}
    import alpaca_eval

    metrics = {
        "benchmark": "alpaca_eval",
        "generator": outputs[0]["generator"],
        **(model or {"model_key": None, "model_run_key": None}),
        "outputs": str(outputs_path),
        "outputs_sha256": sha256_file(outputs_path),
        "results": results,
        "data": data,
        "alpaca_eval_version": alpaca_eval.__version__,
        "wall_time_s": round(time.time() - start, 3),
    }
    write_json(out_json, metrics)
    log.info("%s", summary_line(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    """One line per run, like MT-Bench's: each annotator's win rate (and length-controlled win rate)."""
    def pct(value) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    parts = [f"{name} ({r['version']}): win rate {pct(r['win_rate'])}, LC win rate "
             f"{pct(r['length_controlled_winrate'])} (n={r['n']})" for name, r in metrics["results"].items()]
    return f"AlpacaEval {metrics['generator']}: " + "; ".join(parts)
