"""The fixed preamble and the msgpack header schema (spec/FORMAT.md, sections 2-4).

``parse_header`` turns untrusted bytes into validated records: every offset,
length, count and shape is bounds-checked here, once, so that decoders can
trust the records they are given.
"""
from __future__ import annotations

import math
import reprlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import codecs, rans
from .dtypes import DTYPES, FLOAT_DTYPES
from .errors import AqmFormatError, AqmIntegrityError, AqmVersionError

MAGIC = b"\x89AQM\r\n\x1a\n"
MAJOR, MINOR = 1, 5  # MINOR: the newest minor version this reader knows
PREAMBLE = struct.Struct("<8sHHIQQIIQ12sI")  # 64 bytes
PREAMBLE_SIZE = PREAMBLE.size
ALIGNMENT = 64

MAX_HEADER_BYTES = 16 << 20  # parsed, a header costs up to ~67x its size in Python objects
MAX_TENSORS = 1 << 20
MAX_SECTIONS = 1 << 22
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 48
MAX_NAME_BYTES = 1024
MAX_VECTOR_DIM = 256
MAX_CODEBOOKS_PER_GROUP = 64
# zstd itself cannot exceed this ratio (a block of at most 128 KiB costs at least 4 bytes, as an
# RLE block), so a section claiming more is a bomb, while any real frame, even all zeros, passes.
MAX_ZSTD_RATIO = 1 << 15
# Maps and arrays in a header, in total: a header within MAX_HEADER_BYTES that respects the other
# limits holds fewer (each tensor and its section take 3 containers and at least ~90 bytes), and
# each costs ~100 bytes of memory parsed however few bytes it takes in the file.
MAX_HEADER_CONTAINERS = 1 << 20
# A graph is protobuf: it does not compress like zeros, and its cost of reading grows with its size.
MAX_GRAPH_RATIO = 1 << 10
MAX_DEPTH = 32  # nesting of source/metadata values, so printing them never hits the recursion limit

ENCODINGS = ("raw", "zstd", "rans", "rans-context")
# the minor version that introduced each encoding
ENCODING_MINOR = {"raw": 0, "zstd": 0, "rans": 2, "rans-context": 5}
CODEBOOK_DTYPES = ("float16", "float32")


