"""Build .aqm bytes by hand for hostile-input tests.

``build`` lays out sections and a header dict exactly as the Writer would,
but lets every field be wrong on purpose, and recomputes the CRCs and the
preamble so that the reader's *structural* checks (not its checksums) are
what a test exercises. ``split`` turns a valid file back into a header dict
and section payloads, so mutants can be made structurally and rebuilt.
``FullDisk`` makes the Writer's file fail like a full disk.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import os
import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zstandard

import aqformat
from aqformat import Writer
from aqformat.bitpack import pack
from aqformat.header import ALIGNMENT, MAGIC, MAJOR, PREAMBLE, PREAMBLE_SIZE


@dataclass
class Blob:
    """One section payload; ``entry`` overrides fields of its header record."""

    data: bytes
    encoding: str = "raw"
    size: int | None = None
    entry: dict[str, Any] | None = None


def zstd_blob(raw: bytes, *, content_size: bool = True, size: int | None = None) -> Blob:
    """A zstd section holding ``raw`` (declared size ``size`` or ``len(raw)``)."""
    z = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(raw)
    return Blob(z, "zstd", len(raw) if size is None else size)


def preamble(*, header_offset: int, header_length: int, header_crc: int, file_length: int,
             magic: bytes = MAGIC, major: int = MAJOR, minor: int = 0, flags: int = 0,
             alignment: int = ALIGNMENT, reserved: bytes = b"\0" * 12) -> bytes:
    """A 64-byte preamble with any field chosen freely and a correct own CRC."""
    body = PREAMBLE.pack(magic, major, minor, flags, header_offset, header_length, header_crc,
                         alignment, file_length, reserved, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def build(doc: dict[str, Any] | None, blobs: list[Blob | bytes] = (), *, header: bytes | None = None,
          alignment: int = ALIGNMENT, pad: bytes = b"\0", **pre: Any) -> bytes:
    """Assemble a file from a header ``doc`` and section payloads.

    ``doc["sections"]`` is generated from ``blobs`` (offset, length, size,
    encoding, crc32), each merged with its ``Blob.entry`` overrides, unless the
    doc already has a non-None ``sections`` value. ``header`` replaces the packed doc by raw
    bytes. Extra keyword arguments override preamble fields.
    """
    out = bytearray(PREAMBLE_SIZE)
    entries = []
    for b in blobs:
        b = b if isinstance(b, Blob) else Blob(b)
        out += pad * (-len(out) % alignment)
        e = {"offset": len(out), "length": len(b.data), "size": len(b.data) if b.size is None else b.size,
             "encoding": b.encoding, "crc32": zlib.crc32(b.data)}
        e.update(b.entry or {})
        entries.append(e)
        out += b.data
    if header is None:
        doc = dict(doc or {})
        if doc.get("sections") is None:  # a None placeholder keeps the Writer's key order
            doc["sections"] = entries
        header = msgpack.packb(doc, use_bin_type=True)
    out += pad * (-len(out) % alignment)
    hoff = len(out)
    out += header
    fields = dict(header_offset=hoff, header_length=len(header), header_crc=zlib.crc32(header),
                  file_length=len(out), alignment=alignment)
    fields.update(pre)
    out[:PREAMBLE_SIZE] = preamble(**fields)
    return bytes(out)


def repreamble(data: bytes, **fields: Any) -> bytes:
    """``data`` with preamble fields replaced (names as in :func:`preamble`) and its CRC redone."""
    names = ("magic", "major", "minor", "flags", "header_offset", "header_length", "header_crc",
             "alignment", "file_length", "reserved")
    current = dict(zip(names, PREAMBLE.unpack(data[:PREAMBLE_SIZE])))
    current.update(fields)
    return preamble(**current) + data[PREAMBLE_SIZE:]


def split(data: bytes) -> tuple[dict[str, Any], list[Blob]]:
    """Inverse of ``build`` for a well-formed file: the header doc and each section as a Blob."""
    hoff, hlen = struct.unpack_from("<QQ", data, 16)
    doc = msgpack.unpackb(data[hoff: hoff + hlen], raw=False)
    blobs = [Blob(data[s["offset"]: s["offset"] + s["length"]], s["encoding"], s["size"])
             for s in doc["sections"]]
    doc["sections"] = None
    return doc, blobs


def rebuild(data: bytes, edit, **pre: Any) -> bytes:
    """``build(*edit(doc, blobs), **pre)`` on the parts of valid file ``data``."""
    return build(*edit(*split(data)), **pre)


@contextlib.contextmanager
def codec_unknown(name: str) -> Iterator[None]:
    """Within the block, codec ``name`` is unknown to this reader (as to a reader older than it)."""
    codec = aqformat.codecs.get(name)
    aqformat.codecs.unregister(name)
    try:
        yield
    finally:
        aqformat.codecs.register(codec)


def assert_edited_record_refused(folder: os.PathLike | str, data: bytes, change: dict[str, Any], match: str,
                                 minor: int) -> None:
    """Valid file ``data`` with ``change`` merged into its first tensor record (CRCs fixed): reading
    that tensor fails with an ``AqmFormatError`` matching ``match``."""
    import pytest

    def edit(doc, blobs):
        doc["tensors"][0].update(change)
        return doc, blobs
    path = os.path.join(folder, "edited.aqm")
    with open(path, "wb") as fh:
        fh.write(rebuild(data, edit, minor=minor))
    with pytest.raises(aqformat.AqmFormatError, match=match), aqformat.open(path) as f:
        f.read(f.names()[0])


def assert_listed_but_unreadable_without(path: os.PathLike | str, codec: str, name: str = "t") -> None:
    """A reader that does not know ``codec`` lists tensor ``name`` of ``path`` and refuses to read
    it with a clear error (spec, "Version rules")."""
    import pytest
    with codec_unknown(codec), aqformat.open(path) as f:
        assert f.info(name).codec == codec and f.info(name).shape
        with pytest.raises(aqformat.AqmUnsupportedError, match=f"codec '{codec}'"):
            f.read(name)


def fix_crcs(data: bytes) -> bytes:
    """Recompute preamble, header and (when the header still parses) section CRCs.

    Used on byte-level mutants so that they reach the structural validator
    instead of stopping at the first checksum.
    """
    buf = bytearray(data)
    if len(buf) < PREAMBLE_SIZE:
        return data
    hoff, hlen = struct.unpack_from("<QQ", buf, 16)
    if hoff <= len(buf) and hoff + hlen <= len(buf):
        try:
            doc = msgpack.unpackb(bytes(buf[hoff: hoff + hlen]), raw=False)
            for s in doc["sections"]:
                s["crc32"] = zlib.crc32(bytes(buf[s["offset"]: s["offset"] + s["length"]]))
            header = msgpack.packb(doc, use_bin_type=True)
            if len(header) == hlen:  # re-packing may change the length; keep the layout
                buf[hoff: hoff + hlen] = header
        except Exception:  # a garbage header stays garbage; only its CRC is fixed
            pass
        struct.pack_into("<I", buf, 32, zlib.crc32(bytes(buf[hoff: hoff + hlen])))
    struct.pack_into("<I", buf, PREAMBLE_SIZE - 4, zlib.crc32(bytes(buf[: PREAMBLE_SIZE - 4])))
    return bytes(buf)


def write_sample(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small file using every section kind; return each tensor's expected decode.

    Contains raw (plain, zstd, bfloat16, int64, scalar, empty) tensors, two AQ
    tensors sharing a codebook group (one with scale, perm and axes), a lattice
    tensor (zstd indices) and an embedded graph.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    zeros = np.zeros((64, 16), np.float16)
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    bf = rng.integers(0, 1 << 16, size=(5,), dtype=np.uint16)
    cb = rng.standard_normal((2, 16, 4)).astype(np.float16)
    conv_shape, conv_axes = (3, 2, 2, 2), [0, 2, 3, 1]  # rows=3, cols=8 -> 2 vectors a row
    codes_a = rng.integers(0, 16, size=(3 * 2, 2))
    codes_b = rng.integers(0, 16, size=(4 * 3, 2))  # shape (4, 9): cols padded to 12
    perm = rng.permutation(9)
    scale = rng.uniform(0.5, 2, size=4).astype(np.float32)
    q = rng.integers(-3, 4, size=(4, 5))
    step = rng.uniform(0.01, 0.1, size=4).astype(np.float32)
    with Writer(path, source={"framework": "numpy", "name": "sample"}, metadata={"k": [1, 2.5, "x"]}) as wr:
        wr.add_tensor("w", w)
        wr.add_tensor("zeros", zeros, compress=True)
        wr.add_tensor("ids", ids)
        wr.add_tensor("bf", bf, dtype="bfloat16")
        wr.add_tensor("scalar", np.float64(3.5))
        wr.add_tensor("empty", np.zeros((0, 3), np.float32))
        wr.add_codebooks("g", cb)
        wr.add_aq("conv", conv_shape, codes_a, group="g", axes=conv_axes)
        wr.add_aq("fc", (4, 9), codes_b, group="g", dtype="float16", scale=scale, perm=perm)
        wr.add_lattice("lat", (4, 5), q, step, seed=12345)
        wr.set_graph(onnx_graph_bytes({"w": (6, 10)}))
    return {"w": w, "zeros": zeros, "ids": ids, "bf": bf, "scalar": np.float64(3.5),
            "empty": np.zeros((0, 3), np.float32)}


def sample_decoded(path) -> dict[str, np.ndarray]:
    """:func:`write_sample` at ``path``; return every tensor as the reader decodes it (copied)."""
    import aqformat
    write_sample(path)
    with aqformat.open(path) as f:
        return {n: f.read(n).copy() for n in f.names()}


def aq_only(K: int = 16, M: int = 2, d: int = 4, shape: tuple[int, ...] = (4, 8)) -> tuple[dict, list[Blob]]:
    """Header doc and blobs of a minimal valid single-AQ-tensor file (for field surgery)."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    n = rows * -(-cols // d) * M
    bits = K.bit_length() - 1
    codes = pack(np.arange(n) % K, bits)
    cb = np.linspace(-1, 1, M * K * d, dtype=np.float16).tobytes()
    doc = {"codebooks": [{"name": "g", "M": M, "K": K, "d": d, "dtype": "float16", "section": 0}],
           "tensors": [{"name": "t", "shape": list(shape), "dtype": "float32", "codec": "aq",
                        "group": 0, "codes": 1}]}
    return doc, [Blob(cb), Blob(codes)]


