"""The Triton kernels for AQ codes: the decode is the numpy decoder's, bit for bit, and the lookup-table
product matches the decoded weight's. They run on a CUDA device, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); without Triton they are skipped, and the torch path covers the device code."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aqformat.runtime import triton_kernels
from aqformat.runtime.aq_weight import AQWeight
from aqformat.runtime.aq_weight_torch import TRITON_LUT_MAX_GATHERS, DeviceAQWeight

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_kernels.usable(DEVICE),
                                reason="Triton absent, or no CUDA device and not TRITON_INTERPRET=1")

# (M, K, d, rows, cols, scaled, permuted): uint8 and int32 codes, d not a power of two, ragged last chunk
CASES = [(2, 256, 8, 70, 96, True, False), (4, 256, 8, 33, 61, False, True),
         (3, 512, 6, 40, 50, True, True), (1, 16, 4, 129, 20, True, False)]


def _weight(M, K, d, rows, cols, scaled, permuted, seed=0):
    rng = np.random.default_rng(seed)
    nch = -(-cols // d)
    codes = rng.integers(0, K, (rows * nch, M)).astype(np.uint8 if K <= 256 else np.uint16)
    cb = rng.standard_normal((M, K, d)).astype(np.float32)
    scale = rng.uniform(0.5, 2, rows).astype(np.float32) if scaled else None
    perm = rng.permutation(cols).astype(np.int64) if permuted else None
    return AQWeight(codes, cb, scale, perm, None, rows, cols, (rows, cols))


@pytest.mark.parametrize("case", CASES)
def test_triton_decode_is_the_numpy_decoders(case):
    aq = _weight(*case)
    dev = DeviceAQWeight.from_weight(aq, DEVICE)
    assert dev.triton
    ref = dataclasses.replace(dev, triton=False)
    assert torch.equal(dev.decode().cpu(), torch.from_numpy(aq.decode()))
    assert torch.equal(dev.matrix_rows(5, 17).cpu(), ref.matrix_rows(5, 17).cpu())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 4, TRITON_LUT_MAX_GATHERS + 1])  # the table, and decode + GEMM
def test_triton_products_match_the_decoded_weight(case, T):
    aq = _weight(*case)
    dev = DeviceAQWeight.from_weight(aq, DEVICE)
    x = torch.randn(T, aq.cols, generator=torch.Generator().manual_seed(T))
    want = x @ torch.from_numpy(aq.decode()).T
    got = dev.times_rows(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
