"""mamba-align: align Mamba language models with the Zephyr recipe (SFT -> DPO) and score them."""

import os

# transformers >= 5.25 swaps layers for kernels it downloads from the Hugging Face Hub when a model loads, unless
# told not to: code outside the lock, fetched at run time (and a failure on compute nodes without internet, as
# seen on the GPU machine: docs/benchmarks.md §12). Every step imports this package before it loads a model, so
# the locked mamba_ssm / causal_conv1d run; USE_HUB_KERNELS=YES in the environment opts in.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

__version__ = "0.1.0"
