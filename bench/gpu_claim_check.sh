# mamba_align.ops.jobenv.gpus on a real GPU machine (docs/benchmarks.md §10): two processes claim one GPU each on a
# machine with one; the second waits until the first ends; each sees only its GPU (CUDA_VISIBLE_DEVICES by UUID).
#   bash bench/gpu_claim_check.sh      # device call, no carry: torch from the device image
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=index,uuid --format=csv,noheader
cat > /tmp/c.py <<'PY'
import sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from mamba_align.ops.jobenv.gpus import claim
t0 = time.time(); got = claim(1, poll_s=0.5)
import torch
x = torch.ones(1024, 1024, device="cuda")
print(sys.argv[1], "claimed", got, "after %.1f s" % (time.time() - t0), "device_count", torch.cuda.device_count(),
      torch.cuda.get_device_name(0), float((x @ x).sum()), flush=True)
time.sleep(float(sys.argv[2]))
PY
python3 /tmp/c.py A 6 & sleep 1; python3 /tmp/c.py B 0; wait
