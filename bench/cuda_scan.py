"""An experiment of issue #33: Mamba-1's selective scan as CUDA kernels of our own, compiled at first use by NVRTC
through `torch.cuda._compile_kernel` (no nvcc, no extra package), forward and backward, with the arguments and
results of mamba_ssm's `selective_scan_cuda.fwd` / `.bwd` for what the Mamba-1 mixer passes (real A (d, n), B and C
(b, 1, n, l), D, z, delta_bias, softplus on the time steps; u, delta, z, dout bf16 with unit stride along l).

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t),
    dt_t = softplus(delta_t + delta_bias).

Layout: one thread per (channel, state); a block holds DB channels x 16 states and walks the sequence in tiles of
TT steps, each thread scanning its state sequentially in registers (as fast as a dependent FMA per step). Per
tile, the block stages u, dt, dz-inputs, B and C in shared memory; sums over the 16 states (y, du, ddelta) are
warp shuffles, two quantities per shuffle chain; sums over channels (dB, dC) are a shuffle across the two
channels of a warp, then shared memory across the block's warps, then one atomic add per (b, n, t) per block
(mamba_ssm adds one atomic per (b, d, n, t)).

The forward stores the state entering every tile (b, d, tiles, n; fp32: 84 MB per layer at the 2.8B shape and
2 x 2,048 with TT 16, 5.4 GB over 64 layers until their backward) in place of mamba_ssm's `x`; the backward walks
the tiles from the last, recomputes the tile's states from the stored one into registers, and scans the adjoint
g_t = C_t dy_t + a_{t+1} g_{t+1} backwards: every gradient is formed from h_{t-1}, h_t and g_t, without dividing by a_t.

Status (session 16, no GPU lent): the source compiles for sm_90 with NVRTC 13.5 (DB 16, TT 16: 64 registers in
backward, no spills, 24.7 KB shared memory; 48 in forward, 8 bytes spilled). The same source runs on the CPU
(`host=True`: g++, a thread per CUDA thread, barriers for __syncthreads and shuffles) and matches the fp32
reference's autograd at ragged shapes and the strided delta / z / dz that mamba_inner_fn passes, for TT 8, 16, 32
and DB 4, 8, 16 (fp32 results within 7e-7 of the largest value, bf16 ones within their rounding, <= 3.6e-3):

    python bench/scan_kernel.py --check 2,32,37,16 --configs host:16:16

Not yet run on a GPU. The next GPU call:

    python3 scan_kernel.py --check 2,32,37,16 --configs cuda:16:16        # against the fp32 reference
    python3 scan_kernel.py --check 1,32,2048,16 --configs cuda:8:32
    python3 scan_kernel.py --configs cuda:16:16,cuda:8:16,cuda:8:32,cuda:4:16 --out $OUT/scan_cuda.json
    V=mamba_ssm:2,fast_trl:2,fast_trl+cuscan:2   # then training, as docs/benchmarks.md §19 (CUSCAN=DB:TT)
    python3 training_speed.py --variants $V,$V,$V --rows-per-step 16 --max-grad-norm 1.0 --warmup 1 --steps 3
"""

from __future__ import annotations

import torch

N_STATE = 16

