"""Encoder of codec ``affine`` (:mod:`aqformat.codecs.affine`) and the plan of the tensors it codes.

Each row of the matrix view (or the whole tensor) gets ``scale = (max - min) /
(2**b - 1)`` and ``offset = min``, both rounded to float16 first so that the
codes are chosen against the values the decoder will use. Of the two scopes,
the one with the lower rate-distortion cost ``bits per weight + mean over rows
of log2(row MSE) / 2`` is kept (at high rate, one more bit per weight quarters the MSE), so short rows
(depthwise kernels: 9 weights) share one pair while long ones get their own.

:func:`plan_affine` codes the tensors a conversion gives this codec (those
too small for AQ, and those whose AQ codebooks would outweigh their codes):
each at 1 to 8 bits or kept raw, chosen by measured error per byte within a
byte budget (the bytes of every tensor at its nominal rate). With calibration,
:func:`plan_within` makes the same choice by each coding's predicted error in
the model's *output* (:mod:`aqformat.converters.sensitivity`): a bias that the
output barely feels no longer gets the bits of a gain it amplifies, a tensor
that even 8 bits leave too coarse can be kept at 16 (codec ``half``) instead of 32,
and a budget too small for the output (the small tensors together above
:data:`SMALL_OUTPUT_ERROR` of it) is exceeded, best error decrease per byte first.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from aqformat.codecs import affine
from aqformat.layout import from_matrix, matrix_shape, to_matrix
from aqformat.writer import ZSTD_LEVEL, Writer

__all__ = ["AffineTensor", "AffinePlan", "encode_affine", "codebook_dominated", "plan_affine", "small_bits",
           "nominal_bytes", "plan_within", "RECORD_BYTES", "SMALL_BITS_ABOVE", "SMALL_OUTPUT_ERROR"]

_FP16_MAX = 65504.0
_FP16_TINY = np.float16(2.0 ** -24)  # smallest positive float16 step
RECORD_BYTES = 24
"""Header bytes an affine record takes beyond a raw one (``"bits"``, ``"scope"`` and their values)."""
SMALL_BITS_ABOVE = 2
"""Small tensors' nominal rate is ``bits + SMALL_BITS_ABOVE`` (4 to 8): see :func:`small_bits`."""
SMALL_OUTPUT_ERROR = 1e-3
"""With calibration, the predicted squared output error all small tensors together may cause,
relative to the output's energy: :func:`plan_within` spends beyond its budget (best error decrease
per byte first) until they are under it."""


def small_bits(bits: float) -> float:
    """Nominal rate of small tensors at a model's ``--bits``: ``bits + 2``, between 4 and 8.

    Small tensors hold few of a model's weights but many of its sensitive ones
    (norms, biases, depthwise kernels: one weight per input and tap), so their
    budget is wider than the AQ-coded bulk's; :func:`plan_affine` spends it
    where it lowers the error most. Fractional rates are kept (reached by mixing widths).
    """
    return float(min(affine.MAX_BITS, max(4.0, bits + SMALL_BITS_ABOVE)))


def nominal_bytes(shape: Sequence[int], axes: Sequence[int] | None, bits: float) -> int:
    """Budget of one tensor at ``bits`` per weight: its codes, a (scale, offset) pair per row
    and the record's extra header bytes."""
    rows, cols = matrix_shape(shape, axes)
    return math.ceil(rows * cols * bits / 8) + 4 * rows + RECORD_BYTES


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

    def stored_bytes(self) -> int:
        """Bytes of its section in the file: zstd-encoded where that is smaller, as the writer does."""
        data = np.ascontiguousarray(self.fields["data"]).view(np.uint8)
        z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False).compress(data.tobytes())
        return min(len(z), data.nbytes)

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


