"""Shared helpers of the cluster tier: a scratch copy of the repository to run Snakemake in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# never copied: run state and outputs of the checkout, the environment, VCS data
_SKIP = {".venv", ".snakemake", "results", ".git", ".pytest_cache", "__pycache__", ".gpu", ".whl", "build"}


def copy_repo(dst: Path) -> Path:
    """Copy the working tree (not results/, .venv, .snakemake, .git) to `dst`; the venv is reused."""

    def ignore(directory, names):
        top = Path(directory) == REPO
        return [n for n in names if n in _SKIP and (top or n in {"__pycache__", ".pytest_cache"})]

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    (dst / "results").mkdir(exist_ok=True)
    return dst


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """One scratch copy per test module (dry runs only write .snakemake/ there)."""
    return copy_repo(tmp_path_factory.mktemp("repo") / "mamba-align")


@pytest.fixture
def fresh_repo_copy(tmp_path) -> Path:
    """A scratch copy for one test that runs the workflow."""
    return copy_repo(tmp_path / "mamba-align")