SRC = r"""
typedef unsigned short bf16_t;
#define NS 16
#define NT (DB * NS)
#define NWARP (NT / 32)
#define FULL 0xffffffffu

__device__ __forceinline__ float bf2f(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }

// B and C of one tile (16 states x TT steps, zeros past the end) into shared memory, as floats
__device__ __forceinline__ void stage_bc(const bf16_t* __restrict__ Bm, const bf16_t* __restrict__ Cm,
                                         float (*s_B)[TT + 1], float (*s_C)[TT + 1], long long bcrow, int t0, int L,
                                         int tid) {
    for (int e = tid; e < NS * TT; e += NT) {
        const int k = e / TT, t = e % TT, tt = t0 + t;
        const bool in = tt < L;
        s_B[k][t] = in ? bf2f(Bm[bcrow + (long long)k * L + tt]) : 0.f;
        s_C[k][t] = in ? bf2f(Cm[bcrow + (long long)k * L + tt]) : 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(NT)
scan_fwd(const bf16_t* __restrict__ u, int su_b, int su_d,
         const bf16_t* __restrict__ dl, int sdl_b, int sdl_d,
         const float* __restrict__ A, const bf16_t* __restrict__ Bm, const bf16_t* __restrict__ Cm,
         const float* __restrict__ Dv, const float* __restrict__ bias,
         const bf16_t* __restrict__ z, int sz_b, int sz_d,
         bf16_t* __restrict__ y, bf16_t* __restrict__ outz, float* __restrict__ ckpt,
         int Dm, int L, int nT)
{
    __shared__ float s_dt[DB][TT], s_dtu[DB][TT], s_u[DB][TT], s_y[DB][TT];
    __shared__ float s_B[NS][TT + 1], s_C[NS][TT + 1];
    const int tid = threadIdx.x, n = tid & (NS - 1), ch = tid >> 4;
    const int b = blockIdx.y, d0 = blockIdx.x * DB, d = d0 + ch;
    const float A2 = A[d * NS + n] * 1.4426950408889634f;
    const long long bcrow = (long long)b * NS * L;
    const bool hi = (n & 8) != 0;
    float h = 0.f;
    for (int c = 0; c < nT; ++c) {
        const int t0 = c * TT;
        for (int e = tid; e < DB * TT; e += NT) {
            const int i = e / TT, t = e % TT, tt = t0 + t;
            float dtv = 0.f, uv = 0.f;
            if (tt < L) {
                uv = bf2f(u[(long long)b * su_b + (long long)(d0 + i) * su_d + tt]);
                dtv = softplus_f(bf2f(dl[(long long)b * sdl_b + (long long)(d0 + i) * sdl_d + tt]) + bias[d0 + i]);
            }
            s_dt[i][t] = dtv; s_u[i][t] = uv; s_dtu[i][t] = dtv * uv;
        }
        stage_bc(Bm, Cm, s_B, s_C, bcrow, t0, L, tid);
        ckpt[(((long long)b * Dm + d) * nT + c) * NS + n] = h;
        __syncthreads();
#pragma unroll
        for (int t = 0; t < TT; t += 2) {
            h = fmaf(exp2f(s_dt[ch][t] * A2), h, s_dtu[ch][t] * s_B[n][t]);
            const float p0 = h * s_C[n][t];
            h = fmaf(exp2f(s_dt[ch][t + 1] * A2), h, s_dtu[ch][t + 1] * s_B[n][t + 1]);
            const float p1 = h * s_C[n][t + 1];
            float keep = hi ? p1 : p0;
            keep += __shfl_xor_sync(FULL, hi ? p0 : p1, 8);
            keep += __shfl_xor_sync(FULL, keep, 4);
            keep += __shfl_xor_sync(FULL, keep, 2);
            keep += __shfl_xor_sync(FULL, keep, 1);
            if ((n & 7) == 0) s_y[ch][t + (hi ? 1 : 0)] = keep;
        }
        __syncthreads();
        for (int e = tid; e < DB * TT; e += NT) {
            const int i = e / TT, t = e % TT, tt = t0 + t;
            if (tt < L) {
                const float yv = s_y[i][t] + Dv[d0 + i] * s_u[i][t];
                const float zv = bf2f(z[(long long)b * sz_b + (long long)(d0 + i) * sz_d + tt]);
                const long long o = ((long long)b * Dm + d0 + i) * L + tt;
                y[o] = f2bf(yv);
                outz[o] = f2bf(yv * zv / (1.f + __expf(-zv)));
            }
        }
        __syncthreads();
    }
}

// the block's partial dB / dC: [warp][which][t][17], each [t][17] padded to 16 banks mod 32 so that the two
// half-warps (which = 0, 1) write other banks
#define RSTRIDE (TT * (NS + 1) + (48 - (TT * (NS + 1)) % 32) % 32)
#define RED(w, q, t, k) s_red[((w) * 2 + (q)) * RSTRIDE + (t) * (NS + 1) + (k)]

extern "C" __global__ void __launch_bounds__(NT)
scan_bwd(const bf16_t* __restrict__ u, int su_b, int su_d,
         const bf16_t* __restrict__ dl, int sdl_b, int sdl_d,
         const float* __restrict__ A, const bf16_t* __restrict__ Bm, const bf16_t* __restrict__ Cm,
         const float* __restrict__ Dv, const float* __restrict__ bias,
         const bf16_t* __restrict__ z, int sz_b, int sz_d,
         const bf16_t* __restrict__ yv, int sy_b, int sy_d,
         const bf16_t* __restrict__ dout, int sdo_b, int sdo_d,
         const float* __restrict__ ckpt,
         bf16_t* __restrict__ du, bf16_t* __restrict__ ddl,
         bf16_t* __restrict__ dz, int sdz_b, int sdz_d,
         bf16_t* __restrict__ outz,
         float* __restrict__ dA, float* __restrict__ dB, float* __restrict__ dC,
         float* __restrict__ dD, float* __restrict__ dbias,
         int Dm, int L, int nT, int recompute_outz)
{
    __shared__ float s_dt[DB][TT], s_u[DB][TT], s_dy[DB][TT], s_gB[DB][TT], s_ddt[DB][TT];
    __shared__ float s_B[NS][TT + 1], s_C[NS][TT + 1];
    __shared__ float s_red[NWARP * 2 * RSTRIDE];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, n = tid & (NS - 1), ch = tid >> 4;
    const int b = blockIdx.y, d0 = blockIdx.x * DB, d = d0 + ch;
    const float Av = A[d * NS + n], A2 = Av * 1.4426950408889634f;
    const long long bcrow = (long long)b * NS * L;
    const bool hi = (n & 8) != 0, hiw = (lane & 16) != 0;
    constexpr int PER = (DB * TT + NT - 1) / NT;  // (channel, step) elements per thread
    float dD_acc[PER], db_acc[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) { dD_acc[k] = 0.f; db_acc[k] = 0.f; }
    float g = 0.f, a_next = 0.f, dA_acc = 0.f;
    for (int c = nT - 1; c >= 0; --c) {
        const int t0 = c * TT;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int e = tid + k * NT;
            if (e < DB * TT) {
                const int i = e / TT, t = e % TT, tt = t0 + t;
                float dtv = 0.f, uv = 0.f, dy = 0.f;
                if (tt < L) {
                    const int dd = d0 + i;
                    uv = bf2f(u[(long long)b * su_b + (long long)dd * su_d + tt]);
                    dtv = softplus_f(bf2f(dl[(long long)b * sdl_b + (long long)dd * sdl_d + tt]) + bias[dd]);
                    const float zv = bf2f(z[(long long)b * sz_b + (long long)dd * sz_d + tt]);
                    const float dov = bf2f(dout[(long long)b * sdo_b + (long long)dd * sdo_d + tt]);
                    const float y0 = bf2f(yv[(long long)b * sy_b + (long long)dd * sy_d + tt]);
                    const float sg = 1.f / (1.f + __expf(-zv));
                    dy = dov * zv * sg;
                    const float dzv = dov * y0 * sg * (1.f + zv * (1.f - sg));
                    dz[(long long)b * sdz_b + (long long)dd * sdz_d + tt] = f2bf(dzv);
                    if (recompute_outz) outz[((long long)b * Dm + dd) * L + tt] = f2bf(y0 * zv * sg);
                    dD_acc[k] += dy * uv;
                }
                s_dt[i][t] = dtv; s_u[i][t] = uv; s_dy[i][t] = dy;
            }
        }
        stage_bc(Bm, Cm, s_B, s_C, bcrow, t0, L, tid);
        const float h0 = ckpt[(((long long)b * Dm + d) * nT + c) * NS + n];
        __syncthreads();
        float hs[TT], as[TT];
        float h = h0;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            const float dtv = s_dt[ch][t];
            as[t] = exp2f(dtv * A2);
            h = fmaf(as[t], h, dtv * s_u[ch][t] * s_B[n][t]);
            hs[t] = h;
        }
#pragma unroll
        for (int t = TT - 1; t >= 0; --t) {
            const float dtv = s_dt[ch][t], uv = s_u[ch][t], dy = s_dy[ch][t];
            g = fmaf(g, a_next, s_C[n][t] * dy);
            const float hprev = t > 0 ? hs[t > 0 ? t - 1 : 0] : h0;
            const float q = g * as[t] * hprev;
            dA_acc = fmaf(q, dtv, dA_acc);
            const float gB = g * s_B[n][t];
            const float ddt = fmaf(gB, uv, q * Av);
            float keep = hi ? ddt : gB;
            keep += __shfl_xor_sync(FULL, hi ? gB : ddt, 8);
            keep += __shfl_xor_sync(FULL, keep, 4);
            keep += __shfl_xor_sync(FULL, keep, 2);
            keep += __shfl_xor_sync(FULL, keep, 1);
            if (n == 0) s_gB[ch][t] = keep;
            if (n == 8) s_ddt[ch][t] = keep;
            const float dBc = g * dtv * uv, dCc = hs[t] * dy;
            float keep2 = hiw ? dCc : dBc;
            keep2 += __shfl_xor_sync(FULL, hiw ? dBc : dCc, 16);
            RED(w, hiw ? 1 : 0, t, n) = keep2;
            a_next = as[t];
        }
        __syncthreads();
        for (int e = tid; e < 2 * NS * TT; e += NT) {
            const int q = e / (NS * TT), r = e % (NS * TT), k = r / TT, t = r % TT, tt = t0 + t;
            float s = 0.f;
#pragma unroll
            for (int ww = 0; ww < NWARP; ++ww) s += RED(ww, q, t, k);
            if (tt < L) atomicAdd((q ? dC : dB) + bcrow + (long long)k * L + tt, s);
        }
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int e = tid + k * NT;
            if (e < DB * TT) {
                const int i = e / TT, t = e % TT, tt = t0 + t;
                if (tt < L) {
                    const float dtv = s_dt[i][t];
                    const long long o = ((long long)b * Dm + d0 + i) * L + tt;
                    du[o] = f2bf(dtv * s_gB[i][t] + Dv[d0 + i] * s_dy[i][t]);
                    const float dd = s_ddt[i][t] * -expm1f(-dtv);  // sigmoid(delta + bias) = 1 - exp(-softplus)
                    ddl[o] = f2bf(dd);
                    db_acc[k] += dd;
                }
            }
        }
        __syncthreads();
    }
    atomicAdd(dA + d * NS + n, dA_acc);
    constexpr int G = TT < 32 ? TT : 32;  // lanes that share a channel in the (channel, step) loops
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        float a = dD_acc[k], bb = db_acc[k];
#pragma unroll
        for (int m = G / 2; m >= 1; m /= 2) {
            a += __shfl_xor_sync(FULL, a, m);
            bb += __shfl_xor_sync(FULL, bb, m);
        }
        const int e = tid + k * NT;
        if (e < DB * TT && (tid % G) == 0) {
            atomicAdd(dD + d0 + e / TT, a);
            atomicAdd(dbias + d0 + e / TT, bb);
        }
    }
}
"""

