"""Prepare SFT and preference data: load (Hub at a pinned revision, or local files in the Hub schema),
validate columns, apply the tokenizer's chat template, count / drop over-length rows, write parquet.

What the data came from is known exactly:
- a local source (file or folder) is part of the rule's params as a digest of its files' names, sizes and
  modification times (`local_source_digest`, computed when the workflow is parsed): an edit reruns the step;
- a Hub source's revision is resolved to its commit at prepare time and recorded in stats.json
  (`resolved_revision`); `check_source_revision` resolves it again before training and refuses data prepared
  from another commit (a moved branch or tag). Offline (HF_HUB_OFFLINE=1) the check is skipped, with a log line.
An output rewritten byte-identically to one it had before gets that version's modification time back
(`record_outputs` in the job, `settle_kept_mtimes` at the next parse, after Snakemake has touched the outputs),
so nothing downstream reruns for it in a later invocation.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from mamba_align.train.recipes import DatasetSpec
from mamba_align.utils import UserError, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

SFT_COLUMNS = ("messages",)
PREF_COLUMNS = ("chosen", "rejected")


def load_split(spec: DatasetSpec, split: str, limit: int | None = None):
    """A split as (`datasets.Dataset`, where it came from): `<dir>/<split>.{parquet,jsonl,json}` for a local folder,
    else the Hub. An unreadable or empty file is an error naming it."""
    import datasets

    src = Path(spec.source)
    if src.exists():
        if src.is_dir():
            files = [src / f"{split}.{ext}" for ext in ("parquet", "jsonl", "json")]
            found = [f for f in files if f.exists()]
            if not found:
                raise UserError(f"dataset folder {src} has no {split}.parquet / {split}.jsonl / {split}.json")
            path = found[0]
        else:
            path = src
        where = str(path)
        kind = "parquet" if path.suffix == ".parquet" else "json"
        expected = "a parquet file" if kind == "parquet" else "UTF-8 JSON Lines (or a JSON list) of rows"
        if kind == "json":
            _check_utf8(path, expected)
        if _no_rows(path, kind):  # datasets raises StopIteration (JSON) or ArrowInvalid (parquet) on those
            raise UserError(f"{path}: no rows; expected {expected} in the Hub schema")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:  # DatasetGenerationError, with the parser's error as its cause
            cause = e.__cause__ or e
            raise UserError(f"{path}: cannot be read ({type(cause).__name__}: {cause}); expected {expected}") from e
    else:
        where = f"dataset {spec.source} (revision {spec.revision}, split {split})"
        try:
            ds = datasets.load_dataset(spec.source, revision=spec.revision, split=split)
        except Exception as e:  # the Hub raises many types; name the dataset, revision and split
            raise UserError(f"cannot load {where}: {e}") from e
    if len(ds) == 0:
        raise UserError(f"{where}: no rows; expected the split's rows in the Hub schema")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds, where


def _no_rows(path: Path, kind: str) -> bool:
    if kind == "json":
        return path.stat().st_size == 0
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == 0
    except Exception:  # not a parquet file: load_dataset names the problem
        return False


def _check_utf8(path: Path, expected: str) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 (byte {chunk[e.start]:#04x} at offset {offset + e.start}); "
                                f"expected {expected}") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 (the file ends inside a character); expected {expected}") from None


def valid_rows(spec: DatasetSpec, split: str, limit: int | None, columns: tuple, expected: str, valid):
    """The split's rows for which `valid(row)` holds, as (dataset, rows read, where); a missing column, or no valid
    row at all, is an error naming the data and what a row should hold."""
    ds, where = load_split(spec, split, limit)
    require_columns(ds, columns, where)
    n_in = len(ds)
    ds = ds.filter(valid)
    if len(ds) == 0:
        raise UserError(f"{where}: none of its {n_in} rows is well formed; expected {expected}")
    return ds, n_in, where


def require_columns(ds, columns, where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(ds.column_names)}")


CONVERSATION = ("a list of {role, content} turns (roles system / user / assistant, content a string) that ends "
                "with an assistant turn")


def _valid_conversation(msgs) -> bool:
    return (
        isinstance(msgs, list) and len(msgs) >= 2
        and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs)
        and msgs[-1]["role"] == "assistant"
    )


def with_system_turn(tokenizer, msgs: list[dict]) -> list[dict]:
    # As the alignment-handbook does for Zephyr: an empty system turn when the template has one.
    if msgs[0]["role"] != "system" and "system" in (tokenizer.chat_template or ""):
        return [{"role": "system", "content": ""}] + msgs
    return msgs


def _load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise UserError(f"tokenizer in {model_dir} has no chat template")
    return tok


def prepare_sft_data(spec: DatasetSpec, model_dir, out_dir, max_seq_length: int, packing: bool,
                     inputs=()) -> dict:
    """Write out_dir/{train,test}.parquet with `messages` and `text` (the rendered conversation). `inputs`: the
    job's input paths (see record_outputs)."""
    tok = _load_tokenizer(model_dir)
    out_dir = Path(out_dir)
    stats: dict = {"source": spec.source, "revision": spec.revision, **_source_record(spec),
                   "max_seq_length": max_seq_length, "packing": packing}
    for name, split, limit in (("train", spec.train_split, spec.max_train_samples),
                               ("test", spec.test_split, spec.max_test_samples)):
        if split is None:
            continue
        ds, n_in, where = valid_rows(spec, split, limit, SFT_COLUMNS, f"'messages': {CONVERSATION}",
                                     lambda r: _valid_conversation(r["messages"]))
        n_malformed = n_in - len(ds)

        def render(row):
            text = tok.apply_chat_template(with_system_turn(tok, row["messages"]), tokenize=False)
            return {"text": text, "n_tokens": len(tok(text, add_special_tokens=False)["input_ids"])}

        ds = ds.map(render)
        n_long = sum(1 for n in ds["n_tokens"] if n > max_seq_length)
        if not packing:  # packed rows are cut at max_seq_length anyway; unpacked ones would be truncated
            ds = ds.filter(lambda r: r["n_tokens"] <= max_seq_length)
            if len(ds) == 0:
                raise UserError(f"{where}: every row is longer than max_seq_length {max_seq_length} tokens; "
                                f"expected some that fit (or packing: true)")
        keep = [c for c in ("prompt_id", "messages", "text", "n_tokens") if c in ds.column_names]
        ds = ds.select_columns(keep)
        _write_parquet(ds, out_dir / f"{name}.parquet")
        stats[name] = {"split": split, "rows_in": n_in, "malformed_dropped": n_malformed,
                       "over_length": n_long, "over_length_dropped": 0 if packing else n_long,
                       "rows_out": len(ds), "tokens": int(sum(ds["n_tokens"]))}
        log.info("SFT %s (%s): %s", name, split, stats[name])
    write_json(out_dir / "stats.json", stats)
    # the data training reads (stats.json gains the job's provenance afterwards, and nothing trains on it)
    record_outputs(out_dir, [f"{n}.parquet" for n in ("train", "test") if n in stats], inputs)
    return stats


