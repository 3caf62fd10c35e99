"""AlpacaEval data: the 805 instructions with both references, and the `df_gamed.csv` that the length-controlled
win rate needs, copied from the HF dataset repo at a pinned revision (or from a local folder) and hashed.

`eval/alpacaeval.py` judges against what `fetch_alpaca_eval` put in its `out_dir`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from mamba_align.utils import UserError, fetch_file, read_json, sha256_file, write_json

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
