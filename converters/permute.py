"""PQF permutation search (Martinez et al., "Permute, Quantize, Fine-tune").

Permuting the columns of ``W[rows, cols]`` changes which weights share a
``d``-vector. A small determinant of the covariance of the ``d``-vectors
(the Gaussian rate-distortion proxy) means more correlated dimensions and
lower quantization error at a fixed rate. The search proposes random column
swaps in batches, evaluates every proposal's log-det at once and keeps the
best one if it improves. The result is ``perm`` with ``Wp = W[:, perm]``
(:func:`aqformat.layout.to_matrix`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aqformat.errors import AqmInputError
from aqformat.layout import to_matrix

__all__ = ["PermResult", "subvector_logdet", "search_permutation"]


@dataclass
class PermResult:
    """``perm`` (``None`` = identity, kept when nothing improved) and the objective."""

    perm: np.ndarray | None
    logdet_before: float
    logdet_after: float


def _gram(W: np.ndarray, d: int) -> tuple[torch.Tensor, int]:
    rows, cols = W.shape
    cols_p = math.ceil(cols / d) * d
    S = torch.zeros(cols_p, cols_p, dtype=torch.float64)
    Wt = torch.from_numpy(np.asarray(W, dtype=np.float64))
    S[:cols, :cols] = Wt.T @ Wt  # padding columns are zero
    return S, cols_p


def _sigma(S: torch.Tensor, pos: torch.Tensor, d: int, n_vec: int) -> torch.Tensor:
    idx = pos.reshape(-1, d)
    return S[idx[:, :, None], idx[:, None, :]].sum(0) / n_vec


def subvector_logdet(W: np.ndarray, d: int, perm: np.ndarray | None = None,
                     eps: float = 1e-12) -> float:
    """``log det`` of the covariance (second moment) of the ``d``-vectors of ``W[:, perm]``."""
    S, cols_p = _gram(W, d)
    pos = torch.arange(cols_p)
    if perm is not None:
        pos[: W.shape[1]] = torch.as_tensor(perm)
    sig = _sigma(S, pos, d, W.shape[0] * cols_p // d)
    return float(torch.logdet(sig + eps * torch.eye(d, dtype=sig.dtype)))


def search_permutation(w, d: int, axes: Sequence[int] | None = None, iters: int = 2000,
                       batch: int = 64, seed: int = 0, eps: float = 1e-12) -> PermResult:
    """Random-swap search for a column permutation minimising the sub-vector log-det.

    Parameters
    ----------
    w : array-like
        The tensor (matrix view by ``axes``).
    d : int
        Vector length of the AQ codec.
    iters : int
        Rounds; each evaluates ``batch`` random swaps and keeps the best improving one.
    seed : int
        Seed of the proposals.

    Returns
    -------
    PermResult; ``perm`` is ``None`` when no swap improved the objective, so
    the objective never increases.
    """
    W = to_matrix(np.asarray(w, dtype=np.float64), axes)
    if not np.isfinite(W).all():
        raise AqmInputError("tensor contains NaN or Inf weights")
    rows, cols = W.shape
    S, cols_p = _gram(W, d)
    n_vec = rows * cols_p // d
    eye = eps * torch.eye(d, dtype=torch.float64)
    pos = torch.arange(cols_p)  # pos[slot] = column placed in that slot
    sig = _sigma(S, pos, d, n_vec)
    before = best = float(torch.logdet(sig + eye))
    if cols < 2 or cols_p // d < 2:
        return PermResult(None, before, before)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        a = torch.randint(0, cols, (batch,), generator=gen)
        b = torch.randint(0, cols, (batch,), generator=gen)
        ok = (a // d) != (b // d)  # swaps inside one vector change nothing
        if not ok.any():
            continue
        a, b = a[ok], b[ok]
        ia = pos.reshape(-1, d)[a // d]  # [P, d] columns of the two vectors
        ib = pos.reshape(-1, d)[b // d]
        na, nb = ia.clone(), ib.clone()
        ar = torch.arange(len(a))
        na[ar, a % d], nb[ar, b % d] = pos[b], pos[a]

        def block(ix: torch.Tensor) -> torch.Tensor:
            return S[ix[:, :, None], ix[:, None, :]]

        new = sig + (block(na) + block(nb) - block(ia) - block(ib)) / n_vec
        ld = torch.logdet(new + eye)
        ld = torch.where(torch.isfinite(ld), ld, torch.full_like(ld, math.inf))
        k = int(ld.argmin())
        if float(ld[k]) < best - 1e-12:
            best = float(ld[k])
            sig = new[k]
            pa, pb = int(a[k]), int(b[k])
            pos[pa], pos[pb] = pos[pb].clone(), pos[pa].clone()
    perm = pos[:cols].numpy().astype(np.int64)
    # Recompute from scratch: the running value accumulates rounding.
    after = subvector_logdet(W, d, perm, eps) if best < before else before
    if after >= before:
        return PermResult(None, before, before)
    return PermResult(perm, before, after)
