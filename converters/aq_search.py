"""Additive quantization search: code search, codebook updates and codebook training.

Vector level of the AQ encoder: each ``d``-vector is coded as the sum of
``M`` codewords, one from each of ``M`` codebooks of ``K = 2**b`` entries,
minimising ``(x - x_hat)^T G (x - x_hat)`` under a metric ``G`` (identity,
shared, or one per vector). :func:`beam_search` and :func:`icm` pick codes
for fixed codebooks, :func:`update_codebooks` solves the codebooks for fixed
codes, and :func:`train_aq` alternates the two from a residual k-means start.

Everything is vectorised torch; Python loops run only over codebooks,
iterations, beam steps and chunks of vectors.
"""
from __future__ import annotations

import torch

from aqformat.codecs.aq import codeword_sum
from aqformat.errors import AqmInputError, TooSmallForAQ

from .options import AQConfig

__all__ = ["default_device", "decode_vectors", "beam_search", "icm",
           "update_codebooks", "kmeans", "train_aq"]

_SCORE_BUDGET = 1 << 23  # floats per chunk of candidate scores (~32 MB)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_vectors(C: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Sum of the selected codewords: ``C[M, K, d]``, ``codes[N, M]`` -> ``[N, d]``."""
    return codeword_sum(C, codes.T)


def _metric(G: torch.Tensor | None, d: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, dtype=x.dtype, device=x.device) if G is None else G.to(x)


def _quad_table(C: torch.Tensor, G: torch.Tensor, sl: slice) -> list[torch.Tensor]:
    """``c^T G c`` for every codeword: per codebook ``[K]`` (shared G) or ``[n, K]``."""
    M, K, d = C.shape
    if G.dim() == 2:
        return [torch.einsum("kd,de,ke->k", C[m], G, C[m]) for m in range(M)]
    Gf = G[sl].reshape(-1, d * d)
    return [Gf @ (C[m][:, :, None] * C[m][:, None, :]).reshape(K, d * d).T for m in range(M)]


def _apply(G: torch.Tensor, r: torch.Tensor, sl: slice) -> torch.Tensor:
    """``r G`` for ``r[n, B, d]`` (G symmetric, shared or per vector)."""
    return r @ G if G.dim() == 2 else torch.bmm(r, G[sl])