def prepare_preference_data(spec: DatasetSpec, model_dir, out_dir, max_length: int, max_prompt_length: int,
                            inputs=()) -> dict:
    """Write out_dir/{train,test}.parquet with `prompt` (templated, ending in the generation prompt),
    `chosen` and `rejected` (the assistant reply followed by eos). Over-length pairs are counted;
    the DPO trainer truncates them (prompt to max_prompt_length, pair to max_length) as the handbook does."""
    tok = _load_tokenizer(model_dir)
    out_dir = Path(out_dir)
    stats: dict = {"source": spec.source, "revision": spec.revision, **_source_record(spec),
                   "max_length": max_length, "max_prompt_length": max_prompt_length}
    for name, split, limit in (("train", spec.train_split, spec.max_train_samples),
                               ("test", spec.test_split, spec.max_test_samples)):
        if split is None:
            continue
        ds, n_in, where = valid_rows(spec, split, limit, PREF_COLUMNS, f"'chosen' and 'rejected' each {CONVERSATION}",
                                     lambda r: _valid_conversation(r["chosen"]) and _valid_conversation(r["rejected"]))
        n_malformed = n_in - len(ds)
        # a pair whose replies are the same teaches nothing (its DPO loss is the constant log 2)
        ds = ds.filter(lambda r: r["chosen"][-1]["content"] != r["rejected"][-1]["content"])
        n_identical = n_in - n_malformed - len(ds)
        if n_identical:
            log.warning("%s: dropped %d of %d pairs whose chosen and rejected replies are the same", where,
                        n_identical, n_in)
        if len(ds) == 0:
            raise UserError(f"{where}: every well-formed pair has the same chosen and rejected reply; expected pairs "
                            f"that differ")

        def render(row):
            prompt = tok.apply_chat_template(with_system_turn(tok, row["chosen"][:-1]), tokenize=False,
                                             add_generation_prompt=True)
            chosen = row["chosen"][-1]["content"] + tok.eos_token
            rejected = row["rejected"][-1]["content"] + tok.eos_token
            n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
            n_prompt = n(prompt)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "n_prompt_tokens": n_prompt,
                    "n_tokens": n_prompt + max(n(chosen), n(rejected))}

        ds = ds.map(render, remove_columns=[c for c in ds.column_names if c not in ("prompt_id",)])
        long_prompt = sum(1 for n in ds["n_prompt_tokens"] if n > max_prompt_length)
        long_pair = sum(1 for n in ds["n_tokens"] if n > max_length)
        _write_parquet(ds, out_dir / f"{name}.parquet")
        stats[name] = {"split": split, "rows_in": n_in, "malformed_dropped": n_malformed,
                       "identical_pair_dropped": n_identical, "prompt_over_max_prompt_length": long_prompt,
                       "pair_over_max_length": long_pair, "rows_out": len(ds)}
        log.info("preferences %s (%s): %s", name, split, stats[name])
    write_json(out_dir / "stats.json", stats)
    # the data training reads (stats.json gains the job's provenance afterwards, and nothing trains on it)
    record_outputs(out_dir, [f"{n}.parquet" for n in ("train", "test") if n in stats], inputs)
    return stats


