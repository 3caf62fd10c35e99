"""Shared bits of the speed benchmarks: model shapes, environment record, JSON output (stdout + $OUT)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

# state-spaces/mamba-2.8b-hf: d_model 2560, 64 layers, vocab 50280 (already a multiple of 8), d_state 16
SHAPES = {
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64, vocab_size=50280, state_size=16, expand=2,
                 conv_kernel=4, time_step_rank=160),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, vocab_size=1000, state_size=16, expand=2,
                 conv_kernel=4, time_step_rank=8),
}


def hf_config(shape: str, **overrides):
    from transformers import MambaConfig

    kw = dict(SHAPES[shape], eos_token_id=0, bos_token_id=0, pad_token_id=0, use_cache=True)
    kw.update(overrides)
    return MambaConfig(**kw)


def random_model(shape: str, device, dtype, seed: int = 0, **overrides):
    """A randomly initialised transformers MambaForCausalLM, built directly on `device`."""
    import torch
    from transformers import MambaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = MambaForCausalLM(hf_config(shape, **overrides))
    return model.to(dtype)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "mamba_ssm", "causal_conv1d", "trl", "triton", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = None
    return out


def environment() -> dict:
    import torch

    env = {"versions": versions(), "host_cpus": os.cpu_count(), "argv": sys.argv,
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "sm": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                         "cuda": torch.version.cuda}
    else:
        env["device"] = {"name": "cpu"}
    return env


def emit(name: str, result: dict, out: str | None = None) -> None:
    """Print the result as JSON and write it to `out`, or without `out` to $OUT/<name>.json (the device's
    folder that comes back). Never both: two runs of one script with different `out` must not overwrite each
    other's results there."""
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    if out or os.environ.get("OUT"):
        path = Path(out) if out else Path(os.environ["OUT"]) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_table(prof, cuda: bool, rows: int = 40) -> str:
    """A torch.profiler key-average table, the kernels taking the most GPU time first (CPU time without CUDA)."""
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    try:
        return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)
    except Exception:  # newer torch names it self_device_time_total
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90)
