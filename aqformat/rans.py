"""Section encodings ``rans`` (spec/FORMAT.md 4.5, since format 1.2) and ``rans-context`` (1.5):
entropy-coded integer matrices.

A section of little-endian signed integers (lattice indices) viewed as
``[rows, cols]`` is coded with interleaved rANS (Duda's asymmetric numeral
systems, 32-bit states, 16-bit renormalisation, probabilities in 1/4096).
Each row selects one of up to 16 frequency tables stored in the stream, so
rows of different spread (a global step, channels of different gain) each
get a model fitted to them; the encoder clusters rows by code length.
Values beyond a direct range ``|v| <= 2**e - 1`` are coded as an escape
token for their bit length plus that many raw bits, so tables stay small
whatever the index range.

Encoding ``rans-context`` (format 1.5) selects the table of each symbol by
its context instead: the sum of the magnitudes of the two tokens before it in
its row, as DeepCABAC's neighbour contexts do (weights of similar size cluster
along a row: on silero-vad at 3.7 bits/weight this is 0.19 bits a weight
below the order-0 entropy, bench/entropy_bench.py --gap-only). Its lanes hold
runs of consecutive symbols, so a symbol's context is decoded before it.

Symbols are dealt to ``lanes`` independent rANS states (symbol ``i`` to lane
``i mod lanes``; ``rans-context``: to lane ``i // ceil(n / lanes)``), which
share one word stream: a decoder advances every lane one symbol per step,
so numpy decodes a step for all lanes at once (a Python loop over about
2048 steps per tensor, never one per symbol) and
the compiled kernel (numba, ``aqformat[fast]``) runs the same integer
arithmetic per symbol; both give identical bytes.
Decoding uses integers only: no floating point, so every platform agrees.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bitpack import pack, packed_size, unpack
from .errors import AqmFormatError

__all__ = ["Model", "plan", "encode", "decode", "compiled", "work_bound", "code_lengths", "model_bits", "estimate_bits",
           "MAX_RATIO", "ENCODINGS"]

PRECISION = 12
TOTAL = 1 << PRECISION           # frequencies of a table sum to this
LOW = 1 << 16                    # states live in [LOW, 2**32)
MAX_TABLES = 16
MAX_EXP = 14                     # direct range |v| <= 2**e - 1, e <= MAX_EXP
SYMBOLS_PER_LANE = 2048          # lanes = ceil(n / 2048): 32 state bits per 2048 symbols
MAX_STEPS = 4096                 # the format's bound on symbols per lane: numpy decodes in <= 4096 steps
# The cheapest symbol costs -log2(4095/4096) bits (no frequency may be 4096), so a byte of
# stream (or of lane state) decodes to at most ~23,000 symbols of up to 4 bytes: a section
# claiming more per stored byte is a bomb.
MAX_RATIO = 1 << 17
WIDTHS = (1, 2, 4)
_HEAD = struct.Struct("<BBBBIIII")  # width, e, tables, mode, cols, lanes, words, extra bytes
#: Section encodings of this module by the mode byte their streams carry: tables chosen per row
#: (format 1.2), or per symbol by the context of the two tokens before it in its row (1.5).
ENCODINGS = {"rans": 0, "rans-context": 1}
#: Table counts the encoder tries for ``rans-context`` (the context is capped at the count less one).
CONTEXT_TABLES = (3, 4, 6, 8)
_TABLE = struct.Struct("<hH")       # lowest token, token count; then LEB128 frequencies
_LUT_BYTES = MAX_TABLES * TOTAL * 12


def work_bound(size: int) -> int:
    """Bytes decoding a ``rans`` section of ``size`` decoded bytes allocates at most besides its
    input and output: per symbol a token, a table offset and decoded values (at most 16 bytes),
    plus the tables' lookup arrays."""
    return 16 * size + _LUT_BYTES