def _write_parquet(ds, path: Path) -> None:
    from mamba_align.utils import atomic_path

    with atomic_path(path) as tmp:
        ds.to_parquet(str(tmp))


# ---------------------------------------------------------------------------------------------------
# What the data came from
# ---------------------------------------------------------------------------------------------------

COMMIT = re.compile(r"[0-9a-f]{40}")


def is_local(source: str) -> bool:
    return Path(source).exists()


def local_source_digest(source: str) -> str | None:
    """For a local source (file or folder): a digest of its files' relative paths, sizes and modification times
    (no reads, so cheap at every parse also for GBs of data; an edit, a copy over it or a renamed file changes it).
    None for a Hub id."""
    src = Path(source)
    if not src.exists():
        return None
    files = sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(src) if src.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_revision(source: str, revision: str | None) -> str | None:
    """The commit a Hub dataset's revision (tag, branch, None for the default branch) points at now; None offline.
    A full commit sha is its own answer (no network)."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    if hub_offline():
        return None
    from huggingface_hub import HfApi

    return HfApi().dataset_info(source, revision=revision).sha


def _source_record(spec: DatasetSpec) -> dict:
    if is_local(spec.source):
        return {}  # identified by the rule's params (local_source_digest), kept out of stats.json so that an
        # unchanged output stays byte-identical
    try:
        resolved = resolve_revision(spec.source, spec.revision)
    except Exception as e:  # the load below names an unreachable dataset; the revision stays unrecorded
        log.warning("dataset %s: revision %s not resolved (%s: %s)", spec.source, spec.revision, type(e).__name__, e)
        resolved = None
    if resolved is None:
        log.info("dataset %s: revision %s not resolved to a commit (offline: HF_HUB_OFFLINE=1); training will not "
                 "be able to check it", spec.source, spec.revision)
    return {"resolved_revision": resolved}


def check_source_revision(train_file, resolve=resolve_revision) -> str | None:
    """Before training on prepared data: a Hub source's revision must still resolve to the commit recorded when
    the data was prepared (read from stats.json beside `train_file`). Returns the commit checked, or None where
    there is nothing to check (local source, no record, offline: each logged)."""
    stats_path = Path(train_file).with_name("stats.json")
    if not stats_path.is_file():
        log.info("%s: no stats.json beside it; the dataset revision is not checked", train_file)
        return None
    stats = read_json(stats_path)
    source, revision = stats.get("source"), stats.get("revision")
    if "resolved_revision" not in stats:  # a local source (identified by its digest) or data from before this check
        return None
    recorded = stats["resolved_revision"]
    if recorded is None:
        log.warning("dataset %s (revision %s): no commit recorded in %s (prepared offline); not checked", source,
                    revision, stats_path)
        return None
    if hub_offline() and not (revision and COMMIT.fullmatch(revision)):
        log.info("dataset %s (revision %s): offline (HF_HUB_OFFLINE=1), so not checked against the Hub; prepared "
                 "from commit %s", source, revision, recorded)
        return None
    try:
        now = resolve(source, revision)
    except Exception as e:
        log.warning("dataset %s (revision %s): cannot reach the Hub to check the revision (%s: %s); prepared from "
                    "commit %s", source, revision, type(e).__name__, e, recorded)
        return None
    if now != recorded:
        raise UserError(f"dataset {source}: revision {revision!r} now points at commit {now}, but {stats_path.parent} "
                        f"was prepared from commit {recorded}; pin the revision in the recipe, or rerun the data step "
                        f"(snakemake --forcerun prepare_sft_data / prepare_preference_data)")
    log.info("dataset %s: revision %s is still commit %s", source, revision, now)
    return now


# ---------------------------------------------------------------------------------------------------
# Outputs rewritten byte-identically keep their modification time
# ---------------------------------------------------------------------------------------------------

HISTORY = ".outputs-history.json"  # beside the outputs, not one of them: Snakemake leaves it alone
KEEP_VERSIONS = 8


def _newest_mtime_ns(paths) -> int:
    newest = 0
    for p in map(Path, paths):
        if p.is_dir():
            for root, _, files in os.walk(p, followlinks=True):
                newest = max([newest, os.stat(root).st_mtime_ns,
                              *(os.stat(os.path.join(root, f)).st_mtime_ns for f in files)])
        elif p.exists():
            newest = max(newest, p.stat().st_mtime_ns)
    return newest


def _read_history(out_dir: Path) -> dict:
    try:
        return read_json(out_dir / HISTORY)
    except (FileNotFoundError, json.JSONDecodeError):
        return {"versions": {}, "written": {}}


def record_outputs(out_dir, names, inputs=()) -> dict:
    """After a job wrote `names` in out_dir: an output byte-identical to a version it had before is marked to get
    that version's modification time back, provided that is still newer than every input (else the next run
    would see the output as stale and rerun for ever). Snakemake touches a job's outputs after the job, so the
    times are restored by `settle_kept_mtimes`, which the workflow calls when it is next parsed. Returns the
    files marked {name: mtime_ns}."""
    out_dir = Path(out_dir)
    history = _read_history(out_dir)
    newest_input = _newest_mtime_ns(inputs)
    restore = {}
    for name in names:
        f = out_dir / name
        digest = sha256_file(f)
        versions = history["versions"].setdefault(name, {})
        old = versions.get(digest)
        keep = old is not None and old["mtime_ns"] > newest_input
        if keep:
            restore[name] = old["mtime_ns"]
            log.info("%s is byte-identical to its version of %s: that modification time is kept, so nothing "
                     "downstream reruns for it", f, time.strftime("%Y-%m-%d %H:%M:%S",
                                                                   time.localtime(old["mtime_ns"] / 1e9)))
        st = f.stat()
        history["written"][name] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                    "restore_ns": old["mtime_ns"] if keep else None}
    write_json(out_dir / HISTORY, history)
    return restore


def settle_kept_mtimes(out_dir) -> dict:
    """Finish what record_outputs began, once Snakemake has touched the outputs: give each output marked for it
    its earlier modification time, and remember each new version's final time. An output changed since (another
    size, or a time older than the job left it) is left alone. Returns {name: mtime_ns restored}."""
    out_dir = Path(out_dir)
    if not (out_dir / HISTORY).is_file():
        return {}
    history = _read_history(out_dir)
    restored = {}
    for name, w in list(history["written"].items()):
        f = out_dir / name
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_size != w["size"] or st.st_mtime_ns < w["mtime_ns"]:
            history["written"].pop(name)  # not the file the job wrote
            continue
        if w["restore_ns"] is not None:
            os.utime(f, ns=(st.st_atime_ns, w["restore_ns"]))
            restored[name] = w["restore_ns"]
        mtime = w["restore_ns"] or st.st_mtime_ns
        versions = history["versions"].setdefault(name, {})
        versions.pop(w["sha256"], None)
        versions[w["sha256"]] = {"mtime_ns": mtime}
        while len(versions) > KEEP_VERSIONS:
            versions.pop(next(iter(versions)))
        history["written"].pop(name)
    write_json(out_dir / HISTORY, history)
    if restored:
        log.info("%s: %s kept their earlier modification times (rewritten byte-identically)", out_dir,
                 ", ".join(restored))
    return restored
