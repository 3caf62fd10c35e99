"""Correctness guard of the training fast path on one fixed batch: loss and gradients of
transformers + `enable_fast_path` against transformers' own forward.

Four runs of one model (same weights, same batch, labels with a masked prompt): the reference path and the
fast path, each in fp32 and under bf16 autocast. In fp32 the two paths must agree closely (they differ only
in kernels: Triton RMSNorm, chunked loss). Under bf16 autocast both round, so the check is that the fast
path is no further from the fp32 result than the reference path is: err(fast_bf16) <= 1.5 err(ref_bf16) +
5e-3, per parameter tensor (relative L2 error of its gradient) and for the loss.

    PYTHONPATH=src python bench/fast_train_check.py                 # 2.8B shape, seq 2048, batch 1
    PYTHONPATH=src python bench/fast_train_check.py --tiny          # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import sys
import time

from _benchutil import emit, environment, random_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init", choices=["transformers", "mamba_ssm"], default="mamba_ssm",
                   help="mamba_ssm (default): its init (embedding std 0.02, out_proj rescaled by 1/sqrt(layers)); "
                        "transformers: its default random init, so ill-conditioned at depth that bf16 vs fp32 "
                        "gradients of the reference path itself differ by ~100%% (not a usable yardstick)")
    p.add_argument("--checkpointing", action="store_true", help="fast path with gradient checkpointing")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from mamba_align.train import fast

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = "tiny" if a.tiny else "2.8b"
    if a.tiny:
        a.seq = 64
    overrides = dict(use_cache=False, use_mambapy=not cuda)
    if a.layers:
        overrides["num_hidden_layers"] = a.layers
    if a.init == "mamba_ssm":
        overrides.update(rescale_prenorm_residual=True, initializer_range=0.02)
    model = random_model(shape, device, torch.float32, seed=0, **overrides).train()
    with torch.no_grad():  # non-trivial norm weights
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.uniform_(0.5, 1.5)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100  # a prompt that does not count

    def run(bf16: bool):
        """Loss and gradients (kept on the device: copying 2.8B-parameter gradients to the host is slow)."""
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = {n: prm.grad for n, prm in model.named_parameters()}
        for prm in model.parameters():
            prm.grad = None
        print(f"run bf16={bf16}: loss {loss.item():.6f} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
        return loss.item(), grads

    def rel(x, y):
        return ((x - y).norm() / y.norm().clamp(min=1e-30)).item()

    def sq(x):
        return (x.double().norm() ** 2).item()

    # the fp32 reference and the bf16 reference are kept; the fast runs are compared as they come
    exact_loss, exact = run(False)
    exact_sq = sum(sq(g) for g in exact.values())
    if cuda:
        ref_loss, ref = run(True)
    else:
        ref_loss, ref = exact_loss, {n: g.clone() for n, g in exact.items()}
    if fast.enable_fast_path(model):
        kernels = "triton (mamba_ssm layer_norm_fn)"
    else:
        fast.patch_model(model, fast.reference_add_rms_norm, cuda_only=False)
        kernels = "plain PyTorch (no CUDA/mamba_ssm here: plumbing check only)"
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast32_loss, fast32 = run(False)
    e_fp32 = {n: rel(fast32[n], exact[n]) for n in exact}
    glob_fp32 = (sum(sq(fast32[n] - exact[n]) for n in exact) / exact_sq) ** 0.5
    del fast32
    fast16_loss, fast16 = run(True) if cuda else (fast32_loss, None)
    if fast16 is None:
        e_fast = dict(e_fp32)
        glob_fast, glob_fast_ref = glob_fp32, glob_fp32
    else:
        e_fast = {n: rel(fast16[n], exact[n]) for n in exact}
        glob_fast = (sum(sq(fast16[n] - exact[n]) for n in exact) / exact_sq) ** 0.5
        glob_fast_ref = (sum(sq(fast16[n] - ref[n]) for n in exact) / sum(sq(g) for g in ref.values())) ** 0.5
    e_ref = {n: rel(ref[n], exact[n]) for n in exact}
    glob_ref = (sum(sq(ref[n] - exact[n]) for n in exact) / exact_sq) ** 0.5

    per_param = []
    worst_ratio, failures = 0.0, []
    for n in exact:
        per_param.append((n, e_ref[n], e_fast[n], e_fp32[n]))
        if e_fast[n] > 1.5 * e_ref[n] + 5e-3:
            failures.append(f"{n}: bf16 fast {e_fast[n]:.2e} vs reference {e_ref[n]:.2e}")
        if e_fp32[n] > 1e-3:
            failures.append(f"{n}: fp32 fast vs fp32 reference {e_fp32[n]:.2e}")
        worst_ratio = max(worst_ratio, e_fast[n] / max(e_ref[n], 1e-12))
    loss_err_ref, loss_err_fast = abs(ref_loss - exact_loss), abs(fast16_loss - exact_loss)
    if loss_err_fast > 1.5 * loss_err_ref + 5e-3 * abs(exact_loss):
        failures.append(f"loss: bf16 fast {fast16_loss} vs reference {ref_loss} (fp32 {exact_loss})")
    if abs(fast32_loss - exact_loss) > 1e-4 * abs(exact_loss):
        failures.append(f"loss: fp32 fast {fast32_loss} vs fp32 reference {exact_loss}")
    per_param.sort(key=lambda t: -t[2])
    result = dict(
        benchmark="fast_train_check", shape=shape, init=a.init, layers=model.config.num_hidden_layers, seq=a.seq,
        batch=a.batch, gradient_checkpointing=a.checkpointing, kernels=kernels,
        loss=dict(fp32_reference=exact_loss, fp32_fast=fast32_loss, bf16_reference=ref_loss, bf16_fast=fast16_loss),
        grad_global_rel_err=dict(bf16_reference=glob_ref, bf16_fast=glob_fast, fp32_fast=glob_fp32,
                                 bf16_fast_vs_bf16_reference=glob_fast_ref),
        grad_worst_params=[dict(param=n, bf16_reference=round(r, 6), bf16_fast=round(f, 6), fp32_fast=round(x, 8))
                           for n, r, f, x in per_param[:5]],
        worst_ratio_fast_to_reference=round(worst_ratio, 3),
        passed=not failures, failures=failures[:20], environment=environment())
    emit("fast_train_check", result, a.out)
    if failures:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
