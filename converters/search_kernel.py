"""Compiled (numba) AQ code search: beam search and ICM fused, one vector at a time.

The torch search of :func:`aqformat.converters.aq_search.beam_search` spends
most of its time outside arithmetic: on CPU, ``topk`` over ``beam * K``
candidate scores per vector took 54% of the encoding time of a MiniLM layer
and materialising those scores (``n x beam x K`` floats per codebook) most
of the rest. This kernel keeps one vector's beam in a few hundred bytes,
computes a codebook's ``K`` scores for one beam entry into a small buffer
(contiguous over ``k``, so the loop is vectorised), and keeps the ``beam``
best candidates by insertion against the current worst, which rejects
almost every candidate with one comparison.

It minimises the same objective, ``(x - sum_m C[m, k_m])^T G (x - ...)``
under a shared ``G[d, d]`` or one ``G[n, d, d]`` per vector, keeping the
``beam`` lowest partial distortions after each codebook (ties go to the
lower ``b * K + k``), then runs ICM sweeps. Scores are float32 as in torch,
but summed in another order, so codes may differ from the torch search's on
near ties; every vector is searched independently of the others, so the
codes do not depend on how vectors are split into calls or threads.

numba is optional (the ``fast`` extra): :func:`search` returns None without
it and the caller uses the torch search.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from aqformat.kernels import compile_kernel, numba_module

__all__ = ["search"]

_CHUNK = 4096  # vectors per call with per-vector metrics (their norm table: 16 MB at M*K = 1024)


def _jit(fn):
    """A helper of the kernel: compiled (inlined) with it when numba is present."""
    nb = numba_module()
    return fn if nb is None else nb.njit(cache=True, nogil=True, inline="always")(fn)


@_jit
def _times_metric(rg, r, g):  # pragma: no cover - compiled by numba
    """``rg = r G`` for one ``d``-vector."""
    d = r.shape[0]
    for f in range(d):
        acc = np.float32(0.0)
        for e in range(d):
            acc += r[e] * g[e, f]
        rg[f] = acc


@_jit
def _scores(s, base, quad, CT, rg):  # pragma: no cover - compiled by numba
    """``s[k] = base + c_k^T G c_k - 2 (r G) . c_k`` for one codebook (``CT[d, K]``); the loop over
    ``k`` is innermost and contiguous, so it is vectorised."""
    K = s.shape[0]
    for k in range(K):
        s[k] = base + quad[k]
    for e in range(CT.shape[0]):
        w = np.float32(-2.0) * rg[e]
        for k in range(K):
            s[k] += w * CT[e, k]


@_jit
def _keep_best(best_s, best_i, nb, s, offset):  # pragma: no cover - compiled by numba
    """Insert the scores ``s`` (candidates ``offset + k``) into the ``nb`` lowest so far (sorted;
    a tie keeps the earlier candidate)."""
    worst = best_s[nb - 1]
    for k in range(s.shape[0]):
        v = s[k]
        if v < worst:
            j = nb - 1
            while j > 0 and best_s[j - 1] > v:
                best_s[j] = best_s[j - 1]
                best_i[j] = best_i[j - 1]
                j -= 1
            best_s[j] = v
            best_i[j] = offset + k
            worst = best_s[nb - 1]


@_jit
def _beam_one(x, C, CT, g, quad, beam, work, out):  # pragma: no cover - compiled by numba
    """Beam search of one vector ``x``: ``out[M]`` codes, ``work`` the scratch arrays; returns the
    residual of the best solution in ``work[0][0]``."""
    r, r2, dist, dist2, codes, codes2, best_s, best_i, rg, s = work
    M, K, d = C.shape
    nbeam = 1
    r[0, :] = x
    dist[0] = 0.0
    for m in range(M):
        nb = 1 if m == M - 1 else min(beam, nbeam * K)
        best_s[:nb] = np.inf
        best_i[:nb] = -1
        for b in range(nbeam):
            _times_metric(rg, r[b], g)
            _scores(s, dist[b], quad[m], CT[m], rg)
            _keep_best(best_s, best_i, nb, s, b * K)
        for j in range(nb):
            b = best_i[j] // K
            k = best_i[j] - b * K
            r2[j, :] = r[b] - C[m, k]
            codes2[j, :m] = codes[b, :m]
            codes2[j, m] = k
            dist2[j] = best_s[j]
        r[:nb] = r2[:nb]
        codes[:nb, :m + 1] = codes2[:nb, :m + 1]
        dist[:nb] = dist2[:nb]
        nbeam = nb
    out[:] = codes[0]


@_jit
def _icm_one(x, C, CT, g, quad, sweeps, work, out):  # pragma: no cover - compiled by numba
    """ICM sweeps over one vector's codes ``out[M]`` (the current code is a candidate, so the
    distortion never increases); ``work[0][0]`` holds the residual ``x - decode(out)``."""
    r, r2, _, _, _, _, _, _, rg, s = work
    M = C.shape[0]
    for _ in range(sweeps):
        for m in range(M):
            old = out[m]
            r2[0, :] = r[0] + C[m, old]  # the residual without codebook m's word
            _times_metric(rg, r2[0], g)
            _scores(s, np.float32(0.0), quad[m], CT[m], rg)
            new = old
            low = s[old]
            for k in range(s.shape[0]):
                if s[k] < low:
                    low = s[k]
                    new = k
            if new != old:
                r[0, :] = r2[0] - C[m, new]
                out[m] = new


def _beam_icm(x, C, G, quads, beam, sweeps, out):  # pragma: no cover - compiled by numba
    """Codes ``out[N, M]`` of vectors ``x[N, d]`` under metric ``G[n]`` with codeword norms
    ``quads[n, M, K]`` (``c^T G[n] c``); one ``G`` and ``quads`` row serve every vector when
    the metric is shared."""
    N, d = x.shape
    M, K, _ = C.shape
    CT = np.ascontiguousarray(C.transpose(0, 2, 1))
    per_vector = G.shape[0] > 1
    work = (np.empty((beam, d), np.float32), np.empty((beam, d), np.float32), np.empty(beam, np.float32),
            np.empty(beam, np.float32), np.empty((beam, M), np.int64), np.empty((beam, M), np.int64),
            np.empty(beam, np.float32), np.empty(beam, np.int64), np.empty(d, np.float32),
            np.empty(K, np.float32))
    for n in range(N):
        v = n if per_vector else 0
        _beam_one(x[n], C, CT, G[v], quads[v], beam, work, out[n])
        if sweeps:
            _icm_one(x[n], C, CT, G[v], quads[v], sweeps, work, out[n])


def _signatures(ty: Any) -> list[Any]:
    f2, f3 = ty.Array(ty.float32, 2, "C"), ty.Array(ty.float32, 3, "C")
    return [ty.void(f2, f3, f3, f3, ty.int64, ty.int64, ty.Array(ty.int64, 2, "C"))]


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    return compile_kernel("aq_search", _beam_icm, _signatures)


def search(x: np.ndarray, C: np.ndarray, G: np.ndarray | None, beam: int, icm_sweeps: int) -> np.ndarray | None:
    """Codes ``[N, M]`` int64 of ``x[N, d]`` (float32) against ``C[M, K, d]`` under ``G``
    (None: identity; ``[d, d]`` shared; ``[N, d, d]`` per vector), or None without numba."""
    kernel = _kernel()
    if kernel is None:
        return None
    N, d = x.shape
    M, K, _ = C.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    C = np.ascontiguousarray(C, dtype=np.float32)
    per_vector = G is not None and G.ndim == 3
    if G is None:
        G = np.eye(d, dtype=np.float32)
    G = np.ascontiguousarray(G, dtype=np.float32).reshape(-1, d, d)
    out = np.empty((N, M), np.int64)
    if not per_vector:
        quad = np.einsum("mkd,de,mke->mk", C, G[0], C)[None].astype(np.float32)
        kernel(x, C, G, quad, int(beam), int(icm_sweeps), out)
        return out
    # Per-vector norms c^T G_n c as one matrix product: G_n flattened times every codeword's
    # outer product (BLAS), a chunk of vectors at a time.
    outer = np.einsum("mke,mkf->efmk", C, C).reshape(d * d, M * K)
    for s in range(0, N, _CHUNK):
        sl = slice(s, min(N, s + _CHUNK))
        quad = (G[sl].reshape(-1, d * d) @ outer).reshape(-1, M, K)
        kernel(x[sl], C, G[sl], quad, int(beam), int(icm_sweeps), out[sl])
    return out
