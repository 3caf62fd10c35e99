"""The Mamba CUDA kernels (mamba_ssm, causal_conv1d): required on GPU unless the user opts out.

Without them transformers runs Mamba on its slow path (~10x slower on GPU), so a job sized by the plan
would run out of its time limit and be retried in vain. This check runs before any model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

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


MAMBA_MODELING = "transformers.models.mamba.modeling_mamba"
_imported_on_torch_path = False


def cpu_mamba_class():
    """transformers' MambaForCausalLM on its PyTorch path, for a model that runs on CPU.

    transformers (5.17 to 5.24 at least) binds causal_conv1d's and mamba_ssm's functions, when they are importable,
    the first time its Mamba module is imported, and then calls them for CPU tensors too: they fail with "Expected
    x.is_cuda() to be true". An environment with the GPU extra installed (a shared conda env, the cluster's
    container) would fail every CPU step that runs the model, e.g. the conversion check of `prepare_base_model` on
    a CPU node. So the module is imported here with the kernel packages hidden (and visible again afterwards).
    `tests/test_convert.py` fails once transformers no longer needs this."""
    global _imported_on_torch_path
    if MAMBA_MODELING not in sys.modules:
        hidden = [m for m in KERNEL_PACKAGES if m not in sys.modules]
        for module in hidden:
            sys.modules[module] = None  # `import` raises ImportError; transformers falls back to PyTorch
        try:
            importlib.import_module(MAMBA_MODELING)
        finally:
            for module in hidden:
                sys.modules.pop(module, None)
        _imported_on_torch_path = len(hidden) == len(KERNEL_PACKAGES)
    if _imported_on_torch_path or missing_kernels() == list(KERNEL_PACKAGES.values()):
        return sys.modules[MAMBA_MODELING].MambaForCausalLM
    raise RuntimeError(
        "transformers' Mamba was imported in this process while the CUDA kernels (mamba_ssm, causal_conv1d) were "
        "importable, so it calls them for CPU tensors too; run the CPU model in its own process (as the workflow's "
        "rules do), or before anything imports the model on GPU")
