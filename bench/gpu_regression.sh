#!/usr/bin/env bash
# Issue #20's GPU checks of the restructured package, on one GPU, in parts that each fit one device call (run them
# back to back on one warm machine; each part installs the kit if it is not there). Results in $OUT (default bench-out).
#   bash bench/gpu_regression.sh gpu     # pytest -m gpu (engine, fast path); the conversion check at 2.8B; generation
#   bash bench/gpu_regression.sh speed   # training speed, same run: the package before the restructure (956c551,
#                                     #   unpacked into bench-old/ beforehand, see below) vs now, SFT and DPO
#   bash bench/gpu_regression.sh loss    # SFT loss at the recipe's settings: the fast path's own vs TRL's fused head, ABAB
#                                     #   (needs the tree at 256d774: the own loss was deleted after this measurement)
# Before `speed`, here: rm -rf bench-old && mkdir bench-old && git archive 956c551 src bench | tar -x -C bench-old
# Setup (docs/benchmarks.md): the GPU kit in .gpu (../shared/gpu/README.md), carried with the first call.
set -euo pipefail
OUT=${OUT:-bench-out}
case "${1:-}" in gpu|speed|loss) ;; *) echo "usage: bash bench/gpu_regression.sh gpu|speed|loss" >&2; exit 2 ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ -f /tmp/site/.kit ] || { source .gpu/install.sh >/dev/null && touch /tmp/site/.kit; }; set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
now() { PYTHONPATH=$SITE:$PWD/src:${PYTHONPATH:-} "$@"; }
case "$1" in
  gpu)
    now timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_engine.py tests/test_fast.py \
      2>&1 | tail -25 | tee "$OUT/pytest-gpu.txt" || true
    now timeout 200 python3 bench/verify_conversion_gpu.py --out "$OUT/verify.json" 2>&1 | tail -5 || true
    now timeout 150 python3 bench/generation_throughput.py --batch-sizes 1,64 --ref-batch-sizes 1,64 \
      --hf-batch-sizes 1 --hf-new-tokens 32 --extra "" --out "$OUT/generation.json" 2>&1 | tail -5 || true
    ;;
  speed)  # before / after / before: both the same benchmark command, SFT and DPO at the 2.8B shape
    [ -d bench-old/src ] || { echo "bench-old/ missing (see the header)" >&2; exit 2; }
    for who in old new old; do
      if [ $who = old ]; then dir=bench-old; else dir=$PWD; fi
      (cd $dir && PYTHONPATH=$SITE:$dir/src timeout 200 python3 bench/train_throughput.py --stages sft,dpo --steps 8 \
        --no-checkpoint-save --out "$OUT/speed-$who-$(date +%s).json" 2>&1 | tail -3) || echo "run failed: $who"
    done
    ;;
  loss)   # the zephyr recipes' per-device 2, accumulation 16 (global 32 on 1 GPU)
    now timeout 540 python3 bench/train_throughput.py --stages sft --steps 6 --sft-batch 2 --sft-global-batch 32 \
      --sft-losses fast,trl,fast,trl --no-checkpoint-save --out "$OUT/loss.json" 2>&1 | tail -3 || true
    ;;
esac
