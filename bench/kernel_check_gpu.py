"""Issue #19 on a CUDA machine: the kernel check passes with mamba_ssm/causal_conv1d installed and fails (before
any model loads) without them; a tiny SFT run on the GPU logs its progress lines.

    source .gpu/install.sh && PYTHONPATH=$PWD/src:$PYTHONPATH python3 bench/kernel_check_gpu.py --out OUT
    PYTHONPATH=$PWD/src python3 bench/kernel_check_gpu.py --expect-missing   # the image without the kit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-missing", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch

    from mamba_align.model.kernels import missing_kernels, require_kernels
    from mamba_align.utils import UserError

    result = {"cuda": torch.cuda.is_available(), "missing": missing_kernels()}
    try:
        require_kernels("training (sft)")
        result["check"] = "passed"
    except UserError as e:
        result["check"] = f"UserError: {e}"
    print(json.dumps(result, indent=1))
    if a.expect_missing:
        return 0 if result["check"].startswith("UserError") else 1
    if result["check"] != "passed":
        return 1
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from mamba_align.train.job import TrainJob
    from mamba_align.train.launch import train
    from mamba_align.train.recipes import load_recipe

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.basicConfig(level=logging.INFO)
    logging.getLogger().addHandler(Keep())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        bench.write_model(d / "model", **bench.SHAPES["tiny"])
        bench.write_sft_rows(d / "train.parquet", 64, bench.words(512)[:40], seed=0)
        recipe = load_recipe(ROOT / "config" / "recipes" / "demo", "sft",
                             {"max_steps": 6, "logging_steps": 2, "save_steps": 100})
        train(TrainJob(stage="sft", recipe=recipe, model=d / "model", train=d / "train.parquet", test=None,
                       out=d / "sft", checkpoints=d / "ckpt", metrics=d / "metrics.json"))
    progress = [x for x in lines if " progress: step " in x]
    print("\n".join(progress))
    if a.out:
        Path(a.out).write_text(json.dumps({**result, "progress": progress}, indent=1))
    return 0 if len(progress) >= 3 and progress[-1].startswith("sft progress: step 6/6") else 1


if __name__ == "__main__":
    sys.exit(main())
