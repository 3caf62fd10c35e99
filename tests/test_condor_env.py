"""No htcondor2 "CONDOR_CONFIG unset" warning outside HTCondor; nothing changed where HTCondor is configured."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from mamba_align.ops import condor_env


def test_sets_dev_null_only_where_htcondor_would(monkeypatch, tmp_path):
    monkeypatch.setattr(condor_env, "DEFAULT_LOCATIONS", (str(tmp_path / "condor_config"),))
    env = {}
    assert condor_env.quiet_condor_config(env) and env == {"CONDOR_CONFIG": "/dev/null"}
    env = {"CONDOR_CONFIG": "/pool/condor_config"}
    assert not condor_env.quiet_condor_config(env) and env == {"CONDOR_CONFIG": "/pool/condor_config"}
    (tmp_path / "condor_config").write_text("")
    env = {}
    assert not condor_env.quiet_condor_config(env) and env == {}


@pytest.mark.skipif(importlib.util.find_spec("htcondor2") is None, reason="htcondor (the condor extra) not installed")
def test_the_htcondor_plugin_imports_without_the_warning():
    if any(os.path.isfile(os.path.expanduser(p)) for p in condor_env.DEFAULT_LOCATIONS):
        pytest.skip("an HTCondor config exists here")
    env = {k: v for k, v in os.environ.items() if k != "CONDOR_CONFIG"}
    code = "import mamba_align.ops.condor_env as m; m.quiet_condor_config(); import snakemake_executor_plugin_htcondor"
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and "CONDOR_CONFIG" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", "import htcondor2"], env=env, capture_output=True, text=True)
    import sysconfig

    if not os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "mamba_align_condor.pth")):
        assert "CONDOR_CONFIG is unset" in loud.stderr  # what the helper silences (no .pth from make setup)
    else:
        assert "CONDOR_CONFIG" not in loud.stderr  # make setup's .pth silences it at interpreter start
