#!/usr/bin/env bash
# Run by Snakemake once, right after it created the conda env of workflow/envs/mamba-align.yaml (--sdm conda).
# The Mamba CUDA kernels build against the env's torch, hence here and without build isolation. Their
# setup.py first tries a pre-built wheel for this torch / CUDA / Python from the projects' GitHub releases
# and otherwise compiles (needs nvcc; ~7 min for both on 16 cores). On a machine without CUDA nothing is
# installed: CPU runs use mambapy, and a GPU job without the kernels stops before loading a model
# (MAMBA_ALIGN_ALLOW_SLOW_PATH=1 to run on the slow path anyway).
set -euo pipefail
# no htcondor2 "CONDOR_CONFIG unset" warning where HTCondor is absent: PTH_LINE of
# src/mamba_align/ops/jobenv/condor_env.py, written as make setup writes it (tests/test_condor_env.py checks the copy)
cat > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mamba_align_condor.pth" <<'PTH'
import os; "CONDOR_CONFIG" in os.environ or any(os.path.isfile(os.path.expanduser(f)) for f in ('~/.condor/condor_config', '/etc/condor/condor_config', '/usr/local/etc/condor_config', '~condor/condor_config')) or os.environ.__setitem__("CONDOR_CONFIG", "/dev/null")
PTH
if python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" && command -v nvidia-smi >/dev/null; then
  MAX_JOBS="${MAX_JOBS:-8}" pip install --no-build-isolation --no-cache-dir \
    causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1
  python -c "import mamba_ssm, causal_conv1d, selective_scan_cuda; print('kernels ok', mamba_ssm.__version__)"
else
  echo "mamba-align env: no CUDA here, Mamba kernels not installed (GPU jobs need them)" >&2
fi