def beam_search(x: torch.Tensor, C: torch.Tensor, G: torch.Tensor | None = None,
                beam: int = 8, icm_sweeps: int = 1) -> torch.Tensor:
    """Code search minimising ``(x - sum_m C[m, k_m])^T G (x - ...)``.

    Parameters
    ----------
    x : Tensor [N, d]
        Vectors to code.
    C : Tensor [M, K, d]
        Codebooks.
    G : Tensor [d, d] or [N, d, d], optional
        Symmetric PSD metric, shared or per vector; identity when omitted.
    beam : int
        Partial solutions kept after each codebook (1 = greedy residual).
    icm_sweeps : int
        Iterated-conditional-modes sweeps after the beam (never worse).

    Returns
    -------
    Tensor [N, M] int64 codes.
    """
    if x.device.type == "cpu":
        from .search_kernel import search
        codes = search(x.numpy(), C.numpy(), None if G is None else G.cpu().numpy(), beam, icm_sweeps)
        if codes is not None:
            return torch.from_numpy(codes)
    N, d = x.shape
    M, K, _ = C.shape
    G = _metric(G, d, x)
    out = torch.empty(N, M, dtype=torch.long, device=x.device)
    chunk = max(1, _SCORE_BUDGET // (beam * K))
    for s in range(0, N, chunk):
        sl = slice(s, min(N, s + chunk))
        n = sl.stop - s
        quad = _quad_table(C, G, sl)
        r = x[sl][:, None, :]
        dist = torch.zeros(n, 1, dtype=x.dtype, device=x.device)
        codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
        for m in range(M):
            B = r.shape[1]
            # In-place score assembly: this step is memory-bound on CPU.
            score = (_apply(G, r, sl).reshape(n * B, d) @ C[m].T).reshape(n, B, K).mul_(-2.0)
            score.add_(quad[m] if quad[m].dim() == 1 else quad[m][:, None, :])
            if m:
                score.add_(dist[:, :, None])
            nb = 1 if m == M - 1 else min(beam, score.shape[1] * K)
            dist, idx = score.reshape(n, -1).topk(nb, dim=1, largest=False)
            bi, ki = idx // K, idx % K
            r = torch.gather(r, 1, bi[:, :, None].expand(-1, -1, d)) - C[m][ki]
            codes = torch.cat([torch.gather(codes, 1, bi[:, :, None].expand(-1, -1, m)),
                               ki[:, :, None]], dim=2)
        out[sl] = codes[:, 0]
    return icm(x, C, out, G, icm_sweeps) if icm_sweeps else out


def icm(x: torch.Tensor, C: torch.Tensor, codes: torch.Tensor,
        G: torch.Tensor | None = None, sweeps: int = 1) -> torch.Tensor:
    """Iterated conditional modes: re-pick each codebook's code given the others.

    The current code is always a candidate, so the distortion never increases.
    """
    N, d = x.shape
    M, K, _ = C.shape
    G = _metric(G, d, x)
    codes = codes.clone()
    recon = decode_vectors(C, codes)
    chunk = max(1, _SCORE_BUDGET // K)
    for _ in range(sweeps):
        for m in range(M):
            for s in range(0, N, chunk):
                sl = slice(s, min(N, s + chunk))
                old = codes[sl, m]
                r = (x[sl] - recon[sl] + C[m][old])[:, None, :]
                q = _quad_table(C[m:m + 1], G, sl)[0]
                score = q - 2.0 * (_apply(G, r, sl)[:, 0] @ C[m].T)
                new = score.argmin(dim=1)
                recon[sl] += C[m][new] - C[m][old]
                codes[sl, m] = new
    return codes


def update_codebooks(x: torch.Tensor, codes: torch.Tensor, C: torch.Tensor,
                     G: torch.Tensor | None = None, sweeps: int = 3,
                     ridge: float = 1e-4) -> torch.Tensor:
    """Least-squares codebook update for fixed codes (block coordinate descent).

    Each step solves exactly for one codebook given the others (``K``
    independent ``d x d`` systems); sweeping converges to the joint least
    squares over all ``M`` codebooks, and no step increases the distortion
    beyond the tiny ridge that pins unused codewords to their old value.
    """
    N, d = x.shape
    M, K, _ = C.shape
    C = C.clone()
    recon = decode_vectors(C, codes)
    per_vector = G is not None and G.dim() == 3
    if per_vector:
        Gf = G.reshape(N, d * d).double()
        floor = 1e-9 * float(Gf[:, :: d + 1].sum(1).mean())
    for _ in range(sweeps):
        for m in range(M):
            k = codes[:, m]
            t = x - recon + C[m][k]
            if per_vector:
                A = torch.zeros(K, d * d, dtype=torch.float64, device=x.device).index_add_(0, k, Gf)
                A = A.reshape(K, d, d)
                rhs = torch.zeros(K, d, dtype=torch.float64, device=x.device).index_add_(
                    0, k, torch.bmm(G, t[:, :, None])[:, :, 0].double())
                lam = ridge * A.diagonal(dim1=1, dim2=2).mean(1) + floor
                A = A + lam[:, None, None] * torch.eye(d, dtype=A.dtype, device=A.device)
                new = torch.linalg.solve(A, rhs + lam[:, None] * C[m].double()).to(C)
            else:  # a shared metric leaves the plain mean optimal
                sums = torch.zeros(K, d, dtype=x.dtype, device=x.device).index_add_(0, k, t)
                cnt = torch.bincount(k, minlength=K).to(x.dtype)[:, None]
                new = torch.where(cnt > 0, sums / cnt.clamp_min(1), C[m])
            recon += new[k] - C[m][k]
            C[m] = new
    return C


def kmeans(x: torch.Tensor, K: int, iters: int = 15, weights: torch.Tensor | None = None,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd k-means; empty clusters are re-seeded from random points.

    Returns ``(centroids [K, d], assignment [N])``.
    """
    N, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.ones(N, dtype=x.dtype, device=x.device) if weights is None else weights.to(x)
    cent = x[torch.randperm(N, generator=gen)[:K].to(x.device)].clone()
    for it in range(iters + 1):
        assign = beam_search(x, cent[None], None, beam=1, icm_sweeps=0)[:, 0]  # the nearest centroid
        if it == iters:
            break
        sums = torch.zeros(K, d, dtype=x.dtype, device=x.device).index_add_(0, assign, x * w[:, None])
        tot = torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, assign, w)
        empty = tot <= 0
        cent = sums / tot.clamp_min(1e-30)[:, None]
        if empty.any():
            pick = torch.randint(0, N, (int(empty.sum()),), generator=gen).to(x.device)
            cent[empty] = x[pick]
    return cent, assign


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def train_aq(x: torch.Tensor, cfg: AQConfig, G: torch.Tensor | None = None,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn ``M`` codebooks for vectors ``x`` under metric ``G``.

    Residual k-means initialisation, then ``cfg.iters`` alternations of
    least-squares codebook update and beam search. The codebooks are rounded
    to fp16 before the final code search, so the returned codes are optimal
    for what a decoder sees.

    Returns
    -------
    (C [M, K, d] float32 holding fp16 values, codes [N, M] int64)
    """
    N, d = x.shape
    if N < cfg.K:
        raise TooSmallForAQ(f"{N} training vectors < K={cfg.K}")
    if d != cfg.d:
        raise AqmInputError(f"vectors have length {d}, config says d={cfg.d}")
    w = None if G is None else G.diagonal(dim1=-2, dim2=-1).sum(-1).expand(N)
    resid = x.clone()
    books = []
    for m in range(cfg.M):
        cent, assign = kmeans(resid, cfg.K, weights=w, seed=seed + m)
        books.append(cent)
        resid = resid - cent[assign]
    C = torch.stack(books)
    codes = beam_search(x, C, G, cfg.beam)
    for _ in range(cfg.iters):
        C = update_codebooks(x, codes, C, G)
        codes = beam_search(x, C, G, cfg.beam)
    C = _fp16(update_codebooks(x, codes, C, G))
    return C, beam_search(x, C, G, cfg.beam)
