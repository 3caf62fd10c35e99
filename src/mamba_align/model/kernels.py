"""The Mamba CUDA kernels (mamba_ssm, causal_conv1d): required on GPU unless the user opts out.

Without them transformers runs Mamba on its slow path (~10x slower on GPU), so a job sized by the plan
would run out of its time limit and be retried in vain. This check runs before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from mamba_align.utils import UserError

log = logging.getLogger(__name__)

ALLOW_SLOW_PATH_ENV = "MAMBA_ALIGN_ALLOW_SLOW_PATH"
# import name -> pip name
KERNEL_PACKAGES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}


def missing_kernels() -> list[str]:
    """The pip names of the kernel packages that are not importable."""
    return [pip for module, pip in KERNEL_PACKAGES.items() if importlib.util.find_spec(module) is None]


def slow_path_allowed() -> bool:
    return os.environ.get(ALLOW_SLOW_PATH_ENV, "").strip().lower() in ("1", "true", "yes")


def require_kernels(what: str) -> None:
    """On a CUDA machine, raise UserError when a kernel package is missing (unless the user opted out)."""
    import torch

    if not torch.cuda.is_available():
        return  # CPU runs (the demo, tests) use mambapy's scan; no kernels exist for them
    missing = missing_kernels()
    if not missing:
        return
    if slow_path_allowed():
        log.warning("%s on CUDA without %s (%s=1): transformers' slow path, ~10x slower than the kernels",
                    what, " and ".join(missing), ALLOW_SLOW_PATH_ENV)
        return
    raise UserError(
        f"{what} on CUDA needs the Mamba kernels, but {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: without them transformers falls back to a path "
        f"~10x slower and the job outlives its planned time. Install them in the job's environment "
        f"(pip install 'mamba-align[gpu]', or the container: README 'The GPU environment'), or set "
        f"{ALLOW_SLOW_PATH_ENV}=1 to run on the slow path anyway.")
