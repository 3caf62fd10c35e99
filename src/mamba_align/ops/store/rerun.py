"""A rule's settings as Snakemake's params, so that a rerun's reason names the settings that changed.

Snakemake records each param of a job as `repr(value)` and, when a record differs, prints every differing value
"before: ... now: ...": a whole recipe, judge or model chain (tens of KB over a run's jobs) for one changed key.
`settings_params` gives a rule, for a settings dict (or a list of dicts):

- the param `name`: the whole value for the script (a dict, or list, whose repr is only a digest, so Snakemake
  records `'settings#<sha256 prefix>'`, and provenance still records every key);
- one param per setting, `name.<path>`, recorded as `'<path>=<value>'` (`'beta=0.05'`, `'dpo.beta=0.05'`):
  a change shows as `before: 'beta=0.01' now: 'beta=0.05'`.

What reruns is unchanged: a job reruns when any setting differs (the digest covers the whole value, also a key
no setting param names). Records written before this form (the whole repr of the value) are translated once by
`migrate_records` when the workflow is read, into what this form records for that same value, so a finished run
does not rerun for the new form, and a setting that really changed still does; the same pass drops from a rule's
records a settings param the rule no longer has (DROPPED_PARAMS).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

DIGEST = "settings#"

# The rules whose dict params earlier versions recorded as a whole repr (their records may need migrate_records).
# A rule added later records the new form from its first run: it needs no entry here. (A record that holds a
# digest is never translated, so each of these rules keeps at least one settings_params param.)
OLD_FORM_RULES = frozenset({
    "build_demo_inputs", "plan", "report", "report_experiments", "fetch_alpaca_eval",
    "prepare_base_model", "prepare_sft_data", "prepare_preference_data", "train_sft", "train_dpo",
    "generate_mt_bench", "generate_alpaca_eval", "judge_mt_bench", "judge_alpaca_eval",
    *(f"{r}_grid" for r in ("prepare_base_model", "prepare_sft_data", "prepare_preference_data", "train_sft",
                            "train_dpo", "generate_mt_bench", "generate_alpaca_eval", "judge_mt_bench",
                            "judge_alpaca_eval")),
})


# Settings params rules no longer have: {rule: the param's top-level keys}. The grid's training rules recorded the
# experiment's recipe name and overrides (`config`) for their jobs to read the operational keys from; with those
# in the record, an operational override reran every training run of the grid. Their learned settings are the
# `recipe` param.
DROPPED_PARAMS = {"train_sft_grid": ("recipe", "recipe_overrides"), "train_dpo_grid": ("recipe", "recipe_overrides")}


def is_settings(value: Any) -> bool:
    """A dict, or a list holding a dict: what settings_params splits into one param per setting."""
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def settings(value: Any) -> dict[str, str]:
    """{path: 'path=value'}: every leaf of `value` (dicts and lists of dicts are followed), dotted paths."""
    out: dict[str, str] = {}

    def walk(v, path):
        items = v.items() if isinstance(v, dict) else enumerate(v) if is_settings(v) else None
        if items is None or (path and not v):
            out[path] = f"{path}={v!r}"
            return
        for k, x in items:
            walk(x, f"{path}.{k}" if path else str(k))

    walk(value, "")
    return out


def digest(value: Any) -> str:
    """What Snakemake records for the whole value: a hash of all its settings."""
    return _digest(type(value).__name__, settings(value).values())


def _digest(type_name: str, lines: Iterable[str]) -> str:
    text = "\n".join(sorted(lines))
    return repr(DIGEST + hashlib.sha256(f"{type_name}\n{text}".encode()).hexdigest()[:12])


class SettingsDict(dict):
    """A dict that Snakemake records by its digest (repr); everything else sees a dict."""
    __slots__ = ()

    def __repr__(self) -> str:
        return digest(dict(self))


class SettingsList(list):
    """A list of dicts that Snakemake records by its digest (repr); everything else sees a list."""
    __slots__ = ()

    def __repr__(self) -> str:
        return digest(list(self))


class _Absent:
    """A setting the job's value lacks: not a builtin type, so Snakemake records nothing for it."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return SettingsDict(value)
    return SettingsList(value) if is_settings(value) else value


def recorded(value: Any) -> list[str]:
    """What Snakemake records of a settings param's value in this form: its digest and each setting."""
    return [digest(value), *(repr(s) for s in settings(value).values())]


def settings_params(name: str, value: Any, like: Iterable[Any] = ()) -> dict[str, Callable]:
    """A rule's params for the settings `value` (a dict or list of dicts, or a function of the wildcards giving
    one): `name` for the script (the whole value) and `name.<path>` per setting (see the module's doc).
    For a function, `like` lists values it may return: their paths are the setting params (a setting under
    another path still reruns the job, through the digest, but is not named in the reason).
    Every param is a function of the wildcards, so that Snakemake neither formats `{...}` in a value nor turns
    the value into a plain dict."""
    examples = list(like) if callable(value) else [value]
    value_of = _per_job(value if callable(value) else (lambda wildcards: value))
    params = {name: lambda wildcards: value_of(wildcards)[0]}
    for path in dict.fromkeys(p for ex in examples if is_settings(ex) for p in settings(ex)):
        params[f"{name}.{path}"] = _setting(value_of, path)
    return params


