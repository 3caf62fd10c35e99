"""Silence htcondor2's "CONDOR_CONFIG unset" warning where no HTCondor is configured, and only there.

Snakemake imports every installed executor plugin when it starts, so with the `condor` extra installed
(`make setup` installs it for the tests) each snakemake command imports htcondor2, which warns when it
finds no configuration and then uses /dev/null. Setting CONDOR_CONFIG=/dev/null in exactly that case
changes nothing but the warning; on an access point (a config in a default place, or CONDOR_CONFIG set)
nothing is touched. `make setup` runs this at interpreter start through a .pth file in the venv (the
plugin is imported before the Snakefile is read); common.smk runs it too, for the jobs snakemake starts.
"""

from __future__ import annotations

import os
from pathlib import Path

# where htcondor2 looks when CONDOR_CONFIG is unset (htcondor2/__init__.py, _set_null_config)
DEFAULT_LOCATIONS = ("~/.condor/condor_config", "/etc/condor/condor_config", "/usr/local/etc/condor_config",
                     "~condor/condor_config")


def quiet_condor_config(environ=os.environ) -> bool:
    """Set CONDOR_CONFIG=/dev/null when it is unset and no default config exists; True if it did."""
    if "CONDOR_CONFIG" in environ:
        return False
    if any(Path(os.path.expanduser(p)).is_file() for p in DEFAULT_LOCATIONS):
        return False
    environ["CONDOR_CONFIG"] = "/dev/null"
    return True