def encode_affine(w: np.ndarray, bits: int, axes: Sequence[int] | None = None,
                  scope: str | None = None) -> AffineTensor | None:
    """Code one float tensor at ``bits`` bits per weight, choosing the scope by rate-distortion.

    Parameters
    ----------
    w : numpy.ndarray
        The tensor in its logical shape (any float dtype; non-empty).
    bits : int
        Code width, 1 to 8.
    axes : sequence of int, optional
        Dimension order of the matrix view (see spec, "Layout").
    scope : {"row", "tensor"}, optional
        Force the scope of the (scale, offset) pairs (default: the cheaper by rate-distortion).

    Returns
    -------
    AffineTensor or None
        None when the values do not fit float16 scales (non-finite or beyond 65504).
    """
    W = to_matrix(np.asarray(w, dtype=np.float32), axes)
    if W.size == 0 or not np.isfinite(W).all() or np.abs(W).max() > _FP16_MAX / 2:
        return None
    best: tuple[float, AffineTensor] | None = None
    for sc, view in (("row", W), ("tensor", W.reshape(1, -1))):
        if scope is not None and sc != scope:
            continue
        codes, scale, offset, dec = _quantize(view, bits)
        nbytes = affine.layout(w.shape, axes, bits, sc)[3]
        # Mean over rows of log2 of each row's MSE: a row of small weights (an output
        # channel with a small gain) counts as much as a row of large ones.
        mse = np.mean(np.square(dec.reshape(W.shape) - W, dtype=np.float64), axis=1)
        cost = 8 * nbytes / W.size + 0.5 * float(np.mean(np.log2(np.maximum(mse, 1e-30))))
        if best is None or cost < best[0]:
            best = cost, AffineTensor(affine.fields(codes.reshape(W.shape), scale, offset, bits, sc, axes),
                                      nbytes, from_matrix(dec.reshape(W.shape), w.shape, axes))
    return None if best is None else best[1]


@dataclass
class AffinePlan:
    """The tensors given to the affine codec: which are coded (and how), which stay raw.

    ``coded`` holds each coded tensor's encoding (written as planned): an
    :class:`AffineTensor`, or with calibration a float16 copy
    (:class:`~aqformat.converters.half.HalfTensor`, same interface); ``nbytes``
    every candidate's planned bytes in the file (its section, and a coded
    record's extra header bytes), and those of the tensors ``--keep`` holds at
    16 bits; ``budget`` the bytes it was planned in.
    """

    coded: dict[str, Any] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    budget: int = 0

    def bits(self) -> dict[str, int]:
        """Code width of each coded tensor (16 for a float16 copy)."""
        return {n: int(t.fields.get("bits", 16)) for n, t in self.coded.items()}


def plan_affine(candidates: Mapping[str, tuple[Sequence[int], Sequence[int] | None, float, int]],
                load: Callable[[str], np.ndarray]) -> AffinePlan:
    """Code each candidate at 1 to 8 bits or keep it raw, by measured error per byte within a budget.

    Parameters
    ----------
    candidates : mapping
        ``name -> (shape, axes, nominal bits, raw bytes)``; the budget is the sum of
        :func:`nominal_bytes` over them.
    load : callable
        ``load(name)``: the tensor as float32.

    Returns
    -------
    AffinePlan
        The choice minimising the sum of relative squared errors (error energy over the
        tensor's energy, raw counting 0) within the budget, greedily by error decrease per byte.
    """
    return plan_within(candidates, load)


