"""A small, independent pure-PyTorch forward pass of a Mamba-1 language model in mamba_ssm's format.

It reads a mamba_ssm state dict (`backbone.embedding.weight`, `backbone.layers.{i}.mixer.*`,
`backbone.layers.{i}.norm.weight`, `backbone.norm_f.weight`, `lm_head.weight`) and mamba_ssm's
config dict, and computes what `mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel` computes, written
out step by step: no kernels, no transformers, no cache, a plain sequential selective scan in fp32.
It is the yardstick the conversion is checked against (convert.py, bench/verify_conversion_gpu.py),
so it favours being obviously right over being fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _selective_scan(u, dt, A, B, C, D, z):
    """y_t = C_t . h_t + D u_t, with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; then y * silu(z).

    u, dt, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, L, d_state); D: (d_inner,).
    """
    batch, d_inner, length = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # (batch, d_inner, 1)
        h = torch.exp(dt_t * A) * h + dt_t * B[:, None, t, :] * u[:, :, t, None]
        ys.append((h * C[:, None, t, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D[None, :, None]
    return y * F.silu(z)


def _mixer(x: torch.Tensor, p: dict, d_state: int, dt_rank: int) -> torch.Tensor:
    """One Mamba-1 mixer on x (batch, L, d_model), parameters p keyed like mamba_ssm's `Mamba`."""
    length = x.shape[1]
    xz = F.linear(x, p["in_proj.weight"], p.get("in_proj.bias")).transpose(1, 2)  # (b, 2*d_inner, L)
    u, z = xz.chunk(2, dim=1)
    conv_w = p["conv1d.weight"]  # (d_inner, 1, d_conv): depthwise, causal (pad left, cut right)
    u = F.conv1d(u, conv_w, p.get("conv1d.bias"), padding=conv_w.shape[-1] - 1, groups=u.shape[1])
    u = F.silu(u[..., :length])
    dt, B, C = torch.split(F.linear(u.transpose(1, 2), p["x_proj.weight"]), [dt_rank, d_state, d_state], dim=-1)
    dt = F.softplus(F.linear(dt, p["dt_proj.weight"], p["dt_proj.bias"]).float()).transpose(1, 2)
    A = -torch.exp(p["A_log"].float())
    y = _selective_scan(u.float(), dt, A, B.float(), C.float(), p["D"].float(), z.float())
    return F.linear(y.transpose(1, 2).to(x.dtype), p["out_proj.weight"], p.get("out_proj.bias"))


@torch.no_grad()
def forward(state_dict: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
            eps: float = 1e-5) -> torch.Tensor:
    """Logits (batch, L, vocab rows) of a mamba_ssm-format Mamba-1 model with RMSNorm, in fp32."""
    if not config.get("rms_norm", True) or config.get("d_intermediate", 0) or config.get("attn_layer_idx"):
        raise ValueError("model/reference.py covers pure Mamba-1 models with RMSNorm and no MLP/attention layers")
    ssm_cfg = config.get("ssm_cfg") or {}
    d_model = config["d_model"]
    d_state = ssm_cfg.get("d_state", 16)
    dt_rank = ssm_cfg.get("dt_rank", "auto")
    dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank

    sd = state_dict
    embedding = sd["backbone.embedding.weight"]
    hidden = embedding[input_ids]
    residual = None
    for i in range(config["n_layer"]):
        prefix = f"backbone.layers.{i}."
        # mamba_ssm's Block: residual = hidden + residual (kept in fp32); hidden = mixer(norm(residual))
        residual = hidden.float() if residual is None else residual + hidden.float()
        normed = _rms_norm(residual, sd[prefix + "norm.weight"], eps).to(embedding.dtype)
        mixer = {k[len(prefix + "mixer."):]: v for k, v in sd.items() if k.startswith(prefix + "mixer.")}
        hidden = _mixer(normed, mixer, d_state, dt_rank)
    hidden = _rms_norm(residual + hidden.float(), sd["backbone.norm_f.weight"], eps).to(embedding.dtype)
    lm_head = embedding if config.get("tie_embeddings", True) else sd["lm_head.weight"]
    return F.linear(hidden, lm_head).float()


@torch.no_grad()
def greedy(state_dict: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
           new_tokens: int) -> torch.Tensor:
    """Greedy continuation (batch, new_tokens), recomputing the whole prefix each step (no cache)."""
    ids = input_ids
    for _ in range(new_tokens):
        next_id = forward(state_dict, config, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[:, input_ids.shape[1]:]
