"""Fixtures shared by the test tiers."""

from __future__ import annotations

from pathlib import Path

import pytest
from wfhelpers import copy_workflow


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    return copy_workflow(tmp_path / "wf")
