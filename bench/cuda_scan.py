"""An experiment of issue #33: Mamba-1's selective scan as CUDA kernels of our own (bench/cuda_scan.cu), compiled at
first use by NVRTC through `torch.cuda._compile_kernel` (no nvcc, no extra package; --use_fast_math, as mamba_ssm's
kernels are built), forward and backward, with the arguments and results of mamba_ssm's `selective_scan_cuda.fwd` /
`.bwd` for what the Mamba-1 mixer passes (real A (d, n), B and C (b, 1, n, l), D, z, delta_bias, softplus on the
time steps; u, delta, z, dout bf16 with unit stride along l):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t),
    dt_t = softplus(delta_t + delta_bias).

Both layouts sum dB and dC over a block's DB channels before one atomic add per (b, n, t) per block, where
mamba_ssm adds one per (b, d, n, t) (670 M atomic adds per backward at one layer of the 2.8B shape, 2 x 2,048).
Both store the state entering every tile or chunk in place of mamba_ssm's `x`; the backward recomputes a tile's
states from it and forms every gradient from h_{t-1}, h_t and the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1},
without dividing by a_t.

- layout "state" (`cuda:DB:TT`): a thread per (channel, state) scans its state sequentially in registers, tiles of
  TT steps staged in shared memory; sums over the 16 states (y, du, ddelta) are warp shuffles. Stored states:
  84 MB per layer at TT 16 (5.4 GB over 64 layers until their backward).
- layout "time" (`cuda:DB:IT:time`): a warp per channel, each lane a run of IT steps of a chunk of 32 x IT, a loop
  over the 16 states with warp scans of (decay product, state) pairs forwards and of the adjoint backwards, as
  mamba_ssm's kernels are laid out. Stored states: 5 MB per layer at IT 8.
- a hybrid (`cuda:DB:IT:time/DB:TT`): the "time" forward, storing the state entering each tile of TT steps (its
  lanes' run starts; compiled with -DSAVE=TT), and the "state" backward.

Status (session 16, no GPU lent). Compiled here for sm_90 with NVRTC 13.5: "state" 16:16 uses 64 registers in
backward (no spills, 24.7 KB shared memory); "time" 4:8 128 registers in backward (43 KB), 96 in forward; 4:8 and
8:4 fit the 48 KB of static shared memory, 8:8 does not. The same source runs on the CPU (`host=True`: g++, a thread per
CUDA thread, barriers for __syncthreads and shuffles) and matches the fp32 reference's autograd at ragged shapes,
several tiles or chunks, and the strided delta / z / dz that mamba_inner_fn passes (fp32 results within 7e-7 of
the largest value, bf16 ones within their rounding, <= 4.5e-3):

    python bench/scan_kernel.py --check 2,32,37,16 --configs host:16:16
    python bench/scan_kernel.py --check 2,8,600,16 --configs host:4:4:time

tests/test_cuda_scan.py runs such checks of both layouts on the CPU in every test run, and on the GPU with `-m gpu`.

Static instruction counts per (channel, state, step) (SASS for sm_90, every inner loop counted as often as it runs;
session 17), at one 2.8B layer (335 M elements, 2 x 2,048; full issue: 4 per clock per SM, 132 SMs, ~1.98 GHz):

    kernel                                  forward  backward  (per element; backward atomics per element)
    mamba_ssm 2.3.2 (../shared/gpu wheel)       ~23       ~71   (2: dB, dC)  measured 0.39 / 1.55 ms
    "state" 16:16                                ~61       ~82   (1/8)
    "time" 4:8                                   ~31      ~101   (1/2)

So mamba_ssm's forward issues at ~58% of the full rate and its backward at ~46% (670 M atomic adds per backward,
430 G/s: the likely limit, which `scan_kernel.py --fixed-bc` prices). The best pair here, the hybrid, issues ~113
per element against mamba_ssm's ~94: at the same issue rate it is slower; it wins only where mamba_ssm is held back
by its atomics and ours are not (at ~58% of full issue it breaks even). The 1.75x the scan needs for 1.25x
training (§19: 1.10 ms per layer against 1.94) would take ~103% of full issue (mamba_ssm's reach 46-58%): out of
reach for these kernels; with the "time" forward it would take a backward of ~35-55 instructions per element (at
60-80% of full issue), which needs the sums over the 16 states (du, ddelta) and over channels (dB, dC) without a
shuffle or shared-memory round per element (a thread holding all 16 states of a channel, as mamba_ssm's does, and a
block reduction of dB/dC). Measured on an H200 in run AA (docs/benchmarks.md §21): correct on the GPU; backwards
1.397-2.037 ms against mamba_ssm's 1.522, forwards 0.585-0.893 ms against its 0.381 (the hybrid's, with its saves,
3.3-7.0 ms): no configuration beats mamba_ssm's scan (best forward + backward 0.91x), so no training A/B ran.
Reproduce (bench/scan_speed.sh: the GPU tests, every configuration's forward and backward against mamba_ssm's and
its fixed-B/C variants, then the training A/B only for a configuration that beats it):

    bash bench/scan_speed.sh kernels
    bash bench/scan_speed.sh train
"""

