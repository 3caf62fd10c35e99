"""The name that environments set up before ops/ was split import at interpreter start: their
`mamba_align_condor.pth` reads `import mamba_align.ops.condor_env as m; m.quiet_condor_config()`. The module is
ops/jobenv/condor_env.py; `python -m mamba_align.ops.jobenv.condor_env` rewrites such a .pth with its
standard-library line, which imports nothing of mamba_align."""

from mamba_align.ops.jobenv.condor_env import quiet_condor_config  # noqa: F401
