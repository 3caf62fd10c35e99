"""Silence htcondor2's "CONDOR_CONFIG unset" warning where no HTCondor is configured, and only there.

Snakemake imports every installed executor plugin when it starts, so wherever the `condor` extra (htcondor2) is
installed each snakemake command imports htcondor2, which warns when it finds no configuration and then uses
/dev/null. Setting CONDOR_CONFIG=/dev/null in exactly that case changes nothing but the warning; on an access
point (a config in a default place, or CONDOR_CONFIG set) nothing is touched. The plugin is imported before the
Snakefile is read, so the fix runs at interpreter start: PTH_LINE in a `mamba_align_condor.pth` in the
environment's site-packages. Every install route writes that file: `make setup`, `python -m
mamba_align.ops.jobenv.condor_env` after a pip install, the container's %post (workflow/envs/mamba-align.def) and the
conda env's post-deploy script; the line uses the standard library only, as the container and the conda env do
not install mamba_align. common.smk calls quiet_condor_config too, for the jobs snakemake starts (they inherit
the variable). Not the container's %environment: a variable set there would override a pool's CONDOR_CONFIG.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# where htcondor2 looks when CONDOR_CONFIG is unset (htcondor2/__init__.py, _set_null_config)
DEFAULT_LOCATIONS = ("~/.condor/condor_config", "/etc/condor/condor_config", "/usr/local/etc/condor_config",
                     "~condor/condor_config")
PTH_NAME = "mamba_align_condor.pth"
# quiet_condor_config as one .pth line (site.py executes a line that starts with "import")
PTH_LINE = ('import os; "CONDOR_CONFIG" in os.environ or any(os.path.isfile(os.path.expanduser(f)) for f in '
            f'{DEFAULT_LOCATIONS!r}) or os.environ.__setitem__("CONDOR_CONFIG", "/dev/null")')


def quiet_condor_config(environ=os.environ) -> bool:
    """Set CONDOR_CONFIG=/dev/null when it is unset and no default config exists; True if it did."""
    if "CONDOR_CONFIG" in environ:
        return False
    if any(Path(os.path.expanduser(p)).is_file() for p in DEFAULT_LOCATIONS):
        return False
    environ["CONDOR_CONFIG"] = "/dev/null"
    return True


def write_pth(site_dir: str | os.PathLike | None = None) -> Path:
    """Write the .pth into `site_dir` (default: this interpreter's site-packages); return its path."""
    import sysconfig

    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE + "\n")
    return path


if __name__ == "__main__":  # python -m mamba_align.ops.jobenv.condor_env [SITE_DIR]
    print(write_pth(sys.argv[1] if len(sys.argv) > 1 else None))