def pack_preamble(minor: int, header_offset: int, header_length: int, header_crc: int,
                  file_length: int, alignment: int = ALIGNMENT) -> bytes:
    """Serialise the 64-byte preamble (its own CRC-32 in the last 4 bytes)."""
    body = PREAMBLE.pack(MAGIC, MAJOR, minor, 0, header_offset, header_length, header_crc,
                         alignment, file_length, b"\0" * 12, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass(frozen=True)
class Preamble:
    major: int
    minor: int
    header_offset: int
    header_length: int
    header_crc: int
    alignment: int
    file_length: int


def parse_preamble(raw: bytes, file_size: int) -> Preamble:
    """Validate the preamble against the real ``file_size``."""
    if len(raw) < PREAMBLE_SIZE:
        raise AqmFormatError(f"file is {file_size} bytes, too small to be an .aqm file")
    magic, major, minor, flags, hoff, hlen, hcrc, align, flen, _, crc = PREAMBLE.unpack(
        raw[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise AqmFormatError("not an .aqm file (bad magic bytes)")
    if major != MAJOR:
        raise AqmVersionError(
            f"file is .aqm format {major}.{minor}; this reader supports {MAJOR}.x only")
    if zlib.crc32(raw[: PREAMBLE_SIZE - 4]) != crc:
        raise AqmIntegrityError("preamble checksum mismatch (file is corrupted)")
    if flags != 0:
        raise AqmFormatError(f"unknown preamble flags 0x{flags:08x}")
    if align < 8 or align > 1 << 16 or align & (align - 1):
        raise AqmFormatError(f"alignment {align} is not a power of two in [8, 65536]")
    if flen != file_size:
        raise AqmFormatError(
            f"file is {file_size} bytes but its preamble says {flen} (truncated or extended)")
    if hlen > MAX_HEADER_BYTES:
        raise AqmFormatError(f"header of {hlen} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if hoff < PREAMBLE_SIZE or hoff % align or hoff + hlen != file_size:
        raise AqmFormatError(f"header at [{hoff}, {hoff + hlen}) is misaligned or does not end the file")
    return Preamble(major, minor, hoff, hlen, hcrc, align, flen)


@dataclass(frozen=True)
class Section:
    offset: int
    length: int
    size: int
    encoding: str
    crc32: int


@dataclass(frozen=True)
class CodebookGroup:
    name: str
    M: int
    K: int
    d: int
    dtype: str
    section: int

    @property
    def bits(self) -> int:
        return self.K.bit_length() - 1


@dataclass(frozen=True)
class TensorHead:
    """Name, shape, decoded dtype and codec of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorRecord(TensorHead):
    """A validated tensor record: the head and its codec's fields."""

    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Header:
    minor: int
    producer: str
    source: dict[str, Any]
    metadata: dict[str, Any]
    sections: list[Section]
    codebooks: list[CodebookGroup]
    tensors: list[TensorRecord]
    graph: dict[str, Any] | None


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 60, 60, 4, 4


def show(v: Any) -> str:
    """A short repr of a value from the file for an error message: bounded in length and
    nesting (``repr`` of a 1,000-deep list would raise RecursionError)."""
    return _SHOW.repr(v)


def _fail(msg: str) -> AqmFormatError:
    return AqmFormatError(f"invalid header: {msg}")


def _int(v: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(f"{what} must be an integer in [{lo}, {hi}], got {show(v)}")
    return v


def _str(v: Any, what: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or len(v.encode()) > MAX_NAME_BYTES:
        raise _fail(f"{what} must be a string of at most {MAX_NAME_BYTES} bytes")
    if choices is not None and v not in choices:
        raise _fail(f"{what} {show(v)} is not one of {', '.join(choices)}")
    return v


def _map(v: Any, what: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail(f"{what} must be a map with string keys")
    return v


def _get(m: dict, key: str, what: str) -> Any:
    if key not in m:
        raise _fail(f"{what} lacks required field {key!r}")
    return m[key]


def plain_value_problem(v: Any, depth: int = 0) -> str | None:
    """Why ``v`` is not a JSON-like value, or None if it is.

    Source and metadata are shown by ``aqm info`` (also as JSON), so they are
    restricted to None, bool, int, float, str, lists and string-keyed maps,
    nested at most ``MAX_DEPTH`` deep. Tuples are accepted as lists.
    """
    if depth > MAX_DEPTH:
        return f"nests deeper than {MAX_DEPTH} levels"
    if v is None or isinstance(v, (bool, int, float, str)):
        return None
    if isinstance(v, (list, tuple)):
        items = v
    elif isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            return "has a map with non-string keys"
        items = v.values()
    else:
        return f"holds a value of type {type(v).__name__}"
    return next((p for p in (plain_value_problem(x, depth + 1) for x in items) if p), None)


def _plain_map(v: Any, what: str) -> dict:
    problem = plain_value_problem(_map(v, what))
    if problem:
        raise _fail(f"{what} {problem}")
    return v


def _index(v: Any, what: str, count: int, optional: bool = False) -> int | None:
    """A reference into a table of ``count`` entries."""
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < count:
        raise _fail(f"{what} {show(v)} does not refer to one of the {count} entries")
    return v


def parse_header(raw: bytes, pre: Preamble) -> Header:
    """Decode and validate the msgpack header. Raises AqmFormatError on any violation."""
    if zlib.crc32(raw) != pre.header_crc:
        raise AqmIntegrityError("header checksum mismatch (file is corrupted)")
    doc = _unpack(raw)
    doc = _map(doc, "header")
    sections = [_parse_section(s, i, pre) for i, s in enumerate(_list(_get(doc, "sections", "header"), "sections", MAX_SECTIONS))]
    _check_no_overlap(sections, pre.header_offset)
    n = len(sections)
    groups = [parse_group(g, i, n) for i, g in enumerate(_list(doc.get("codebooks", []), "codebooks", MAX_TENSORS))]
    tensors = [parse_tensor(t, i, n, groups) for i, t in enumerate(_list(_get(doc, "tensors", "header"), "tensors", MAX_TENSORS))]
    names = set()
    for t in tensors:
        if t.name in names:
            raise _fail(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
    if len({g.name for g in groups}) != len(groups):
        raise _fail("duplicate codebook group name")
    graph = doc.get("graph")
    if graph is not None:
        graph = _map(graph, "graph")
        _str(_get(graph, "format", "graph"), "graph format")
        g = sections[_index(_get(graph, "section", "graph"), "graph section", n)]
        if g.size > graph_size_limit(g.length):
            raise _fail(f"graph section claims {g.size} bytes from {g.length}, more than a graph "
                        f"expands ({MAX_GRAPH_RATIO}:1 above 256 KiB)")
    return Header(
        minor=pre.minor,
        producer=_str(doc.get("producer", ""), "producer"),
        source=_plain_map(doc.get("source", {}), "source"),
        metadata=_plain_map(doc.get("metadata", {}), "metadata"),
        sections=sections, codebooks=groups, tensors=tensors, graph=graph)


def _unpack(raw: bytes) -> Any:
    """The msgpack value of ``raw``, materialising at most ``MAX_HEADER_CONTAINERS`` maps and arrays.

    The count is checked as each container is built, so a header of millions of
    empty maps costs a bounded amount of memory before it is refused; a map that
    names a key twice is refused too (readers differ on which value wins).
    """
    built = 0

    def count() -> None:
        nonlocal built
        built += 1
        if built > MAX_HEADER_CONTAINERS:
            raise _fail(f"more than {MAX_HEADER_CONTAINERS} maps and arrays")

    def as_map(pairs: list[tuple[Any, Any]]) -> dict:
        count()
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _fail(f"a map names the key {show(dup)} twice")
        return out

    def as_list(items: list) -> list:
        count()
        return items

    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=as_map,
                               list_hook=as_list, max_array_len=MAX_SECTIONS, max_map_len=MAX_SECTIONS)
    except AqmFormatError:
        raise
    except ValueError as e:
        if "exceeds max_" not in str(e):
            raise _fail(f"not valid msgpack ({type(e).__name__})") from None
        raise _fail(f"an array or map has more than {MAX_SECTIONS} entries") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise _fail(f"not valid msgpack ({type(e).__name__})") from None


def _list(v: Any, what: str, limit: int) -> list:
    if not isinstance(v, list) or len(v) > limit:
        raise _fail(f"{what} must be a list of at most {limit} entries")
    return v


def _parse_section(s: Any, i: int, pre: Preamble) -> Section:
    what = f"section {i}"
    s = _map(s, what)
    off = _int(_get(s, "offset", what), f"{what} offset", PREAMBLE_SIZE, pre.header_offset)
    length = _int(_get(s, "length", what), f"{what} length", 0, pre.header_offset - off)
    size = _int(_get(s, "size", what), f"{what} size", 0, MAX_ELEMENTS)
    # A newer minor may add encodings: such a section is kept, and only reading it fails.
    enc = _str(_get(s, "encoding", what), f"{what} encoding")
    crc = _int(_get(s, "crc32", what), f"{what} crc32", 0, (1 << 32) - 1)
    if off % pre.alignment:
        raise _fail(f"{what} offset {off} is not a multiple of the alignment {pre.alignment}")
    if enc == "raw" and size != length:
        raise _fail(f"{what} is raw but its size {size} differs from its length {length}")
    if enc == "zstd" and size > max(1 << 20, length * MAX_ZSTD_RATIO):
        raise _fail(f"{what} claims {size} decoded bytes from {length} (decompression bomb)")
    if enc in rans.ENCODINGS and size > max(1 << 20, length * rans.MAX_RATIO):
        raise _fail(f"{what} claims {size} decoded bytes from {length} (decompression bomb)")
    return Section(off, length, size, enc, crc)


def graph_size_limit(length: int) -> int:
    """The most bytes a graph section stored in ``length`` bytes may decode to."""
    return max(1 << 18, length * MAX_GRAPH_RATIO)


def _check_no_overlap(sections: list[Section], end: int) -> None:
    spans = sorted((s.offset, s.offset + s.length) for s in sections if s.length)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail(f"sections overlap at byte {b0}")


def parse_group(g: Any, i: int, n_sections: int) -> CodebookGroup:
    """Validate codebook group record ``g`` (the ``i``-th) against ``n_sections`` sections."""
    what = f"codebook group {i}"
    g = _map(g, what)
    K = _int(_get(g, "K", what), f"{what} K", 2, 1 << 16)
    if K & (K - 1):
        raise _fail(f"{what} K={K} is not a power of two")
    return CodebookGroup(
        name=_str(_get(g, "name", what), f"{what} name"),
        M=_int(_get(g, "M", what), f"{what} M", 1, MAX_CODEBOOKS_PER_GROUP), K=K,
        d=_int(_get(g, "d", what), f"{what} d", 1, MAX_VECTOR_DIM),
        dtype=_str(_get(g, "dtype", what), f"{what} dtype", CODEBOOK_DTYPES),
        section=_index(_get(g, "section", what), f"{what} section", n_sections))


class RecordFields:
    """Bounds-checked access to the codec fields of one tensor record, for codecs' ``parse``.

    Every getter validates the value it returns and raises AqmFormatError
    (naming the tensor and the field) otherwise.
    """

    def __init__(self, raw: dict, name: str, shape: tuple[int, ...], dtype: str, n_sections: int,
                 groups: list[CodebookGroup]):
        self._raw, self.what = raw, f"tensor {name!r}"
        self.shape, self.dtype = shape, dtype
        self._n_sections, self._groups = n_sections, groups

    def section(self, key: str, optional: bool = False) -> int | None:
        """A section index (None when ``optional`` and absent or nil)."""
        v = self._raw.get(key) if optional else _get(self._raw, key, self.what)
        return _index(v, f"{self.what} {key}", self._n_sections, optional)

    def group(self, key: str = "group") -> int:
        """An index into the codebook groups."""
        return _index(_get(self._raw, key, self.what), f"{self.what} {key}", len(self._groups))

    def integer(self, key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        """An integer in ``[lo, hi]``."""
        return _int(_get(self._raw, key, self.what), f"{self.what} {key}", lo, hi)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        """One of ``choices`` (``default`` when absent, if given)."""
        v = self._raw.get(key, default) if default is not None else _get(self._raw, key, self.what)
        return _str(v, f"{self.what} {key}", choices)

    def axes(self, key: str = "axes") -> list[int] | None:
        """An optional permutation of the tensor's dimensions."""
        axes = self._raw.get(key)
        if axes is None:
            return None
        axes = [_int(a, f"{self.what} axis", 0, MAX_NDIM) for a in _list(axes, f"{self.what} {key}", MAX_NDIM)]
        if sorted(axes) != list(range(len(self.shape))):
            raise _fail(f"{self.what} {key} {axes} are not a permutation of its dimensions")
        return axes


def parse_tensor(t: Any, i: int, n_sections: int, groups: list[CodebookGroup]) -> TensorRecord:
    """Validate tensor record ``t`` (the ``i``-th) against ``n_sections`` sections and ``groups``."""
    t = _map(t, f"tensor {i}")
    name = _str(_get(t, "name", f"tensor {i}"), f"tensor {i} name")
    what = f"tensor {name!r}"
    shape = _list(_get(t, "shape", what), f"{what} shape", MAX_NDIM)
    shape = tuple(_int(x, f"{what} dimension", 0, MAX_ELEMENTS) for x in shape)
    span = 1
    for x in shape:  # stepwise, and over nonzero dims too: numpy refuses [0, 2**48, 2**48]
        span *= max(x, 1)
        if span > MAX_ELEMENTS:
            raise _fail(f"{what} shape {list(shape)} spans more than 2**48 elements")
    numel = math.prod(shape)
    dtype = _str(_get(t, "dtype", what), f"{what} dtype", tuple(DTYPES))
    codec_name = _str(_get(t, "codec", what), f"{what} codec")
    codec = codecs.get(codec_name)
    if codec is None:  # kept: listing still works, reading raises AqmUnsupportedError
        return TensorRecord(name, shape, dtype, codec_name, {})
    if codec.float_only:
        if dtype not in FLOAT_DTYPES:
            raise _fail(f"{what} uses codec {codec_name} but has non-float dtype {dtype}")
        if not shape or numel == 0:
            raise _fail(f"{what} uses codec {codec_name} but is empty or a scalar")
    return TensorRecord(name, shape, dtype, codec_name, codec.parse(RecordFields(t, name, shape, dtype, n_sections, groups)))
