"""config/README.md documents every key of the config schema, with a block that validates against it;
the catalog files exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in (node.get("properties") or {}).items():
        out.add(prefix + k)
        out |= keys(v, f"{prefix}{k}.")
    return out


def doc_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out.add(prefix + k)
        if isinstance(v, dict) and v:
            out |= doc_keys(v, f"{prefix}{k}.")
    return out


def test_every_schema_key_is_in_config_readme_and_the_block_validates():
    from snakemake.utils import validate

    schema_path = REPO / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    text = (REPO / "config" / "README.md").read_text()
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert keys(schema) - doc_keys(block) == set()
    validate(block, str(schema_path))
    for example in re.findall(r"```yaml\n(.*?)```", text, re.S)[1:]:
        data = yaml.safe_load(example)
        assert doc_keys(data) <= keys(schema) | {k for k in doc_keys(data) if k.startswith("recipe_overrides.")}


def test_catalog_files():
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True
    assert "--profile profiles/slurm" in catalog["usage"]["mandatory-flags"]["flags"]
    assert "config/demo.yaml" in (REPO / ".test" / "README.md").read_text()


def test_every_test_named_in_the_reliability_document_exists():
    """docs/reliability.md lists each fault case with its test: every `file::test` there is a test in tests/."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = []
    for row in re.findall(r"^\|.*\|$", doc, re.M):
        file = None
        for ref in re.findall(r"`([^`]+)`", row):
            m = re.match(r"(?:([\w/]+\.py))?::(\w+)(\[[^\]]*\])?$", ref)
            if not m:
                continue
            file = m.group(1) or file
            if not file or not re.search(rf"^(async )?def {m.group(2)}\(", (REPO / "tests" / file).read_text(), re.M):
                missing.append(f"{file}::{m.group(2)}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
    assert doc.count("::") > 60
