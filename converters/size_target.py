"""Size budgets (``--target-size``, ``--allocate``): what a model can reach, known before encoding.

Every byte of an .aqm file but the header follows from the tensors' shapes:
bit-packed codes (``M * b`` bits per ``d`` weights of a row, rows padded),
fp16 row scales, each used group's fp16 codebooks and the raw tensors. So
the sizes a model can take are computed from its shapes alone, in
milliseconds: a budget out of reach is refused before anything is trained,
in the units the user typed, with the range that works. Within reach, the
code widths worth training are the ones around the budget's uniform width
(the allocator then mixes them, and raw tensors, per tensor), so any budget
from 1 code bit per weight up to the uncompressed model is searched, not
only the widths next to ``--bits``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aqformat.errors import AqmInputError
from aqformat.header import ALIGNMENT
from aqformat.units import format_size, parse_size

from .allocate import aq_tensor_bytes
from .options import AQConfig

__all__ = ["LANDING", "MAX_CODE_BITS", "SLACK", "Budget", "Reach", "fullest", "reach", "target_widths", "header_bytes", "reserved_bytes", "allocate_budget",
           "target_budget"]

#: Widest code searched, in code bits per weight (8 codebooks of 8-bit codes over 8-vectors by
#: default); budgets between it and the uncompressed model are met by keeping tensors raw.
MAX_CODE_BITS = 8
#: Slack kept under a budget for the header estimate (see :func:`reserved_bytes`).
SLACK = 1.002
#: A file lands at most this fraction under its target size, or the target is refused.
LANDING = 0.02


def reserved_bytes(n_tensors: int) -> int:
    """Bytes of header, metadata and alignment padding reserved under an ``--allocate`` budget.

    Measured: 19.6 KB for MiniLM's 104 tensors, 1.6 KB for an 8-tensor model.
    """
    return 1024 + 224 * n_tensors


#: Header bytes per tensor beyond its name, by how it is stored: its record, its sections'
#: records (about 53 bytes each) and their padding to 64 bytes (about 17 on average). Fitted on
#: converter output (the digits CNN, silero-vad, EfficientNet-Lite0 at 3 and 4 bits: 10 to 93
#: tensors) within 140 bytes.
RAW_TENSOR_BYTES = 116     # one section
SMALL_TENSOR_BYTES = 140   # affine or float16: codec fields, one section
AQ_TENSOR_BYTES = 224      # codec fields, the codes' and the row scales' sections
GROUP_BYTES = 120          # a codebook group's record and section
BASE_BYTES = 400           # preamble, the conversion's metadata, the header's framing
HEADER_MARGIN = 250        # each bound's margin beyond the estimate
PADDING_64 = 17            # the padding a section in the figures above, at 64-byte alignment

#: Models of fewer tensor bytes are written with sections aligned to :data:`SMALL_ALIGNMENT` bytes
#: instead of the writer's 64: the padding (up to 63 bytes a section) was 358 of the digits CNN's
#: 8,498 bytes at 1 bit/weight, while in a 16 MiB model 64-byte padding is under 0.1%.
SMALL_MODEL_BYTES = 16 << 20
#: Enough for zero-copy reads of every dtype (the widest is 8 bytes).
SMALL_ALIGNMENT = 8


def section_alignment(source_bytes: int) -> int:
    """The section alignment of a conversion of a model of ``source_bytes`` tensor bytes."""
    return SMALL_ALIGNMENT if source_bytes < SMALL_MODEL_BYTES else ALIGNMENT


def header_bytes(names: Sequence[str], known: int = 0, coded: int = 0, small: int = 0,
                 groups: int = 0, alignment: int = ALIGNMENT) -> tuple[int, int]:
    """Bounds ``(low, high)`` of the bytes of header, metadata and section padding of a file
    holding tensors ``names``, ``known`` of them already counted (e.g. the source's description),
    ``coded`` of the tensors offered to AQ (each may yet stay raw), ``small`` coded by the affine
    codec or at 16 bits and the rest raw, with ``groups`` codebook groups, its sections aligned
    to ``alignment`` bytes. A size target lands between the target and 2% under, so both bounds
    count."""
    base = BASE_BYTES + known + sum(len(n.encode("utf-8")) for n in names) + GROUP_BYTES * groups \
        + RAW_TENSOR_BYTES * (len(names) - coded - small) + SMALL_TENSOR_BYTES * small
    saved = PADDING_64 * (1 - min(alignment, ALIGNMENT) / ALIGNMENT)  # a section, below 64-byte alignment
    sections = len(names) + groups  # one each; an AQ tensor has two
    return (int(base + RAW_TENSOR_BYTES * coded - saved * (sections + coded)) - HEADER_MARGIN,
            int(base + AQ_TENSOR_BYTES * coded - saved * sections) + HEADER_MARGIN)


@dataclass(frozen=True)
class Budget:
    """What the allocator gets: ``bytes`` for the compressible tensors (codes, scales,
    codebooks), the code ``widths`` (codebooks per vector) to train, and the ``floor`` of bytes
    they should take so that a file lands within :data:`LANDING` under its target (0: none)."""

    bytes: int
    widths: list[int]
    floor: int = 0


@dataclass(frozen=True)
class Reach:
    """Sizes a model can take, from its shapes.

    ``coded[M]`` is the bytes of every compressible tensor coded with ``M``
    codebooks (``code_bits[M]`` bits per weight), their groups' codebooks
    included; ``fixed`` the bytes of the tensors always stored raw, ``raw`` of
    the compressible ones stored raw.
    """

    coded: dict[int, int]
    code_bits: dict[int, float]
    fixed: int
    raw: int
    header: int                            # upper bound of the header's bytes
    header_low: int                        # lower bound
    reserve: int                           # header bytes reserved under --allocate
    weights: int
    options: dict[str, dict[str, int]]     # tensor -> option ("group:M" or "raw") -> bytes
    books: dict[str, int]                  # option -> its codebooks' bytes, paid once if used

    def file_size(self, M: int) -> int:
        """File bytes with every compressible tensor at width ``M`` (the budget's slack included)."""
        return int((self.header + self.fixed + self.coded[M]) * SLACK)

    @property
    def smallest(self) -> int:
        return self.file_size(min(self.coded))

    @property
    def uncompressed(self) -> int:
        return int((self.header + self.fixed + self.raw) * SLACK)

    def top_width(self, budget: int) -> int:
        """The widest code width (M) at which every compressible tensor fits ``budget`` bytes."""
        return max((m for m in self.coded if self.coded[m] <= budget), default=min(self.coded))

    def widths_for(self, budget: int) -> list[int]:
        """Code widths (M) to train for ``budget`` bytes of compressible tensors:
        :meth:`top_width`, one narrower and one wider (the allocator mixes them, and raw
        tensors, per tensor)."""
        top = self.top_width(budget)
        return [m for m in (top - 1, top, top + 1) if m in self.coded]

    def least_bits(self, side: tuple[int, int] = (0, 0)) -> float:
        """Fewest bits per compressible weight ``--allocate`` can reach (header counted),
        rounded up to the hundredth; ``side`` is ``(weights, bytes)`` of tensors coded by
        another codec, counted with them."""
        weights, nbytes = side
        return math.ceil(800.0 * (self.reserve + nbytes + self.coded[min(self.coded)])
                         / (self.weights + weights)) / 100


def reach(shapes: Mapping[str, Sequence[int]], axes: Mapping[str, Sequence[int] | None],
          groups: Mapping[str, Sequence[str]], raw_bytes: Mapping[str, int], *, b: int = 8, d: int = 8,
          other_bytes: int = 0, permute: bool = False, header_known: int = 0, small: int = 0) -> Reach:
    """The sizes reachable by a model.

    Parameters
    ----------
    shapes, axes : dict tensor -> shape / matrix-view axes
        Every compressible tensor's shape; the axes of those with a non-default matrix view.
    groups : dict group key -> tensor names
        The compressible tensors, by codebook group (one set of codebooks each).
    raw_bytes : dict tensor -> bytes
        Every tensor's size stored raw.
    b, d : int
        Bits per code and vector length.
    other_bytes : int
        Bytes stored besides the tensors and the header, e.g. the embedded graph.
    permute : bool
        Coded tensors store a column permutation.
    header_known : int
        Header bytes known in advance (the source's description).
    small : int
        How many of the other tensors the affine codec or a 16-bit copy stores.
    """
    members = {n for names in groups.values() for n in names}
    header = header_bytes(list(raw_bytes), header_known, len(members), small, len(groups),
                          section_alignment(sum(raw_bytes.values())))
    coded, code_bits, books = {}, {}, {}
    options: dict[str, dict[str, int]] = {n: {"raw": raw_bytes[n]} for n in members}
    for M in range(1, MAX_CODE_BITS * d // b + 1):
        cfg = AQConfig(M=M, b=b, d=d)
        for key, names in groups.items():
            books[f"{key}:{M}"] = cfg.codebook_bytes()
            for n in names:
                options[n][f"{key}:{M}"] = aq_tensor_bytes(shapes[n], cfg, axes.get(n), perm=permute)
        coded[M] = sum(options[n][f"{k}:{M}"] for k, names in groups.items() for n in names) \
            + len(groups) * cfg.codebook_bytes()
        code_bits[M] = cfg.code_bits
    return Reach(coded, code_bits, fixed=other_bytes + sum(v for n, v in raw_bytes.items() if n not in members),
                 raw=sum(raw_bytes[n] for n in members), header=header[1], header_low=header[0],
                 reserve=reserved_bytes(len(raw_bytes)),
                 weights=sum(math.prod(shapes[n]) for n in members), options=options, books=books)


def _fullest(r: Reach, widths: Sequence[int], budget: int) -> tuple[int, int | None]:
    """``(bytes, next)``: the most bytes of compressible tensors that fit ``budget`` with the code
    widths ``widths`` and raw tensors mixed per tensor (more bits preferred, as the allocator
    does when every error falls with width), and the next size above ``budget`` (None if none).

    Only byte counts are involved: this runs before any codebook is trained.
    """
    keep = {f":{m}" for m in widths}
    opts = {n: {o: v for o, v in o_bytes.items() if o == "raw" or o[o.rindex(":"):] in keep}
            for n, o_bytes in r.options.items()}
    choice = fullest(opts, {o: r.code_bits[int(o[o.rindex(":") + 1:])] for o in r.books}, budget, r.books)

    def total(c: Mapping[str, str]) -> int:
        return sum(opts[n][o] for n, o in c.items()) + sum(r.books.get(o, 0) for o in set(c.values()))
    above = [total(dict(choice, **{n: o})) for n in opts for o in opts[n]]
    return total(choice), min((t for t in above if t > budget), default=None)



def target_budget(target: int, typed: str | int, r: Reach) -> Budget:
    """The :class:`Budget` of a file size ``target``: the bytes left for the compressible
    tensors, the widths to train, and the fewest bytes for the file to land within :data:`LANDING`.

    Raises
    ------
    AqmInputError
        ``target`` is out of reach: the message gives the reachable range in
        the units of ``typed`` (what the user wrote).
    """
    def size(n: int, rounding: str = "nearest") -> str:
        return format_size(n, like=str(typed), rounding=rounding)
    span = (f"this model reaches {size(r.smallest, 'up')} (1 code bit per weight) to "
            f"{size(r.uncompressed, 'down')} (uncompressed)")
    if target < r.smallest:
        raise AqmInputError(f"--target-size {typed} is out of reach: {span}; give --target-size "
                            f"{size(r.smallest, 'up')} or more (or --keep fewer tensors raw)")
    if target >= r.uncompressed:
        raise AqmInputError(f"--target-size {typed} needs no compression: {span}; give a target "
                            f"below {size(r.uncompressed, 'down')}")
    budget = int(target / SLACK) - r.header - r.fixed
    landed, above = _landing(r, target)
    if not _lands(r, landed, target):
        nearest = list(dict.fromkeys(_landable(r, n, typed) or format_size(_file_bytes(r, n), like=str(typed))
                                     for n in (landed, above) if n is not None))
        raise AqmInputError(f"--target-size {typed} cannot be met within {100 * LANDING:.0f}%: codes and "
                            f"codebooks come in steps, and the nearest sizes this model takes are "
                            f"{' and '.join(nearest)}; give one of those ({span})")
    # the fewest bytes that land within the window even with the smallest header
    return Budget(budget, target_widths(r, target), int((1 - LANDING) * target) - r.header_low - r.fixed)


def fullest(nbytes: Mapping[str, Mapping[str, int]], code_bits: Mapping[str, float], budget: int,
            group_bytes: Mapping[str, int]) -> dict[str, str]:
    """A choice of option per tensor that fills ``budget`` as far as it goes, by bytes alone:
    the allocator run on an error that falls with code bits (and is 0 raw), so the bytes go
    evenly to wider codes. ``code_bits`` gives each coded option's bits per weight."""
    from .allocate import allocate
    errors = {n: {o: 0.0 if o == "raw" else v * 2.0 ** -code_bits[o] for o, v in o_bytes.items()}
              for n, o_bytes in nbytes.items()}
    return allocate(errors, nbytes, budget, group_bytes)


def target_widths(r: Reach, target: int) -> list[int]:
    """Code widths (M) to train for a file of ``target`` bytes: of the three-width windows
    around the widest uniform width that fits, the one the budget fills best."""
    budget = int(target / SLACK) - r.header - r.fixed
    top = r.top_width(budget)
    windows = [[m for m in (c - 1, c, c + 1) if m in r.coded] for c in (top - 1, top, top + 1)]
    return max((w for w in windows if w), key=lambda w: _fullest(r, w, budget)[0])


def _landing(r: Reach, target: int) -> tuple[int, int | None]:
    """Bytes of compressible tensors a ``target`` is filled with, and the next amount above
    it (None if none)."""
    budget = int(target / SLACK) - r.header - r.fixed
    return _fullest(r, target_widths(r, target), budget)


def _lands(r: Reach, filled: int, target: int) -> bool:
    """Whether a file of ``filled`` bytes of compressible tensors lands within :data:`LANDING`
    under ``target``, by the header's estimate (its high bound less the margin). Where the window
    is narrower than the estimate's margins (files of a few kB), by the high bound: no target
    could be promised otherwise (the summary tells where the file landed)."""
    narrow = LANDING * target < 2 * HEADER_MARGIN
    return r.header - (0 if narrow else HEADER_MARGIN) + r.fixed + filled >= (1 - LANDING) * target


def _file_bytes(r: Reach, filled: int) -> int:
    """A target a file of ``filled`` bytes of compressible tensors surely fits under."""
    return int((r.header + r.fixed + filled) * SLACK)


def _landable(r: Reach, size: int, typed: str | int) -> str | None:
    """A target for ``size`` bytes of compressible tensors, written like ``typed``, that lands
    within :data:`LANDING`
    (the code widths tried depend on the target, so the size a target lands at is checked)."""
    for _ in range(4):
        text = format_size(_file_bytes(r, size), like=str(typed), rounding="up")
        target = parse_size(text.replace(" ", ""))
        filled, _ = _landing(r, target)
        if _lands(r, filled, target):
            return text
        size = filled
    return None


def allocate_budget(bits: float, r: Reach, grouping: str, width: int, shared: Reach | None = None,
                    side: tuple[int, int] = (0, 0)) -> Budget:
    """The budget of ``--allocate`` at ``bits`` per compressed weight, ``width`` the code
    width (codebooks per vector) of ``bits``; ``side`` is ``(weights, bytes)`` of the tensors
    coded by the affine codec, inside the same budget.

    Raises
    ------
    AqmInputError
        Even 1 code bit per weight takes more (small models with one set of
        codebooks per layer kind, mostly): the message gives the fewest
        ``--bits`` that work, and those of ``--grouping shared`` when that
        sharing is fewer.
    """
    if not r.weights:
        return Budget(0, [width])
    least = r.least_bits(side)
    if bits >= least:
        budget = int(bits * (r.weights + side[0]) / 8) - r.reserve - side[1]
        around = [m for m in (width - 1, width, width + 1) if m in r.coded]
        # the widths next to --bits (``width``), unless codebook overheads put even the narrowest over
        return Budget(budget, around if around and r.coded[around[0]] <= budget else r.widths_for(budget))
    hint = ""
    if shared is not None and grouping != "shared" and shared.least_bits(side) < least:
        hint = f"--grouping shared (one set of codebooks: from {shared.least_bits(side):.2f} bits/weight), "
    raise AqmInputError(f"--allocate at {bits:g} bits/weight is out of reach: with {grouping} codebooks "
                        f"this model's {r.weights + side[0]:,} compressed weights take at least {least:.2f} "
                        f"bits each, codebooks and header counted; use {hint}--bits {least:.2f} "
                        f"or more, or no --allocate")