_KERNELS: dict = {}


def _kernels(db: int, tt: int, host: bool = False):
    """(scan_fwd, scan_bwd), each called as fn(grid, block, args), compiled once per shape: by NVRTC through torch
    (`torch.cuda._compile_kernel`), or with `host` by g++ around HOST_PRELUDE, on CPU tensors."""
    if (db, tt, host) not in _KERNELS:
        opts = [f"-DDB={db}", f"-DTT={tt}", "-std=c++17"]
        if host:
            _KERNELS[db, tt, host] = _host_kernels(opts)
        else:
            _KERNELS[db, tt, host] = tuple(torch.cuda._compile_kernel(SRC, name, nvcc_options=opts)
                                           for name in ("scan_fwd", "scan_bwd"))
    return _KERNELS[db, tt, host]


# The kernels' own source run on the CPU, for a check without a GPU: every CUDA thread of a block is a thread
# (blocks one after another), __syncthreads a barrier of the block, a warp shuffle two barriers of the warp,
# __shared__ arrays static (one block at a time), atomics under a lock.
HOST_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
struct Idx { int x = 0, y = 0, z = 0; };
thread_local Idx threadIdx, blockIdx;
static std::barrier<>* g_block_bar;
static std::vector<std::barrier<>*> g_warp_bar;
static float g_xchg[64][32];
static std::mutex g_atomic;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    g_xchg[w][lane] = v;
    g_warp_bar[w]->arrive_and_wait();
    const float r = g_xchg[w][lane ^ m];
    g_warp_bar[w]->arrive_and_wait();
    return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> l(g_atomic); float o = *p; *p += v; return o; }
