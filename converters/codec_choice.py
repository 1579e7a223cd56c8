"""Per-tensor codec choice by measured rate and distortion: the encoder of ``--codec auto``.

Every tensor the conversion compresses is offered each codec that can code it:

* ``aq``: its codebook group at the code widths around the budget's rate
  (the groups are trained as ``--allocate`` trains them; the error of each is
  predicted from a few coded rows, :func:`aqformat.converters.planning._trial`);
* ``lattice`` and ``uniform``: integer indices times one step for the whole
  tensor, on a grid of :data:`STEPS_PER_OCTAVE` steps per octave shared by
  every tensor, their bytes those the writer will store (the smallest of raw,
  zstd and rans indices, steps and record). Each step takes the dithered lattice
  (:mod:`aqformat.converters.lattice`) unless its error exceeds
  :data:`NOISY_LATTICE` of the tensor's energy; then it takes the uniform codec
  (the lattice without its dither), which rounds the many weights under half a
  step to zero instead of adding the dither's noise;
* ``affine``: the scalar codec of small tensors at 2 to 8 bits;
* ``half`` (float16) and ``raw``.

Each option has its bytes in the file and its distortion ``D``: the squared
weight error, or with calibration the output error ``tr(E H E^T)`` weighted by
each row's output sensitivity (tensors lacking it weighted relative to their
energy, as ``--allocate`` does). The choice minimises ``D + lam * bytes`` per
tensor, a shared group's codebooks counted in its members' bytes, and ``lam``
is bisected so that the bytes fit the budget (``--target-size``: every byte of
the file; ``--bits``: per compressed weight, with codes, scales, codebooks, steps,
the tensors' records and the small tensors counted, see :func:`auto_budget`). Without calibration a tensor's squared error is
weighed by its mean energy to the power ``-DATA_FREE_EXPONENT`` (a quarter), so the
lattice steps grow as a power of each tensor's RMS and AQ and the others join
where they are cheaper at that slope.
Lattice steps are measured lazily: per ``lam``, each tensor walks the step grid
from its last best step to the cheapest one.

``--codec-for PATTERN:CODEC`` (:func:`parse_codec_for`) restricts the tensors a
pattern matches to one codec; a codec that cannot code such a tensor is an
:class:`AqmInputError` naming it and why.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat import rans
from aqformat.codecs import affine as affine_codec
from aqformat.codecs import aq as aq_codec
from aqformat.codecs import half as half_codec
from aqformat.codecs import lattice as lattice_codec
from aqformat.codecs import raw as raw_codec
from aqformat.codecs import uniform as uniform_codec
from aqformat.dtypes import FLOAT_DTYPES
from aqformat.errors import AqmInputError
from aqformat.layout import to_matrix
from aqformat.writer import ZSTD_LEVEL

from .allocate import bisect_multiplier, upgrade
from .options import AUTO, ConvertOptions
from .planning import ModelTensors, Plan
from .size_target import MAX_CODE_BITS, Budget

__all__ = ["NAME", "FORCIBLE", "STEPS_PER_OCTAVE", "DATA_FREE_EXPONENT", "Option", "AutoEncoder", "parse_codec_for",
           "forced_codec", "forced_names", "auto_budget", "section_bytes", "choose"]

NAME = AUTO
AQ, LATTICE, AFFINE, HALF, RAW = aq_codec.NAME, lattice_codec.NAME, affine_codec.NAME, half_codec.NAME, raw_codec.NAME
UNIFORM = uniform_codec.NAME
#: The codecs of one step per tensor on the step grid.
GRID = (UNIFORM, LATTICE)
#: Codecs ``--codec-for`` can force (``fp16`` is read as ``half``).
FORCIBLE = (AQ, UNIFORM, LATTICE, AFFINE, HALF, RAW)
#: Lattice steps tried: ``2 ** (k / STEPS_PER_OCTAVE)`` for integer ``k``, the same grid for every tensor.
STEPS_PER_OCTAVE = 4
#: Header bytes a lattice record takes beyond an AQ one (its seed, index dtype and step section).
LATTICE_RECORD_BYTES = 48
#: Metadata bytes reserved per chosen tensor for its entry in the ``conversion.choice`` record.
CHOICE_METADATA_BYTES = 128
#: Weights a lattice option is estimated from while choosing (the chosen ones are then measured whole).
LATTICE_SAMPLE = 1 << 16
#: Without calibration, each tensor's squared weight error is weighed by its mean energy to the power
#: ``-DATA_FREE_EXPONENT``: 0 is equal error per weight (one global lattice step, NNCodec's implicit
#: allocation), 1 equal relative error per tensor. Measured data-free at NNCodec's sizes
#: (bench/codec_choice_bench.py): EfficientNet-Lite0's top-1 agreement at 3.72 bits/weight is 0.27 at 0,
#: 0.445 at 0.25, 0.555 at 0.5 and 0.37 at 1, but at 0.5 silero-vad falls from 0.96 to 0.69 at 3.79
#: bits/weight (0.96 at 0.25); digits and MiniLM hardly move.
DATA_FREE_EXPONENT = 0.25
#: A grid step whose dithered-lattice error exceeds this share of the tensor's energy takes the
#: uniform codec instead. There most weights lie under half a step, and the dither's noise
#: (step**2 / 12 a weight) exceeds the error of rounding them to zero, at more bits: the digits CNN
#: at 1 bit/weight went from top-1 0.10 to 0.93. Where the lattice is finer, its error is
#: independent of the weights, and the model's output suffered less from it than from rounding's
#: smaller, weight-correlated error: silero-vad 16k at 3 and 4 bits/weight, mean |dp| 0.042 and
#: 0.026 with the lattice everywhere, 0.061 and 0.033 with the uniform codec everywhere.
NOISY_LATTICE = 0.25
_AFFINE_WIDTHS = range(2, 9)
_K_LIMIT = 48 * STEPS_PER_OCTAVE  # steps from 2**-48 to 2**48
#: Rounds of :func:`choose` on estimated lattice options before it measures every one it weighs
#: whole. That is slow: each measure codes the whole tensor, and the choice weighs some 20 steps a
#: tensor (EfficientNet-Lite0 calibrated at 4 bits: over 10 minutes). The rounds before it take
#: seconds; there the chosen options left estimated went 38, 5, 2, 1, 2, 1, 0 (4 rounds had left one).
ESTIMATED_ROUNDS = 8


@dataclass(frozen=True)
class Option:
    """One way of storing a tensor: its codec, setting (AQ group, lattice grid step ``k``, affine
    bits), bytes in the file (an AQ group's codebooks apart) and distortion."""

    codec: str
    setting: str | int
    nbytes: int
    error: float


def parse_codec_for(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``PATTERN:CODEC`` strings as ``((pattern, codec), ...)``; ``fp16`` is ``half``.

    Raises :class:`AqmInputError` for an item without a pattern or with an unknown codec.
    """
    out = []
    for item in items:
        pattern, _, codec = str(item).rpartition(":")
        codec = HALF if codec == "fp16" else codec
        if not pattern or codec not in FORCIBLE:
            raise AqmInputError(f"--codec-for {item!r}: give PATTERN:CODEC with CODEC one of "
                                f"{', '.join(FORCIBLE)} (or fp16)")
        out.append((pattern, codec))
    return tuple(out)


def forced_codec(name: str, codec_for: Sequence[tuple[str, str]]) -> str | None:
    """The codec the first matching ``(pattern, codec)`` forces on tensor ``name``, else None."""
    return next((c for p, c in codec_for if fnmatch.fnmatchcase(name, p)), None)


def forced_names(specs: Sequence[Any], compress: Sequence[str], opts: ConvertOptions) -> list[str]:
    """Float tensors outside ``compress`` that a ``--codec-for`` pattern matches (and no ``--keep``):
    they join the choice, in the codec forced on them."""
    chosen = set(compress)
    return [s.name for s in specs if s.name not in chosen and s.dtype in FLOAT_DTYPES and s.numel
            and forced_codec(s.name, opts.codec_for) is not None
            and not any(fnmatch.fnmatchcase(s.name, p) for p in opts.keep)]


def auto_budget(specs: Sequence[Any], compress: Sequence[str], opts: ConvertOptions, other_bytes: int,
                known: int, small: Any) -> Budget:
    """Bytes the ``compress`` tensors may take (sections, codebooks, extra record and choice
    metadata bytes) and the AQ code widths to train.

    ``--target-size``: the target less the header's upper estimate, ``other_bytes`` (the
    embedded graph), the other tensors and the small ones (``small``, an
    :class:`~aqformat.converters.affine.AffinePlan`). Otherwise ``--bits`` per weight of the
    compressed and affine-coded tensors, their every byte counted: their records in the header
    and the affine tensors' bytes come off. The file's own header (preamble, metadata, the raw
    tensors' records) is left out: it does not grow with the weights, and on a model of a few
    thousand weights it alone would exceed a rate of 4 bits. ``known`` is the header bytes known
    in advance. The bytes may be 0 or fewer: the choice then reports the budget out of reach.
    """
    from . import size_target
    names = set(compress)
    numel = sum(s.numel for s in specs if s.name in names)
    reserve = sum(CHOICE_METADATA_BYTES + len(n.encode("utf-8")) for n in names)
    if opts.target_size is not None:
        rest = sum(small.nbytes.get(s.name, s.nbytes) for s in specs if s.name not in names)
        header = size_target.header_bytes([s.name for s in specs], known, coded=len(names), small=len(small.coded),
                                          alignment=size_target.section_alignment(sum(s.nbytes for s in specs)))[1]
        nbytes = int(opts.target_size / size_target.SLACK) - header - other_bytes - rest - reserve
        rate = 8.0 * nbytes / max(numel, 1)
    else:
        side = [s for s in specs if s.name in small.coded]
        weights = numel + sum(s.numel for s in side)
        records = sum(size_target.AQ_TENSOR_BYTES + len(n.encode("utf-8")) for n in names)
        nbytes = int(opts.bits_per_weight * weights / 8) - records - sum(small.nbytes[s.name] for s in side) - reserve
        rate = float(opts.bits_per_weight)
    b, d = opts.encoder.code_width, opts.encoder.vector_dim
    M = int(round(min(max(rate, b / d), MAX_CODE_BITS) * d / b))
    return Budget(nbytes, [m for m in (M - 1, M, M + 1) if 1 <= m <= MAX_CODE_BITS * d // b])


def section_bytes(data: np.ndarray, entropy: bool = False) -> int:
    """Bytes the writer stores for a section holding ``data``, at most: the smallest of raw, zstd
    and (with ``entropy``, for a 2-D integer array) the ``rans`` stream
    (:meth:`aqformat.writer.Writer._section`). With ``entropy``, zstd (level 19, slow) is left
    out: the writer may find fewer bytes, never more."""
    import zstandard
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    best = raw.nbytes
    if raw.nbytes and not entropy:
        best = min(best, len(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False).compress(raw)))
    if entropy and data.size:
        r = len(rans.encode(data))
        if r < best and raw.nbytes <= max(1 << 20, r * rans.MAX_RATIO):
            best = r
    return best


def _step_bytes(step: np.float32, rows: int) -> int:
    """Stored bytes of a lattice tensor's step section: one float32 a row, all ``step`` here, which
    the writer zstd-codes (a few dozen bytes however many rows)."""
    return section_bytes(np.full(rows, step, dtype="<f4"))


def _matrix_error(E: np.ndarray, H: Any, s: Any) -> float:
    """``tr(E H E^T)`` of an error matrix ``E`` (rows of the matrix view), each row's term weighted
    by ``s`` (the squared error where ``H`` is None, in numpy)."""
    if H is None:
        rows = np.square(E, dtype=np.float64).sum(axis=1)
        return float(rows.sum() if s is None else np.dot(rows, np.asarray(s, np.float64)))
    import torch

    from .aq_encode import output_error
    return output_error(torch.tensor(E, dtype=torch.float32), 0.0, H, s)  # a copy: E may be read-only


@dataclass
class _Candidate:
    """A tensor in the choice: its weights (``m`` the matrix view), calibration, weight and
    measured options (``lattice`` by grid step, those in ``exact`` measured on every row)."""

    name: str
    w: np.ndarray
    axes: tuple[int, ...] | None
    seed: int
    forced: str | None
    H: Any = None
    s: Any = None
    sens: float = 1.0
    options: list[Option] = field(default_factory=list)
    lattice: dict[int, Option | None] = field(default_factory=dict)
    exact: set[int] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)
    k: int = 0
    exact_only: bool = False
    damp: float = 0.0
    _zero: float | None = field(default=None, repr=False)
    _feedback: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.m = np.asarray(to_matrix(self.w, self.axes), dtype=np.float32)

    def zero_error(self) -> float:
        """The distortion of decoding all zeros, the tensor's energy under the metric: the scale of its
        weighting and of the errors ``aqm-info`` shows; no option worse than that is worth its bytes."""
        if self._zero is None:
            self._zero = max(_matrix_error(self.m, self.H, self.s), 1e-30)
        return self._zero

    def distortion(self, decoded: np.ndarray) -> float:
        """Output error of ``decoded`` (logical shape; squared weight error without calibration)."""
        return _matrix_error(np.asarray(to_matrix(decoded, self.axes), np.float32) - self.m, self.H, self.s)

    @property
    def feedback(self) -> np.ndarray | None:
        """The grid codecs' calibration error feedback (:func:`~aqformat.converters.aq_encode.feedback_factor`
        of ``H``), None without calibration."""
        if self._feedback is None and self.H is not None:
            from .aq_encode import feedback_factor
            self._feedback = feedback_factor(self.H, self.damp)
        return self._feedback

    def allowed(self, codec: str) -> bool:
        return self.forced is None or self.forced == codec

    @property
    def on_grid(self) -> bool:
        """Whether the tensor may take a step on the grid (``lattice`` or ``uniform``)."""
        return self.forced is None or self.forced in GRID


def _lattice_at(c: _Candidate, k: int, exact: bool = False) -> Option | None:
    """The option of ``c`` on grid step ``k`` (memoised; None where it cannot be coded): measured
    (:func:`_exact_lattice`) when ``exact``, else estimated (:func:`_estimate_lattice`). The codec
    is the dithered lattice, or the uniform codec where the lattice's error exceeds
    :data:`NOISY_LATTICE` of the tensor's energy (or either where it is forced)."""
    exact = exact or c.exact_only
    if k in c.lattice and (k in c.exact or not exact):
        return c.lattice[k]
    if abs(k) > _K_LIMIT:
        c.lattice[k] = None
        return None
    step = np.float32(2.0 ** (k / STEPS_PER_OCTAVE))
    measure = _exact_lattice if exact else _estimate_lattice
    codec = UNIFORM if c.forced == UNIFORM else LATTICE
    try:
        opt = measure(c, k, step, codec)
        if c.forced is None and opt.error > NOISY_LATTICE * c.zero_error():
            opt = measure(c, k, step, UNIFORM)
    except AqmInputError as e:
        c.reasons[c.forced or LATTICE] = str(e)
        opt = None
    if opt is not None and opt.error >= c.zero_error():
        # A step so coarse that the dither's noise (step**2 / 12 a weight) outweighs the tensor: the
        # walk to coarser steps stops here, and a budget needing such steps is out of reach.
        opt = None
    c.lattice[k] = opt
    if exact:
        c.exact.add(k)
    return opt


def _estimate_lattice(c: _Candidate, k: int, step: np.float32, codec: str) -> Option:
    """The option of grid codec ``codec`` (``lattice`` or ``uniform``) at ``step`` estimated from
    up to :data:`LATTICE_SAMPLE` weights (evenly spaced rows) rounded (with calibration, with its
    error feedback, :func:`~aqformat.converters.lattice.feedback_indices`) and
    :func:`aqformat.rans.estimate_bits`, scaled to every row."""
    from aqformat.dither import dither

    from .lattice import feedback_indices
    rows, cols = c.m.shape
    pick = np.unique(np.linspace(0, rows - 1, max(1, min(rows, LATTICE_SAMPLE // cols)), dtype=np.int64))
    W = c.m[pick].astype(np.float64)
    u = dither(c.seed, W.size).reshape(W.shape) if codec == LATTICE else None
    x = W / float(step) + (u if u is not None else 0.0)
    if not np.isfinite(x).all() or np.abs(x).max(initial=0) > 2**31 - 2:
        raise AqmInputError(f"lattice step {float(step):g} too small for {c.name!r}: integers exceed int32"
                            if np.isfinite(x).all() else f"tensor {c.name!r} contains NaN or Inf weights")
    if c.feedback is None:
        q = np.rint(x)
    else:
        q = feedback_indices(W, np.full(len(pick), step), u, c.feedback)
    scale = rows / len(pick)
    s = None if c.s is None else np.asarray(c.s)[pick]
    nbytes = rans.estimate_bits(q) / 8 * scale + _step_bytes(step, rows) + LATTICE_RECORD_BYTES
    return Option(codec, k, int(math.ceil(nbytes)), _matrix_error((q - x) * float(step), c.H, s) * scale)


def _exact_lattice(c: _Candidate, k: int, step: np.float32, codec: str) -> Option:
    """The option of grid codec ``codec`` at ``step`` as the encoder will write it: its bytes (rans
    or raw indices, steps, record) and the error of the decoded weights."""
    from .lattice import RDOQ_LAMBDA, encode_lattice
    seed = c.seed if codec == LATTICE else None
    q, steps = encode_lattice(c.m, step, seed, None, c.name, rdoq=RDOQ_LAMBDA, feedback=c.feedback)
    fields = lattice_codec.index_fields(c.name, c.m.shape, q, steps)
    rows, cols = c.m.shape
    dec = lattice_codec.decode_lattice(fields["data"], steps, seed, c.m.shape, None, rows, cols)
    nbytes = section_bytes(fields["data"], entropy=True) + _step_bytes(step, rows) + LATTICE_RECORD_BYTES
    return Option(codec, k, nbytes, _matrix_error(dec - c.m, c.H, c.s))


def _best_lattice(c: _Candidate, lam: float) -> Option | None:
    """The lattice option of least ``sens * D + lam * bytes``: a walk on the step grid from the
    last best step, measuring as it goes."""
    def cost(o: Option | None) -> float:
        return math.inf if o is None else c.sens * o.error + lam * o.nbytes
    best = cost(_lattice_at(c, c.k))
    for direction in (1, -1):
        while abs(c.k + direction) <= _K_LIMIT:
            trial = cost(_lattice_at(c, c.k + direction))
            if not trial < best:
                break
            c.k, best = c.k + direction, trial
    return c.lattice[c.k]


def _fixed_options(c: _Candidate, raw_bytes: int) -> None:
    """Measure ``c``'s affine, half and raw options (AQ's come from the trained groups)."""
    from .affine import RECORD_BYTES as AFFINE_RECORD, encode_affine
    from .half import RECORD_BYTES as HALF_RECORD, encode_half
    if c.allowed(AFFINE):
        for bits in _AFFINE_WIDTHS:
            t = encode_affine(c.w, bits, c.axes)
            if t is None:
                c.reasons[AFFINE] = "its values do not fit float16 scales"
                break
            c.options.append(Option(AFFINE, bits, t.stored_bytes() + AFFINE_RECORD, c.distortion(t.decoded)))
    if c.allowed(HALF):
        h = encode_half(c.w)
        if h is None:
            c.reasons[HALF] = "values beyond float16's range"
        else:
            c.options.append(Option(HALF, "float16", h.stored_bytes() + HALF_RECORD, c.distortion(h.decoded)))
    if c.allowed(RAW):
        c.options.append(Option(RAW, "", raw_bytes, 0.0))


def choose_at(cands: Sequence[_Candidate], lam: float, books: Mapping[str, float]) -> dict[str, Option]:
    """Each candidate's option of least ``sens * D + lam * bytes``, an AQ option charged its share
    ``books[group]`` of the group's codebooks."""
    out = {}
    for c in cands:
        opts = list(c.options)
        if c.on_grid:
            best = _best_lattice(c, lam)
            opts += [best] if best is not None else []
        out[c.name] = min(opts, key=lambda o: c.sens * o.error + lam * (o.nbytes + books.get(o.setting, 0.0)),
                          default=None)
    return out


def total_bytes(choice: Mapping[str, Option], group_bytes: Mapping[str, int]) -> int:
    """Bytes of a choice: each option's, and each used AQ group's codebooks once."""
    used = {o.setting for o in choice.values() if o.codec == AQ}
    return sum(o.nbytes for o in choice.values()) + sum(group_bytes[g] for g in used)


def choose(cands: Sequence[_Candidate], budget: int, group_bytes: Mapping[str, int],
           shares: Mapping[str, float], lam0: float) -> tuple[dict[str, Option], float]:
    """The choice of least distortion whose :func:`total_bytes` fit ``budget``, and its ``lam``
    (:func:`_bisect`, then :func:`_fill`), its lattice options measured on every row: the estimated
    ones chosen are measured whole and the choice made again, until none is left; after
    :data:`ESTIMATED_ROUNDS` rounds the estimates are dropped and every lattice option is measured
    whole.
    """
    for round_ in range(ESTIMATED_ROUNDS + 2):
        if round_ == ESTIMATED_ROUNDS:
            for c in cands:
                c.lattice, c.exact_only = {k: c.lattice[k] for k in c.exact}, True
        choice, lam0 = _bisect(cands, budget, group_bytes, shares, lam0)
        _fill(cands, choice, budget, group_bytes)
        stale = [(c, int(choice[c.name].setting)) for c in cands
                 if choice[c.name].codec in GRID and int(choice[c.name].setting) not in c.exact]
        if not stale:
            break
        for c, k in stale:
            _lattice_at(c, k, exact=True)
    return choice, lam0


def _nearby(c: _Candidate) -> list[Option]:
    """``c``'s options the filling pass weighs: its measured ones and the lattice grid steps
    around its last best."""
    lattice = [_lattice_at(c, k) for k in range(c.k - 8, c.k + 9)] if c.on_grid else []
    return [*c.options, *(o for o in lattice if o is not None)]


def _fill(cands: Sequence[_Candidate], choice: dict[str, Option], budget: int,
          group_bytes: Mapping[str, int]) -> None:
    """Spend what the Lagrangian choice left of ``budget`` (its choices lie on the convex hull of
    each tensor's options, which may stop far below the budget): change, one at a time, the
    option of most distortion saved per extra byte that still fits, a new AQ group paying its
    codebooks."""
    used = {o.setting for o in choice.values() if o.codec == AQ}
    by_name = {c.name: c for c in cands}

    def extra(name: str, o: Option) -> int:
        new_group = o.codec == AQ and o.setting not in used
        return o.nbytes - choice[name].nbytes + (group_bytes[o.setting] if new_group else 0)

    def take(name: str, o: Option, _: int) -> None:
        choice[name] = o
        used.update([o.setting] if o.codec == AQ else [])
    upgrade(list(by_name), lambda name: _nearby(by_name[name]),
            lambda name, o: by_name[name].sens * (choice[name].error - o.error), extra,
            budget - total_bytes(choice, group_bytes), take)


def _bisect(cands: Sequence[_Candidate], budget: int, group_bytes: Mapping[str, int],
            shares: Mapping[str, float], lam0: float) -> tuple[dict[str, Option], float]:
    """The choice of least distortion whose :func:`total_bytes` fit ``budget``, and its ``lam``
    (:func:`~aqformat.converters.allocate.bisect_multiplier` from ``lam0``).

    Raises :class:`AqmInputError` when the smallest choice does not fit.
    """
    def fits(lam: float) -> tuple[bool, dict[str, Option]]:
        c = choose_at(cands, lam, shares)
        return total_bytes(c, group_bytes) <= budget, c
    lam, choice = bisect_multiplier(fits, lam0)
    if lam is None:
        raise _out_of_reach(budget, total_bytes(choice, group_bytes))
    return choice, lam


def _out_of_reach(budget: int, smallest: int) -> AqmInputError:
    return AqmInputError(f"the budget of {max(budget, 0):,} bytes for the compressed tensors is out of reach: "
                         f"the smallest coding takes {smallest:,} bytes; give a larger --bits or --target-size")


def _check_reach(cands: Sequence[_Candidate], budget: int, aq_bits: float) -> None:
    """Refuse, before any codebook is trained, a budget below what the tensors take at their
    cheapest: each one's coarsest useful lattice step or narrowest affine coding, or its codes at
    ``aq_bits`` per weight (the narrowest AQ width, codebooks not counted), whichever is less."""
    walked = {c.name: c.k for c in cands}
    cheapest = choose_at(cands, 1e30, {})
    for c in cands:
        c.k = walked[c.name]  # the choice walks from where the candidate started, as without this check
    floor = 0.0
    for c in cands:
        if c.forced is not None:
            continue  # a forced codec that cannot code its tensor: _check_forced says why
        o = cheapest[c.name]
        least = o.nbytes if o is not None else math.inf
        if c.allowed(AQ):
            least = min(least, c.w.size * aq_bits / 8)
        floor += least if least < math.inf else 0.0
    if floor > max(budget, 0):  # a budget of 0 or less with nothing to code: the choice is empty
        raise _out_of_reach(budget, math.ceil(floor))


def _candidates(tensors: ModelTensors, names: Sequence[str], opts: ConvertOptions,
                rate: float) -> list[_Candidate]:
    """The tensors of the choice with their affine, half and raw options measured, each starting on
    the lattice grid step of about ``rate`` bits per weight."""
    from .lattice import lattice_step, tensor_seed
    out = []
    for n in names:
        spec, axes = tensors.spec(n), tensors.axes.get(n)
        c = _Candidate(n, tensors.load(n), axes, tensor_seed(opts.seed, n), forced_codec(n, opts.codec_for),
                       tensors.H.get(n), tensors.S.get(n), damp=opts.encoder.damp)
        step = float(np.median(lattice_step(c.m.astype(np.float64), max(rate, 0.5))))
        c.k = int(round(STEPS_PER_OCTAVE * math.log2(max(step, 2.0 ** -40))))
        _fixed_options(c, spec.nbytes)
        out.append(c)
    return out


def _aq_options(cands: Sequence[_Candidate], tensors: ModelTensors, opts: ConvertOptions, widths: Sequence[int],
                executor: Any) -> tuple[Plan, dict[str, float]]:
    """Train the AQ groups the candidates may join (``widths``: codebooks per vector) and add each
    candidate's AQ options (error predicted from a few rows); the groups and each group's codebook
    bytes per candidate member."""
    import torch

    from . import planning
    names = [c.name for c in cands if c.allowed(AQ)]
    configs, members = planning._candidates(tensors, names, opts, list(widths))
    books = planning._sample_and_train(configs, members, tensors, opts, executor) if members else {}
    gen = torch.Generator().manual_seed(opts.seed)
    count: dict[str, int] = {}
    for c in cands:
        if c.name not in members:
            cfg = opts.encoder.config(min(widths) * opts.encoder.code_width / opts.encoder.vector_dim)
            c.reasons[AQ] = (f"AQ needs at least {cfg.K} vectors of {cfg.d} weights "
                               f"({cfg.M}x{cfg.b}-bit codes); the tensor has {c.w.size} weights")
            continue
        errors, nbytes, _ = planning._trial(c.name, members[c.name], configs, books, tensors, gen)
        for g in members[c.name]:
            c.options.append(Option(AQ, g, nbytes[g], errors[g]))
            count[g] = count.get(g, 0) + 1
    shares = {g: configs[g].codebook_bytes() / k for g, k in count.items()}
    return Plan(configs, {}, books), shares


def _weigh(cands: Sequence[_Candidate]) -> float:
    """Set each candidate's sensitivity and return a starting ``lam``.

    Without calibration a tensor's squared error is weighed by ``(typical / e) **
    DATA_FREE_EXPONENT``, ``e`` its mean squared weight and ``typical`` the median of them. With
    it, tensors with an output sensitivity count as measured; the others relative to their
    energy, scaled by the median energy of the first (as ``--allocate``). The start is the slope of the lattice at
    each tensor's starting step, ``lam = 8 ln2 f step**2 / 6`` with ``f`` a weight's error
    factor, the median over tensors.
    """
    measured = [c.zero_error() for c in cands if c.s is not None]
    ref = float(np.median(measured)) if measured else None
    slopes = []
    mean_energy = {c.name: c.zero_error() / c.m.size for c in cands}
    typical = float(np.median(list(mean_energy.values()))) if cands else 1.0
    for c in cands:
        if ref is not None and c.s is None:
            c.sens = ref / c.zero_error()
        elif ref is None and c.H is None:
            c.sens = (typical / mean_energy[c.name]) ** DATA_FREE_EXPONENT
        cols = c.m.shape[1]
        f = c.sens * (float(np.trace(np.asarray(c.H, np.float64))) / cols if c.H is not None else 1.0) \
            * (float(np.mean(np.asarray(c.s, np.float64))) if c.s is not None else 1.0)
        slopes.append(8 * math.log(2) * f * 2.0 ** (2 * c.k / STEPS_PER_OCTAVE) / 6)
    return float(np.median(slopes)) if slopes else 1.0


def _check_forced(cands: Sequence[_Candidate], lam: float) -> None:
    """Raise :class:`AqmInputError` for a tensor its forced codec cannot code, naming it and why."""
    for c in cands:
        if c.options or (c.on_grid and _best_lattice(c, lam) is not None):
            continue
        why = c.reasons.get(c.forced or "", "it cannot be coded")
        raise AqmInputError(f"--codec-for: tensor {c.name!r} cannot be coded by {c.forced}: {why}")


def _report(cands: Sequence[_Candidate], choice: Mapping[str, Option], lam: float,
            shares: Mapping[str, float]) -> dict[str, list[Any]]:
    """Why each tensor got its codec: ``name -> [codec, setting, bytes, error, {other codec: [bytes,
    error]}]`` (a lattice setting is its step), errors relative to the tensor's energy
    (calibration-weighted where it was), the others each codec's option of least cost at the
    final ``lam``."""
    out: dict[str, list[Any]] = {}
    for c in cands:
        best: dict[str, Option] = {}
        lattice = [c.lattice[c.k]] if c.lattice.get(c.k) is not None else []
        for o in [*c.options, *lattice]:
            cost = c.sens * o.error + lam * (o.nbytes + shares.get(o.setting, 0.0))
            if o.codec not in best or cost < c.sens * best[o.codec].error + lam * (
                    best[o.codec].nbytes + shares.get(best[o.codec].setting, 0.0)):
                best[o.codec] = o
        o = choice[c.name]
        setting = f"step {2.0 ** (int(o.setting) / STEPS_PER_OCTAVE):.4g}" if o.codec in GRID else o.setting
        out[c.name] = [o.codec, setting, o.nbytes, float(f"{o.error / c.zero_error():.3g}"),
                       {k: [v.nbytes, float(f"{v.error / c.zero_error():.3g}")] for k, v in best.items() if k != o.codec}]
    return out


@dataclass
class _Stored:
    """A tensor coded by the affine or half codec, with its name and shape for the writer."""

    name: str
    shape: tuple[int, ...]
    coded: Any


def _code_other(w: np.ndarray, name: str, codec: str, setting: Any, axes: Any) -> tuple[_Stored, float]:
    """Code ``w`` by the affine (``setting`` bits) or half codec and measure its SQNR: one task."""
    from .affine import encode_affine
    from .half import encode_half
    from .pipeline import sqnr_db
    coded = encode_affine(w, int(setting), axes) if codec == AFFINE else encode_half(w)
    if coded is None:  # measured codable while choosing: the same values code the same way
        raise AqmInputError(f"tensor {name!r} can no longer be coded by {codec}")
    return _Stored(name, tuple(int(v) for v in w.shape), coded), sqnr_db(w, coded.decoded)


class AutoEncoder:
    """The encoder of ``--codec auto`` (:class:`~aqformat.converters.encoders.TensorEncoder`): each
    tensor gets the codec and setting of least distortion per byte (see the module docstring);
    AQ tensors are coded as :class:`~aqformat.converters.aq_encode.AQEncoder` codes them, lattice
    ones at their chosen step, affine and half ones by their codec, raw ones stay as stored."""

    codec = NAME
    calibrated = True

    def __init__(self, opts: ConvertOptions) -> None:
        from .aq_encode import AQEncoder
        from .lattice import LatticeEncoder
        self.opts = opts
        self._aq, self._lattice = AQEncoder(opts), LatticeEncoder(opts)
        self.choice: dict[str, Option] = {}
        self.report: dict[str, list[Any]] = {}
        self.lam = 0.0

    def train(self, tensors: ModelTensors, names: list[str], executor: Any = None) -> None:
        budget = tensors.budget or auto_budget(tensors.specs, names, self.opts, 0, 0, tensors.small)
        weights = sum(tensors.spec(n).numel for n in names)
        cands = _candidates(tensors, names, self.opts, 8.0 * budget.bytes / max(weights, 1))
        _check_reach(cands, budget.bytes, min(budget.widths) * self.opts.encoder.code_width
                     / self.opts.encoder.vector_dim)
        plan, shares = _aq_options(cands, tensors, self.opts, budget.widths, executor)
        lam0 = _weigh(cands)
        _check_forced(cands, lam0)
        self._aq.tensors = tensors
        self._lattice.axes = tensors.axes
        self._options = (cands, plan, shares)
        self._by_name = {c.name: c for c in cands}
        self._budget = budget.bytes
        self._settle(lam0)

    def _settle(self, lam0: float) -> None:
        """Choose within ``self._budget`` from the options :meth:`train` measured, from ``lam0``."""
        cands, plan, shares = self._options
        group_bytes = {g: cfg.codebook_bytes() for g, cfg in plan.configs.items()}
        self.choice, self.lam = choose(cands, self._budget, group_bytes, shares, lam0) if cands else ({}, 0.0)
        self.report = _report(cands, self.choice, self.lam, shares)
        group_of = {n: str(o.setting) for n, o in self.choice.items() if o.codec == AQ}
        used = set(group_of.values())
        self._aq.plan = Plan({g: c for g, c in plan.configs.items() if g in used}, group_of,
                             {g: b for g, b in plan.books.items() if g in used})

    def refill(self, extra: int) -> bool:
        """Choose again with ``extra`` bytes more than the budget :meth:`train` had; whether the
        choice changed. A ``--target-size`` budget subtracts the header's upper estimate: on a
        small model that margin is several percent of the file, which lands short of its target
        (the digits CNN fixture at 12 kB landed at 0.915 of it); the file written is then measured
        and the shortfall spent."""
        before = dict(self.choice)
        self._budget += extra
        self._settle(self.lam)
        return self.choice != before

    @property
    def coded(self) -> list[str]:
        return [n for n, o in self.choice.items() if o.codec != RAW]

    @property
    def groups(self) -> dict[str, list[str]]:
        return self._aq.groups

    def compute_codes(self, name: str, w: np.ndarray) -> Any:
        return self.join(name, [fn(*args) for fn, args in self.tasks(name, w, lambda obj: obj)])[0]

    def tasks(self, name: str, w: np.ndarray, share: Any) -> list[tuple[Any, tuple[Any, ...]]]:
        from . import lattice
        o = self.choice[name]
        if o.codec == AQ:
            return self._aq.tasks(name, w, share)
        if o.codec in GRID:
            step = np.float32(2.0 ** (int(o.setting) / STEPS_PER_OCTAVE))
            seed = self._lattice.tensor_seed(name) if o.codec == LATTICE else None
            fb = self._by_name[name].feedback
            return [(lattice._code_and_measure, (w, name, step, seed, self._lattice.axes.get(name),
                                                 None if fb is None else share(fb)))]
        return [(_code_other, (w, name, o.codec, o.setting, self._lattice.axes.get(name)))]

    def join(self, name: str, results: list[Any]) -> tuple[Any, float]:
        return self._aq.join(name, results) if self.choice[name].codec == AQ else results[0]

    def decode(self, encoded: Any) -> np.ndarray:
        if isinstance(encoded, _Stored):
            return encoded.coded.decoded
        codec = self.choice[encoded.name].codec
        return (self._aq if codec == AQ else self._lattice).decode(encoded)

    def write_shared(self, writer: Any) -> None:
        self._aq.write_shared(writer)

    def write(self, writer: Any, encoded: Any, dtype: str) -> None:
        if isinstance(encoded, _Stored):
            encoded.coded.write(writer, encoded.name, encoded.shape, dtype)
        elif self.choice[encoded.name].codec == AQ:
            self._aq.write(writer, encoded, dtype)
        else:
            self._lattice.write(writer, encoded, dtype)

    def metadata(self) -> dict[str, Any]:
        o = self.opts
        aq = self._aq.metadata() if self._aq.plan.group_of else {}
        return {"codec": self.codec, "bits": o.bits_per_weight, "target_size": o.target_size,
                "codec_for": [f"{p}:{c}" for p, c in o.codec_for], "lambda": float(f"{self.lam:.4g}"),
                "lattice_steps_per_octave": STEPS_PER_OCTAVE, "calibrated": bool(self._aq.tensors.H),
                "seed": o.seed, "min_elements": o.min_elements, "keep": list(o.keep),
                **{k: aq[k] for k in ("groups", "codebooks", "beam", "iters", "reservoir") if k in aq},
                "choice": self.report}
