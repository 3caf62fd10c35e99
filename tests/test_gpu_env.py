"""The GPU environment definitions: pinned, the same pins in the conda env and the container, wired to the rules.

What cannot run here (no conda, no apptainer, no internet on the GPU machine) is not tested: creating the env,
building the image, compiling the kernels."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mamba_align.ops.jobenv import jobenv

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "workflow" / "envs"


def conda_pins() -> dict[str, str]:
    env = yaml.safe_load((ENVS / "mamba-align.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for req in pip:
        name, sep, version = req.partition("==")
        assert sep and version, f"not pinned: {req}"
        pins[name.lower()] = version
    return pins


def test_conda_env_is_valid_yaml_with_every_pip_package_pinned():
    env = yaml.safe_load((ENVS / "mamba-align.yaml").read_text())
    assert "python=3.12" in env["dependencies"]
    pins = conda_pins()
    assert pins["torch"] == "2.11.0" and {"transformers", "trl", "snakemake", "tensorboard"} <= set(pins)
    post = (ENVS / "mamba-align.post-deploy.sh").read_text()
    assert "mamba-ssm==2.3.2.post1" in post and "causal-conv1d==1.7.0" in post and "--no-build-isolation" in post


def test_rules_use_the_env_and_the_container():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        assert n_rules == text.count('conda:\n        "../envs/mamba-align.yaml"'), smk
    assert 'container: "workflow/envs/mamba-align.sif"' in (REPO / "Snakefile").read_text()


def test_jobs_import_the_checkout(tmp_path):
    env = {"PYTHONPATH": "/elsewhere"}
    jobenv.use_checkout_source("/repo/src", env)
    jobenv.use_checkout_source("/repo/src", env)
    assert env["PYTHONPATH"] == "/repo/src:/elsewhere"
