"""A second, deliberately naive decoder written from spec/FORMAT.md alone.

It shares no code with aqformat's decoders (it parses the preamble and header
itself and unpacks bits with numpy.unpackbits), so agreement between the two
is evidence that the implementation follows the spec.
"""
from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import zstandard

NP = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int8": "i1",
      "uint8": "u1", "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4",
      "int64": "<i8", "uint64": "<u8", "bool": "?"}


def _section(buf: bytes, s: dict) -> bytes:
    data = buf[s["offset"]: s["offset"] + s["length"]]
    assert zlib.crc32(data) == s["crc32"]
    if s["encoding"] in ("rans", "rans-context"):
        return _rans(data, s["size"], s["encoding"])
    return zstandard.ZstdDecompressor().decompress(data) if s["encoding"] == "zstd" else data


def _rans(data: bytes, size: int, encoding: str) -> bytes:
    """Section encodings ``rans`` and ``rans-context`` (spec 4.5), one symbol at a time."""
    w, e, T, mode, cols, lanes, n_words, n_extra = struct.unpack_from("<BBBBIIII", data)
    assert mode == {"rans": 0, "rans-context": 1}[encoding]
    pos, E = 20, 2**e - 1
    tables = []
    for _ in range(T):
        lo, count = struct.unpack_from("<hH", data, pos)
        pos += 4
        f = []
        while len(f) < count:
            b0 = data[pos]
            pos += 1
            if b0 >= 128:
                f.append(b0 - 128 + 128 * data[pos])
                pos += 1
            else:
                f.append(b0)
        assert sum(f) == 4096 and max(f) < 4096
        tables.append((lo, f, [sum(f[:j]) for j in range(count)]))
    n = size // w
    rows = n // cols
    row_table = [0] * rows
    if T > 1 and mode == 0:
        b = (T - 1).bit_length()
        nbytes = -(-rows * b // 8)
        bits = np.unpackbits(np.frombuffer(data[pos: pos + nbytes], np.uint8), bitorder="little")
        row_table = [sum(int(bits[r * b + k]) << k for k in range(b)) for r in range(rows)]
        pos += nbytes
    x = list(struct.unpack_from(f"<{lanes}I", data, pos))
    pos += 4 * lanes
    words = struct.unpack_from(f"<{n_words}H", data, pos)
    pos += 2 * n_words
    extra = np.unpackbits(np.frombuffer(data[pos: pos + n_extra], np.uint8), bitorder="little")
    assert pos + n_extra == len(data)
    if mode == 0:
        order = [(i, i % lanes) for i in range(n)]
    else:  # rans-context: lane l holds symbols l*run .. l*run + run - 1, decoded a step of every lane at a time
        run = -(-n // lanes)
        order = [(lane * run + t, lane) for t in range(run) for lane in range(lanes) if lane * run + t < n]
    tok = [0] * n
    nxt = 0
    for i, lane in order:
        if mode == 0:
            lo, f, c = tables[row_table[i // cols]]
        else:
            before = min(i % cols, i % run)
            ctx = sum(abs(tok[i - b]) for b in (1, 2) if before >= b)
            lo, f, c = tables[min(ctx, T - 1)]
        s = x[lane] % 4096
        j = next(j for j in range(len(f)) if c[j] <= s < c[j] + f[j])
        tok[i] = lo + j
        x[lane] = f[j] * (x[lane] // 4096) + s - c[j]
        if x[lane] < 65536:
            x[lane] = x[lane] * 65536 + words[nxt]
            nxt += 1
    bitpos = 0
    out = []
    for t in tok:  # escapes take their bits in the order of i
        if abs(t) > E:
            k = abs(t) - E + e
            m = sum(int(extra[bitpos + q]) << q for q in range(k - 1))
            bitpos += k - 1
            t = (1 if t > 0 else -1) * (2 ** (k - 1) + m)
        out.append(t)
    assert nxt == n_words and all(v == 65536 for v in x) and -(-bitpos // 8) == n_extra
    return np.array(out, f"<i{w}").tobytes()


def _splitmix(seed: int, n: int) -> np.ndarray:
    out = np.empty(n)
    mask = (1 << 64) - 1
    for k in range(n):  # integer-exact and slow on purpose: this is the reference
        z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out[k] = (z >> 11) * 2.0**-53 - 0.5
    return out


def decode_file(path: str) -> dict[str, np.ndarray]:
    """Decode every tensor of an .aqm file following the spec text."""
    buf = open(path, "rb").read()
    magic, major, minor, flags, hoff, hlen, hcrc, align, flen = struct.unpack_from("<8sHHIQQIIQ", buf)
    assert magic == b"\x89AQM\r\n\x1a\n" and major == 1 and flen == len(buf)
    assert struct.unpack_from("<I", buf, 60)[0] == zlib.crc32(buf[:60])
    header = buf[hoff: hoff + hlen]
    assert zlib.crc32(header) == hcrc
    h = msgpack.unpackb(header, raw=False)
    secs = h["sections"]
    out = {}
    for t in h["tensors"]:
        shape = t["shape"]
        if t["codec"] == "raw":
            a = np.frombuffer(_section(buf, secs[t["data"]]), NP[t["dtype"]]).reshape(shape)
            out[t["name"]] = (a.astype(np.uint32) << 16).view(np.float32) if t["dtype"] == "bfloat16" else a
            continue
        if t["codec"] == "half":  # 5.6: exact to float32, then the dtype
            data = np.frombuffer(_section(buf, secs[t["data"]]), "<u2")
            assert len(data) == int(np.prod(shape))
            a = (data.view("<f2").astype(np.float32) if t.get("format", "float16") == "float16"
                 else (data.astype(np.uint32) << 16).view(np.float32)).reshape(shape)
            out[t["name"]] = a.astype(np.float16) if t["dtype"] == "float16" else a
            continue
        axes = t.get("axes") or list(range(len(shape)))
        s2 = [shape[a] for a in axes]
        rows, cols = (s2[0], int(np.prod(s2[1:]))) if len(s2) >= 2 else (1, s2[0])
        if t["codec"] == "aq":
            g = h["codebooks"][t["group"]]
            M, K, d = g["M"], g["K"], g["d"]
            b = K.bit_length() - 1
            cb = np.frombuffer(_section(buf, secs[g["section"]]), NP[g["dtype"]]).reshape(M, K, d).astype(np.float32)
            cols_p = -(-cols // d) * d
            n = rows * cols_p // d * M
            bits = np.unpackbits(np.frombuffer(_section(buf, secs[t["codes"]]), np.uint8), bitorder="little")
            codes = (bits[: n * b].reshape(n, b).astype(np.int64) << np.arange(b)).sum(1).reshape(-1, M)
            vec = cb[0][codes[:, 0]]
            for m in range(1, M):
                vec = vec + cb[m][codes[:, m]]
            q = vec.reshape(rows, cols_p)[:, :cols]
            if t.get("scale") is not None:
                q = q * np.frombuffer(_section(buf, secs[t["scale"]]), NP[t.get("scale_dtype", "float16")]).astype(np.float32)[:, None]
            w = q.copy()
            if t.get("perm") is not None:
                perm = np.frombuffer(_section(buf, secs[t["perm"]]), "<u4")
                w = np.empty_like(q)
                w[:, perm] = q
        elif t["codec"] == "affine":
            data = _section(buf, secs[t["data"]])
            pairs = rows if t.get("scope", "row") == "row" else 1
            scale = np.frombuffer(data[: 2 * pairs], "<f2").astype(np.float32)
            offset = np.frombuffer(data[2 * pairs: 4 * pairs], "<f2").astype(np.float32)
            b = t["bits"]
            assert len(data) == 4 * pairs + -(-rows * cols * b // 8)
            bits = np.unpackbits(np.frombuffer(data[4 * pairs:], np.uint8), bitorder="little")
            c = (bits[: rows * cols * b].reshape(-1, b).astype(np.int64) << np.arange(b)).sum(1).reshape(rows, cols)
            p = np.arange(rows) if pairs == rows else np.zeros(rows, np.int64)
            w = offset[p][:, None] + (c.astype(np.float32) * scale[p][:, None]).astype(np.float32)
        else:  # lattice (5.3), or uniform (5.7): no dither
            q = np.frombuffer(_section(buf, secs[t["data"]]), NP[t["index_dtype"]]).reshape(rows, cols)
            step = np.frombuffer(_section(buf, secs[t["step"]]), "<f4").astype(np.float64)
            u = _splitmix(t["seed"], rows * cols).reshape(rows, cols) if t["codec"] == "lattice" else 0.0
            w = ((q - u) * step[:, None]).astype(np.float32)
        full = np.empty(shape, np.float32)
        full[...] = np.transpose(w.reshape(s2), np.argsort(axes))
        out[t["name"]] = full.astype(np.float16) if t["dtype"] == "float16" else full
    return out
