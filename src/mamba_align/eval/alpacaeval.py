"""AlpacaEval through the `alpaca_eval` library: pinned data, a configurable judge, resumable annotation.

`fetch_alpaca_eval` copies the 805 instructions with both references, and the `df_gamed.csv` that the
length-controlled win rate needs, from the HF dataset repo at a pinned revision (or from a local folder).
`judge_alpaca_eval` runs `alpaca_eval.evaluate` once per annotator. Everything alpaca_eval would write by
default into its own package directory (annotation caches, GLM weights, leaderboards) goes to `cache_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

from mamba_align.utils import UserError, fetch_file, read_json, setup_logging, sha256_file, write_json

log = logging.getLogger(__name__)

HF_REPO = "tatsu-lab/alpaca_eval"
LC_FILE = "df_gamed.csv"  # AlpacaEval 2.0's length-control GLM is fit on these "gamed" annotations
REFERENCE_FILES = ("alpaca_eval.json", "alpaca_eval_gpt4_baseline.json")
DATA_FILES = (*REFERENCE_FILES, LC_FILE)
RECORD_KEYS = ("instruction", "output", "generator", "dataset")
LC_COLUMNS = ("index", "preference", "instruction_difficulty", "not_gamed_baseline")

# requested annotator -> (AlpacaEval version, reference file); both are package configs of alpaca_eval 0.6.6
ANNOTATORS = {
    "alpaca_eval_gpt4": ("1.0", "alpaca_eval.json"),
    "weighted_alpaca_eval_gpt4_turbo": ("2.0", "alpaca_eval_gpt4_baseline.json"),
}
LOGPROB_ANNOTATORS = {"weighted_alpaca_eval_gpt4_turbo"}
# a judge without logprobs still ranks in text, with the 1.0 annotator's prompt and parser
RANKING_FALLBACK = "alpaca_eval_gpt4"


# ---------------------------------------------------------------- data


def _hub_download(filename: str, revision: str) -> tuple[Path, str | None]:
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=filename, revision=revision))
    except Exception as e:  # offline, unknown revision, gated, ...
        raise UserError(f"could not download {filename} from the HF dataset {HF_REPO}@{revision}: {e}. "
                        f"On an offline machine set eval.alpaca_eval.local_dir to a folder with {DATA_FILES}") from e
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None  # the HF cache's layout
    return path, commit


def validate_records(path: str | os.PathLike, keys: tuple[str, ...] = RECORD_KEYS) -> list[dict]:
    """Read an alpaca_eval JSON file: a list of dicts with string values for `keys`."""
    try:
        rows = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty JSON list of {{{', '.join(keys)}}} records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: record {i} is not a JSON object")
        for key in keys:
            if not isinstance(row.get(key), str):
                raise UserError(f"{path}: record {i} has no string '{key}' key (expected keys {list(keys)})")
    return rows


def _validate_lc_file(path: Path) -> None:
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in LC_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing columns {missing} (expected alpaca_eval's df_gamed.csv)")


def fetch_alpaca_eval(revision: str, local_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                      sha256: dict[str, str] | None = None, annotators: list[str] | None = None) -> Path:
    """Put the AlpacaEval data files into `out_dir` and record their sha256 in `out_dir/hashes.json`.

    From `local_dir` if given (same file names; df_gamed.csv may be absent, then no length-controlled win
    rate), else from the HF dataset repo at `revision`. `sha256` (file name -> hash) pins the content.
    Only the reference files of `annotators` (default: all) are required: a 2.0-only run needs no 1.0 file.
    A second call with the same source and intact files does nothing.
    """
    out_dir, sha256 = Path(out_dir), dict(sha256 or {})
    unknown = [a for a in annotators or [] if a not in ANNOTATORS]
    if unknown:
        raise UserError(f"unknown AlpacaEval annotators {unknown}; expected some of {list(ANNOTATORS)}")
    needed = {ANNOTATORS[a][1] for a in annotators} if annotators else set(REFERENCE_FILES)
    unknown = set(sha256) - set(DATA_FILES)
    if unknown:
        raise UserError(f"sha256 pins for unknown files {sorted(unknown)}; expected some of {list(DATA_FILES)}")
    source = f"local:{Path(local_dir).resolve()}" if local_dir else f"hf:{HF_REPO}@{revision}"
    hashes_path = out_dir / "hashes.json"
    if hashes_path.exists():
        old = read_json(hashes_path)
        if old.get("source") == source and set(sha256) <= set(old["files"]) and all(
            (out_dir / name).exists() and sha256_file(out_dir / name) == h == sha256.get(name, h)
            for name, h in old["files"].items()
        ) and needed <= set(old["files"]):
            log.info("AlpacaEval data already in %s (%s)", out_dir, source)
            return out_dir
    if not local_dir and not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        log.warning("eval.alpaca_eval.revision=%r is not a commit sha; the data is not pinned", revision)

    files, commit = {}, None
    for name in DATA_FILES:
        if name in REFERENCE_FILES and name not in needed and name not in sha256:
            if not (local_dir and (Path(local_dir) / name).exists()):
                continue  # no annotator of this run compares against it
        if local_dir:
            src = Path(local_dir) / name
            if not src.exists():
                if name == LC_FILE and name not in sha256:
                    log.warning("%s has no %s: AlpacaEval 2.0 will report no length-controlled win rate",
                                local_dir, name)
                    continue
                required = sorted(needed | set(sha256)) + [f"{LC_FILE} (optional)"]
                raise UserError(f"{src} does not exist (eval.alpaca_eval.local_dir must hold {required})")
        else:
            src, commit = _hub_download(name, revision)
        if name == LC_FILE:
            _validate_lc_file(src)
        else:
            validate_records(src)
        dest = out_dir / name
        dest.unlink(missing_ok=True)  # fetch_file would reuse it
        fetch_file(f"https://huggingface.co/datasets/{HF_REPO}/resolve/{revision}/{name}", dest,
                   sha256=sha256.get(name), local_path=src)
        files[name] = sha256_file(dest)
    write_json(hashes_path, {"source": source, "repo": HF_REPO, "revision": revision, "commit": commit,
                             "files": files})
    return out_dir


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


def _judge_settings(judge_cfg: dict, base_url: str | None) -> dict:
    backend = judge_cfg.get("backend", "openai")
    if backend not in ("openai", "local"):
        raise UserError(f"judge.backend must be 'openai' or 'local', got {backend!r}")
    key_env = judge_cfg.get("api_key_env") or "OPENAI_API_KEY"
    api_key = os.environ.get(key_env)
    if not api_key and base_url is None and backend == "openai":
        raise UserError(f"the judge needs an API key in the environment variable {key_env} (judge.api_key_env)")
    concurrency = int(judge_cfg.get("concurrency") or 1)
    return {
        "model": judge_cfg.get("model"),
        "base_url": base_url,
        "api_key": api_key or "EMPTY",  # local OpenAI-compatible servers ignore it, the client wants one
        "concurrency": concurrency,
        # annotations reach the cache file after each chunk: a crash loses at most the chunk in flight
        "chunksize": int(judge_cfg.get("chunksize") or max(16, 4 * concurrency)),
    }


@contextlib.contextmanager
def _openai_key(api_key: str) -> Iterator[None]:
    """alpaca_eval builds its OpenAI clients itself; they read the key from OPENAI_API_KEY.

    Passing it in the client config would write it to disk, and through decoding kwargs it would be logged.
    """
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = api_key
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old


def _package_config(config_name: str) -> tuple[dict, Path]:
    import yaml
    from alpaca_eval import constants

    path = constants.EVALUATORS_CONFIG_DIR / config_name / "configs.yaml"
    return yaml.safe_load(path.read_text())[config_name], constants.EVALUATORS_CONFIG_DIR


def _write_annotator_config(config_name: str, model: str, judge: dict, work_dir: Path) -> Path:
    """Copy a package annotator config (yaml + prompt) into work_dir with our judge model and client settings."""
    import yaml

    cfg, package_dir = _package_config(config_name)
    kwargs = cfg["completions_kwargs"]
    # alpaca_eval 0.6.6 reads the OpenAI client kwargs (base_url, ...) from a client_config_path yaml;
    # "default" applies to every model name
    client_cfg = work_dir / "client_configs.yaml"
    client_cfg.write_text(yaml.safe_dump({"default": [{"base_url": judge["base_url"]} if judge["base_url"] else {}]}))
    kwargs.update(model_name=model, client_config_path=str(client_cfg), num_procs=judge["concurrency"],
                  requires_chatml=True)  # chat endpoint for any model name (alpaca_eval guesses from the name)
    # prompt paths are relative to the parent of the config's folder, as in the package
    folder = work_dir / "configs" / config_name
    folder.mkdir(parents=True, exist_ok=True)
    prompt = package_dir / cfg["prompt_template"]
    shutil.copyfile(prompt, folder / prompt.name)
    cfg["prompt_template"] = f"{config_name}/{prompt.name}"
    (folder / "configs.yaml").write_text(yaml.safe_dump({config_name: cfg}, sort_keys=False))
    return folder / "configs.yaml"


def _has_logprobs(judge: dict, model: str, probe_path: Path) -> bool:
    """One 1-token request with top_logprobs; the answer is remembered in probe_path (restarts send none)."""
    if probe_path.exists():
        probe = read_json(probe_path)
        if probe.get("model") == model:
            return probe["logprobs"]
    import openai

    client = openai.OpenAI(base_url=judge["base_url"], api_key=judge["api_key"])
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
        raise UserError(f"judge {model} at {judge['base_url'] or 'api.openai.com'} is not usable: {e}") from e
    write_json(probe_path, {"model": model, "logprobs": ok})
    return ok


@contextlib.contextmanager
def _lc_inputs_from(data_dir: Path) -> Iterator[None]:
    """Serve alpaca_eval's run-time hf_hub_download of df_gamed.csv from data_dir.

    alpaca_eval 0.6.6 has no argument for this file: metrics/glm_winrate.py downloads it (unpinned, revision
    main) inside get_length_controlled_winrate. We give it our pinned, hashed copy instead.
    """
    from alpaca_eval.metrics import glm_winrate

    def local_file(repo_id: str, filename: str, **kwargs: Any) -> str:
        path = data_dir / filename
        if repo_id != HF_REPO or not path.exists():
            raise UserError(f"alpaca_eval asked for {repo_id}/{filename}; expected it in {data_dir}")
        return str(path)

    with mock.patch.object(glm_winrate, "hf_hub_download", local_file):
        yield


def _caching_path(work_dir: Path, config_name: str, model: str) -> Path:
    return work_dir / f"annotations_{config_name}_{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.json"


def _all_annotated(path: Path, outputs: list[dict]) -> bool:
    """Whether alpaca_eval's cache at `path` already holds a preference for every one of `outputs`."""
    try:
        rows = read_json(path)
    except (OSError, ValueError):
        return False
    seen = {(r.get("instruction"), r.get("output_2")) for r in rows if isinstance(r, dict)
            and r.get("preference") is not None and r.get("preference") == r.get("preference")}
    return all((o["instruction"], o["output"]) in seen for o in outputs)


