#!/usr/bin/env bash
# Issue #17's multi-GPU figures on one 2-GPU host, through the pipeline's training command (bench/multigpu.py),
# in parts that each fit one device call (run them back to back so the machine and its /dev/shm stay the same;
# each part installs and sets up again if they did not). Results: one JSON per run in $OUT (default bench-out).
#   bash bench/multi_gpu_scaling.sh sft      # FSDP 2 GPUs; 1 process with both GPUs visible; DDP 2 GPUs   (SFT)
#   bash bench/multi_gpu_scaling.sh ddp      # SFT DDP 2 GPUs again (gradients in DDP's buckets); DPO 1 GPU and DDP 2 GPUs
#   bash bench/multi_gpu_scaling.sh resume   # DPO FSDP 2 GPUs; DDP stop at step 3 and resume; 2 launchers x 1 GPU, same
#   bash bench/multi_gpu_scaling.sh nodes    # only the last: 2 launchers x 1 GPU (as 2 nodes), stop at step 3 and resume
#   bash bench/multi_gpu_scaling.sh scale    # 1 vs 2 GPUs with each rank accumulating what it does in the recipes on 8 GPUs
# Setup (docs/benchmarks.md): the GPU kit in .gpu (../shared/gpu/README.md), carried with the call.
set -euo pipefail
OUT=${OUT:-bench-out}
WORK=${WORK:-/dev/shm/mamba-mg}
case "${1:-}" in sft|ddp|resume|nodes|scale) ;; *) echo "usage: bash bench/multi_gpu_scaling.sh sft|ddp|resume|nodes|scale" >&2; exit 2 ;; esac
mkdir -p "$OUT"
[ -f /tmp/site/.kit ] || { source .gpu/install.sh >/dev/null && touch /tmp/site/.kit; }; set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ -f "$WORK/setup.json" ] || python3 bench/multigpu.py setup --work "$WORK"
run() { timeout 300 python3 bench/multigpu.py run --work "$WORK" --out "$OUT" "$@" || echo "run failed: $*"; }
# the recipes' settings (zephyr-7b-beta), shortened: SFT global batch 32 (of the recipe's 512) and per-device 2;
# DPO global batch 16 (of 32), its per-device 2 and gradient checkpointing
SFT=(--stage sft --override max_steps=10 --override global_batch_size=32 --override per_device_train_batch_size=2)
DPO=(--stage dpo --override max_steps=10 --override global_batch_size=16)
case "$1" in
  sft)
    run --name sft-fsdp2 --nproc 2 --fsdp --gpus 0,1 "${SFT[@]}"
    run --name sft-1gpu-2visible --nproc 1 --gpus all "${SFT[@]}"
    run --name sft-ddp2 --nproc 2 --gpus 0,1 "${SFT[@]}"
    ;;
  ddp)
    run --name sft-ddp2 --nproc 2 --gpus 0,1 "${SFT[@]}"
    run --name dpo-1gpu --nproc 1 --gpus 0 "${DPO[@]}"
    run --name dpo-ddp2 --nproc 2 --gpus 0,1 "${DPO[@]}"
    ;;
  resume)
    run --name dpo-fsdp2 --nproc 2 --fsdp --gpus 0,1 "${DPO[@]}"
    run --name sft-ddp2-resume --nproc 2 --gpus 0,1 --preempt-at 3 "${SFT[@]}" --override max_steps=6
    ;&  # and the 2-launcher run, the whole of `nodes`
  nodes)
    run --name sft-2nodes-resume --nodes 2 --preempt-at 3 "${SFT[@]}" --override max_steps=6
    ;;
  scale)
    # On 8 GPUs the recipes accumulate 32 micro-batches per rank (SFT: 512 = 8 x 2 x 32) and 2 (DPO: 32 = 8 x 2 x 2).
    # The same per-rank work on 2 GPUs: SFT global 128 (1 GPU: 64 micro-batches), DPO global 8 (1 GPU: 4).
    S=(--stage sft --override max_steps=4 --override global_batch_size=128 --override per_device_train_batch_size=2)
    D=(--stage dpo --override max_steps=6 --override global_batch_size=8)
    run --name sft-1gpu-acc64 --nproc 1 --gpus 0 "${S[@]}"
    run --name sft-ddp2-acc32 --nproc 2 --gpus 0,1 "${S[@]}"
    run --name dpo-1gpu-acc4 --nproc 1 --gpus 0 "${D[@]}"
    run --name dpo-ddp2-acc2 --nproc 2 --gpus 0,1 "${D[@]}"
    ;;
esac