static void run_grid(int gx, int gy, int nt, const std::function<void()>& kernel) {
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            std::barrier<> block_bar(nt);
            std::vector<std::barrier<>*> warps;
            for (int w = 0; w < nt / 32; ++w) warps.push_back(new std::barrier<>(32));
            g_block_bar = &block_bar;
            g_warp_bar = warps;
            std::vector<std::thread> threads;
            for (int t = 0; t < nt; ++t)
                threads.emplace_back([=, &kernel] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; kernel(); });
            for (auto& th : threads) th.join();
            for (auto* b : warps) delete b;
        }
}
"""


def _host_kernels(opts):
    """g++ builds HOST_PRELUDE + SRC + one `launch_<kernel>(gx, gy, nt, args...)` per kernel into a shared
    library (cached by content under the temp dir); returns callables like torch's compiled kernels."""
    import ctypes
    import hashlib
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    wrappers, sigs = [], {}
    for name in ("scan_fwd", "scan_bwd"):
        params = [p.strip() for p in re.search(rf"{name}\((.*?)\)\s*\{{", SRC, re.S).group(1).split(",")]
        names = [re.findall(r"\w+", p)[-1] for p in params]
        sigs[name] = ["*" in p for p in params]
        wrappers.append(f'extern "C" void launch_{name}(int gx, int gy, int nt, {", ".join(params)}) '
                        f'{{ run_grid(gx, gy, nt, [&] {{ {name}({", ".join(names)}); }}); }}')
    code = HOST_PRELUDE + SRC + "\n".join(wrappers)
    key = hashlib.sha256((code + " ".join(opts)).encode()).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"cuda_scan_host_{key}.so"
    if not lib.exists():
        src = lib.with_suffix(".cpp")
        src.write_text(code)
        defs = [o for o in opts if o.startswith("-D")]
        subprocess.run(["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-w", *defs, str(src), "-o",
                        str(lib)], check=True)
    so = ctypes.CDLL(str(lib))

    def kernel(name):
        fn = getattr(so, f"launch_{name}")

        def call(grid, block, args):
            conv = [ctypes.c_void_p(a.data_ptr()) if ptr else ctypes.c_int(a) for a, ptr in zip(args, sigs[name])]
            fn(ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), ctypes.c_int(block[0]), *conv)
        return call

    return kernel("scan_fwd"), kernel("scan_bwd")