# -- tokens ----------------------------------------------------------------------------------------
def _bit_length(a: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53 (frexp is exact there)."""
    return np.frexp(a.astype(np.float64))[1].astype(np.int64)


def _tokens(v: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(token, extra bit count, extra bits)`` of each value: ``v`` itself within the direct range
    ``|v| <= 2**e - 1``, else ``sign(v) * (2**e - 1 + k - e)`` for ``k`` the bit length of ``|v|``,
    followed by the ``k - 1`` bits of ``|v|`` below its leading one."""
    E = (1 << e) - 1
    a = np.abs(v.astype(np.int64))
    big = a > E
    k = np.where(big, _bit_length(a), 0)
    tok = np.where(big, np.sign(v) * (E + k - e), v).astype(np.int32)
    nb = np.where(big, k - 1, 0)
    extra = np.where(big, a - (np.int64(1) << np.maximum(nb, 0)), 0)
    return tok, nb, extra


# -- models ----------------------------------------------------------------------------------------
@dataclass
class Model:
    """How one matrix is coded: the direct-range exponent, the tables and each row's table."""

    e: int
    lo: list[int]              # lowest token of each table
    freqs: list[np.ndarray]    # each table's frequencies (sum TOTAL), token lo + j at j
    row_table: np.ndarray      # [rows] table index per row (all 0 with contexts)
    contexts: bool = False     # tables by neighbour context (encoding rans-context)

    @property
    def encoding(self) -> str:
        return "rans-context" if self.contexts else "rans"


def _lane_count(n: int) -> int:
    return max(1, -(-n // SYMBOLS_PER_LANE))


def _context(tok: np.ndarray, cols: int, n_tables: int) -> np.ndarray:
    """Table of each token of ``tok`` (flat, C order) under ``rans-context``: the magnitudes of the two
    tokens before it in its row and its lane's run, summed and capped at ``n_tables - 1``."""
    a = np.minimum(np.abs(tok.astype(np.int64)), n_tables)
    run = -(-a.size // _lane_count(a.size))
    i = np.arange(a.size)
    inside = np.minimum(i % cols, i % run)  # tokens before it in both its row and its run
    ctx = np.zeros_like(a)
    ctx[1:] += np.where(inside[1:] >= 1, a[:-1], 0)
    ctx[2:] += np.where(inside[2:] >= 2, a[:-2], 0)
    return np.minimum(ctx, n_tables - 1)


def _step(n: int, lanes: int, contexts: bool, t: int) -> np.ndarray | slice:
    """Positions of the symbols decoded at step ``t``, lane by lane: ``t * lanes`` onwards (one
    symbol of each lane in turn), or with contexts the ``t``-th of each lane's run."""
    if not contexts:
        return slice(t * lanes, min(n, (t + 1) * lanes))
    run = -(-n // lanes)
    return np.arange(min(lanes, -(-(n - t) // run))) * run + t


def _table_bytes(freqs: list[np.ndarray]) -> int:
    """Stored bytes of tables with these frequencies (LEB128: one byte below 128, else two)."""
    return sum(_TABLE.size + f.size + int(np.count_nonzero(f >= 128)) for f in freqs)


def _normalise(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to TOTAL, at least 1 where a count is (at least two counts are non-zero)."""
    f = np.where(counts > 0, np.maximum(1, np.floor(counts * TOTAL / counts.sum())), 0).astype(np.int64)
    diff = TOTAL - int(f.sum())
    # Hand out (or take back) the difference where it changes the code length least.
    while diff:
        with np.errstate(divide="ignore", invalid="ignore"):  # absent tokens are masked out
            gain = np.where(counts > 0, counts * np.log2((f + 1) / np.maximum(f, 1)), -1)
            loss = np.where(f > 1, counts * np.log2(f / np.maximum(f - 1, 1)), np.inf)
        if diff > 0:
            j = int(np.argmax(gain))
            step = min(diff, max(1, int(f[j] // 64)))
        else:
            j = int(np.argmin(loss))
            step = -min(-diff, max(1, int((f[j] - 1) // 64)))
        f[j] += step
        diff -= step
    return f


def _table(hist: np.ndarray, base: int, bound: int) -> tuple[int, np.ndarray]:
    """``(lo, freqs)`` of a table for token histogram ``hist`` (token ``base + j`` at ``j``); tokens
    lie in ``[-bound, bound]``."""
    nz = np.flatnonzero(hist)
    lo = base + int(nz[0])
    counts = hist[nz[0]:nz[-1] + 1].astype(np.float64)
    if counts.size == 1:  # no token may have all of TOTAL: a neighbour gets frequency 1
        tiny = counts[0] / TOTAL
        counts = np.array([counts[0], tiny]) if lo < bound else np.array([tiny, counts[0]])
        lo = lo if lo < bound else lo - 1
    return lo, _normalise(counts)


def _code_lengths(hist: np.ndarray, tables: list[tuple[int, np.ndarray]], base: int) -> np.ndarray:
    """Bits each row of ``hist`` ([rows, tokens]) costs under each table ([rows, tables]); rows
    holding a token a table lacks cost infinity there."""
    out = np.empty((hist.shape[0], len(tables)))
    for c, (lo, f) in enumerate(tables):
        cost = np.full(hist.shape[1], np.inf)
        j = np.arange(f.size) + lo - base
        ok = (j >= 0) & (j < hist.shape[1]) & (f > 0)
        cost[j[ok]] = PRECISION - np.log2(f[ok])
        with np.errstate(invalid="ignore"):
            out[:, c] = np.where(hist > 0, hist * cost, 0).sum(axis=1)
    return out


def _fit(hist: np.ndarray, base: int, bound: int, n_tables: int) -> tuple[list[tuple[int, np.ndarray]], np.ndarray, float]:
    """Tables and row assignment for up to ``n_tables`` classes (rows split by spread, then refined
    by code length, as k-means), and the estimated bits of tables, row classes and tokens."""
    rows = hist.shape[0]
    spread = (hist * np.abs(np.arange(hist.shape[1]) + base)).sum(axis=1) / np.maximum(hist.sum(axis=1), 1)
    assign = np.zeros(rows, np.int64)
    assign[np.argsort(spread, kind="stable")] = np.arange(rows) * n_tables // rows
    for it in range(5):
        used = np.unique(assign)
        assign = np.searchsorted(used, assign)
        tables = [_table(hist[assign == c].sum(axis=0), base, bound) for c in range(used.size)]
        lengths = _code_lengths(hist, tables, base)
        new = np.argmin(lengths, axis=1)
        if it == 4 or np.array_equal(new, assign):
            break
        assign = new
    bits = float(lengths[np.arange(rows), assign].sum())
    return tables, assign, bits + 8 * _table_bytes([f for _, f in tables]) + rows * _class_bits(len(tables))


def _class_bits(n_tables: int) -> int:
    return (n_tables - 1).bit_length()


def _typical_exp(a: np.ndarray) -> int:
    """Bit length of the 99.9th percentile of ``|v|``: a direct range around it keeps escapes rare."""
    return int(np.quantile(a, 0.999)).bit_length() if a.size else 0


def _stream_overhead_bits(n: int) -> int:
    """Bits of a stream besides its tables, row classes, symbols and escapes: header and lane states."""
    return 8 * _HEAD.size + 32 * _lane_count(n)


def plan(values: np.ndarray, max_tables: int = MAX_TABLES, contexts: bool = True) -> Model:
    """Choose the direct range and up to ``max_tables`` tables for ``values`` ([rows, cols] integers)
    by estimated code length (tables, row classes, symbols and escape bits included): per row, or
    (``contexts``) per neighbour context where that is shorter."""
    v = np.asarray(values).astype(np.int64)
    rows, cols = v.shape
    a = np.abs(v)
    p = _typical_exp(a)
    best: tuple[float, Model] | None = None
    for e in sorted({min(MAX_EXP, max(0, p + d)) for d in (-1, 0, 1)} | {0, min(p, 4)}):
        tok, nb, _ = _tokens(v, e)
        base, width = int(tok.min()), int(tok.max()) - int(tok.min()) + 1
        bound = (1 << e) - 1 + 32 - e
        if rows * width > 1 << 25:  # too wide for per-row histograms: one table
            hist = np.bincount((tok - base).reshape(-1), minlength=width)[None, :]
            options = [1]
        else:
            hist = np.bincount((np.arange(rows)[:, None] * width + tok - base).reshape(-1),
                               minlength=rows * width).reshape(rows, width)
            options = [t for t in (1, 2, 4, 8, 16) if t <= min(max_tables, rows)]
        previous = np.inf
        for t in options:
            tables, assign, bits = _fit(hist, base, bound, t)
            total = bits + float(nb.sum())
            if best is None or total < best[0]:
                row_table = assign if assign.size == rows else np.zeros(rows, np.int64)
                best = total, Model(e, [lo for lo, _ in tables], [f for _, f in tables], row_table)
            if total >= previous:
                break
            previous = total
        if contexts:
            for t in CONTEXT_TABLES:
                tables, bits = _fit_contexts(tok, cols, base, bound, t)
                if bits + float(nb.sum()) < best[0]:
                    best = bits + float(nb.sum()), Model(e, [lo for lo, _ in tables], [f for _, f in tables],
                                                         np.zeros(rows, np.int64), True)
    assert best is not None
    return best[1]


def _fit_contexts(tok: np.ndarray, cols: int, base: int, bound: int,
                  n_tables: int) -> tuple[list[tuple[int, np.ndarray]], float]:
    """Tables of ``rans-context`` with ``n_tables`` contexts for tokens ``tok`` ([rows, cols]) and
    their estimated bits (tables and tokens)."""
    hist = _context_histograms(tok, cols, base, n_tables)
    width = hist.shape[1]
    empty = hist.sum(axis=1) == 0
    hist[empty, -base if 0 <= -base < width else 0] = 1  # an unused context still stores a table
    tables = [_table(h, base, bound) for h in hist]
    lengths = _code_lengths(hist, tables, base)
    return tables, float(np.trace(lengths)) + 8 * _table_bytes([f for _, f in tables])


def _context_histograms(tok: np.ndarray, cols: int, base: int, n_tables: int) -> np.ndarray:
    """``[n_tables, tokens]`` counts of tokens ``tok`` ([rows, cols], none below ``base``) by context."""
    flat = tok.reshape(-1).astype(np.int64)
    width = int(flat.max()) - base + 1
    ctx = _context(flat, cols, n_tables)
    return np.bincount(ctx * width + flat - base, minlength=n_tables * width).reshape(n_tables, width)


def estimate_bits(values: np.ndarray, max_tables: int = MAX_TABLES) -> float:
    """Bits of :func:`encode`'s stream for ``values`` ([rows, cols] integers), estimated fast.

    For the direct ranges :func:`plan` weighs most (none, the typical one and
    at most 4 bits), the rows are split by spread into 1, 2, 4, 8 or 16 equal
    classes, each at the empirical entropy of its tokens, plus escape bits,
    the stored tables (:func:`_table_bytes` of each class's frequencies over
    its token range), row classes, header and lane states; and the tokens
    by neighbour context (``rans-context``); the cheapest of these is the
    estimate. It skips
    :func:`plan`'s refinement of the classes, so it errs high by a little,
    at a small part of its cost: it is what a rate search calls many times.
    """
    v = np.asarray(values).astype(np.int64)
    if v.size == 0:
        return 0.0
    p = min(MAX_EXP, _typical_exp(np.abs(v)))
    order = np.argsort(np.abs(v).sum(axis=1), kind="stable")
    es = sorted({0, min(p, 4), p})
    rows = min(_class_bits_estimate(v, e, order, max_tables) for e in es)
    return min(rows, min(_context_bits_estimate(v, e) for e in es)) + _stream_overhead_bits(v.size)


def _context_bits_estimate(v: np.ndarray, e: int) -> float:
    """Bits of ``rans-context`` tables, tokens and escapes at direct range ``e``, at the empirical
    entropy of each context's tokens, for the table count of :data:`CONTEXT_TABLES` in the middle."""
    tok, nb, _ = _tokens(v, e)
    hist = _context_histograms(tok, v.shape[1], int(tok.min()), CONTEXT_TABLES[len(CONTEXT_TABLES) // 2])
    bits = 0.0
    for h in hist:
        nz = np.flatnonzero(h)
        span = nz[-1] - nz[0] + 1 if nz.size else 2
        bits += 8 * (_TABLE.size + span)  # a table spans its lowest to highest token
        if nz.size:
            c = h[nz].astype(np.float64)
            bits += float(-(c * np.log2(c / c.sum())).sum())
    return bits + float(nb.sum())


def _class_bits_estimate(v: np.ndarray, e: int, order: np.ndarray, max_tables: int) -> float:
    """Bits of tables, row classes, tokens and escapes at direct range ``e`` for the cheapest of 1 to
    ``max_tables`` classes of rows (``order``: rows by spread)."""
    rows = v.shape[0]
    tok, nb, _ = _tokens(v, e)
    best = np.inf
    for t in (1, 2, 4, 8, 16):
        if t > min(max_tables, rows):
            break
        bits = 0.0
        for part in np.array_split(order, t):
            values, counts = np.unique(tok[part], return_counts=True)
            p = counts / counts.sum()
            freqs = np.zeros(int(values[-1] - values[0]) + 1, np.int64)  # a table spans lowest to highest
            freqs[values - values[0]] = np.maximum(1, p * TOTAL)
            bits += float(-(counts * np.log2(p)).sum()) + 8 * _table_bytes([freqs])
        best = min(best, bits + (rows * _class_bits(t) if t > 1 else 0))
    return best + float(nb.sum())


def code_lengths(values: np.ndarray, model: Model, absent: float = np.inf) -> np.ndarray:
    """Bits each of ``values`` ([rows, cols]) costs under ``model``: ``-log2`` of its token's probability
    in its table (its row's or its context's) plus its escape bits; ``absent`` (plus escape bits)
    where the table lacks the token."""
    v = np.asarray(values)
    tok, nb, _ = _tokens(v, model.e)
    out = np.full(v.shape, float(absent))
    if model.contexts:
        at = _context(tok.reshape(-1), v.shape[1], len(model.freqs)).reshape(v.shape)
    else:
        at = np.repeat(model.row_table[:, None], v.shape[1], axis=1)
    for c, (lo, f) in enumerate(zip(model.lo, model.freqs)):
        rows = at == c
        t = tok[rows] - lo
        inside = (t >= 0) & (t < f.size)
        fv = np.where(inside, f[np.clip(t, 0, f.size - 1)], 0)
        with np.errstate(divide="ignore"):
            out[rows] = np.where(fv > 0, PRECISION - np.log2(np.maximum(fv, 1)), absent)
    return out + nb


def model_bits(values: np.ndarray, model: Model) -> float:
    """Bits ``values`` cost under ``model`` (the ideal code length an entropy coder approaches;
    tables and lane states not included)."""
    return float(code_lengths(values, model).sum())


# -- encoding --------------------------------------------------------------------------------------
def _leb128(f: np.ndarray) -> bytes:
    f = f.astype(np.int64)
    two = f >= 128
    out = np.empty(f.size + int(two.sum()), np.uint8)
    pos = np.arange(f.size) + np.concatenate([[0], np.cumsum(two)[:-1]])
    out[pos] = np.where(two, (f & 127) | 128, f)
    out[pos[two] + 1] = f[two] >> 7
    return out.tobytes()


def encode(values: np.ndarray, model: Model | None = None) -> bytes:
    """The stream of ``values`` ([rows, cols] int8, int16 or int32), which decodes to their
    little-endian bytes, in the model's encoding (:attr:`Model.encoding`).

    Parameters
    ----------
    values : numpy.ndarray
        Non-empty 2-D signed integer array; its itemsize is the decoded width.
    model : Model, optional
        Tables and row classes or contexts (default: :func:`plan`'s choice).
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.size == 0 or values.dtype.kind != "i" or values.itemsize not in WIDTHS:
        raise ValueError("rans codes a non-empty 2-D int8, int16 or int32 array")
    model = plan(values) if model is None else model
    rows, cols = values.shape
    n = values.size
    tok, nb, extra = _tokens(values, model.e)
    tok, nb, extra = tok.reshape(-1), nb.reshape(-1), extra.reshape(-1)
    lanes = _lane_count(n)
    if model.contexts:
        cls = _context(tok, cols, len(model.freqs))
    else:
        cls = np.repeat(model.row_table.astype(np.int64), cols)
    offsets = np.concatenate([[0], np.cumsum([f.size for f in model.freqs])])
    lo = np.asarray(model.lo, np.int64)
    flat_f = np.concatenate(model.freqs).astype(np.int64)
    flat_c = np.concatenate([np.concatenate([[0], np.cumsum(f)[:-1]]) for f in model.freqs]).astype(np.int64)
    j = offsets[cls] + tok - lo[cls]
    if np.any((tok < lo[cls]) | (j >= offsets[cls + 1])) or np.any(flat_f[j] == 0):
        raise ValueError("a value has no frequency in its table")
    F, C = flat_f[j], flat_c[j]
    x = np.full(lanes, LOW, np.int64)
    chunks = []
    for t in range(-(-n // lanes) - 1, -1, -1):
        at = _step(n, lanes, model.contexts, t)
        f, c = F[at], C[at]
        m = f.size
        xs = x[:m]
        emit = xs >= (f << (32 - PRECISION))
        chunks.append((xs[emit] & 0xFFFF).astype("<u2"))
        xs = np.where(emit, xs >> 16, xs)
        x[:m] = ((xs // f) << PRECISION) + xs % f + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, "<u2")
    big = nb > 0
    if big.any():
        bits = ((extra[big, None] >> np.arange(32)) & 1).astype(np.uint8)
        bits = bits[np.arange(32) < nb[big, None]]
        extra_bytes = np.packbits(bits, bitorder="little").tobytes()
    else:
        extra_bytes = b""
    n_tables = len(model.freqs)
    parts = [_HEAD.pack(values.itemsize, model.e, n_tables, int(model.contexts), cols, lanes, words.size,
                        len(extra_bytes))]
    for lo_t, f in zip(model.lo, model.freqs):
        parts += [_TABLE.pack(lo_t, f.size), _leb128(f)]
    if n_tables > 1 and not model.contexts:
        parts.append(pack(model.row_table, _class_bits(n_tables)))
    parts += [x.astype("<u4").tobytes(), words.tobytes(), extra_bytes]
    return b"".join(parts)


# -- decoding --------------------------------------------------------------------------------------
def _fail(msg: str) -> AqmFormatError:
    return AqmFormatError(f"rans section: {msg}")


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > self.buf.size:
            raise _fail(f"{what} runs past the end of the section")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _read_table(cur: _Cursor, bound: int) -> tuple[int, np.ndarray]:
    lo, count = _TABLE.unpack(cur.take(_TABLE.size, "a table header").tobytes())
    if count < 2 or lo < -bound or lo + count - 1 > bound:
        raise _fail(f"a table of {count} tokens from {lo} is outside the tokens [-{bound}, {bound}]")
    rest = cur.buf[cur.pos:cur.pos + 2 * count]
    ends = np.flatnonzero(rest < 128)[:count]
    if ends.size < count:
        raise _fail("a table's frequencies run past the end of the section")
    starts = np.concatenate([[0], ends[:-1] + 1])
    if np.any(ends - starts > 1):
        raise _fail("a frequency is longer than two bytes")
    two = ends > starts
    f = rest[ends].astype(np.int64)
    f[two] = (rest[starts[two]].astype(np.int64) & 127) | (f[two] << 7)
    cur.take(int(ends[-1]) + 1, "a table")
    if np.any(two & (f < 128)) or int(f.sum()) != TOTAL or int(f.max()) >= TOTAL:
        raise _fail(f"a table's frequencies do not sum to {TOTAL} with none above {TOTAL - 1}")
    return lo, f


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    from .kernels import compile_kernel
    ro = {"readonly": True}
    return compile_kernel("rans", _decode_lanes,
                          lambda ty: [ty.int64(ty.Array(ty.uint32, 1, "C"), ty.Array(ty.uint16, 1, "C", **ro),
                                               ty.Array(ty.uint16, 1, "C", **ro), ty.int64, ty.int64,
                                               ty.Tuple((ty.Array(ty.int32, 1, "C", **ro),
                                                         ty.Array(ty.uint32, 1, "C", **ro),
                                                         ty.Array(ty.uint32, 1, "C", **ro))),
                                               ty.Array(ty.int32, 1, "C"))])


def compiled() -> bool:
    """Whether large sections decode with the compiled kernel (compiling or loading it on first call)."""
    return _kernel() is not None


def _decode_lanes(x, words, table_at, cols, contexts, luts, out):  # pragma: no cover - compiled by numba
    """Compiled twin of :func:`_decode_numpy` with :func:`_row_tables` (``contexts`` 0; ``table_at``:
    each symbol's table offset) or :func:`_context_tables` (``contexts`` tables; ``table_at`` unused);
    ``luts``: :func:`_lookups`. Returns the words read, or -1 when the stream ends early."""
    lut_tok, lut_f, lut_bias = luts
    lanes = x.size
    n = out.size
    run = (n + lanes - 1) // lanes
    ptr = 0
    for t in range(run):
        for lane in range(lanes):
            if contexts:
                i = lane * run + t
                if i >= n:
                    break  # the lanes after it have no symbol at this step either
                before = min(i % cols, t)
                ctx = 0
                if before >= 1:
                    ctx += min(abs(np.int64(out[i - 1])), contexts)
                if before >= 2:
                    ctx += min(abs(np.int64(out[i - 2])), contexts)
                offset = min(ctx, contexts - 1) * TOTAL
            else:
                i = t * lanes + lane
                if i >= n:
                    break
                offset = np.int64(table_at[i])
            s = x[lane]
            idx = offset + (s & (TOTAL - 1))
            out[i] = lut_tok[idx]
            s = lut_f[idx] * (s >> PRECISION) + lut_bias[idx]
            if s < LOW:
                if ptr >= words.size:
                    return -1
                s = (s << 16) | words[ptr]
                ptr += 1
            x[lane] = s
    return ptr


# Below this, numpy's at most 2048 steps (~30 ms) cost less than loading numba (~1 s and ~80 MiB
# the first time in a process): a small file, and the fuzzer's 4 MiB decode budget, never load it.
_MIN_KERNEL_SYMBOLS = 1 << 18


def decode(stored: np.ndarray | bytes, size: int, encoding: str | None = None) -> np.ndarray:
    """Decode a stream to exactly ``size`` bytes (a new uint8 array). ``encoding``, a key of
    :data:`ENCODINGS` (a section's declared one), must match the mode the stream carries; None
    takes the stream's.

    Every count is checked against ``size`` and the stream's length before
    anything sized by it is allocated; AqmFormatError on any inconsistency.
    """
    buf = np.frombuffer(stored, np.uint8) if isinstance(stored, (bytes, bytearray, memoryview)) else stored
    cur = _Cursor(buf)
    width, e, n_tables, mode, cols, lanes, n_words, n_extra = _HEAD.unpack(cur.take(_HEAD.size, "the header").tobytes())
    modes = ENCODINGS.values() if encoding is None else [ENCODINGS[encoding]]
    if width not in WIDTHS or e > MAX_EXP or not 1 <= n_tables <= MAX_TABLES or mode not in modes:
        raise _fail(f"width {width}, exponent {e}, {n_tables} tables or mode {mode} out of range"
                    + (f" for {encoding}" if encoding else ""))
    contexts = mode == ENCODINGS["rans-context"]
    n = size // width
    if size % width or n == 0 or cols == 0 or n % cols:
        raise _fail(f"{size} bytes are not rows of {cols} integers of {width} bytes")
    rows = n // cols
    if not -(-n // MAX_STEPS) <= lanes <= n:
        raise _fail(f"{lanes} lanes for {n} symbols (at most {MAX_STEPS} symbols a lane)")
    E = (1 << e) - 1
    bound = E + 32 - e
    tables = [_read_table(cur, bound) for _ in range(n_tables)]
    row_table = np.zeros(rows, np.int64)
    if n_tables > 1 and not contexts:
        b = _class_bits(n_tables)
        row_table = unpack(cur.take(packed_size(rows, b), "the row tables"), rows, b).astype(np.int64)
        if int(row_table.max()) >= n_tables:
            raise _fail("a row names a table that does not exist")
    x = cur.take(4 * lanes, "the lane states").view("<u4").astype(np.uint32)
    words = cur.take(2 * n_words, "the words").view("<u2")
    extra = cur.take(n_extra, "the escape bits")
    if cur.pos != buf.size:
        raise _fail(f"{buf.size - cur.pos} bytes follow the escape bits")
    if int(x.min()) < LOW:
        raise _fail("a lane state is below 2**16")
    luts = _lookups(tables)
    tok = np.empty(n, np.int32)
    table_at = np.repeat((row_table * TOTAL).astype(np.uint16), cols) if n_tables > 1 and not contexts else None
    kernel = _kernel_for(n)
    if kernel is not None:
        at = table_at if table_at is not None else np.zeros(0 if contexts else n, np.uint16)
        read = kernel(x, np.ascontiguousarray(words, np.uint16), at, cols, n_tables if contexts else 0, luts, tok)
    elif contexts:
        read = _decode_numpy(x, words, luts, tok, _context_tables(n, lanes, cols, n_tables, tok))
    else:
        read = _decode_numpy(x, words, luts, tok, _row_tables(n, lanes, table_at))
    if read < 0:
        raise _fail("the words end before the symbols")
    if read != n_words or np.any(x != LOW):
        raise _fail("the stream does not end where its encoder started (corrupted or truncated)")
    return _values(tok, e, extra, width).view(np.uint8)


def _lookups(tables: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup arrays per (table, slot): token, frequency, and slot less the token's cumulative frequency."""
    lut_tok = np.empty(len(tables) * TOTAL, np.int32)
    lut_f = np.empty(len(tables) * TOTAL, np.uint32)
    lut_bias = np.empty(len(tables) * TOTAL, np.uint32)
    for c, (lo, f) in enumerate(tables):
        sym = np.repeat(np.arange(f.size), f)
        cum = np.concatenate([[0], np.cumsum(f)[:-1]])
        sl = slice(c * TOTAL, (c + 1) * TOTAL)
        lut_tok[sl] = lo + sym
        lut_f[sl] = f[sym]
        lut_bias[sl] = np.arange(TOTAL) - cum[sym]
    return lut_tok, lut_f, lut_bias


def _kernel_for(n: int) -> Any:
    """The compiled kernel for a section of ``n`` symbols, or None to decode in numpy: large sections
    load it; once it is loaded in the process (a large section, :func:`compiled`), smaller ones use it too."""
    if n >= _MIN_KERNEL_SYMBOLS or (n >= 1 << 10 and _kernel.cache_info().currsize):
        return _kernel()
    return None


def _decode_numpy(x: np.ndarray, words: np.ndarray, luts: tuple[np.ndarray, np.ndarray, np.ndarray],
                  out: np.ndarray, tables: Any) -> int:
    """Decode ``out.size`` tokens, one step of every lane at a time; ``tables(t)`` gives the
    positions decoded at step ``t`` (lane by lane), their count and each one's table offset (table
    times TOTAL); ``luts``: :func:`_lookups`. Returns the words read."""
    lut_tok, lut_f, lut_bias = luts
    state = x.astype(np.int64)
    words = words.astype(np.int64)
    f64, bias64 = lut_f.astype(np.int64), lut_bias.astype(np.int64)
    ptr = 0
    for t in range(-(-out.size // x.size)):
        at, m, offset = tables(t)
        s = state[:m]
        idx = (s & (TOTAL - 1)) + offset
        out[at] = lut_tok[idx]
        s = f64[idx] * (s >> PRECISION) + bias64[idx]
        need = s < LOW
        k = int(np.count_nonzero(need))
        if k:
            if ptr + k > words.size:
                raise _fail("the words end before the symbols")
            s[need] = (s[need] << 16) | words[ptr:ptr + k]
            ptr += k
        state[:m] = s
    x[:] = state
    return ptr


def _row_tables(n: int, lanes: int, table_at: np.ndarray | None) -> Any:
    """:func:`_decode_numpy`'s ``tables`` for ``rans``: consecutive symbols, each its row's table."""
    def at(t: int) -> tuple[slice, int, Any]:
        sl = _step(n, lanes, False, t)
        return sl, sl.stop - sl.start, 0 if table_at is None else table_at[sl]
    return at


def _context_tables(n: int, lanes: int, cols: int, n_tables: int, out: np.ndarray) -> Any:
    """:func:`_decode_numpy`'s ``tables`` for ``rans-context``: the ``t``-th symbol of each lane's
    run, each with the table of the two tokens before it in its row and run (decoded at earlier steps)."""
    def at(t: int) -> tuple[np.ndarray, int, np.ndarray]:
        pos = _step(n, lanes, True, t)
        inside = np.minimum(pos % cols, t)
        ctx = np.zeros(pos.size, np.int64)
        for back in (1, 2):
            seen = np.minimum(np.abs(out[np.maximum(pos - back, 0)].astype(np.int64)), n_tables)
            ctx += np.where(inside >= back, seen, 0)
        return pos, pos.size, np.minimum(ctx, n_tables - 1) * TOTAL
    return at


def _values(tok: np.ndarray, e: int, extra: np.ndarray, width: int) -> np.ndarray:
    """Tokens and escape bits to little-endian integers of ``width`` bytes."""
    E = (1 << e) - 1
    big = np.flatnonzero(np.abs(tok) > E)
    if not big.size:
        if extra.size:
            raise _fail("escape bits without escapes")
        return _fit_width(tok, width)
    t = tok[big].astype(np.int64)
    k = np.abs(t) - E + e                       # bit length of |v|, 1..32
    nb = k - 1
    total = int(nb.sum())
    if -(-total // 8) != extra.size:
        raise _fail(f"{total} escape bits in {extra.size} bytes")
    bits = np.unpackbits(extra, bitorder="little")
    if bits[total:].any():
        raise _fail("the escape bits' padding is not zero")
    start = np.cumsum(nb) - nb
    a = np.int64(1) << nb
    for j in range(int(nb.max(initial=0))):
        has = nb > j
        a[has] |= bits[start[has] + j].astype(np.int64) << j
    full = tok.astype(np.int64)
    full[big] = np.sign(t) * a
    return _fit_width(full, width)


def _fit_width(v: np.ndarray, width: int) -> np.ndarray:
    lo, hi = -(1 << (8 * width - 1)), (1 << (8 * width - 1)) - 1
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise _fail(f"a value does not fit {width} bytes")
    return v.astype(f"<i{width}")