def whole(params) -> dict:
    """A job's named params without the per-setting ones (`name.<path>`, whose values are in `name`): what a
    record of the job (provenance) needs."""
    return {k: v for k, v in params.items() if "." not in k}


def _per_job(fn: Callable) -> Callable:
    """(the wrapped value, its settings) for the wildcards: computed once per job, not once per param."""
    seen: dict[tuple, tuple] = {}

    def value_of(wildcards):
        key = tuple(sorted(dict(wildcards.items()).items()))
        if key not in seen:
            v = fn(wildcards)
            seen[key] = wrap(v), (settings(v) if is_settings(v) else {})
        return seen[key]

    return value_of


def _setting(value_of: Callable, path: str) -> Callable:
    def setting(wildcards):
        return value_of(wildcards)[1].get(path, ABSENT)

    return setting


# --- records written by earlier versions ------------------------------------------------------------------------

def translate(params: list) -> list | None:
    """A record's params in this form, or None when it holds nothing to translate: each recorded whole dict (or
    list of dicts) becomes what this form records for that value. A record that holds a digest was written in this
    form already and is left alone."""
    if any(isinstance(s, str) and s.startswith(repr(DIGEST)[:-1]) for s in params):
        return None
    out, found = [], False
    for s in params:
        value = _value(s)
        if is_settings(value):
            out += recorded(value)
            found = True
        else:
            out.append(s)
    return sorted(out) if found else None


def drop(params: list, keys: Iterable[str]) -> list | None:
    """A record's params without those of a settings param the rule no longer has (a dict param whose top-level
    keys are `keys`): its settings and its digest, recomputed from them. None when the record holds none, or when
    the digest is not there (then the record is left alone: the job reruns once)."""
    keys = set(keys)
    mine = {s: v for s in params if isinstance(v := _value(s), str) and v.partition("=")[0].split(".")[0] in keys}
    its_digest = _digest("dict", mine.values())
    if not mine or its_digest not in params:
        return None
    return sorted(p for p in params if p not in mine and p != its_digest)


def _value(recorded_param):
    """The value a record's param is the repr of, or None when it is not one Python can read back."""
    try:
        return ast.literal_eval(recorded_param) if isinstance(recorded_param, str) else None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def migrate_records(metadata_dir: str | os.PathLike = ".snakemake/metadata",
                    rules: Iterable[str] = OLD_FORM_RULES | DROPPED_PARAMS.keys()) -> dict[str, list[str]]:
    """Bring the params of Snakemake's records (its file backend, one JSON file per output) of `rules` written by
    an earlier version to this version's: the earlier form translated (`translate`), the params a rule no longer
    has dropped (DROPPED_PARAMS, `drop`). Both keep what reruns: Snakemake compares the record with what this
    version records for the current settings, equal exactly when the settings are. Returns {rule: [output, ...]}."""
    root, rules, done = Path(metadata_dir), set(rules), {}
    if not root.is_dir():
        return done
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written by a running snakemake, or not a record
        if not isinstance(record, dict) or record.get("rule") not in rules or not isinstance(
                record.get("params"), list):
            continue
        params = translate(record["params"]) or record["params"]
        if record["rule"] in DROPPED_PARAMS:
            params = drop(params, DROPPED_PARAMS[record["rule"]]) or params
        if params == record["params"]:
            continue
        tmp = path.with_name(f".{path.name}.migrating-{os.getpid()}")
        tmp.write_text(json.dumps({**record, "params": params}))
        os.chmod(tmp, path.stat().st_mode)
        os.replace(tmp, path)
        done.setdefault(record["rule"], []).append(_output_of(root, path))
    return done


def _output_of(root: Path, record: Path) -> str:
    """The output a record file is of (Snakemake names it by the urlsafe base64 of the path, split in folders)."""
    name = "".join(part.lstrip("@") for part in record.relative_to(root).parts)
    try:
        return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return str(record)


def migration_note(done: dict[str, list[str]]) -> str | None:
    """One line for the console saying what migrate_records translated, or None."""
    if not done:
        return None
    outputs = [o for outs in done.values() for o in outs]
    shown = ", ".join(outputs[:5]) + (f" and {len(outputs) - 5} more" if len(outputs) > 5 else "")
    return (f"Snakemake's records of {len(outputs)} outputs ({', '.join(sorted(done))}) held their params in the "
            f"form of an earlier version; translated to this version's form (nothing reruns for that; a changed "
            f"setting still does): {shown}")
