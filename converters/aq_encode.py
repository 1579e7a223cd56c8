"""Tensor encoding: one tensor coded against its group's fixed AQ codebooks.

A tensor is viewed as ``W[rows, cols]`` (:func:`aqformat.layout.to_matrix`),
rows are divided by a per-row fp16 scale, zero-padded to a multiple of ``d``
and cut into ``d``-vectors. Each vector is coded as the sum of ``M``
codewords, one from each of ``M`` codebooks of ``K = 2**b`` entries
(:mod:`aqformat.converters.aq_search`).

Distortion is data-aware: with ``H = X^T X`` from calibration inputs, the
error of a row is ``e^T H e`` (the layer output error). Codes are searched
column block by column block with GPTQ-style error feedback, so each block is
coded under the metric ``G_B`` (the Schur complement of ``H`` on the columns
not yet coded) and its error is pushed onto the columns still to be coded.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch

from aqformat.codecs import aq as aq_codec
from aqformat.codecs.aq import stored_bytes, vector_count
from aqformat.errors import AqmInputError, TooSmallForAQ
from aqformat.layout import from_matrix, matrix_shape, to_matrix

from .aq_search import _fp16, beam_search, decode_vectors, default_device
from .options import AQConfig, ConvertOptions
from .planning import ModelTensors, Plan, plan

__all__ = ["AQEncoder", "AQTensor", "as_matrix", "aq_eligible", "row_scales", "encode_tensor", "decode_rows",
           "decode_tensor", "output_error", "inverse_factor", "feedback_factor"]


@dataclass
class AQTensor:
    """One AQ-coded tensor, in the layout of the file format.

    ``codes[n_vec, M]`` (uint8 for ``b <= 8``, else uint16) number vectors
    row-major over the padded, permuted, scaled matrix view.
    """

    name: str
    shape: tuple[int, ...]
    axes: tuple[int, ...] | None
    perm: np.ndarray | None
    scale: np.ndarray
    codes: np.ndarray
    d: int
    b: int

    @property
    def rows(self) -> int:
        return int(self.scale.shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape)) // self.rows

    def nbytes(self) -> int:
        """Bytes in the file: codes (bit-packed at ``b`` bits), fp16 scales and the permutation."""
        return stored_bytes(self.shape, self.axes, M=self.codes.shape[1], bits=self.b, d=self.d,
                            perm=self.perm is not None)


def as_matrix(name: str, w, axes: Sequence[int] | None = None,
              perm: np.ndarray | None = None) -> torch.Tensor:
    """float32 matrix view of ``w`` (numpy or torch); rejects NaN/Inf naming the tensor."""
    t = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    a = np.ascontiguousarray(to_matrix(t, axes, perm), dtype=np.float32)
    if not a.flags.writeable:  # e.g. an ONNX initializer viewed in place: torch needs its own copy
        a = a.copy()
    m = torch.from_numpy(a)
    if not torch.isfinite(m).all():
        raise AqmInputError(f"tensor {name!r} contains NaN or Inf weights")
    return m


def aq_eligible(shape: Sequence[int], cfg: AQConfig, axes: Sequence[int] | None = None) -> bool:
    """True when a tensor can be AQ-coded: at least one vector and at least ``K`` vectors."""
    n = int(np.prod(shape)) if len(shape) else 1
    return n >= cfg.d and vector_count(shape, axes, cfg.d) >= cfg.K


def row_scales(W: torch.Tensor) -> torch.Tensor:
    """Per-row RMS rounded to fp16 (zero rows get 1), so rows share one codebook scale."""
    s = W.pow(2).mean(1).sqrt()
    s = torch.where(s > 0, s, torch.ones_like(s)).clamp(6.2e-5, 65504.0)
    return _fp16(s)


def _padded_h(H, cols: int, cols_p: int, perm: np.ndarray | None, damp: float) -> torch.Tensor | None:
    """float64 ``H`` permuted, damped, and extended with near-zero weight on padding.

    ``None`` without calibration: the metric is then the identity, and no
    ``cols x cols`` matrix is ever built (it would dominate streaming memory).
    """
    if H is None:
        return None
    Hp = torch.as_tensor(np.asarray(H) if not isinstance(H, torch.Tensor) else H.cpu()).double()
    if Hp.shape != (cols, cols):
        raise AqmInputError(f"H has shape {tuple(Hp.shape)}, expected {(cols, cols)}")
    if perm is not None:
        p = torch.as_tensor(perm)
        Hp = Hp[p][:, p]
    diag = Hp.diagonal()
    mean = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    out = torch.zeros(cols_p, cols_p, dtype=torch.float64)
    out[:cols, :cols] = Hp
    idx = torch.arange(cols_p)
    out[idx, idx] += damp * mean
    out[idx[cols:], idx[cols:]] = 1e-6 * mean  # padding columns: error does not matter
    return out


def inverse_factor(Hp: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``Hp^-1`` (``Hp`` damped, float64): GPTQ's feedback.
    Row ``j`` of ``U`` divided by ``U[j, j]`` is how an error on column ``j`` is best absorbed
    by the columns after it, and ``e**2 / U[j, j]**2`` is the output error it still costs."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)


def feedback_factor(H, damp: float) -> np.ndarray:
    """:func:`inverse_factor` of a calibration ``H [cols, cols]`` damped as the AQ search damps it:
    the grid codecs' error feedback (:func:`aqformat.converters.lattice.feedback_indices`)."""
    cols = int(np.shape(H)[0])
    return inverse_factor(_padded_h(H, cols, cols, None, damp)).numpy()


