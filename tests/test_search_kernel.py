"""The compiled AQ code search against the torch search it replaces on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aqformat import kernels
from aqformat.converters import aq_search, search_kernel

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed (extra 'fast')")


def _problem(metric: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, d, M, K = 1500, 8, 3, 64
    x = torch.randn(N, d, generator=g)
    C = torch.randn(M, K, d, generator=g) * 0.6
    A = torch.randn(d, d, generator=g)
    G = {"identity": None, "shared": A @ A.T / d + 0.1 * torch.eye(d),
         "per-vector": (A @ A.T / d + 0.1 * torch.eye(d)) * (1 + torch.rand(N, generator=g))[:, None, None]}[metric]
    return x, C, G


def _distortion(x, C, G, codes) -> float:
    e = x - aq_search.decode_vectors(C, codes)
    if G is None:
        return float((e * e).sum())
    G = G.expand(x.shape[0], -1, -1) if G.dim() == 2 else G
    return float((torch.bmm(e[:, None], G)[:, 0] * e).sum())


def _torch_search(monkeypatch, *args, **kw):
    with monkeypatch.context() as m:
        m.setattr(search_kernel, "_kernel", lambda: None)
        return aq_search.beam_search(*args, **kw)


@pytest.mark.parametrize("metric", ["identity", "shared", "per-vector"])
@pytest.mark.parametrize("beam,sweeps", [(1, 0), (8, 1)])
def test_kernel_matches_torch_search(monkeypatch, metric, beam, sweeps):
    x, C, G = _problem(metric)
    fast = aq_search.beam_search(x, C, G, beam, icm_sweeps=sweeps)
    ref = _torch_search(monkeypatch, x, C, G, beam, icm_sweeps=sweeps)
    assert fast.dtype == torch.long and fast.shape == ref.shape
    # Same objective, float32 sums in another order: codes agree but for near ties.
    assert float((fast == ref).all(1).float().mean()) > 0.99
    assert _distortion(x, C, G, fast) <= _distortion(x, C, G, ref) * (1 + 1e-5)


def test_codes_do_not_depend_on_the_split():
    x, C, G = _problem("per-vector", seed=3)
    whole = search_kernel.search(x.numpy(), C.numpy(), G.numpy(), 8, 1)
    parts = np.concatenate([search_kernel.search(x[s:s + 100].numpy(), C.numpy(), G[s:s + 100].numpy(), 8, 1)
                            for s in range(0, x.shape[0], 100)])
    assert np.array_equal(whole, parts)


def test_torch_search_without_numba_is_used(monkeypatch):
    monkeypatch.setattr(search_kernel, "_kernel", lambda: None)
    assert search_kernel.search(np.zeros((2, 8), np.float32), np.zeros((1, 4, 8), np.float32), None, 2, 0) is None
    x, C, _ = _problem("identity")
    assert aq_search.beam_search(x, C, None, 2).shape == (x.shape[0], C.shape[0])
