"""The environment every job of the workflow inherits from the snakemake process (set by common.smk)."""

from __future__ import annotations

import os


def use_checkout_source(src: str, environ=os.environ) -> None:
    """Put the checkout's src/ first on PYTHONPATH, so that every job, also inside a `--sdm conda` env or the
    container (which carry only the dependencies), imports mamba_align from the checkout: never a stale copy."""
    parts = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        environ["PYTHONPATH"] = os.pathsep.join([src, *parts])
