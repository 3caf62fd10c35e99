#!/usr/bin/env bash
# Every figure issue #8 asks for, on one device machine, in two parts that each fit one device call (run the
# second right after the first so that the machine stays the same). Results go to $OUT (default ./bench-out).
#   bash bench/single_gpu_speed.sh train      # ~8 min: raw training loops, the pipeline's SFT, DPO +- precomputed ref
#   bash bench/single_gpu_speed.sh generate   # generation throughput, MT-Bench + AlpacaEval generation wall time
# Setup first (docs/benchmarks.md): source .gpu/install.sh; export PYTHONPATH=$PWD/src:$PYTHONPATH HF_HUB_OFFLINE=1
set -euo pipefail
OUT=${OUT:-bench-out}
WORK=${WORK:-/dev/shm/mamba-bench}
case "${1:-}" in train|generate) ;; *) echo "usage: bash bench/single_gpu_speed.sh train|generate" >&2; exit 2 ;; esac
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-}" in
  train)
    # raw training loops (no trainer) at batch 4: mamba_ssm's own model vs the fast path, without and with clipping
    python3 bench/training_speed.py --variants mamba_ssm:4,fast:4 --warmup 3 --steps 8 --timeout 90 --out "$OUT/training_speed.json"
    python3 bench/training_speed.py --variants mamba_ssm:4,fast:4 --max-grad-norm 1.0 --warmup 3 --steps 8 --timeout 90 --out "$OUT/training_speed-clip.json"
    # the pipeline's SFT step (train_sft: TRL SFTTrainer), with the recipes' clipping and without
    python3 bench/train_throughput.py --stages sft --sft-batch 4 --no-gradient-checkpointing --steps 8 --no-checkpoint-save --workdir "$WORK" --out "$OUT/train_throughput-sft.json"
    python3 bench/train_throughput.py --stages sft --sft-batch 4 --no-gradient-checkpointing --steps 8 --max-grad-norm 0 --no-checkpoint-save --workdir "$WORK" --out "$OUT/train_throughput-sft-no-clip.json"
    python3 bench/train_throughput.py --stages dpo --steps 6 --precompute-ref --dpo-optim rmsprop --no-checkpoint-save --workdir "$WORK" --out "$OUT/train_throughput-dpo.json"
    ;;
  generate)
    python3 bench/generation_throughput.py --out "$OUT/generation_throughput.json"
    python3 bench/eval_generation_walltime.py --batch-size 128 --rate-batches 64 --out "$OUT/eval_generation_walltime.json"
    ;;
esac
rm -rf "$WORK"
