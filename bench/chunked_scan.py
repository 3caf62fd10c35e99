"""An experiment of issue #33, not used by the pipeline: Mamba-1's selective scan in Triton, chunked, forward and
backward. Measured against mamba_ssm's CUDA kernel by bench/scan_kernel.py (docs/benchmarks.md §19): correct, and
2.3x slower in backward, so the fast path keeps mamba_ssm's kernel.

The same arguments and results as mamba_ssm's `selective_scan_cuda.fwd` / `.bwd` for what the Mamba-1 mixer
passes (real A of shape (d, n), B and C of shape (b, 1, n, l), D, z, delta_bias, softplus on the time steps):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t),
    dt_t = softplus(delta_t + delta_bias).

The forward scans chunks of `chunk` time steps in parallel (an associative scan of the pairs (a, b) that
compose as h -> a h + b) and stores the state entering each chunk (b, d, chunks, n; fp32). The backward walks
the chunks from the last: it recomputes a chunk's states from the stored state instead of re-running the
whole forward scan, scans the adjoint q_t = dy_t C_t + a_{t+1} q_{t+1} backwards inside the chunk, and forms
every gradient from h_t and q_t (a_t h_{t-1} = h_t - dt_t B_t u_t: no division). dB and dC are sums over the
channels: each program writes its block's partial sums and one torch sum adds them (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(a1, b1, a2, b2):
    # (a1, b1) earlier, (a2, b2) later: h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _last(x, T: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, T)[None, None, :] == T - 1, x, 0.0), axis=2)


@triton.jit
def _first(x, T: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, T)[None, None, :] == 0, x, 0.0), axis=2)


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, outz_ptr, state_ptr,
                Dm, L, n_chunks, N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr):
    pb = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    dmask = d < Dm
    A2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dmask[:, None], other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0)
    h = tl.zeros([BD, N], dtype=tl.float32)
    row = pb * Dm * L + d[:, None] * L
    bc_row = pb * N * L + n[:, None] * L
    for c in range(0, n_chunks):
        t = c * T + tl.arange(0, T)
        tmask = t < L
        m = dmask[:, None] & tmask[None, :]
        u = tl.load(u_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(dt_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32) + bias[:, None])
        dt = tl.where(m, dt, 0.0)  # past the end: a = 1, b = 0, the state passes through
        Bt = tl.load(B_ptr + bc_row + t[None, :], mask=tmask[None, :], other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_row + t[None, :], mask=tmask[None, :], other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        b = (dt * u)[:, None, :] * Bt[None, :, :]
        tl.store(state_ptr + ((pb * Dm + d[:, None]) * n_chunks + c) * N + n[None, :], h, mask=dmask[:, None])
        aa, hh = tl.associative_scan((a, b), axis=2, combine_fn=_compose)
        hh = hh + aa * h[:, :, None]
        h = _last(hh, T)
        y = tl.sum(hh * Ct[None, :, :], axis=1) + Dv[:, None] * u
        zz = tl.load(z_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(outz_ptr + row + t[None, :], (y * zz * tl.sigmoid(zz)).to(outz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, dout_ptr, state_ptr,
                du_ptr, ddt_ptr, dz_ptr, outz_ptr, dA_ptr, dD_ptr, dbias_ptr, dBp_ptr, dCp_ptr,
                Dm, L, n_chunks, n_dblocks, N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr):
    pb = tl.program_id(0)
    pd = tl.program_id(1)
    d = pd * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    dmask = d < Dm
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dmask[:, None], other=0.0)
    A2 = A * 1.4426950408889634
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0)
    q = tl.zeros([BD, N], dtype=tl.float32)  # the adjoint of the state at the first step of the next chunk
    dA = tl.zeros([BD, N], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    row = pb * Dm * L + d[:, None] * L
    bc_row = pb * N * L + n[:, None] * L
    part_row = (pb * n_dblocks + pd) * N * L + n[:, None] * L
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * T + tl.arange(0, T)
        tmask = t < L
        m = dmask[:, None] & tmask[None, :]
        m1 = dmask[:, None] & (t + 1 < L)[None, :]
        u = tl.load(u_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        raw = tl.load(dt_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32) + bias[:, None]
        dt = tl.where(m, _softplus(raw), 0.0)
        dt1 = tl.where(m1, _softplus(tl.load(dt_ptr + row + t[None, :] + 1, mask=m1, other=0.0).to(tl.float32)
                                     + bias[:, None]), 0.0)
        Bt = tl.load(B_ptr + bc_row + t[None, :], mask=tmask[None, :], other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_row + t[None, :], mask=tmask[None, :], other=0.0).to(tl.float32)
        zz = tl.load(z_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row + t[None, :], mask=m, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zz)
        dy = dout * zz * sz
        tl.store(dz_ptr + row + t[None, :], (dout * y * sz * (1.0 + zz * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                 mask=m)
        tl.store(outz_ptr + row + t[None, :], (y * zz * sz).to(outz_ptr.dtype.element_ty), mask=m)
        # the chunk's states again, from the state that entered it
        h0 = tl.load(state_ptr + ((pb * Dm + d[:, None]) * n_chunks + c) * N + n[None, :], mask=dmask[:, None],
                     other=0.0)
        bx = (dt * u)[:, None, :] * Bt[None, :, :]
        aa, hh = tl.associative_scan((tl.exp2(dt[:, None, :] * A2[:, :, None]), bx), axis=2, combine_fn=_compose)
        hh = hh + aa * h0[:, :, None]
        # the adjoint, backwards: q_t = dy_t C_t + a_{t+1} q_{t+1}
        a1 = tl.exp2(dt1[:, None, :] * A2[:, :, None])
        qa, qq = tl.associative_scan((a1, dy[:, None, :] * Ct[None, :, :]), axis=2, combine_fn=_compose,
                                     reverse=True)
        qq = qq + qa * q[:, :, None]
        q = _first(qq, T)
        hb = hh - bx  # a_t h_{t-1}
        qB = tl.sum(qq * Bt[None, :, :], axis=1)
        ddt = tl.sum(qq * hb * A[:, :, None], axis=1) + u * qB
        dA += tl.sum(qq * hb * dt[:, None, :], axis=2)
        du = dt * qB + Dv[:, None] * dy
        draw = tl.where(m, ddt * tl.sigmoid(raw), 0.0)
        dD += tl.sum(dy * u, axis=1)
        dbias += tl.sum(draw, axis=1)
        tl.store(du_ptr + row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddt_ptr + row + t[None, :], draw.to(ddt_ptr.dtype.element_ty), mask=m)
        tl.store(dBp_ptr + part_row + t[None, :], tl.sum(qq * (dt * u)[:, None, :], axis=0), mask=tmask[None, :])
        tl.store(dCp_ptr + part_row + t[None, :], tl.sum(hh * dy[:, None, :], axis=0), mask=tmask[None, :])
    tl.store(dA_ptr + (pb * Dm + d[:, None]) * N + n[None, :], dA, mask=dmask[:, None])
    tl.store(dD_ptr + pb * Dm + d, dD, mask=dmask)
    tl.store(dbias_ptr + pb * Dm + d, dbias, mask=dmask)


class ChunkedScan:
    """`fwd` / `bwd` with the signatures of mamba_ssm's `selective_scan_cuda` for the Mamba-1 mixer's call."""

    def __init__(self, chunk: int = 32, block_d: int = 8, num_warps: int = 4):
        self.chunk, self.block_d, self.num_warps = chunk, block_d, num_warps

    def _grid(self, u):
        b, dm, _ = u.shape
        return (b, triton.cdiv(dm, self.block_d))

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        assert delta_softplus and z is not None and D is not None and delta_bias is not None
        assert not A.is_complex() and B.dim() == 4 and B.shape[1] == 1 and C.dim() == 4
        b, dm, L = u.shape
        n = A.shape[-1]
        n_chunks = triton.cdiv(L, self.chunk)
        y = torch.empty_like(u)
        out_z = torch.empty_like(z)
        states = torch.empty(b, dm, n_chunks, n, device=u.device, dtype=torch.float32)
        _fwd_kernel[self._grid(u)](u, delta, A.float().contiguous(), B, C, D.float(), z, delta_bias.float(), y,
                                   out_z, states, dm, L, n_chunks, N=n, BD=self.block_d, T=self.chunk,
                                   num_warps=self.num_warps)
        return y, states, out_z

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, y, dz, delta_softplus, recompute_out_z):
        b, dm, L = u.shape
        n = A.shape[-1]
        n_chunks = states.shape[2]
        n_dblocks = triton.cdiv(dm, self.block_d)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if dz is None else dz
        out_z = torch.empty_like(z)
        f32 = dict(device=u.device, dtype=torch.float32)
        dA, dD, dbias = torch.empty(b, dm, n, **f32), torch.empty(b, dm, **f32), torch.empty(b, dm, **f32)
        dBp, dCp = torch.empty(b, n_dblocks, n, L, **f32), torch.empty(b, n_dblocks, n, L, **f32)
        _bwd_kernel[self._grid(u)](u, delta, A.float().contiguous(), B, C, D.float(), z, delta_bias.float(), y,
                                   dout.contiguous(), states, du, ddelta, dz, out_z, dA, dD, dbias, dBp, dCp,
                                   dm, L, n_chunks, n_dblocks, N=n, BD=self.block_d, T=self.chunk,
                                   num_warps=self.num_warps)
        dB = dBp.sum(1, keepdim=True)
        dC = dCp.sum(1, keepdim=True)
        return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0).to(D.dtype), dbias.sum(0).to(delta_bias.dtype), dz,
                out_z if recompute_out_z else None)