# -- mutation ----------------------------------------------------------------------------
# Mutators take a random.Random (hypothesis' st.randoms() in tests, a seeded one in
# fuzz/fuzz_reader.py) so both runs share one implementation and failures replay.

RANS = ("rans", "rans-context")  # the section encodings of aqformat.rans, spelled out: tests pin the spec
NASTY = [0, 1, -1, 7, 63, 64, 255, 256, 65536, 1 << 31, 1 << 32, (1 << 48) + 1, (1 << 63) - 1,
         (1 << 64) - 1, -(1 << 63), True, False, None, 0.5, float("nan"), float("inf"), "", "raw",
         "zstd", "rans", "rans-context", "aq", "lattice", "affine", "row", "tensor", "float32", "bogus", "x" * 1100, b"\x00\xff", [], {}, [[[[]]]],
         {"a": {"b": {}}}, [0, 0], [1 << 40, 1 << 40], [-1], list(range(9))]


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep."""
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


def _containers(doc: Any, depth: int = 0) -> list[Any]:
    """Every map and list inside ``doc``, down to depth 6 (mutants may nest deeply)."""
    out = [doc]
    values = doc.values() if isinstance(doc, dict) else doc
    for v in values:
        if isinstance(v, (dict, list)) and depth < 6:
            out += _containers(v, depth + 1)
    return out


def _nasty(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.1:
        return nested(rng.choice([40, 500]))  # msgpack's packer stops at 511 levels
    if r < 0.3:
        return rng.choice([-1, 1]) * rng.getrandbits(rng.choice([8, 16, 33, 49, 63]))
    return copy.deepcopy(rng.choice(NASTY))


def mutate_header(rng: random.Random, doc: dict, blobs: list[Blob]) -> tuple[dict, list[Blob]]:
    """One structural edit of a split file (sections are regenerated by ``build``)."""
    # files without rans sections draw exactly as before, so their mutants stay the same
    op = 10 if any(b.encoding in RANS for b in blobs) and rng.random() < 0.2 else rng.randrange(10)
    if op <= 2:  # set, add or delete a field anywhere (including section records)
        if doc.get("sections") is None:
            doc["sections"] = [{"offset": 0, "length": len(b.data), "size": b.size or len(b.data),
                                "encoding": b.encoding, "crc32": zlib.crc32(b.data)} for b in blobs]
            _relayout(doc, blobs)
        c = rng.choice(_containers(doc))
        if isinstance(c, list):
            if op == 2 and c:
                del c[rng.randrange(len(c))]
            elif op == 0 and c:
                c[rng.randrange(len(c))] = _nasty(rng)
            else:
                c.insert(rng.randrange(len(c) + 1), _nasty(rng))
        elif op == 2 and c:
            del c[rng.choice(sorted(c))]
        else:
            key = rng.choice(sorted(c)) if op == 0 and c else rng.choice(
                ["offset", "length", "size", "shape", "codec", "axes", "perm", "scale", "graph", "future"])
            c[key] = _nasty(rng)
    elif op == 3 and len(blobs) > 1:  # swap the contents of two sections
        i, j = rng.sample(range(len(blobs)), 2)
        blobs[i], blobs[j] = blobs[j], blobs[i]
    elif op == 4 and _records(doc, "tensors"):  # a duplicate tensor record
        doc["tensors"].append(dict(rng.choice(_records(doc, "tensors"))))
    elif op == 5 and blobs:  # a zstd bomb or mismatched frame in place of a section
        i = rng.randrange(len(blobs))
        raw = b"\0" * rng.choice([0, 100, 1 << 20, 8 << 20])
        blobs[i] = zstd_blob(raw, content_size=rng.random() < 0.5,
                             size=rng.choice([blobs[i].size or len(blobs[i].data), len(raw), 1 << 40]))
    elif op == 6 and _records(doc, "tensors"):  # huge shape
        dims = [0, 1, 1 << 16, 1 << 24, 1 << 32, 1 << 48]
        rng.choice(_records(doc, "tensors"))["shape"] = [rng.choice(dims) for _ in range(rng.randrange(1, 10))]
    elif op == 7:  # unknown codec / unknown optional fields
        for t in _records(doc, "tensors"):
            if rng.random() < 0.5:
                t["codec"] = "future"
        doc["future_field"] = {"nested": [1, 2, 3]}
    elif op == 9 and _records(doc, "tensors") and doc.get("sections") is None:
        # a valid tensor that decodes to 1-16 MiB from a few hundred bytes: the decode budget's case
        t = rng.choice(_records(doc, "tensors"))
        n = rng.choice([1 << 20, 1 << 22, 1 << 24])
        for key in ("codes", "scale", "perm", "step", "group", "axes", "index_dtype", "seed", "scale_dtype"):
            t.pop(key, None)
        t.update(codec="raw", dtype="uint8", shape=[n], data=len(blobs))
        blobs.append(zstd_blob(bytes(n)))
    elif op == 10:  # a field of a rans stream's header
        i = rng.choice([i for i, b in enumerate(blobs) if b.encoding in RANS])
        data = bytearray(blobs[i].data)
        offset, fmt = rng.choice([(0, "<B"), (1, "<B"), (2, "<B"), (3, "<B"), (4, "<I"), (8, "<I"), (12, "<I"), (16, "<I"),
                                  (20, "<h"), (22, "<H")])
        if len(data) >= offset + struct.calcsize(fmt):
            bits = 8 * struct.calcsize(fmt)
            value = rng.choice([0, 1, 2, 4, 15, 16, 17, 4095, 4096, 1 << (bits - 1), rng.getrandbits(bits)])
            value &= (1 << bits) - 1
            struct.pack_into(fmt.upper(), data, offset, value)  # "<H" for "<h": the same bytes
        blobs[i] = Blob(bytes(data), blobs[i].encoding, blobs[i].size)
    elif op == 8 and _records(doc, "codebooks"):  # codebook geometry
        g = rng.choice(_records(doc, "codebooks"))
        g[rng.choice(["K", "M", "d"])] = rng.choice([0, 1, 3, 12, 256, 257, 1 << 16, 1 << 17, 1 << 40])
    return doc, blobs


def _records(doc: dict, key: str) -> list[dict]:
    """The map entries of list ``doc[key]`` (mutants may have broken it)."""
    v = doc.get(key)
    return [r for r in v if isinstance(r, dict)] if isinstance(v, list) else []


def _relayout(doc: dict, blobs: list[Blob]) -> None:
    """Give explicit section records the offsets ``build`` would use."""
    pos = PREAMBLE_SIZE
    for e, b in zip(doc["sections"], blobs):
        pos += -pos % ALIGNMENT
        e["offset"] = pos
        pos += len(b.data)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: bit flips, overwritten runs, truncation, insertion, preamble fields."""
    buf = bytearray(data)
    op = rng.randrange(6)
    if op == 0:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(buf) * 8)
            buf[i // 8] ^= 1 << (i % 8)
    elif op == 1:
        i = rng.randrange(len(buf))
        n = rng.randrange(1, 17)
        buf[i: i + n] = bytes([rng.choice([0, 0xFF, rng.randrange(256)])]) * n
    elif op == 2:  # truncate, preferably at a section or header boundary
        cuts = boundaries(data)
        del buf[rng.choice(cuts) if rng.random() < 0.7 else rng.randrange(len(buf)):]
    elif op == 3:
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = rng.randbytes(rng.randrange(1, 130))
    else:
        field = rng.choice(["major", "minor", "flags", "header_offset", "header_length", "alignment",
                            "file_length"])
        bits = {"major": 16, "minor": 16, "flags": 32, "alignment": 32}.get(field, 64)
        value = rng.choice([0, 1, 3, 8, 64, 1 << 16, len(data), len(data) + 64, (1 << bits) - 1,
                            rng.getrandbits(bits)])
        return repreamble(data, **{field: value & ((1 << bits) - 1)})
    return bytes(buf)


def boundaries(data: bytes) -> list[int]:
    """Offsets where a section or the header starts or ends (and 0, 64)."""
    hoff, hlen = struct.unpack_from("<QQ", data, 16)
    doc = msgpack.unpackb(data[hoff: hoff + hlen], raw=False)
    cuts = {0, PREAMBLE_SIZE, hoff, hoff + hlen - 1}
    for s in doc["sections"]:
        cuts |= {s["offset"], s["offset"] + s["length"]}
    return sorted(cuts)


def mutant(rng: random.Random, data: bytes) -> bytes:
    """A random mutant of valid file ``data``, CRCs fixed up about half the time."""
    if rng.random() < 0.5:
        doc, blobs = split(data)
        for _ in range(rng.randrange(1, 4)):
            doc, blobs = mutate_header(rng, doc, blobs)
        try:
            out = build(doc, blobs)
        except (TypeError, ValueError, OverflowError):  # msgpack cannot encode the value
            out = data
    else:
        out = mutate_bytes(rng, data)
        if rng.random() < 0.5:
            out = fix_crcs(out)
    return out


# -- embedded ONNX graphs ----------------------------------------------------------------
# Written with the runtime's own protobuf field writer, so the fuzzer needs neither onnx
# nor onnxruntime (and its peak RSS stays that of the reader).

def _stub(name: str | bytes, dims: tuple[int, ...], location: str | bytes = "aqm", kind: int = 1) -> bytes:
    from aqformat.runtime.onnx_graph import pb_field as _pb
    return (b"".join(_pb(1, d) for d in dims) + _pb(2, 1) + _pb(8, name)
            + _pb(13, _pb(1, "location") + _pb(2, location)) + _pb(14, kind))


def _value_info(name: str, dims: tuple[int, ...]) -> bytes:
    from aqformat.runtime.onnx_graph import pb_field as _pb
    shape = b"".join(_pb(1, _pb(1, d)) for d in dims)
    return _pb(1, name) + _pb(2, _pb(1, _pb(1, 1) + _pb(2, shape)))


def onnx_graph_bytes(stubs: dict[str, tuple[int, ...]]) -> bytes:
    """A ModelProto ``y = relu(x @ W) + b`` whose weights are the .aqm stubs ``stubs``, with an If
    node (a subgraph), a Constant node (a tensor attribute) and an inline initializer."""
    from aqformat.runtime.onnx_graph import pb_field as _pb
    node = lambda ins, outs, op, attrs=b"": (b"".join(_pb(1, i) for i in ins) + b"".join(_pb(2, o) for o in outs)
                                            + _pb(4, op) + attrs)
    branch = _pb(1, node(["h"], ["z"], "Identity")) + _pb(2, "then") + _pb(12, _value_info("z", (2, 4)))
    const = _pb(1, 2) + _pb(2, 1) + _pb(9, np.ones(2, np.float32).tobytes())
    nodes = [node(["x", "W"], ["h"], "MatMul"), node(["h"], ["r"], "Relu"),
             node([], ["c"], "Constant", _pb(5, _pb(1, "value") + _pb(5, const) + _pb(20, 4))),
             node(["cond"], ["z2"], "If", _pb(5, _pb(1, "then_branch") + _pb(6, branch) + _pb(20, 5))
                  + _pb(5, _pb(1, "else_branch") + _pb(6, branch) + _pb(20, 5))),
             node(["r", "b"], ["y"], "Add")]
    inline = _pb(1, 4) + _pb(2, 1) + _pb(8, "b") + _pb(9, np.zeros(4, np.float32).tobytes())
    graph = (b"".join(_pb(1, n) for n in nodes) + _pb(2, "g")
             + b"".join(_pb(5, _stub(k, v)) for k, v in stubs.items()) + _pb(5, inline)
             + _pb(11, _value_info("x", (2, 8))) + _pb(12, _value_info("y", (2, 4))))
    return _pb(1, 8) + _pb(8, _pb(2, 17)) + _pb(7, graph)


def write_graph_sample(path, seed: int = 0) -> None:
    """A small file whose embedded ONNX graph's stubs name its tensors (raw and AQ)."""
    rng = np.random.default_rng(seed)
    with Writer(path, source={"framework": "onnx", "name": "graph-sample"}) as w:
        w.add_codebooks("g", rng.standard_normal((2, 16, 4)).astype(np.float16))
        w.add_aq("W", (8, 4), rng.integers(0, 16, size=(8, 2)), group="g")
        w.add_tensor("V", rng.standard_normal((4, 4)).astype(np.float32))
        w.set_graph(onnx_graph_bytes({"W": (8, 4), "V": (4, 4)}))


def _ldfields(buf: bytes) -> list[tuple[int, int, int]]:
    """``(field_start, value_start, value_end)`` of the well-formed length-delimited fields at every
    depth of ``buf`` (a best-effort parse: mutants may stop being protobuf)."""
    from aqformat.errors import AqmFormatError
    from aqformat.runtime.onnx_graph import fields
    found, todo = [], [(0, len(buf), 0)]
    while todo and len(found) < 4096:
        start, end, depth = todo.pop()
        try:
            for num, wt, val, vend, fstart in fields(buf, start, end):
                if wt == 2:
                    found.append((fstart, val, vend))
                    if depth < 12:
                        todo.append((val, vend, depth + 1))
        except AqmFormatError:
            continue
    return found


def mutate_graph(rng: random.Random, graph: bytes) -> bytes:
    """One protobuf-aware edit of a serialized ModelProto: hostile stubs and external references,
    wrong wire types, lying lengths, deep nesting, huge repeated fields, or damaged bytes."""
    from aqformat.runtime.onnx_graph import pb_field as _pb, varint
    fields = _ldfields(graph)
    op = rng.randrange(9)
    if op == 0 or not fields:  # a new tensor with an external reference, anywhere a tensor may be
        loc = rng.choice(["aqm", "id_rsa", "../../etc/passwd", "/proc/self/environ", "", b"\xff\xfe"])
        t = _stub(rng.choice(["W", "V", "k", b"\xc3", "x" * 2000]), tuple(rng.choice([4, 8, 1 << 40])
                  for _ in range(rng.randrange(0, 11))), loc, rng.choice([0, 1, 1, 2]))
        where = rng.randrange(4)
        if where == 0:
            return _pb(7, _pb(5, t)) + graph
        if where == 1:  # a Constant node's tensor attribute
            return _pb(7, _pb(1, _pb(4, "Constant") + _pb(5, _pb(1, "value") + _pb(5, t)))) + graph
        if where == 2:  # a subgraph's initializer
            return _pb(7, _pb(1, _pb(4, "If") + _pb(5, _pb(6, _pb(5, t))))) + graph
        return _pb(7, _pb(15, _pb(1, t))) + graph  # a sparse initializer's values
    fstart, vstart, vend = rng.choice(fields)
    if op == 1:  # the length says more or less than the bytes
        n = rng.choice([0, vend - vstart + 1, vend - vstart - 1, 1 << 31, (1 << 64) - 1])
        key = graph[fstart:fstart + 1] if graph[fstart] < 0x80 else graph[fstart:fstart + 2]
        return graph[:fstart] + key + varint(max(n, 0)) + graph[vstart:]
    if op == 2:  # the same field number with another wire type
        key = graph[fstart]
        wt = rng.choice([0, 1, 3, 4, 5, 6, 7])
        return graph[:fstart] + bytes([(key & ~7) | wt]) + graph[fstart + 1:]
    if op == 3:  # nest the graph inside If-node subgraphs
        inner = graph
        for _ in range(rng.choice([1, 10, 63, 70, 200])):
            inner = _pb(1, _pb(4, "If") + _pb(5, _pb(1, "then_branch") + _pb(6, inner)))
        return _pb(7, inner)
    if op == 4:  # a huge run of tiny fields (linear-time scan, bounded memory)
        unit = rng.choice([b"\x08\x00", _pb(1, _pb(4, "Relu")), _pb(11, _pb(1, "v")), _pb(5, _pb(1, 1))])
        return graph + _pb(7, unit * (rng.choice([1 << 10, 1 << 14, 1 << 17]) // len(unit)))
    if op == 5:  # a value replaced by invalid UTF-8 or a long string
        text = rng.choice([b"\xff", b"\xed\xa0\x80", b"\x1b[2J", b"a" * 5000])
        return graph[:vstart - len(varint(vend - vstart))] + varint(len(text)) + text + graph[vend:]
    if op == 6:  # a duplicated field
        return graph[:vend] + graph[fstart:vend] + graph[vend:]
    if op == 7:  # a deleted field
        return graph[:fstart] + graph[vend:]
    buf = bytearray(graph)  # byte damage
    for _ in range(rng.randrange(1, 9)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def graph_mutant(rng: random.Random, data: bytes) -> bytes:
    """``data`` (a file with an ONNX graph) with its graph mutated 1-3 times, stored raw or zstd."""
    doc, blobs = split(data)
    i = doc["graph"]["section"]
    g = blobs[i].data if blobs[i].encoding == "raw" else zstandard.ZstdDecompressor().decompress(blobs[i].data)
    for _ in range(rng.randrange(1, 4)):
        g = mutate_graph(rng, g)
    if rng.random() < 0.5:
        blobs[i] = Blob(g)
    else:
        blobs[i] = zstd_blob(g, content_size=rng.random() < 0.8,
                             size=rng.choice([len(g)] * 6 + [len(g) + 1, max(len(g) - 1, 0), 1 << 30]))
    return build(doc, blobs)


def read_graph(f: aqformat.AqmFile) -> None:
    """What the runtime and aqm-info do with a stored ONNX graph, short of building a session."""
    from aqformat.runtime.onnx_graph import locate_stubs, scan_model
    from aqformat.runtime.onnx_io import graph_io
    g = f.graph()
    if g is None or g[0] != "onnx":
        return
    scan = scan_model(g[1])  # what InferenceSession does
    locate_stubs(g[1], {s.name: f"aqm.{i}" for i, s in enumerate(scan.stubs)}, scan)
    graph_io(g[1])  # what aqm-info does


def read_everything(path) -> None:
    """What a user does with a file: open it, read every tensor and the graph, verify it."""
    with aqformat.open(path) as f:
        for name in f.names():
            f.info(name)
            f.read(name)
        read_graph(f)
        f.verify()


class FullDisk:
    """A file object that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, f, budget: int):
        self._f, self._budget = f, budget

    def write(self, data):
        if len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)
