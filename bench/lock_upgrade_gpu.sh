#!/usr/bin/env bash
# The lock upgrade on a GPU (docs/benchmarks.md §12): the old lock's transformers 5.24.0 against the new lock's
# 5.25.0 (with accelerate 1.16.0 and kernels 0.19.1, and for both the lock's huggingface_hub 2.4.0), on the
# device image plus the GPU kit (mamba_ssm, causal_conv1d, trl). For each: the GPU tests, the conversion tests
# on CPU with the real kernels importable (what cpu_mamba_class guarded until 5.25), and SFT throughput at 2.8B.
#
# Wheels, once, here (python 3.12 manylinux, --no-deps; see the device README):
#   .whl/common: huggingface_hub 2.4.0 httpx2 2.16.2 httpcore2 2.16.2 hf-xet 1.8.0 click 8.5.1 truststore 0.10.5
#                anyio 4.16.0 idna 3.20;  .whl/old: transformers 5.24.0;
#   .whl/new: transformers 5.25.0 accelerate 1.16.0 kernels 0.19.1 tomlkit 0.15.3
# Device, one warm machine:  call 1 (carry .gpu): bash bench/lock_upgrade_gpu.sh kit
#                            call 2 (carry .whl): bash bench/lock_upgrade_gpu.sh check
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
case "${1:-}" in
  kit) source .gpu/install.sh ;;
  check)
    install /tmp/common .whl/common/*.whl && install /tmp/tf-old .whl/old/*.whl && install /tmp/tf-new .whl/new/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
    for v in old new; do
      export PYTHONPATH=$PWD/src:/tmp/tf-$v:/tmp/common:/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
      python3 -c "import torch, transformers, accelerate, huggingface_hub, trl, mamba_ssm; print('$v', 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'hub', huggingface_hub.__version__, 'trl', trl.__version__, 'mamba_ssm', mamba_ssm.__version__)" | tee -a "$OUT/device.txt"
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_fast.py 2>&1 | tail -3 | sed "s/^/$v gpu tests: /" | tee -a "$OUT/summary.txt"
      CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider tests/test_convert.py 2>&1 | tail -3 | sed "s/^/$v conversion on CPU, real kernels importable: /" | tee -a "$OUT/summary.txt"
      python3 bench/train_throughput.py --stages sft --steps 6 --out "$OUT/train-$v.json" > "$OUT/train-$v.log" 2>&1
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'train:', json.dumps(d.get('sft', d))[:600])" "$OUT/train-$v.json" $v | tee -a "$OUT/summary.txt"
    done ;;
  *) echo "usage: $0 kit|check" >&2; exit 2 ;;
esac
