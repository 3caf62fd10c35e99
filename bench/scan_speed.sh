#!/usr/bin/env bash
# Issue #33's selective-scan attempt 2 (bench/cuda_scan.py), on one device machine, in two parts that each fit one
# device call (run the second right after the first, so that the machine and its compiled kernels stay). Results go
# to $OUT (default ./bench-out); docs/benchmarks.md §19 is the earlier attempt, §21 this one's results (run AA).
#   bash bench/scan_speed.sh kernels  # ~3 min: correctness on the GPU (tests/test_cuda_scan.py -m gpu), then one
#                                     # layer's forward + backward of every configuration against mamba_ssm's,
#                                     # and mamba_ssm's with B and/or C fixed (what its per-element atomics cost)
#   bash bench/scan_speed.sh train    # ~7 min: only when a configuration's forward + backward beats mamba_ssm's:
#                                     # the training A/B at what users run (2 x 2,048 per micro-batch, 8 accumulated,
#                                     # clipping 1.0), three repetitions; CUSCAN=DB:TT[:time] picks the configuration
#                                     # (default: the fastest in $OUT/scan_cuda.json)
# Setup: the GPU kit in .gpu (../shared/gpu/README.md), carried with the first call; each part installs it if needed.
set -euo pipefail
OUT=${OUT:-bench-out}
CONFIGS=${CONFIGS:-cuda:16:16,cuda:8:16,cuda:8:32,cuda:4:8:time,cuda:8:4:time,cuda:4:8:time/16:16,cuda:8:4:time/16:16}
case "${1:-}" in kernels|train) ;; *) echo "usage: bash bench/scan_speed.sh kernels|train" >&2; exit 2 ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ -f /tmp/site/.kit ] || { source .gpu/install.sh >/dev/null && touch /tmp/site/.kit; }; set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "$1" in
  kernels)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_scan.py 2>&1 | tail -25 \
      | tee "$OUT/test_cuda_scan.txt" || true
    (cd bench && timeout 300 python3 scan_kernel.py --fixed-bc --configs "$CONFIGS" --out "$OUT/scan_cuda.json")
    ;;
  train)
    if [ -z "${CUSCAN:-}" ]; then
      # the fastest configuration by forward + backward, and whether it beats mamba_ssm's by more than 5%
      CUSCAN=$(python3 - "$OUT/scan_cuda.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
native = next(r for r in rows if r["impl"] == "mamba_ssm CUDA")
own = [r for r in rows if r["impl"].startswith("cuda:") and "fwd_ms" in r]
best = min(own, key=lambda r: r["fwd_ms"] + r["bwd_ms"], default=None)
total = lambda r: r["fwd_ms"] + r["bwd_ms"]
print(best["impl"].split(":", 1)[1] if best and total(best) < 0.95 * total(native) else "")
EOF
)
      [ -n "$CUSCAN" ] || { echo "no configuration beats mamba_ssm's scan by more than 5%: no training A/B" \
                                | tee "$OUT/training_speed.txt"; exit 0; }
    fi
    echo "CUSCAN=$CUSCAN" | tee "$OUT/cuscan.txt"
    V=mamba_ssm:2,fast_trl:2,fast_trl+cuscan:2
    CUSCAN=$CUSCAN timeout 560 python3 bench/training_speed.py --variants $V,$V,$V --rows-per-step 16 --max-grad-norm 1.0 \
      --warmup 1 --steps 3 --out "$OUT/training_speed.json"
    ;;
esac
