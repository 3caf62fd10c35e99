"""The package layout docs/architecture.md describes: imports point down the stages, every module is in the
document, none is large."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "mamba_align"
DOC = PKG.parents[1] / "docs" / "architecture.md"
# what each folder may import (process, flock, utils are top-level modules; cli/, the top, may import anything);
# ops/ by its parts: store (the results folder) below jobenv (where a job runs), both below reporting (plan, report)
LOW = {"process", "flock", "utils"}
MAY_IMPORT = {
    "process": set(),
    "flock": set(),
    "utils": {"process"},
    "model": LOW | {"model"},
    "train": LOW | {"model", "train"},
    "eval": LOW | {"model", "train", "eval"},
    "ops/schema": LOW,
    "ops/jobenv": LOW | {"model", "train", "ops/store", "ops/jobenv"},
    "ops/condor_env": {"ops/jobenv"},  # the old name in earlier environments' .pth
    "ops/store": LOW | {"model", "train", "ops/schema", "ops/store"},  # provenance.load_config: schema errors
    "ops/reporting": LOW | {"model", "train", "ops/schema", "ops/jobenv", "ops/store", "ops/reporting"},
    "testing": LOW | {"model", "testing"},
}
# single modules a folder may import beyond MAY_IMPORT: the plan prices the judge from its typed settings
ALSO_MAY_IMPORT = {"ops/reporting": {"mamba_align.eval.judge.settings"}}
MAX_LINES = 450


def part(names: list[str]) -> str:
    """The folder a module path (relative to the package, without .py) belongs to; ops/ by its sub-package."""
    if names[0] == "ops" and len(names) > 1:
        return f"ops/{names[1]}"
    return names[0]


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        yield path, part([*rel.parts[:-1], rel.stem])


def imported_parts(path: Path, allowed: set[str] = frozenset()) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
        for name in names:
            if name.startswith("mamba_align.") and name not in allowed:
                parts.add(part(name.split(".")[1:]))
    return parts


def test_imports_point_down_the_stages():
    wrong = []
    for path, folder in modules():
        if folder in ("cli", "__init__", "ops/__init__"):
            continue
        bad = imported_parts(path, ALSO_MAY_IMPORT.get(folder, set())) - MAY_IMPORT[folder]
        if bad:
            wrong.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not wrong, wrong


def test_every_module_is_in_the_architecture_document():
    doc = DOC.read_text()
    named = set(re.findall(r"`([\w/]+)\.py`", doc)) | set(re.findall(r"(\w+)\.py", doc))
    missing = [str(p.relative_to(PKG)) for p, _ in modules()
               if p.stem not in ("__init__", "__main__") and p.stem not in named]
    assert not missing, f"not described in docs/architecture.md: {missing}"


def test_no_module_is_large():
    large = {str(p.relative_to(PKG)): n for p, _ in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not large, large
