"""No htcondor2 "CONDOR_CONFIG unset" warning outside HTCondor; nothing changed where HTCondor is configured."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_align.ops.jobenv import condor_env


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
    code = ("import mamba_align.ops.jobenv.condor_env as m; m.quiet_condor_config(); "
            "import snakemake_executor_plugin_htcondor")
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and "CONDOR_CONFIG" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", "import htcondor2"], env=env, capture_output=True, text=True)
    import sysconfig

    if not os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "mamba_align_condor.pth")):
        assert "CONDOR_CONFIG is unset" in loud.stderr  # what the helper silences (no .pth from make setup)
    else:
        assert "CONDOR_CONFIG" not in loud.stderr  # make setup's .pth silences it at interpreter start


REPO = Path(__file__).resolve().parents[1]
NO_CONFIG_HERE = any(os.path.isfile(os.path.expanduser(p)) for p in condor_env.DEFAULT_LOCATIONS)


def run_with_pth(tmp_path, code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that processes only the .pth that write_pth put in a folder of its own
    (-S: not the venv's, which `make setup` may have given one; the venv's packages stay importable)."""
    import sysconfig

    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    condor_env.write_pth(site_dir)
    clean = {k: v for k, v in os.environ.items() if k != "CONDOR_CONFIG"}
    clean["PYTHONPATH"] = os.pathsep.join([sysconfig.get_paths()["purelib"], str(REPO / "src")])
    return subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site_dir)!r}); {code}"],
                          env=clean | env, capture_output=True, text=True)


@pytest.mark.skipif(NO_CONFIG_HERE, reason="an HTCondor config exists here")
def test_the_pth_line_does_what_quiet_condor_config_does(tmp_path):
    show = "import os; print(os.environ.get('CONDOR_CONFIG'))"
    assert run_with_pth(tmp_path, show).stdout.strip() == "/dev/null"
    assert run_with_pth(tmp_path, show, CONDOR_CONFIG="/pool/condor_config").stdout.strip() == "/pool/condor_config"
    (tmp_path / ".condor").mkdir()
    (tmp_path / ".condor" / "condor_config").write_text("")
    assert run_with_pth(tmp_path, show, HOME=str(tmp_path)).stdout.strip() == "None"  # an access point's config


@pytest.mark.skipif(importlib.util.find_spec("htcondor2") is None or NO_CONFIG_HERE,
                    reason="htcondor (the condor extra) not installed, or an HTCondor config exists here")
def test_snakemake_starts_without_the_warning_in_an_env_with_the_pth(tmp_path):
    """#29: a pip install with the condor extra but without `make setup` warned at every snakemake start (the
    executor plugins load before the Snakefile is read); `python -m mamba_align.ops.jobenv.condor_env` writes the
    .pth."""
    proc = run_with_pth(tmp_path, "import sys; sys.argv = ['snakemake', '--version']; "
                                  "from snakemake.cli import main; main()")
    assert "9." in proc.stdout and "CONDOR_CONFIG" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("route", ["workflow/envs/mamba-align.def", "workflow/envs/mamba-align.post-deploy.sh"])
def test_the_container_and_the_conda_env_write_the_same_pth(route):
    """The container and the conda env do not install mamba_align: they write PTH_LINE itself (standard library
    only) into their site-packages, as `make setup` does; not an %environment CONDOR_CONFIG, which would override
    a pool's."""
    text = (REPO / route).read_text()
    assert f'/{condor_env.PTH_NAME}" <<\'PTH\'\n{condor_env.PTH_LINE}\nPTH\n' in text
    assert "CONDOR_CONFIG=" not in text


def test_write_pth_writes_the_line(tmp_path):
    path = condor_env.write_pth(tmp_path)
    assert path == tmp_path / "mamba_align_condor.pth" and path.read_text() == condor_env.PTH_LINE + "\n"
