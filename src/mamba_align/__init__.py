"""mamba-align: align Mamba language models with the Zephyr recipe (SFT -> DPO) and score them."""

__version__ = "0.1.0"