from __future__ import annotations

from pathlib import Path

import torch

N_STATE = 16

SRC = (Path(__file__).parent / "cuda_scan.cu").read_text()

_KERNELS: dict = {}


def _kernels(layout: str, db: int, tt: int, host: bool = False, save: int = 0):
    """(scan_fwd, scan_bwd), each called as fn(grid, block, args), compiled once per shape: by NVRTC through torch
    (`torch.cuda._compile_kernel`), or with `host` by g++ around HOST_PRELUDE, on CPU tensors. `save`: the "time"
    forward's steps per stored state when not its chunk (a hybrid's, for the "state" backward's tiles)."""
    key = (layout, db, tt, host, save)
    if key not in _KERNELS:
        opts = [f"-DDB={db}", "-std=c++17"] + (["-DTIME_LAYOUT=1", f"-DIT={tt}"] if layout == "time" else
                                               [f"-DTT={tt}"]) + ([f"-DSAVE={save}"] if save else [])
        if host:
            _KERNELS[key] = _host_kernels(opts)
        else:
            opts.append("--use_fast_math")  # as mamba_ssm's kernels are built: exp2f is one MUFU.EX2
            _KERNELS[key] = tuple(torch.cuda._compile_kernel(SRC, name, nvcc_options=opts)
                                  for name in ("scan_fwd", "scan_bwd"))
    return _KERNELS[key]


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
inline float __shfl_sync(unsigned, float v, int src) {
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    g_xchg[w][lane] = v;
    g_warp_bar[w]->arrive_and_wait();
    const float r = g_xchg[w][src];
    g_warp_bar[w]->arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned m, float v, int x) { return __shfl_sync(m, v, (threadIdx.x & 31) ^ x); }