def _bd(t):
    """The tensor with unit stride along l, its batch stride, its channel stride (kernel arguments)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


class CudaScan:
    """`fwd` / `bwd` with the signatures of mamba_ssm's `selective_scan_cuda` for the Mamba-1 mixer's call."""

    def __init__(self, block_d: int = 16, tile: int = 16, host: bool = False):
        assert (block_d * N_STATE) % 32 == 0 and tile % 2 == 0
        self.block_d, self.tile, self.host = block_d, tile, host

    def _check(self, u, A, B, z, delta_bias, delta_softplus):
        assert delta_softplus and z is not None and delta_bias is not None
        assert not A.is_complex() and A.shape[-1] == N_STATE and B.dim() == 4 and B.shape[1] == 1
        assert u.dtype == torch.bfloat16 and u.shape[1] % self.block_d == 0

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self._check(u, A, B, z, delta_bias, delta_softplus)
        b, dm, L = u.shape
        nT = -(-L // self.tile)
        u, su_b, su_d = _bd(u)
        delta, sdl_b, sdl_d = _bd(delta)
        z, sz_b, sz_d = _bd(z)
        A, B, C = A.float().contiguous(), B.contiguous(), C.contiguous()
        D, bias = D.float().contiguous(), delta_bias.float().contiguous()
        y = torch.empty(b, dm, L, device=u.device, dtype=u.dtype)
        out_z = torch.empty_like(y)
        states = torch.empty(b, dm, nT, N_STATE, device=u.device, dtype=torch.float32)
        fwd, _ = _kernels(self.block_d, self.tile, self.host)
        fwd((dm // self.block_d, b, 1), (self.block_d * N_STATE, 1, 1),
            [u, su_b, su_d, delta, sdl_b, sdl_d, A, B, C, D, bias, z, sz_b, sz_d, y, out_z, states, dm, L, nT])
        return y, states, out_z

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, y, dz, delta_softplus, recompute_out_z):
        self._check(u, A, B, z, delta_bias, delta_softplus)
        b, dm, L = u.shape
        nT = states.shape[2]
        assert nT == -(-L // self.tile), "states from a forward with another tile"
        u, su_b, su_d = _bd(u)
        delta, sdl_b, sdl_d = _bd(delta)
        z, sz_b, sz_d = _bd(z)
        y, sy_b, sy_d = _bd(y)
        dout, sdo_b, sdo_d = _bd(dout)
        A, B, C = A.float().contiguous(), B.contiguous(), C.contiguous()
        Df, bias = D.float().contiguous(), delta_bias.float().contiguous()
        du, ddelta = torch.empty(b, dm, L, device=u.device, dtype=u.dtype), torch.empty(b, dm, L, device=u.device,
                                                                                       dtype=delta.dtype)
        if dz is None:
            dz = torch.empty(b, dm, L, device=u.device, dtype=z.dtype)
        assert dz.stride(-1) == 1
        out_z = torch.empty(b, dm, L, device=u.device, dtype=z.dtype) if recompute_out_z else None
        f32 = dict(device=u.device, dtype=torch.float32)
        dA = torch.zeros(dm, N_STATE, **f32)
        dB, dC = torch.zeros(b, 1, N_STATE, L, **f32), torch.zeros(b, 1, N_STATE, L, **f32)
        dD, dbias = torch.zeros(dm, **f32), torch.zeros(dm, **f32)
        _, bwd = _kernels(self.block_d, self.tile, self.host)
        bwd((dm // self.block_d, b, 1), (self.block_d * N_STATE, 1, 1),
            [u, su_b, su_d, delta, sdl_b, sdl_d, A, B, C, Df, bias, z, sz_b, sz_d, y, sy_b, sy_d, dout, sdo_b, sdo_d,
             states, du, ddelta, dz, dz.stride(0), dz.stride(1), du if out_z is None else out_z,
             dA, dB, dC, dD, dbias, dm, L, nT, int(recompute_out_z)])
        return (du, ddelta, dA, dB, dC, dD.to(D.dtype), dbias.to(delta_bias.dtype), dz, out_z)

