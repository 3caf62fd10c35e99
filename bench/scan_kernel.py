"""The selective scan alone at one layer of the 2.8B shape: mamba_ssm's CUDA kernel against bench/chunked_scan.py's
`ChunkedScan` (Triton; --configs chunk:block_d:warps) and bench/cuda_scan.py's `CudaScan` (CUDA of our own;
--configs cuda:block_d:tile), forward and backward times and their agreement.

Inputs as the Mamba-1 mixer passes them in training under bf16 autocast: u, delta, z (b, d, l) bf16, B and C
(b, 1, n, l) bf16, A (d, n), D and delta_bias (d) fp32, softplus on the time steps. Times are the median of
--reps CUDA-event timings after warm-up; agreement is the largest difference from the CUDA kernel relative to
the largest magnitude of each result.

    PYTHONPATH=src python bench/scan_kernel.py --out $OUT/scan_kernel.json
    # fp32 gradients against scan_reference.reference_scan's autograd at a small shape with ragged chunks and
    # channel blocks; on CPU through Triton's interpreter (triton 3.6.0 needs numpy < 2.4 there):
    TRITON_INTERPRET=1 python bench/scan_kernel.py --check 2,12,37,4 --configs 8:8:4
    python bench/scan_kernel.py --check 2,32,37,16 --configs host:16:16   # CudaScan's source on CPU threads
    python bench/scan_kernel.py --check 2,32,37,16 --configs cuda:16:16   # CudaScan itself (GPU), bf16 in/out
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _benchutil import emit, environment


def inputs(b, d, seq, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    bf = torch.bfloat16
    return dict(u=r(b, d, seq).to(bf), delta=(r(b, d, seq) * 0.5 - 1).to(bf),
                A=-torch.exp(r(d, n) * 0.5).contiguous(), B=r(b, 1, n, seq).to(bf), C=r(b, 1, n, seq).to(bf),
                D=r(d), z=r(b, d, seq).to(bf), delta_bias=r(d) * 0.3)


def timed(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 4), round(max(ts) - min(ts), 4)


def run(ops, x, dout):
    a = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    y, st, oz = ops.fwd(*a, True)
    res = ops.bwd(*a, dout, st, y, None, True, True)
    return (y, st, oz), res


OWN = ("cuda:", "host:")  # --configs prefixes of bench/cuda_scan.py's scan (bf16 in and out)


def make_ops(cfg):
    """`chunk:block_d:warps` -> the Triton scan; `cuda:block_d:tile` -> the CUDA one (bench/cuda_scan.py);
    `host:block_d:tile` -> the CUDA one's source on CPU threads (g++), for a check without a GPU; a fourth field
    `time` picks the CUDA scan's other layout (a warp per channel, `tile` steps per lane)."""
    if cfg.startswith(OWN):  # [cuda|host]:block_d:tile[:time]
        from cuda_scan import CudaScan

        kind, spec = cfg.split(":", 1)
        return CudaScan.from_spec(spec, host=kind == "host")
    from chunked_scan import ChunkedScan

    chunk, bd, warps = (int(v) for v in cfg.split(":"))
    return ChunkedScan(chunk=chunk, block_d=bd, num_warps=warps)