inline float __shfl_up_sync(unsigned m, float v, int k) {
    const float r = __shfl_sync(m, v, ((threadIdx.x & 31) - k) & 31);
    return (threadIdx.x & 31) >= k ? r : v;
}
inline float __shfl_down_sync(unsigned m, float v, int k) {
    const float r = __shfl_sync(m, v, ((threadIdx.x & 31) + k) & 31);
    return (threadIdx.x & 31) + k < 32 ? r : v;
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

    macros = {k: v.replace("\\\n", " ") for k, v in re.findall(r"#define (\w+_PARAMS) (.*?)\n\n", SRC, re.S)}
    wrappers, sigs = [], {}
    for name in ("scan_fwd", "scan_bwd"):
        text = macros[f"{name[5:].upper()}_PARAMS"].replace("IN_PARAMS", macros["IN_PARAMS"])
        params = [p.strip() for p in text.split(",")]
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


def _in_params(u, delta, A, B, C, D, z, delta_bias) -> list:
    """The arguments both kernels start with (IN_PARAMS in cuda_scan.cu)."""
    u, su_b, su_d = _bd(u)
    delta, sdl_b, sdl_d = _bd(delta)
    z, sz_b, sz_d = _bd(z)
    return [u, su_b, su_d, delta, sdl_b, sdl_d, A.float().contiguous(), B.contiguous(), C.contiguous(),
            D.float().contiguous(), delta_bias.float().contiguous(), z, sz_b, sz_d]


class CudaScan:
    """`fwd` / `bwd` with the signatures of mamba_ssm's `selective_scan_cuda` for the Mamba-1 mixer's call.
    layout "state": a thread per (channel, state), `block_d` channels per block, tiles of `tile` steps;
    layout "time": a warp per channel, each lane `tile` consecutive steps of a chunk of 32 x `tile`."""

    def __init__(self, block_d: int = 16, tile: int = 16, host: bool = False, layout: str = "state",
                 backward: CudaScan | None = None):
        assert layout in ("state", "time") and tile % 2 == 0
        assert layout == "time" or (block_d * N_STATE) % 32 == 0
        self.block_d, self.tile, self.host, self.layout = block_d, tile, host, layout
        self.chunk = tile * (32 if layout == "time" else 1)  # steps per stored state
        self.threads = block_d * (32 if layout == "time" else N_STATE)
        self.backward = backward or self
        if backward is not None:  # a hybrid: the "time" forward stores the state entering each backward tile
            assert layout == "time" and backward.layout == "state" and backward.host == host
            assert backward.chunk % tile == 0 and self.chunk % backward.chunk == 0, "tiles of whole runs in a chunk"
            self.chunk = backward.chunk

    @classmethod
    def from_spec(cls, spec: str, host: bool = False) -> CudaScan:
        """From `DB:TT` (layout "state"), `DB:IT:time`, or a hybrid `DB:IT:time/DB:TT` (that forward, this
        backward), as scan_kernel.py's --configs and CUSCAN spell it."""
        fwd, _, bwd = spec.partition("/")
        db, tile, *layout = fwd.split(":")
        return cls(int(db), int(tile), host=host, layout=(layout or ["state"])[0],
                   backward=cls.from_spec(bwd, host) if bwd else None)

    def _check(self, u, A, B, z, delta_bias, delta_softplus):
        assert delta_softplus and z is not None and delta_bias is not None
        assert not A.is_complex() and A.shape[-1] == N_STATE and B.dim() == 4 and B.shape[1] == 1
        assert u.dtype == torch.bfloat16 and u.shape[1] % self.block_d == 0 and u.shape[1] % self.backward.block_d == 0

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self._check(u, A, B, z, delta_bias, delta_softplus)
        b, dm, L = u.shape
        nT = -(-L // self.chunk)
        args = _in_params(u, delta, A, B, C, D, z, delta_bias)
        y = torch.empty(b, dm, L, device=u.device, dtype=u.dtype)
        out_z = torch.empty_like(y)
        states = torch.empty(b, dm, nT, N_STATE, device=u.device, dtype=torch.float32)
        save = self.chunk if self.backward is not self else 0
        fwd, _ = _kernels(self.layout, self.block_d, self.tile, self.host, save)
        fwd((dm // self.block_d, b, 1), (self.threads, 1, 1), [*args, y, out_z, states, dm, L, nT])
        return y, states, out_z

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, y, dz, delta_softplus, recompute_out_z):
        self._check(u, A, B, z, delta_bias, delta_softplus)
        b, dm, L = u.shape
        nT = states.shape[2]
        assert nT == -(-L // self.chunk), "states from a forward with another tile"
        args = _in_params(u, delta, A, B, C, D, z, delta_bias)
        y, sy_b, sy_d = _bd(y)
        dout, sdo_b, sdo_d = _bd(dout)
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
        k = self.backward
        _, bwd = _kernels(k.layout, k.block_d, k.tile, k.host)
        bwd((dm // k.block_d, b, 1), (k.threads, 1, 1),
            [*args, y, sy_b, sy_d, dout, sdo_b, sdo_d, states, du, ddelta, dz, dz.stride(0), dz.stride(1),
             du if out_z is None else out_z, dA, dB, dC, dD, dbias, dm, L, nT, int(recompute_out_z)])
        return (du, ddelta, dA, dB, dC, dD.to(D.dtype), dbias.to(delta_bias.dtype), dz, out_z)