def _check_cache(path: Path) -> None:
    """alpaca_eval writes its cache in place; a kill mid-write leaves it unreadable. Say so plainly."""
    if path.exists():
        try:
            read_json(path)
        except ValueError as e:
            raise UserError(f"annotation cache {path} is corrupt ({e}); delete it to re-annotate") from e


def _annotator_class():
    from alpaca_eval.annotators import PairwiseAnnotator

    class CacheAsFloat(PairwiseAnnotator):
        """pandas 3 reads a cache of whole-number preferences (1.0, 2.0) back as int64, and alpaca_eval 0.6.6
        then fails to write a 1.5 (tie) into that column on restart. Preferences are floats: read them so."""

        def load_(self, path=None):
            super().load_(path)
            if self.df_annotations is not None and self.annotation_key in self.df_annotations:
                self.df_annotations[self.annotation_key] = self.df_annotations[self.annotation_key].astype(float)

    return CacheAsFloat


def _metric(length_controlled: bool):
    """alpaca_eval's metric, after making the preferences numeric.

    With pandas 3, a missing annotation (unparsable judge answer) reaches the metric as None in an object
    column, which alpaca_eval 0.6.6 fails to round; as NaN it is dropped from the counts, as intended.
    """
    import pandas as pd
    from alpaca_eval import metrics

    def metric(annotations, **kwargs) -> dict:
        df = pd.DataFrame(list(annotations))
        df["preference"] = pd.to_numeric(df["preference"], errors="coerce")
        if length_controlled and df["preference"].notna().any():
            return metrics.get_length_controlled_winrate(df, **kwargs)
        return metrics.get_winrate(df)

    return metric


