"""A config that fails its schema is said in one line: the key's path and the schema's complaint, not the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from wfhelpers import REPO, snakemake

from mamba_align.ops.schema import config_error

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def schema_error(config: dict) -> Exception:
    """The error snakemake's validate raises: a WorkflowError raised while handling jsonschema's error."""
    import jsonschema
    from snakemake.exceptions import WorkflowError

    try:
        try:
            jsonschema.Draft202012Validator(SCHEMA).validate(config)
        except jsonschema.ValidationError as e:
            raise WorkflowError("Error validating config file.", e)
    except WorkflowError as e:
        return e
    raise AssertionError("the config passed the schema")


@pytest.mark.parametrize("config, expected", [
    ({"base_modle": {"source": "x"}},
     "config: unknown key base_modle (did you mean base_model?); the keys allowed at the top are run_name, "),
    ({"judge": {"bakend": "local"}}, "config: unknown key judge.bakend (did you mean judge.backend?); the keys "
                                     "allowed in judge are backend, model, base_url"),
    ({"eval": {"generation_batch_size": "big"}},
     "config key eval.generation_batch_size: 'big' is not of type 'integer' (schema: "),
    ({"judge": {"backend": "gpt"}}, "config key judge.backend: 'gpt' is not one of ['openai', 'local'] (schema: "),
])
def test_a_schema_error_is_one_line_naming_the_key(config, expected):
    message = config_error(schema_error(config))
    assert message.startswith(expected) and "\n" not in message and len(message) < 500, message


def test_an_error_of_another_kind_keeps_its_text():
    assert config_error(ValueError("no such file")) == "no such file"


def test_an_unknown_top_level_key_prints_one_line_not_the_config(workflow_copy: Path):
    """Was: the right line, then 1,240 lines of schema and config."""
    (workflow_copy / "bad.yaml").write_text(yaml.safe_dump({"base_modle": {"source": "x"}}))
    proc = snakemake(workflow_copy, "-n", "--configfile", "config/demo.yaml", "bad.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config: unknown key base_modle (did you mean base_model?)" in out
    assert len(out.splitlines()) < 10 and "On instance" not in out and "'results_dir'" not in out, out