def plan_within(candidates: Mapping[str, tuple[Sequence[int], Sequence[int] | None, float, int]],
                load: Callable[[str], np.ndarray], sensitivity: Any = None) -> AffinePlan:
    """:func:`plan_affine` weighing each coding by its predicted error in the model's output.

    Parameters
    ----------
    candidates, load
        As in :func:`plan_affine` (the same budget).
    sensitivity : SmallSensitivity, optional
        Output sensitivities from calibration
        (:func:`aqformat.converters.sensitivity.small_sensitivity`): a coding's cost is its
        predicted squared output error (``sensitivity.errors``) instead of its relative weight
        error, float16 (codec ``half``, :func:`aqformat.converters.half.encode_half`) is
        offered between 8 bits and raw, and where the budget leaves the small tensors' total
        predicted output error above :data:`SMALL_OUTPUT_ERROR` of the output's energy
        (``sensitivity.energy``), the same greedy steps continue beyond it until it does not.
        Without it, the plan is :func:`plan_affine`'s.

    Returns
    -------
    AffinePlan
        The choice minimising the sum of the costs within the budget, greedily by cost decrease per byte.
    """
    names = list(candidates)
    budget = sum(nominal_bytes(shape, axes, bits) for shape, axes, bits, _ in candidates.values())
    if not names:
        return AffinePlan(budget=budget)
    options = [_options(n, load(n), candidates[n], sensitivity) for n in names]
    cost = np.array([c for _, c, _ in options])
    size = np.array([z for _, _, z in options], dtype=np.int64)
    pick = _choose(cost, size, budget)
    if sensitivity is not None:  # beyond the budget while the predicted output error is above its share
        pick = _choose(cost, size, np.iinfo(np.int64).max // 4, pick, SMALL_OUTPUT_ERROR * sensitivity.energy)
    plan = AffinePlan(budget=budget)
    for (coded, _, _), n, j in zip(options, names, pick):
        if coded[j] is None:  # raw
            plan.nbytes[n] = candidates[n][3]
        else:
            plan.coded[n] = coded[j]
            plan.nbytes[n] = coded[j].stored_bytes() + _record_bytes(coded[j])
    return plan


def _options(name: str, w: np.ndarray, candidate: tuple[Sequence[int], Sequence[int] | None, float, int],
             sensitivity: Any) -> tuple[list[Any], list[float], list[int]]:
    """One tensor's codings (1 to 8 bits, with ``sensitivity`` float16, then raw: None), each one's
    cost (inf: unavailable) and planned bytes (the section before zstd and the record's extra bytes)."""
    _, axes, _, raw_bytes = candidate
    coded: list[Any] = [encode_affine(w, b, axes) for b in range(1, affine.MAX_BITS + 1)]
    if sensitivity is not None:
        from .half import encode_half
        coded.append(encode_half(w))
    decoded = [None if t is None else t.decoded for t in coded]
    cost = _relative_errors(w, decoded) if sensitivity is None else sensitivity.errors(name, w, decoded)
    unavailable = int(np.iinfo(np.int64).max)
    size = [unavailable if t is None else _coded_bytes(t) + _record_bytes(t) for t in coded]
    return [*coded, None], [*cost.tolist(), 0.0], [*size, raw_bytes]


def _coded_bytes(t: Any) -> int:
    """Bytes of a coding's section before zstd (an affine code's layout, a float16 copy's data)."""
    return t.nbytes if isinstance(t, AffineTensor) else int(t.fields["data"].nbytes)


def _record_bytes(t: Any) -> int:
    """Header bytes a coded record takes beyond a raw one: :data:`RECORD_BYTES`, or
    :data:`aqformat.converters.half.RECORD_BYTES` for a float16 copy."""
    if isinstance(t, AffineTensor):
        return RECORD_BYTES
    from .half import RECORD_BYTES as HALF_RECORD_BYTES
    return HALF_RECORD_BYTES


def _relative_errors(w: np.ndarray, decoded: Sequence[np.ndarray | None]) -> np.ndarray:
    """Squared error of each decoded candidate over the energy of ``w`` (inf where None)."""
    energy = max(float(np.sum(np.square(w, dtype=np.float64))), 1e-30)
    return np.array([np.inf if d is None else float(np.sum(np.square(d - w, dtype=np.float64))) / energy
                     for d in decoded])


def _choose(cost: np.ndarray, size: np.ndarray, budget: int, pick: np.ndarray | None = None,
            target: float = 0.0) -> np.ndarray:
    """One option per row of ``cost``/``size`` (inf: unavailable): ``pick`` (default: the smallest)
    first, then greedy steps of best error decrease per byte that fit ``budget``, until the
    total cost is at most ``target``."""
    rows = np.arange(cost.shape[0])
    pick = np.argmin(size, axis=1) if pick is None else pick.copy()
    spent = int(size[rows, pick].sum())
    while float(cost[rows, pick].sum()) > target:
        extra = size - size[rows, pick][:, None]
        gain = cost[rows, pick][:, None] - cost
        ok = (gain > 0) & (extra <= budget - spent) & np.isfinite(cost)
        if not ok.any():
            return pick
        ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        spent += int(extra[i, j])
        pick[i] = j
    return pick
