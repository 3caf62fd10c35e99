"""Text generation engines of the generate_* rules: `load_engine` picks the fastest one the machine has.

Every engine takes token-id prompts and returns the new token ids of each prompt, stopped at (and
without) the model's eos, honouring the sampling parameters per call (`generate(prompts, sampling)`).

- eval/engine/ssm.py: `MambaSSMEngine`, mamba_ssm's model with CUDA graphs and continuous batching
  (needs CUDA, mamba_ssm and causal_conv1d); ~10x the tokens/s of transformers on a GPU.
- eval/engine/hf.py: `TransformersEngine`, transformers' `generate`; the portable fallback.
- eval/engine/decode.py: the continuous-batching loop; eval/engine/sampling.py: `Sampling` and drawing tokens.
"""

from __future__ import annotations

import logging

from mamba_align.eval.engine.hf import TransformersEngine
from mamba_align.eval.engine.ssm import MambaSSMEngine

log = logging.getLogger(__name__)


def _mamba_ssm_missing() -> str | None:
    """Why the mamba_ssm engine cannot run here, or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    for mod in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def load_engine(model_dir: str, device: str | None = None, batch_size: int = 8, backend: str = "auto", **kwargs):
    """Return the best available engine ("auto"), or the one named by `backend` ("mamba_ssm", "transformers")."""
    if backend not in ("auto", "transformers", "mamba_ssm"):
        raise ValueError(f"unknown generation backend {backend!r} (expected auto, mamba_ssm or transformers)")
    if device is None or str(device).startswith("cuda"):
        from mamba_align.model.kernels import require_kernels

        require_kernels("generation")  # before the model loads: the transformers path is ~10x slower on GPU
    if backend in ("auto", "mamba_ssm"):
        missing = _mamba_ssm_missing()
        if missing is None and device is not None and not str(device).startswith("cuda"):
            missing = f"device {device!r} is not a CUDA device"
        if missing is None:
            from transformers import AutoConfig

            model_type = getattr(AutoConfig.from_pretrained(model_dir), "model_type", None)
            if model_type != "mamba":
                missing = f"model_type {model_type!r} is not Mamba-1"
        if missing is None:
            log.info("generation engine: mamba_ssm (CUDA graphs, %d slots)", batch_size)
            return MambaSSMEngine(model_dir, device=device, batch_size=batch_size, **kwargs)
        if backend == "mamba_ssm":
            raise RuntimeError(f"generation backend 'mamba_ssm' is unavailable: {missing}")
        log.info("generation engine: transformers (%s)", missing)
    return TransformersEngine(model_dir, device=device, batch_size=batch_size, dtype=kwargs.get("dtype"))