def check(shape, cfg):
    """Largest difference of each result from the step-by-step fp32 reference (and its autograd); for the CUDA
    scan (bf16 inputs and outputs) the inputs are bf16 and each difference is relative to the largest value."""
    from scan_reference import reference_scan

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.startswith(OWN)
    b, d, seq, n = shape
    torch.manual_seed(0)
    x = [torch.randn(b, d, seq), torch.randn(b, d, seq) * 0.5 - 1, -torch.rand(d, n) * 4 - 0.1,
         torch.randn(b, 1, n, seq), torch.randn(b, 1, n, seq), torch.randn(d), torch.randn(b, d, seq),
         torch.randn(d) * 0.3]
    x = [t.to(dev) for t in x]
    if bf16:
        x = [t.to(torch.bfloat16) if i in (0, 1, 3, 4, 6) else t for i, t in enumerate(x)]
    ref_in = [t.float().clone().requires_grad_() for t in x]
    out = reference_scan(*ref_in)
    g = torch.randn_like(out)
    if bf16:
        g = g.to(torch.bfloat16).float()
    out.backward(g)
    ops = make_ops(cfg)
    dz = None
    if bf16:  # strided as mamba_inner_fn passes them: delta (l, b*l, 1), z and dz halves of (b, 2d, l) tensors
        x[1] = x[1].transpose(0, 1).contiguous().transpose(0, 1)
        x[6] = torch.cat([torch.zeros_like(x[6]), x[6]], dim=1)[:, d:]
        dz = torch.empty(b, 2 * d, seq, device=dev, dtype=x[6].dtype)[:, d:]
    y, st, oz = ops.fwd(*x, True)
    res = ops.bwd(*x, g.to(x[0].dtype), st, y, dz, True, True)
    assert dz is None or res[7].data_ptr() == dz.data_ptr()
    scale = (lambda r: max(r.abs().max().item(), 1e-12)) if bf16 else (lambda r: 1.0)
    err = {"out_z": (oz.float() - out).abs().max().item() / scale(out)}
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dz"]
    for name, mine, i in zip(names, res, [0, 1, 2, 3, 4, 5, 7, 6]):
        ref = ref_in[i].grad
        err[name] = (mine.float().reshape(ref.shape) - ref).abs().max().item() / scale(ref)
    return err


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="2,5120,2048,16", help="batch,d_inner,seqlen,d_state")
    p.add_argument("--configs", default="32:8:4,64:8:4,32:16:4,32:4:4,16:8:4,32:8:8,64:16:8,32:16:8")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--check", metavar="B,D,L,N", help="only compare with the fp32 reference at this shape")
    p.add_argument("--fixed-bc", action="store_true",
                   help="also time mamba_ssm's kernel with B and/or C fixed (d, n): what its per-element atomic "
                        "adds of dB and dC cost")
    p.add_argument("--out")
    args = p.parse_args()
    if args.check:
        cfg = args.configs.split(",")[0]
        err = check([int(v) for v in args.check.split(",")], cfg)
        print(err)
        assert max(err.values()) < (2e-2 if cfg.startswith(OWN) else 1e-4), err
        return
    import selective_scan_cuda

    b, d, seq, n = (int(v) for v in args.shape.split(","))
    x = inputs(b, d, seq, n)
    a = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    dout = torch.randn(b, d, seq, device="cuda").to(torch.bfloat16)
    (ry, rst, roz), rres = run(selective_scan_cuda, x, dout)
    rows = [dict(impl="mamba_ssm CUDA", fwd_ms=timed(lambda: selective_scan_cuda.fwd(*a, True), args.reps),
                 bwd_ms=timed(lambda: selective_scan_cuda.bwd(*a, dout, rst, ry, None, True, True), args.reps))]
    if args.fixed_bc:  # B, C as (d, n) weights: dB, dC summed in the block, not one atomic per (b, d, n, t)
        for which in ("B", "C", "BC"):
            f = dict(x, **{k: torch.randn(d, n, device="cuda") for k in which})
            fa = (f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["z"], f["delta_bias"])
            fy, fst, _ = selective_scan_cuda.fwd(*fa, True)
            rows.append(dict(impl=f"mamba_ssm CUDA, {which} fixed (d, n)",
                             fwd_ms=timed(lambda: selective_scan_cuda.fwd(*fa, True), args.reps),
                             bwd_ms=timed(lambda: selective_scan_cuda.bwd(*fa, dout, fst, fy, None, True, True),
                                          args.reps)))
            print(rows[-1], flush=True)
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dz", "out_z"]
    for cfg in args.configs.split(","):
        ops = make_ops(cfg)
        try:
            (y, st, oz), res = run(ops, x, dout)
            torch.cuda.synchronize()
        except Exception as e:  # a config that does not compile (registers, shared memory): say so, go on
            rows.append(dict(impl=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        err = {"out_z": (oz.float() - roz.float()).abs().max().item() / roz.float().abs().max().item()}
        for nm, mine, ref in zip(names, res, rres):
            if mine is not None and ref is not None:
                mine, ref = mine.float().reshape(ref.shape), ref.float()
                err[nm] = (mine - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        rows.append(dict(impl=cfg if cfg.startswith("cuda:") else "triton chunk:block_d:warps " + cfg,
                         fwd_ms=timed(lambda: ops.fwd(*a, True), args.reps),
                         bwd_ms=timed(lambda: ops.bwd(*a, dout, st, y, None, True, True), args.reps),
                         rel_err={k: float(f"{v:.3g}") for k, v in err.items()}))
        print(rows[-1], flush=True)
    emit("scan_kernel", dict(shape=dict(batch=b, d_inner=d, seqlen=seq, d_state=n), rows=rows,
                             environment=environment()), args.out)


if __name__ == "__main__":
    main()