def _clean(value: Any) -> Any:
    """numpy scalars -> Python, NaN -> None (strict JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _run_annotator(name: str, outputs: list[dict], data_dir: Path, judge: dict, cache_dir: Path) -> dict:
    from alpaca_eval import main as alpaca_eval_main

    version, reference_file = ANNOTATORS[name]
    work_dir = cache_dir / name
    work_dir.mkdir(parents=True, exist_ok=True)
    package_model = _package_config(name)[0]["completions_kwargs"]["model_name"]
    model = judge["model"] or package_model
    if model != package_model:
        log.warning("%s: judging with %s instead of the package's %s; scores are not comparable to the public "
                    "leaderboard", name, model, package_model)
    config_name, fallback = name, None
    if name in LOGPROB_ANNOTATORS and not _all_annotated(_caching_path(work_dir, name, model), outputs):
        # (every output already annotated with logprobs: no probe, no request at all)
        if not _has_logprobs(judge, model, work_dir / "logprobs_probe.json"):
            config_name = RANKING_FALLBACK
            fallback = (f"the judge server returned no logprobs, so {name} (m/M logprob weights) was replaced by "
                        f"the ranking annotator {RANKING_FALLBACK} against the {version} reference")
            log.warning(fallback)
    config_path = _write_annotator_config(config_name, model, judge, work_dir)
    caching_path = _caching_path(work_dir, config_name, model)
    _check_cache(caching_path)

    lc = version == "2.0" and (data_dir / LC_FILE).exists()
    if version == "2.0" and not lc:
        log.warning("no %s in %s: no length-controlled win rate", LC_FILE, data_dir)
    generator = outputs[0]["generator"]
    log.info("AlpacaEval %s: %s vs %s with %s (%s)", version, generator, reference_file, config_name, model)
    with _lc_inputs_from(data_dir), _openai_key(judge["api_key"]):
        leaderboard, _ = alpaca_eval_main.evaluate(
            model_outputs=outputs,
            reference_outputs=str(data_dir / reference_file),
            annotators_config=str(config_path),
            name=generator,
            output_path=work_dir / "output",
            precomputed_leaderboard=None,  # "auto" would read, and is_cache_leaderboard write, package files
            is_cache_leaderboard=False,
            is_return_instead_of_print=True,
            fn_metric=_metric(lc),
            metric_kwargs={"save_weights_dir": work_dir / "lc_weights"} if lc else None,  # "auto" = package dir
            sort_by="win_rate",
            annotation_kwargs={"chunksize": judge["chunksize"]},
            caching_path=str(caching_path),
            Annotator=_annotator_class(),
        )
    row = {k: _clean(v) for k, v in leaderboard.loc[generator].items()}
    return {
        "version": version,
        "reference": reference_file,
        "annotator": name,
        "annotator_used": config_name,
        "judge_model": model,
        "package_judge_model": package_model,  # what the public leaderboard used
        "judge_base_url": judge["base_url"],
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
                      judge_cfg: dict, out_json: str | os.PathLike, cache_dir: str | os.PathLike,
                      base_url: str | None = None) -> dict:
    """Score a model's AlpacaEval outputs with each annotator and write the metrics to out_json.

    Resumable: annotations are cached in cache_dir, so a rerun only sends requests for missing items.
    `base_url` overrides judge_cfg["base_url"]; without either, backend "local" starts the local judge server.
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

    base_url = base_url or judge_cfg.get("base_url")
    judge = _judge_settings(judge_cfg, base_url)
    results = {}
    with contextlib.ExitStack() as stack:
        if base_url is None and judge_cfg.get("backend") == "local":
            from mamba_align.eval.judge.server import (
                serve_local_judge,  # transformers only when a local judge is asked for
            )

            judge["base_url"] = stack.enter_context(serve_local_judge(judge_cfg.get("local", {}), judge["model"]))
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name in annotators:
            results[name] = _run_annotator(name, outputs, data_dir, judge, cache_dir)

    hashes_path = data_dir / "hashes.json"
    data = read_json(hashes_path) if hashes_path.exists() else {
        "files": {p.name: sha256_file(p) for p in (data_dir / f for f in DATA_FILES) if p.exists()}}
    import alpaca_eval

    metrics = {
        "benchmark": "alpaca_eval",
        "generator": outputs[0]["generator"],
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


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba_align.eval.alpacaeval", description=__doc__.splitlines()[0])
    p.add_argument("--log", help="log file (the rule's log)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or copy) the AlpacaEval data files")
    f.add_argument("--revision", default="main", help="HF dataset revision; pin a commit sha")
    f.add_argument("--local-dir", help="folder with the same files (offline clusters, the demo)")
    f.add_argument("--out-dir", required=True)
    f.add_argument("--sha256", action="append", default=[], metavar="FILE=HASH", help="pin a file's content")
    j = sub.add_parser("judge", help="annotate a model's outputs and write the win rates")
    j.add_argument("--outputs", required=True, help="model outputs JSON (alpaca_eval format)")
    j.add_argument("--data-dir", required=True, help="out-dir of `fetch`")
    j.add_argument("--annotators", nargs="+", default=list(ANNOTATORS), choices=list(ANNOTATORS))
    j.add_argument("--judge-config", required=True, help="JSON or YAML file with the judge section")
    j.add_argument("--base-url", help="an already running OpenAI-compatible judge server")
    j.add_argument("--cache-dir", required=True, help="annotation caches and generated annotator configs")
    j.add_argument("--out", required=True, help="metrics JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    if args.command == "fetch":
        pins = dict(s.split("=", 1) for s in args.sha256)
        fetch_alpaca_eval(args.revision, args.local_dir, args.out_dir, sha256=pins)
    else:
        import yaml

        judge_cfg = yaml.safe_load(Path(args.judge_config).read_text()) or {}
        judge_alpaca_eval(args.outputs, args.data_dir, args.annotators, judge_cfg, args.out, args.cache_dir,
                          base_url=args.base_url)


if __name__ == "__main__":
    main()