def _block_metrics(Hp: torch.Tensor, d: int, feedback: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per column block metric ``G[J, d, d]`` and, for feedback, the Cholesky factor.

    With feedback, ``U`` is the upper Cholesky factor of ``H^-1`` and block
    ``B`` is coded under ``(U_BB^T U_BB)^-1``: the output error left after the
    not-yet-coded columns absorb the block's error optimally.
    """
    J = Hp.shape[0] // d
    if not feedback:
        blocks = Hp.reshape(J, d, J, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return blocks.contiguous(), None
    U = inverse_factor(Hp)
    Ubb = U.reshape(J, d, J, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    G = torch.linalg.inv(Ubb.transpose(1, 2) @ Ubb)
    return 0.5 * (G + G.transpose(1, 2)), U


def _prepare(name: str, w, cfg: AQConfig, H, axes, perm):
    W = as_matrix(name, w, axes, perm)
    rows, cols = W.shape
    if not aq_eligible(tuple(W.shape), cfg):
        raise TooSmallForAQ(f"tensor {name!r} ({rows}x{cols}) is too small for AQ with "
                            f"d={cfg.d}, K={cfg.K}: keep it raw")
    J = math.ceil(cols / cfg.d)
    s = row_scales(W)
    Wn = torch.zeros(rows, J * cfg.d)
    Wn[:, :cols] = W / s[:, None]
    Hp = _padded_h(H, cols, J * cfg.d, perm, cfg.damp)
    return W, s, Wn, Hp


def _code_blocks(Wc: torch.Tensor, C: torch.Tensor, G: torch.Tensor, U: torch.Tensor | None,
                 beam: int) -> torch.Tensor:
    """Codes ``[rows, J, M]`` of the column blocks of ``Wc`` (modified in place with feedback)."""
    d = C.shape[2]
    R, J = Wc.shape[0], G.shape[0]
    codes = torch.empty(R, J, C.shape[0], dtype=torch.long, device=Wc.device)
    for j in range(J):
        b0, b1 = j * d, (j + 1) * d
        tgt = Wc[:, b0:b1]
        cj = beam_search(tgt, C, G[j], beam)
        codes[:, j] = cj
        if U is not None and j + 1 < J:
            F = torch.linalg.solve_triangular(U[b0:b1, b0:b1], U[b0:b1, b1:], upper=True)
            Wc[:, b1:] -= (tgt - decode_vectors(C, cj)) @ F.float().to(Wc.device)
    return codes


def _decoded_rows(C: torch.Tensor, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """Unscaled decoded rows ``[rows, cols]`` (on the CPU) of codes ``[rows, J, M]``."""
    return decode_vectors(C, codes.reshape(-1, C.shape[0])).reshape(codes.shape[0], -1)[:, :cols].cpu()


def _fit_scales(W: torch.Tensor, Wh: torch.Tensor, H: torch.Tensor | None,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fp16 row scales for decoded rows ``Wh``, and row errors under ``H``.

    The scale is fitted to the plain weight error, not under ``H``: fitted
    under a calibration ``H`` it grew up to 6.6x on MiniLM's MLP output rows,
    multiplying the error in the input directions the calibration never
    excited, and embeddings of unseen sentences collapsed (3 bits, 64
    sentences: cosine 0.60, against 0.92 with the plain fit).
    """
    den = (Wh * Wh).sum(1)
    s_ls = _fp16((Wh * W).sum(1) / den.clamp_min(1e-30))
    s = torch.where(torch.isfinite(s_ls) & (s_ls > 0) & (den > 0), s_ls, s)
    E = W - Wh * s[:, None]
    return s, ((E if H is None else E @ H) * E).sum(1)


def _code_with_metric(W: torch.Tensor, Wn: torch.Tensor, s: torch.Tensor, Hp: torch.Tensor,
                      Cd: torch.Tensor, cfg: AQConfig, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[rows, J, M]`` and fitted row scales minimising ``tr(E H E^T)``."""
    cols = W.shape[1]
    Hc = Hp[:cols, :cols].float()
    best = None
    for fb in ((False, True) if cfg.feedback == "auto" else (bool(cfg.feedback),)):
        G, U = _block_metrics(Hp, cfg.d, fb)
        codes = _code_blocks(Wn.clone().to(dev), Cd, G.float().to(dev), U, cfg.beam)
        Wh = _decoded_rows(Cd, codes, cols)
        s_fit, err = _fit_scales(W, Wh, Hc, s)
        if best is None:
            best = (codes, s_fit, err)
        else:  # rows are coded independently: keep the better coding of each row
            pick = err < best[2]
            best = (torch.where(pick.to(dev)[:, None, None], codes, best[0]),
                    torch.where(pick, s_fit, best[1]), torch.minimum(err, best[2]))
    return best[0], best[1]


def encode_tensor(name: str, w, C: torch.Tensor, cfg: AQConfig, H=None,
                  axes: Sequence[int] | None = None, perm: np.ndarray | None = None, *,
                  rows: torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> AQTensor:
    """Code one tensor against fixed codebooks ``C`` minimising ``tr(E H E^T)``.

    Parameters
    ----------
    name : str
        Tensor name (for error messages).
    w : array or Tensor
        The tensor, in its logical shape.
    C : Tensor [M, K, d]
        The group's codebooks (fp16 values).
    cfg : AQConfig
        Group settings (``M, b, d`` must match ``C``).
    H : array or Tensor [cols, cols], optional
        ``X^T X`` over the matrix-view columns (unpermuted); identity if omitted.
    axes, perm : optional
        Matrix view (see :mod:`aqformat.layout`).
    rows : Tensor, optional
        Code only these rows (cheap trials for bit allocation).
    device : optional
        Where to compute.

    Returns
    -------
    AQTensor
        Raises :class:`TooSmallForAQ` when the tensor should stay raw and
        :class:`AqmInputError` on NaN/Inf weights.
    """
    d = cfg.d
    if tuple(C.shape) != (cfg.M, cfg.K, d):
        raise AqmInputError(f"codebooks {tuple(C.shape)} do not match {cfg}")
    dev = torch.device(device) if device is not None else default_device()
    W, s, Wn, Hp = _prepare(name, w, cfg, H, axes, perm)
    if rows is not None:
        W, s, Wn = W[rows], s[rows], Wn[rows]
    Cd = C.to(dev, torch.float32)
    cols = W.shape[1]
    cdt = np.uint8 if cfg.b <= 8 else np.uint16
    shape = tuple(int(v) for v in np.shape(w))
    if Hp is None:  # plain weight MSE: every vector independent, coded in one search
        codes = beam_search(Wn.reshape(-1, d).to(dev), Cd, None, cfg.beam).reshape(Wn.shape[0], -1, cfg.M)
        Wh = _decoded_rows(Cd, codes, cols)
        s = _fit_scales(W, Wh, None, s)[0]
    else:
        codes, s = _code_with_metric(W, Wn, s, Hp, Cd, cfg, dev)
    return AQTensor(name=name, shape=shape, axes=None if axes is None else tuple(axes),
                    perm=None if perm is None else np.asarray(perm),
                    scale=s.numpy().astype(np.float16),
                    codes=codes.reshape(-1, cfg.M).cpu().numpy().astype(cdt), d=d, b=cfg.b)


def decode_rows(t: AQTensor, C: torch.Tensor, cols: int) -> torch.Tensor:
    """Scaled rows ``[t.rows, cols]`` of ``t``'s (permuted) matrix view, float32.

    ``cols`` is the matrix view's width; it is given because a row subset coded
    with ``encode_tensor(rows=...)`` does not know its tensor's full shape.
    """
    Ct = torch.as_tensor(C, dtype=torch.float32)
    codes = torch.from_numpy(t.codes.astype(np.int64)).reshape(t.rows, -1, Ct.shape[0])
    return _decoded_rows(Ct, codes, cols) * torch.from_numpy(t.scale.astype(np.float32))[:, None]


def decode_tensor(t: AQTensor, C: torch.Tensor) -> np.ndarray:
    """Reference decoder (float32, logical shape) following the format's layout."""
    if t.codes.shape[0] != t.rows * math.ceil(t.cols / t.d):
        raise AqmInputError(f"codes of {t.name!r} do not match its shape")
    return from_matrix(decode_rows(t, C, t.cols).numpy(), t.shape, t.axes, t.perm)


def output_error(W: torch.Tensor, W_hat: torch.Tensor | float, H=None, row_weights=None) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` (plain squared error if ``H`` is None), each
    row's term multiplied by ``row_weights`` when given."""
    E = (W - W_hat).double()
    rows = (E * E if H is None else (E @ torch.as_tensor(H).double()) * E).sum(1)
    if row_weights is not None:
        rows = rows * torch.as_tensor(row_weights).double()
    return float(rows.sum())


ROW_BLOCK = 1 << 22
"""Weights per encoding task: a tensor over twice this is coded as blocks of rows, in parallel
(rows are coded independently, so the codes are the same), and no worker waits alone on it."""


def _code_and_measure(w: np.ndarray, name: str, C: torch.Tensor, *args: Any) -> tuple[AQTensor, float, float]:
    """One tensor, or a block of rows of its matrix view, coded (:func:`encode_tensor`'s arguments:
    ``cfg, H, axes, perm, device``), with its squared weight error and squared weights: one task
    of a conversion."""
    cfg, H, axes, perm, device = args
    t = encode_tensor(name, w, C, cfg, H, axes, perm, device=device)
    v = np.asarray(w, dtype=np.float64).ravel()
    e = v - decode_tensor(t, C).ravel()
    return t, float(e @ e), float(v @ v)


class AQEncoder:
    """The AQ encoder of a conversion (:class:`~aqformat.converters.encoders.TensorEncoder`).

    ``train`` plans the codebook groups (and, with a target size or
    ``allocate``, each tensor's rate) and trains their codebooks
    (:func:`aqformat.converters.planning.plan`); tensors are then coded
    against their group's codebooks under their calibration metric.
    """

    codec = aq_codec.NAME
    calibrated = True

    def __init__(self, opts: ConvertOptions) -> None:
        self.opts = opts
        self.tensors = ModelTensors([], lambda name: np.empty(0))
        self.plan = Plan({}, {}, {})
        self._shared: dict[str, Any] = {}  # group -> its codebooks as tasks receive them

    def train(self, tensors: ModelTensors, names: list[str], executor: Any = None) -> None:
        self.tensors = tensors
        self.plan = plan(tensors, names, self.opts, executor)
        self._shared: dict[str, Any] = {}

    @property
    def coded(self) -> list[str]:
        return list(self.plan.group_of)

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n, g in self.plan.group_of.items():
            out.setdefault(g, []).append(n)
        return out

    def compute_codes(self, name: str, w: np.ndarray) -> AQTensor:
        g, t = self.plan.group_of[name], self.tensors
        return encode_tensor(name, w, self.plan.books[g], self.plan.configs[g], t.H.get(name),
                             t.axes.get(name), t.perms.get(name), device=self.opts.device)

    def tasks(self, name: str, w: np.ndarray, share: Any) -> list[tuple[Any, tuple[Any, ...]]]:
        g, t = self.plan.group_of[name], self.tensors
        if g not in self._shared:  # a group's codebooks go to the object store once
            self._shared[g] = share(self.plan.books[g])
        H, axes, perm = t.H.get(name), t.axes.get(name), t.perms.get(name)
        rest = (self.plan.configs[g], None if H is None else share(H))
        (rows, cols), cfg = matrix_shape(np.shape(w), axes), self.plan.configs[g]
        min_rows = -(-cfg.K // -(-cols // cfg.d))  # rows holding K vectors, what AQ needs of a tensor
        blocks = min(rows // min_rows, -(-rows * cols // ROW_BLOCK))  # of about ROW_BLOCK weights
        if rows * cols <= 2 * ROW_BLOCK or blocks < 2:
            return [(_code_and_measure, (w, name, self._shared[g], *rest, axes, perm, self.opts.device))]
        m = to_matrix(w, axes)  # each block keeps the column permutation, so H applies as it is
        cuts = np.linspace(0, rows, blocks + 1).astype(int)
        return [(_code_and_measure, (m[a:b], name, self._shared[g], *rest, None, perm, self.opts.device))
                for a, b in zip(cuts[:-1], cuts[1:])]

    def join(self, name: str, results: list[Any]) -> tuple[AQTensor, float]:
        from .pipeline import sqnr_from
        t = results[0][0]
        if len(results) > 1:
            spec = self.tensors.spec(name)
            t = AQTensor(name=name, shape=tuple(spec.shape), axes=self.tensors.axes.get(name), perm=t.perm,
                         scale=np.concatenate([r[0].scale for r in results]),
                         codes=np.concatenate([r[0].codes for r in results]), d=t.d, b=t.b)
        return t, sqnr_from(sum(r[1] for r in results), sum(r[2] for r in results))

    def decode(self, encoded: AQTensor) -> np.ndarray:
        return decode_tensor(encoded, self.plan.books[self.plan.group_of[encoded.name]])

    def write_shared(self, writer) -> None:
        for g in sorted(self.plan.books):
            writer.add_codebooks(g, self.plan.books[g].numpy(), dtype="float16")

    def write(self, writer, encoded: AQTensor, dtype: str) -> None:
        writer.add_aq(encoded.name, encoded.shape, encoded.codes, group=self.plan.group_of[encoded.name],
                      dtype=dtype, scale=encoded.scale, perm=encoded.perm, axes=encoded.axes)

    def metadata(self) -> dict[str, Any]:
        o, enc = self.opts, self.opts.encoder
        return {"bits": o.bits_per_weight, "target_size": o.target_size,
                "allocated": bool(o.target_size is not None or o.allocate),
                "permuted": sorted(n for n, p in self.tensors.perms.items() if p is not None),
                "groups": {g: {"M": c.M, "b": c.b, "d": c.d} for g, c in sorted(self.plan.configs.items())},
                "codebooks": o.grouping, "calibrated": bool(self.tensors.H), "seed": o.seed,
                "min_elements": o.min_elements, "keep": list(o.keep), "beam": enc.beam,
                "iters": enc.iters, "reservoir": int(enc.reservoir)}
