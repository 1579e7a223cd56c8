"""Dithered uniform scalar lattice encoder (Choi et al., universal DNN compression).

Per tensor: matrix view ``W[rows, cols]`` (:func:`aqformat.layout.to_matrix`),
per-row step ``step[rows]`` (float32) and a uint64 seed. With the dither
``u = aqformat.dither.dither(seed, rows*cols)`` reshaped row-major to
``[rows, cols]``, the integers are ``q = round(W / step + u)`` and the decoder
returns ``(q - u) * step``: the error is uniform in ``[-step/2, step/2]``
whatever the weight distribution. The writer entropy-codes ``q`` (section
encoding ``rans`` where it is smaller than zstd).

Rate-distortion-optimised quantization (:func:`rdoq_indices`) may instead pick,
for each weight, the lattice point on the other side of ``W / step + u`` when
that saves more bits, under the entropy model the writer will use, than it
costs in squared error; the converter does this at :data:`RDOQ_LAMBDA`
(bench/entropy_bench.py measures the gain at equal rate).

:class:`LatticeEncoder` is this codec's encoder of a conversion
(``aqm convert --codec lattice``): every selected tensor at one rate, each
with its own dither seed derived from the conversion seed and its name.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqformat import rans
from aqformat.codecs import lattice as lattice_codec
from aqformat.codecs import uniform as uniform_codec
from aqformat.codecs.lattice import decode_lattice
from aqformat.dither import dither
from aqformat.errors import AqmInputError
from aqformat.layout import matrix_shape, to_matrix

from .options import ConvertOptions
from .planning import ModelTensors

__all__ = ["LatticeEncoder", "LatticeTensor", "encode_lattice", "feedback_indices", "lattice_step", "rdoq_indices",
           "tensor_seed", "RDOQ_LAMBDA"]

_INT32_MAX = 2**31 - 1
_ZERO_ROW_STEP = np.float32(1e-30)  # all-zero rows: any step works, a tiny one decodes ~0
RDOQ_LAMBDA = 0.1
"""The converter's rate-distortion trade in squared steps per bit (plain rounding trades ln(2)/6 ~ 0.12
along its step-size curve). Measured at equal rate (bench/entropy_bench.py): +0.1 dB weight SQNR on
EfficientNet-Lite0 and +0.3 dB on silero-vad at 3 bits, +0.01 to +0.06 dB at 4-5 bits."""


def rdoq_indices(x: np.ndarray, lam: float, rounds: int = 2) -> np.ndarray:
    """Lattice indices of ``x = W / step + u`` ([rows, cols]) chosen by rate and distortion.

    Each index is the lattice point below or above ``x`` with the lower cost
    ``J = (x - q)**2 + lam * bits(q)``: the squared error in squared steps plus
    ``lam`` times the index's code length under the ``rans`` model (per-row
    tables) fitted to the indices, refitted ``rounds`` times from plain
    rounding. ``lam = 0`` is plain rounding.

    Returns
    -------
    numpy.ndarray
        int64 indices, each ``floor(x)`` or ``floor(x) + 1``.
    """
    q = np.rint(x)
    if lam <= 0 or x.size == 0:
        return q.astype(np.int64)
    lo = np.floor(x)
    for _ in range(rounds):
        model = rans.plan(q.astype(np.int64), contexts=False)  # a cost per index independent of its neighbours
        # an index its row's table lacks costs a little more than the rarest one it has
        j_lo = (x - lo) ** 2 + lam * rans.code_lengths(lo.astype(np.int64), model, absent=rans.PRECISION + 1)
        j_hi = (x - lo - 1) ** 2 + lam * rans.code_lengths(lo.astype(np.int64) + 1, model, absent=rans.PRECISION + 1)
        q = np.where(j_lo <= j_hi, lo, lo + 1)
    return q.astype(np.int64)


FEEDBACK_BLOCK = 128
"""Columns whose errors :func:`feedback_indices` pushes on one at a time before it updates the
columns after them with one matrix product (GPTQ's lazy batch)."""


def feedback_indices(W: np.ndarray, step: np.ndarray, u: np.ndarray | None, U: np.ndarray) -> np.ndarray:
    """Indices of ``W [rows, cols]`` at per-row ``step`` (dither ``u`` or None), chosen column by
    column with GPTQ's error feedback under a calibration metric ``H``.

    Each column is rounded, and its error (``w - (q - u) * step``) is pushed onto the columns not
    yet rounded as ``U`` (:func:`~aqformat.converters.aq_encode.feedback_factor` of ``H``) says,
    so they absorb it in the layer's output. The decoder is unchanged: it reads indices as always.
    Rows are independent, so a sample of rows codes as it would in the whole tensor. On
    EfficientNet-Lite0 the calibrated ``--bits 4`` file's KL to fp32 went from 0.031 to 0.012 at
    the same size (bench/grid_feedback_bench.py). The columns are rounded in storage order:
    GPTQ's act-order (by decreasing ``diag(H)``) lowered each layer's error a little more there,
    yet raised that file's KL by a fifth.

    Returns
    -------
    numpy.ndarray
        int64 indices ``[rows, cols]``.
    """
    W = np.array(W, dtype=np.float64)
    rows, cols = W.shape
    st = step.astype(np.float64)
    inv = 1.0 / st
    q = np.empty((rows, cols), dtype=np.int64)
    for b0 in range(0, cols, FEEDBACK_BLOCK):
        b1 = min(b0 + FEEDBACK_BLOCK, cols)
        err = np.empty((rows, b1 - b0))
        for j in range(b0, b1):  # a column at a time: each is rounded after the errors before it
            x = W[:, j] * inv + (u[:, j] if u is not None else 0.0)
            qj = np.rint(x)
            q[:, j] = qj
            e = (x - qj) * st / U[j, j]
            err[:, j - b0] = e
            W[:, j + 1:b1] -= np.outer(e, U[j, j + 1:b1])
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return q


def lattice_step(W: np.ndarray, bits: float) -> np.ndarray:
    """Per-row step giving about ``bits`` of entropy per weight after coding.

    At high rate a uniform quantizer of step ``D`` on a Gaussian of standard
    deviation ``s`` has entropy ``log2(s * sqrt(2 pi e) / D)``, so
    ``D = s * sqrt(2 pi e) * 2**-bits`` (heavier-tailed rows code smaller).
    """
    s = np.sqrt(np.mean(np.square(W, dtype=np.float64), axis=1))
    step = (s * math.sqrt(2 * math.pi * math.e) * 2.0 ** -bits).astype(np.float32)
    return np.where(step > 0, step, _ZERO_ROW_STEP).astype(np.float32)


def encode_lattice(w, bits_or_step: float | Sequence[float] | np.ndarray, seed: int,
                   axes: Sequence[int] | None = None, name: str = "tensor", rdoq: float = 0.0,
                   feedback: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dithered lattice quantization of one tensor.

    Parameters
    ----------
    w : array-like
        The tensor in its logical shape.
    bits_or_step : float or array
        A float ``< 32`` with ``float`` type is read as target bits per weight
        (see :func:`lattice_step`); an array of ``rows`` values, or a
        ``numpy.float32`` scalar, is the step itself.
    seed : int or None
        Unsigned 64-bit dither seed; None: no dither (codec ``uniform``, ``W = q * step``).
    axes : sequence of int, optional
        Transpose before flattening (matrix view as in the AQ codec).
    name : str
        Used in error messages.
    rdoq : float
        Rate-distortion trade of :func:`rdoq_indices` (0: plain rounding).
    feedback : numpy.ndarray, optional
        Calibration error feedback (:func:`~aqformat.converters.aq_encode.feedback_factor`): the
        indices are then chosen by :func:`feedback_indices` (``rdoq`` unused: its rate model
        ignores the calibration metric, and it cost output error at equal rate there).

    Returns
    -------
    (q int32 [rows, cols], step float32 [rows])
    """
    W = np.asarray(to_matrix(np.asarray(w, dtype=np.float64), axes), dtype=np.float64)
    if not np.isfinite(W).all():
        raise AqmInputError(f"tensor {name!r} contains NaN or Inf weights")
    rows, cols = W.shape
    if isinstance(bits_or_step, (float, int)) and not isinstance(bits_or_step, np.floating):
        if not 0 < bits_or_step < 32:
            raise AqmInputError(f"lattice bits must be in (0, 32), got {bits_or_step}")
        step = lattice_step(W, float(bits_or_step))
    else:
        step = np.broadcast_to(np.asarray(bits_or_step, dtype=np.float32), (rows,)).copy()
        if not (np.isfinite(step).all() and (step > 0).all()):
            raise AqmInputError(f"lattice steps of {name!r} must be finite and > 0")
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise AqmInputError("lattice seed must be an unsigned 64-bit integer")
    u = dither(int(seed), rows * cols).reshape(rows, cols) if seed is not None else None
    x = W / step.astype(np.float64)[:, None] + (u if u is not None else 0.0)
    if np.abs(x).max(initial=0) > _INT32_MAX - 1:
        raise AqmInputError(f"lattice step too small for {name!r}: integers exceed int32")
    if feedback is None:
        return rdoq_indices(x, rdoq).astype(np.int32), step
    q = feedback_indices(W, step, u, feedback)
    if np.abs(q).max(initial=0) > _INT32_MAX - 1:  # the feedback may push a column past the check above
        raise AqmInputError(f"lattice step too small for {name!r}: integers exceed int32")
    return q.astype(np.int32), step


def tensor_seed(seed: int, name: str) -> int:
    """The dither seed of tensor ``name`` in a conversion of ``seed``: a hash of both."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class LatticeTensor:
    """One lattice-coded tensor: indices ``q[rows, cols]`` of its matrix view, per-row steps, dither
    seed (None: no dither, codec ``uniform``)."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[int, ...] | None
    q: np.ndarray
    step: np.ndarray
    seed: int | None


def _code(w: np.ndarray, name: str, bits: float, seed: int | None, axes: tuple[int, ...] | None,
          feedback: np.ndarray | None = None) -> LatticeTensor:
    q, step = encode_lattice(w, bits, seed, axes, name, rdoq=RDOQ_LAMBDA, feedback=feedback)
    return LatticeTensor(name, tuple(int(v) for v in np.shape(w)), axes, q, step, seed)


def _decode(t: LatticeTensor) -> np.ndarray:
    rows, cols = matrix_shape(t.shape, t.axes)
    return decode_lattice(t.q, t.step, t.seed, t.shape, t.axes, rows, cols)


def _code_and_measure(w: np.ndarray, *args: Any) -> tuple[LatticeTensor, float]:
    """A tensor coded (:func:`_code`'s arguments after ``w``) and its weight SQNR: one task."""
    from .pipeline import sqnr_db
    t = _code(w, *args)
    return t, sqnr_db(w, _decode(t))


class LatticeEncoder:
    """The lattice encoder of a conversion (:class:`~aqformat.converters.encoders.TensorEncoder`).

    Nothing is trained: every candidate tensor is coded at ``bits_per_weight``
    (an entropy target, :func:`lattice_step`), its indices chosen by
    :func:`rdoq_indices` at :data:`RDOQ_LAMBDA`, or with calibration by
    :func:`feedback_indices` under the tensor's ``H``.
    """

    codec = lattice_codec.NAME
    calibrated = True

    def __init__(self, opts: ConvertOptions) -> None:
        self.opts = opts
        self.axes: dict[str, tuple[int, ...]] = {}
        self.H: dict[str, Any] = {}
        self.coded: list[str] = []
        self.groups: dict[str, list[str]] = {}

    def train(self, tensors: ModelTensors, names: list[str], executor: Any = None) -> None:
        self.axes, self.H, self.coded = tensors.axes, tensors.H, list(names)

    def tensor_seed(self, name: str) -> int:
        """The dither seed of tensor ``name`` (:func:`tensor_seed`)."""
        return tensor_seed(self.opts.seed, name)

    def _args(self, name: str) -> tuple[Any, ...]:
        """:func:`_code`'s arguments after ``w`` for tensor ``name``."""
        from .aq_encode import feedback_factor
        H = self.H.get(name)
        fb = None if H is None else feedback_factor(H, self.opts.encoder.damp)
        return name, float(self.opts.bits_per_weight), self.tensor_seed(name), self.axes.get(name), fb

    def compute_codes(self, name: str, w: np.ndarray) -> LatticeTensor:
        return _code(w, *self._args(name))

    def tasks(self, name: str, w: np.ndarray, share: Any) -> list[tuple[Any, tuple[Any, ...]]]:
        """One task: the entropy model of its indices spans the whole tensor."""
        return [(_code_and_measure, (w, *self._args(name)))]

    def join(self, name: str, results: list[Any]) -> tuple[LatticeTensor, float]:
        return results[0]

    def decode(self, encoded: LatticeTensor) -> np.ndarray:
        return _decode(encoded)

    def write_shared(self, writer) -> None:
        """Nothing is shared between lattice tensors."""

    def write(self, writer, encoded: LatticeTensor, dtype: str) -> None:
        e = encoded
        if e.seed is None:
            codec, fields = uniform_codec.NAME, uniform_codec.fields(e.name, e.shape, e.q, e.step, e.axes)
        else:
            codec, fields = lattice_codec.NAME, lattice_codec.fields(e.name, e.shape, e.q, e.step, e.seed, e.axes)
        writer.add_encoded(e.name, codec, e.shape, fields, dtype=dtype, compress=("data", "step"), entropy=("data",))

    def metadata(self) -> dict[str, Any]:
        o = self.opts
        return {"codec": self.codec, "bits": o.bits_per_weight, "seed": o.seed, "rdoq_lambda": RDOQ_LAMBDA,
                "min_elements": o.min_elements, "keep": list(o.keep), "calibrated": bool(self.H)}
