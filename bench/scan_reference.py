"""Mamba-1's selective scan step by step in PyTorch, fp32: the reference the scans of issue #33
(bench/chunked_scan.py in Triton, bench/cuda_scan.py in CUDA) are checked against, with its autograd for their
backwards (bench/scan_kernel.py --check, tests/test_cuda_scan.py). No Triton or CUDA needed."""

from __future__ import annotations

import torch


def reference_scan(u, delta, A, B, C, D, z, delta_bias):
    """out_z (b, d, l) of the scan, step by step in fp32."""
    dt = torch.nn.functional.softplus(delta.float() + delta_bias.float()[:, None])
    Bf, Cf = B[:, 0].float(), C[:, 0].float()  # (b, n, l)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t].float())[..., None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D.float()[:, None] * u.float()
    return y * torch.nn.functional.silu(z.float())
