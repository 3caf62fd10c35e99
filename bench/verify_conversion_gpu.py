"""Check the mamba_ssm -> transformers conversion at the real Mamba-2.8B shape on a GPU.

1. Build a random-weight mamba_ssm MambaLMHeadModel (d_model 2560, 64 layers, vocab 50277 -> 50280 rows),
   fp32 on CUDA; take its logits on a fixed random batch and its greedy continuation (its own kernels
   and decode loop); save it in mamba_ssm's format (config.json + pytorch_model.bin); free it.
2. Run mamba_align.model.reference (pure PyTorch) on the saved weights: shows the reference agrees with the
   kernels, so a CPU check against the reference means something.
3. Convert with prepare_base_model(verify=False, tokenizer=None); load the result with transformers'
   MambaForCausalLM on CUDA (it uses mamba_ssm / causal_conv1d kernels when installed); compare.

All fp32 with TF32 off. Writes a JSON with max/mean |dlogit| and greedy agreement for each pair;
exits 1 if a pair is over --atol or a greedy continuation differs.

On the device (H100, kit from shared/gpu copied to .gpu/, carry [".gpu"]):
    source .gpu/install.sh && PYTHONPATH=$PWD/src:$PYTHONPATH \
        python3 bench/verify_conversion_gpu.py --out $OUT/verify.json
Measured 2026-11-25 on one H100 (torch 2.11, transformers 5.17, mamba_ssm 2.3.2.post1): 104 s for the script
(+25 s kit install), peak 10.8 GiB GPU, 11.9 GiB host RSS, ~22 GB temp disk; max |dlogit| 3.1e-5
(transformers vs reference), 2.5e-5 (mamba_ssm vs reference), 2.3e-5 (transformers vs mamba_ssm),
16-token greedy continuations identical for all three; max |logit| 28.7.
Dry check here, same code at a tiny shape, no mamba_ssm needed:
    python bench/verify_conversion_gpu.py --device cpu --tiny --out /tmp/verify_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # mamba_ssm MambaConfig fields
    "2.8b": {"d_model": 2560, "n_layer": 64, "vocab_size": 50277},
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 301},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape (dry check of this script)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=1e-3, help="max |dlogit| allowed per pair (fp32; H100 measured 3e-5)")
    p.add_argument("--workdir", help="where the two checkpoints go (default: a temp dir); 2.8B needs ~25 GB")
    return p


def compare(a, b) -> dict:
    diff = (a.float().cpu() - b.float().cpu()).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item()}


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mamba_align.model import reference
    from mamba_align.model.convert import prepare_base_model
    from mamba_align.testing.demo import build_tiny_mamba_ssm_checkpoint
    from mamba_align.utils import setup_logging, write_json

    setup_logging()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    device, shape = args.device, SHAPES["tiny" if args.tiny else "2.8b"]
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        have_mamba_ssm = device.startswith("cuda")
    except ImportError:
        have_mamba_ssm = False
    timings: dict[str, float] = {}
    t0 = time.time()

    def lap(name: str) -> None:
        nonlocal t0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[name] = round(time.time() - t0, 1)
        print(f"[{name}] {timings[name]} s", file=sys.stderr, flush=True)
        t0 = time.time()

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, shape["vocab_size"], (args.batch, args.seq_len), generator=g).to(device)
    n = args.new_tokens
    result: dict = {"shape": shape, "batch": args.batch, "seq_len": args.seq_len, "new_tokens": n,
                    "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                    "versions": {"torch": torch.__version__}}
    logits, greedy = {}, {}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ssm_dir, hf_dir = Path(tmp) / "mamba_ssm", Path(tmp) / "hf"
        with torch.no_grad():
            # 1. the source: mamba_ssm's own model and kernels, or (no mamba_ssm) our random-init builder
            if have_mamba_ssm:
                import mamba_ssm

                result["versions"]["mamba_ssm"] = mamba_ssm.__version__
                torch.manual_seed(args.seed)
                model = MambaLMHeadModel(MambaConfig(**shape), device=device, dtype=torch.float32).eval()
                logits["mamba_ssm"] = model(ids).logits.cpu()
                greedy["mamba_ssm"] = model.generate(ids, max_length=args.seq_len + n, top_k=1)[:, -n:].cpu()
                model.save_pretrained(str(ssm_dir))
                del model
                free(device)
            else:
                result["versions"]["mamba_ssm"] = None
                build_tiny_mamba_ssm_checkpoint(ssm_dir, seed=args.seed, **shape)
            lap("source")

            # 2. the pure-PyTorch reference on the saved weights
            sd = torch.load(ssm_dir / "pytorch_model.bin", map_location=device, weights_only=True)
            config = json.loads((ssm_dir / "config.json").read_text())
            logits["reference"] = reference.forward(sd, config, ids).cpu()
            greedy["reference"] = reference.greedy(sd, config, ids, n).cpu()
            del sd
            free(device)
            lap("reference")

        # 3. convert (CPU), then transformers on the device
        report = prepare_base_model(ssm_dir, None, None, None, None, hf_dir, Path(tmp) / "report.json", verify=False)
        result["conversion"] = {k: report[k] for k in ("format", "n_params", "vocab_rows", "source_vocab_size",
                                                       "weights_sha256", "seconds")}
        lap("convert")

        import transformers
        from transformers import MambaForCausalLM
        from transformers.utils import import_utils

        result["versions"]["transformers"] = transformers.__version__
        result["transformers_sees_kernels"] = {
            name: getattr(import_utils, f"is_{name}_available", lambda: None)()
            for name in ("mamba_ssm", "causal_conv1d")}
        model = MambaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            logits["transformers"] = model(ids).logits.cpu()
            greedy["transformers"] = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                                    pad_token_id=1)[:, -n:].cpu()
        if device.startswith("cuda"):
            result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        del model
        free(device)
        lap("transformers")

    pairs = [("transformers", "reference"), ("mamba_ssm", "reference"), ("transformers", "mamba_ssm")]
    result["comparisons"] = {}
    for a, b in pairs:
        if a in logits and b in logits:
            result["comparisons"][f"{a}_vs_{b}"] = {
                **compare(logits[a], logits[b]),
                "greedy_continuation_identical": torch.equal(greedy[a], greedy[b]),
            }
    result["greedy"] = {k: v.tolist() for k, v in greedy.items()}
    result["max_abs_logit"] = logits["reference"].abs().max().item()
    result["atol"] = args.atol
    result["passed"] = all(c["max_abs_logit_diff"] <= args.atol and c["greedy_continuation_identical"]
                           for c in result["comparisons"].values())
    result["seconds"] = timings
    result["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "greedy"}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
