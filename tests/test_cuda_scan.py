"""bench/cuda_scan.cu, the CUDA selective scans of issue #33 (not in the pipeline until one beats mamba_ssm's on the
GPU), against the step-by-step fp32 reference's autograd: on the CPU through the same source built by g++ (a thread
per CUDA thread), and with `-m gpu` compiled by NVRTC on the GPU. bf16 inputs and outputs, as the Mamba-1 mixer
passes them under autocast, strided delta / z / dz as mamba_inner_fn passes them; every result within 2e-2 of the
largest value of its reference (bf16 rounding: the CPU runs give <= 4.5e-3), fp32 reductions within 1e-5."""

from __future__ import annotations

import shutil

import pytest
import torch
from wfhelpers import REPO

BF16_RESULTS = ("out_z", "du", "ddelta", "dz")  # written in bf16; the rest are fp32 sums


@pytest.fixture
def scan_kernel(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import scan_kernel

    return scan_kernel


def _assert_close(err: dict):
    assert set(err) == {*BF16_RESULTS, "dA", "dB", "dC", "dD", "ddelta_bias"}
    for name, e in err.items():
        assert e < (2e-2 if name in BF16_RESULTS else 1e-5), (name, err)


# shapes with a ragged last tile or chunk, several of them, more than one block of channels
# and a hybrid: the "time" forward storing the state entering each tile of the "state" backward
CASES = [("16:16", (2, 32, 37, 16)), ("8:8", (1, 16, 29, 16)), ("4:4:time", (1, 8, 300, 16)),
         ("4:4:time/16:16", (1, 16, 150, 16))]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to build the kernels' source for the CPU")
@pytest.mark.parametrize("spec,shape", CASES)
def test_the_kernels_source_matches_the_reference_on_cpu_threads(scan_kernel, spec, shape):
    _assert_close(scan_kernel.check(shape, f"host:{spec}"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,shape", CASES + [("8:4:time", (2, 64, 2048, 16)), ("4:8:time/16:16", (2, 64, 2048, 16))])
def test_the_kernels_match_the_reference_on_the_gpu(scan_kernel, spec, shape):
    _assert_close(scan_kernel.check(shape, f"cuda:{spec}"))
