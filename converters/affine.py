"""Encoder of codec ``affine`` (:mod:`aqformat.codecs.affine`) for tensors too small for AQ.

Each row of the matrix view (or the whole tensor) gets ``scale = (max - min) /
(2**b - 1)`` and ``offset = min``, both rounded to float16 first so that the
codes are chosen against the values the decoder will use. Of the two scopes,
the one with the lower rate-distortion cost ``bits per weight + mean over rows
of log2(row MSE) / 2`` is kept (at high rate, one more bit per weight quarters the MSE), so short rows
(depthwise kernels: 9 weights) share one pair while long ones get their own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqformat.codecs import affine
from aqformat.dtypes import FLOAT_DTYPES
from aqformat.layout import from_matrix, to_matrix
from aqformat.writer import Writer

from .sources import TensorSpec

__all__ = ["AffineTensor", "encode_affine", "codebook_dominated", "plan_small", "rate_bits", "small_bits", "SMALL_BITS_ABOVE"]

_FP16_MAX = 65504.0
_FP16_TINY = np.float16(2.0 ** -24)  # smallest positive float16 step
_RECORD_BYTES = 24  # header bytes an affine record takes beyond a raw one ("bits", "scope", its values)
SMALL_BITS_ABOVE = 2
"""Small tensors get ``round(bits) + SMALL_BITS_ABOVE`` bits (4 to 8): see :func:`small_bits`."""


def small_bits(bits: float) -> int:
    """Code width for small tensors at a model's ``--bits``: between 4 and 8.

    Small tensors hold few of a model's weights but many of its sensitive ones
    (norms, biases, depthwise kernels: one weight per input and tap), so they get
    more bits than the AQ-coded bulk; measured on silero-vad and the digits CNN
    (bench/tasks.py), see the README.
    """
    return int(min(affine.MAX_BITS, max(4, round(bits) + SMALL_BITS_ABOVE)))


def rate_bits(bits: float) -> int:
    """Code width for tensors coded at the model's own ``--bits`` (nearest integer, 1 to 8)."""
    return int(min(affine.MAX_BITS, max(1, round(bits))))


def codebook_dominated(groups: Mapping[str, Sequence[str]], cfg: Any, numel: Mapping[str, int]) -> list[str]:
    """Members of the codebook groups whose float16 codebooks would take more bytes than their codes.

    Such a group (e.g. the one linear layer of a small MLP: 16 KiB of codebooks
    for 4 KiB of codes at 4 bits) is smaller coded by the affine codec at the
    same rate.
    """
    return [n for ms in groups.values() if cfg.codebook_bytes() > sum(numel[n] for n in ms) * cfg.code_bits / 8
            for n in ms]


@dataclass
class AffineTensor:
    """One tensor coded by :func:`encode_affine`: the writer's record fields and what they cost."""

    fields: dict[str, Any]
    nbytes: int
    decoded: np.ndarray

    def write(self, writer: Writer, name: str, shape: Sequence[int], dtype: str) -> None:
        """Append the tensor to ``writer`` (its section zstd-coded where that is smaller)."""
        writer.add_encoded(name, affine.NAME, shape, self.fields, dtype=dtype, compress=("data",))


def _quantize(W: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes, float16 scales and offsets and the decoded matrix, one (scale, offset) per row of ``W``."""
    lo, hi = W.min(axis=1), W.max(axis=1)
    offset = lo.astype(np.float16)
    levels = (1 << bits) - 1
    scale = ((hi - offset.astype(np.float32)) / levels).astype(np.float16)
    scale = np.where((scale == 0) & (hi > lo), _FP16_TINY, scale)
    s = scale.astype(np.float32)[:, None]
    codes = np.rint((W - offset.astype(np.float32)[:, None]) / np.where(s > 0, s, 1))
    codes = np.clip(codes, 0, levels).astype(np.uint8)
    return codes, scale, offset, affine.dequantize(codes, scale, offset)


def encode_affine(w: np.ndarray, bits: int, axes: Sequence[int] | None = None) -> AffineTensor | None:
    """Code one float tensor at ``bits`` bits per weight, choosing the scope by rate-distortion.

    Parameters
    ----------
    w : numpy.ndarray
        The tensor in its logical shape (any float dtype; non-empty).
    bits : int
        Code width, 1 to 8.
    axes : sequence of int, optional
        Dimension order of the matrix view (see spec, "Layout").

    Returns
    -------
    AffineTensor or None
        None when the values do not fit float16 scales (non-finite or beyond 65504).
    """
    W = to_matrix(np.asarray(w, dtype=np.float32), axes)
    if W.size == 0 or not np.isfinite(W).all() or np.abs(W).max() > _FP16_MAX / 2:
        return None
    best: tuple[float, AffineTensor] | None = None
    for scope, view in (("row", W), ("tensor", W.reshape(1, -1))):
        codes, scale, offset, dec = _quantize(view, bits)
        nbytes = affine.layout(w.shape, axes, bits, scope)[3]
        # Mean over rows of log2 of each row's MSE: a row of small weights (an output
        # channel with a small gain) counts as much as a row of large ones.
        mse = np.mean(np.square(dec.reshape(W.shape) - W, dtype=np.float64), axis=1)
        cost = 8 * nbytes / W.size + 0.5 * float(np.mean(np.log2(np.maximum(mse, 1e-30))))
        if best is None or cost < best[0]:
            best = cost, AffineTensor(affine.fields(codes.reshape(W.shape), scale, offset, bits, scope, axes),
                                      nbytes, from_matrix(dec.reshape(W.shape), w.shape, axes))
    return best[1]


def plan_small(specs: Sequence[TensorSpec], names: Iterable[str], bits: int,
               weights: Callable[[str], np.ndarray], axes: Mapping[str, Any]) -> dict[str, AffineTensor]:
    """Code each float tensor of ``names`` at ``bits``, keeping those it makes smaller.

    Parameters
    ----------
    specs : sequence of TensorSpec
        The source's tensors.
    names : iterable of str
        Candidates (the pipeline passes tensors AQ does not take and ``--keep`` does not keep).
    bits : int
        Code width (see :func:`small_bits`).
    weights : callable
        ``weights(name)``: the tensor as float32.
    axes : mapping
        Matrix-view axes by tensor name, where a source defines them.

    Returns
    -------
    dict
        ``{name: AffineTensor}`` of the tensors whose coded bytes (a record
        costs about ``_RECORD_BYTES`` more header than a raw one) are fewer than raw.
    """
    by_name = {s.name: s for s in specs}
    out = {}
    for n in names:
        s = by_name[n]
        if s.dtype not in FLOAT_DTYPES or s.numel == 0 or not s.shape:
            continue
        t = encode_affine(weights(n), bits, axes.get(n))
        if t is not None and t.nbytes + _RECORD_BYTES < s.nbytes:
            out[n] = t
    return out
