"""A config that fails its schema, said in one line.

snakemake's `validate` raises a WorkflowError carrying jsonschema's ValidationError, whose text is the whole
schema and the whole config: 1,240 lines for one misspelled top-level key, the line that matters at the top.
"""

from __future__ import annotations

import difflib

SCHEMA = "workflow/schemas/config.schema.yaml"


def config_error(err: BaseException) -> str:
    """One line for a failed config validation: the key's path, the schema's complaint and what it expects;
    for an unknown key, the keys allowed there and the closest one. Any other error: its own text."""
    from jsonschema import ValidationError

    # snakemake's WorkflowError keeps only the text; the ValidationError is the exception it was raised from
    cause = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, ValidationError)), None)
    if cause is None:
        return str(err)
    where = ".".join(map(str, cause.absolute_path))
    if cause.validator == "additionalProperties" and isinstance(cause.instance, dict):
        known = list(cause.schema.get("properties", {}))
        unknown = [k for k in cause.instance if k not in known]
        prefix = f"{where}." if where else ""
        hints = [f"{prefix}{k}" + (f" (did you mean {prefix}{m[0]}?)" if (m := difflib.get_close_matches(k, known, 1))
                                   else "") for k in unknown]
        return (f"config: unknown key {', '.join(hints)}; the keys allowed {f'in {where}' if where else 'at the top'} "
                f"are {', '.join(known)} ({SCHEMA})")
    message = cause.message if len(cause.message) <= 300 else cause.message[:300] + "..."
    description = cause.schema.get("description") if isinstance(cause.schema, dict) else None
    return f"config key {where or '(top level)'}: {message}" + (f" (schema: {description})" if description else "")
