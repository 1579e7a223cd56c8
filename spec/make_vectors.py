"""Produce the frozen v1 test vectors in spec/vectors/ and their MANIFEST.json.

Run once per new vector (``python spec/make_vectors.py NAME``); existing files
are never rewritten, because readers must keep decoding them identically.
``--check`` regenerates everything in a temporary folder and compares bytes
(the writer is deterministic, so any difference is a format change).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

import aqformat

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def _codes(rng: np.random.Generator, n_vec: int, M: int, K: int) -> np.ndarray:
    return rng.integers(0, K, size=(n_vec, M))


def raw_dtypes(w: aqformat.Writer, rng: np.random.Generator) -> None:
    for dt in ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
               "uint32", "int64", "uint64"):
        info = np.iinfo(dt) if np.dtype(dt).kind in "iu" else None
        a = (rng.integers(info.min, info.max, size=(3, 5), dtype=dt, endpoint=True) if info
             else rng.standard_normal((3, 5)).astype(dt))
        w.add_tensor(f"raw.{dt}", a)
    w.add_tensor("raw.bfloat16", (rng.standard_normal(7).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16),
                 dtype="bfloat16")
    w.add_tensor("raw.bool", rng.integers(0, 2, size=(4, 4)).astype(bool))
    w.add_tensor("raw.scalar", np.array(3.5, dtype=np.float32))
    w.add_tensor("raw.empty", np.zeros((0, 3), dtype=np.float32))


def aq_8bit_shared(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_codebooks("shared", rng.standard_normal((2, 256, 8)).astype(np.float16))
    w.add_aq("layer1.weight", (16, 32), _codes(rng, 16 * 4, 2, 256), group="shared",
             scale=rng.uniform(0.5, 2, 16))
    w.add_aq("layer2.weight", (8, 64), _codes(rng, 8 * 8, 2, 256), group="shared")


def aq_3bit_perm(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_codebooks("g3", rng.standard_normal((3, 8, 4)).astype(np.float16))
    # MatMul-style [in, out] weight viewed with axes (1, 0); 10 columns pad to 12.
    w.add_aq("matmul.B", (10, 6), _codes(rng, 6 * 3, 3, 8), group="g3", axes=(1, 0),
             perm=rng.permutation(10), scale=rng.uniform(0.1, 1, 6), scale_dtype="float32")


def aq_7bit_conv(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_codebooks("g7", rng.standard_normal((2, 128, 9)).astype(np.float32), dtype="float32")
    w.add_aq("conv.weight", (4, 3, 3, 3), _codes(rng, 4 * 3, 2, 128), group="g7", dtype="float16")


def aq_12bit_bf16(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_codebooks("g12", rng.standard_normal((1, 4096, 4)).astype(np.float16))
    w.add_aq("fc.weight", (5, 12), _codes(rng, 5 * 3, 1, 4096), group="g12", dtype="bfloat16",
             scale=rng.uniform(0.5, 2, 5))


def aq_1bit_16bit(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_codebooks("g1", rng.standard_normal((5, 2, 2)).astype(np.float16))
    w.add_codebooks("g16", rng.standard_normal((1, 65536, 2)).astype(np.float16))
    w.add_aq("vec", (9,), _codes(rng, 5, 5, 2), group="g1", scale=np.array([1.5]))
    w.add_aq("wide", (3, 7), _codes(rng, 3 * 4, 1, 65536), group="g16")


def lattice(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_lattice("lat.small", (6, 10), rng.integers(-4, 5, size=(6, 10)), rng.uniform(0.01, 0.1, 6),
                  seed=0x0123456789ABCDEF)
    w.add_lattice("lat.wide", (20, 3), rng.integers(-300, 300, size=(3, 20)), rng.uniform(1e-3, 1e-2, 3),
                  seed=2**64 - 1, axes=(1, 0))


def affine(w: aqformat.Writer, rng: np.random.Generator) -> None:
    """Codec ``affine`` (format 1.1): both scopes, code widths 1, 3, 4, 5 and 8, axes, zstd and raw data."""
    from aqformat.codecs.affine import fields

    def add(name, shape, rows, cols, bits, scope="row", axes=None, dtype="float32", compress=("data",)):
        pairs = rows if scope == "row" else 1
        codes = rng.integers(0, 1 << bits, size=(rows, cols))
        w.add_encoded(name, "affine", shape, fields(codes, rng.uniform(0.001, 0.1, pairs), rng.uniform(-1, 0, pairs),
                                                    bits, scope, axes), dtype=dtype, compress=compress)
    add("af.linear", (12, 40), 12, 40, 4)
    add("af.depthwise", (8, 1, 3, 3), 8, 9, 3, scope="tensor", dtype="float16")
    add("af.bias", (10,), 1, 10, 8, compress=())
    add("af.matmul", (6, 5), 5, 6, 5, axes=(1, 0), dtype="bfloat16")
    add("af.binary", (3, 11), 3, 11, 1, compress=())


def lattice_rans(w: aqformat.Writer, rng: np.random.Generator) -> None:
    """Section encoding ``rans`` (format 1.2): lattice indices of widths 1, 2 and 4, one and several
    tables, direct ranges with and without escapes, one and several lanes, axes."""
    spread = np.repeat([0.3, 2.0, 9.0], 8)[:, None]
    w.add_lattice("rans.rows", (24, 40), np.rint(rng.laplace(0, 1, (24, 40)) * spread).clip(-127, 127),
                  rng.uniform(0.01, 0.1, 24), seed=7, entropy=True)
    q = np.rint(rng.laplace(0, 6, (30, 16)))
    far = rng.random(q.shape) < 0.05
    q[far] = rng.integers(-30000, 30000, size=int(far.sum()))
    w.add_lattice("rans.escapes", (16, 30), q, rng.uniform(1e-4, 1e-3, 30), seed=2**63 + 5, axes=(1, 0),
                  entropy=True)
    q = np.rint(rng.laplace(0, 2, (5, 64))).astype(np.int64)
    q[:, ::16] = [[-2**31], [2**31 - 1], [70000], [-3], [2**20]]
    w.add_lattice("rans.int32", (5, 64), q, rng.uniform(1e-9, 1e-8, 5), seed=11, entropy=True)
    # values a bit-length escape would code badly: a direct range
    w.add_lattice("rans.direct", (8, 300), rng.choice([-6, -1, 0, 1, 6], size=(8, 300), p=[0.1, 0.2, 0.4, 0.2, 0.1]),
                  rng.uniform(0.01, 0.1, 8), seed=5, entropy=True)
    # 5120 indices: three lanes, the last step decoding two of them
    q = np.rint(rng.standard_normal((40, 128)) * np.repeat([1.0, 4.0, 16.0, 40.0], 10)[:, None])
    w.add_lattice("rans.lanes", (40, 128), q, rng.uniform(0.01, 0.1, 40), seed=3, entropy=True)


def half(w: aqformat.Writer, rng: np.random.Generator) -> None:
    """Codec ``half`` (format 1.3): float16 and bfloat16 storage, decoded to float32, float16, float64
    and bfloat16, subnormals, the largest finite float16, signed zeros, a zstd section."""
    from aqformat.codecs.half import encode
    a = rng.standard_normal((6, 7)).astype(np.float32)
    a[0, :6] = [65504.0, -65504.0, 2.0 ** -24, -(2.0 ** -20), -0.0, 1e-9]   # 1e-9 rounds to +0
    w.add_encoded("half.f16", "half", a.shape, encode(a))
    w.add_encoded("half.bf16", "half", (3, 5), encode(rng.standard_normal((3, 5)) * 1e30, "bfloat16"))
    w.add_encoded("half.as_f64", "half", (9,), encode(rng.standard_normal(9)), dtype="float64")
    w.add_encoded("half.as_f16", "half", (2, 2, 2), encode(rng.standard_normal((2, 2, 2))), dtype="float16")
    w.add_encoded("half.as_bf16", "half", (4,), encode(rng.standard_normal(4), "bfloat16"), dtype="bfloat16")
    w.add_encoded("half.zstd", "half", (64, 16), encode(np.repeat(rng.standard_normal((1, 16)), 64, 0)),
                  compress=("data",))


def uniform(w: aqformat.Writer, rng: np.random.Generator) -> None:
    """Codec ``uniform`` (format 1.4): indices of widths 1, 2 and 4 times per-row steps, decoded to
    float32, float16 and bfloat16, axes, zstd and rans sections, a zero row."""
    from aqformat.codecs.uniform import NAME, fields

    def add(name, shape, q, step, axes=None, **kw):
        w.add_encoded(name, NAME, shape, fields(name, shape, q, step, axes), **kw)
    q = np.rint(rng.laplace(0, 2, (12, 20)))
    q[3] = 0
    add("un.int8", (12, 20), q, rng.uniform(0.01, 0.1, 12), compress=("data",))
    add("un.int16_conv", (4, 3, 3, 3), np.rint(rng.laplace(0, 300, (4, 27))), rng.uniform(1e-4, 1e-3, 4),
        dtype="float16", entropy=("data",))
    q = np.rint(rng.laplace(0, 3, (7, 9))).astype(np.int64)
    q[:, 0] = [-2**31, 2**31 - 1, 70000, -3, 2**20, 0, 1]
    add("un.int32_axes", (9, 7), q, rng.uniform(1e-9, 1e-8, 7), axes=(1, 0), dtype="bfloat16")
    add("un.rans", (40, 128), np.rint(rng.standard_normal((40, 128)) * 3), rng.uniform(0.01, 0.1, 40),
        entropy=("data",), compress=("step",))


def rans_context(w: aqformat.Writer, rng: np.random.Generator) -> None:
    """Section encoding ``rans-context`` (format 1.5): rows whose magnitude comes in runs (quiet and
    loud stretches, where a neighbour context pays), widths 1, 2 and 4, escapes, several lanes whose
    runs start inside rows, a uniform tensor."""
    from aqformat.codecs.uniform import NAME, fields

    def sines(rows, cols, amp):
        loud = np.sin(rng.uniform(0, 2 * np.pi, (rows, 1)) + np.arange(cols) * rng.uniform(0.1, 0.4, (rows, 1))) > 0
        return np.rint(rng.laplace(0, np.where(loud, amp, 0.15)))
    w.add_lattice("ctx.int8", (32, 60), sines(32, 60, 20).clip(-127, 127), rng.uniform(0.01, 0.1, 32), seed=17,
                  entropy=True)
    q = sines(30, 64, 200)
    far = rng.random(q.shape) < 0.02
    q[far] = rng.integers(-30000, 30000, size=int(far.sum()))
    w.add_lattice("ctx.escapes", (30, 64), q, rng.uniform(1e-4, 1e-3, 30), seed=2**63 + 9, entropy=True)
    q = sines(16, 120, 9).astype(np.int64)
    q[:6, ::40] = [[-2**31], [2**31 - 1], [70000], [-3], [2**20], [0]]
    w.add_lattice("ctx.int32", (16, 120), q, rng.uniform(1e-9, 1e-8, 16), seed=13, entropy=True)
    # values a bit-length escape would code badly: a direct range
    q = rng.choice([-6, -5, 5, 6], size=(8, 300)) * (np.abs(sines(8, 300, 9)) > 1)
    w.add_lattice("ctx.direct", (8, 300), q, rng.uniform(0.01, 0.1, 8), seed=23, entropy=True)
    # 5120 indices: three lanes of runs 1707, 1707 and 1706, each starting inside a row of 128
    w.add_lattice("ctx.lanes", (40, 128), sines(40, 128, 12), rng.uniform(0.01, 0.1, 40), seed=19, entropy=True)
    w.add_encoded("ctx.uniform", NAME, (24, 50), fields("ctx.uniform", (24, 50), sines(24, 50, 6),
                                                        rng.uniform(0.01, 0.1, 24)), entropy=("data",))


def zstd_graph(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.add_tensor("zeros", np.zeros((64, 64), dtype=np.float32), compress=True)
    w.add_tensor("ramp", np.arange(1000, dtype=np.int64) % 7, compress=True)
    w.set_graph(_tiny_onnx_graph())
    w.update_metadata(note="graph is an ONNX model with one external initializer", nested={"a": [1, 2.5, "x"]})


def _tiny_onnx_graph() -> bytes:
    """y = x + ramp, with `ramp` stored in the .aqm (written once, then frozen)."""
    from onnx import TensorProto, helper
    init = TensorProto(name="ramp", data_type=TensorProto.INT64, dims=[1000],
                       data_location=TensorProto.EXTERNAL)
    init.external_data.add(key="location", value="aqm")
    graph = helper.make_graph([helper.make_node("Add", ["x", "ramp"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [1000])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1000])], [init])
    return helper.make_model(graph, producer_name="aqformat-vectors",
                             opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def empty(w: aqformat.Writer, rng: np.random.Generator) -> None:
    w.update_metadata(description="a file with no tensors")


VECTORS = {f.__name__: f for f in (raw_dtypes, aq_8bit_shared, aq_3bit_perm, aq_7bit_conv,
                                   aq_12bit_bf16, aq_1bit_16bit, lattice, zstd_graph, empty, affine, lattice_rans,
                                   half, uniform, rans_context)}


def digest(path: str) -> dict:
    """Shape, dtype and SHA-256 of each decoded tensor of ``path``."""
    with aqformat.open(path) as f:
        out = {}
        for name in f.names():
            a = np.ascontiguousarray(f.read(name))
            out[name] = {"shape": list(a.shape), "dtype": f.info(name).dtype,
                         "sha256": hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()}
    return out


def build(name: str, folder: str) -> str:
    path = os.path.join(folder, f"{name}.aqm")
    with aqformat.Writer(path, producer="aqformat spec/make_vectors.py",
                         source={"framework": "numpy", "name": name}) as w:
        VECTORS[name](w, _rng(name))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="vectors to create (default: all missing ones)")
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare bytes")
    args = ap.parse_args()
    manifest_path = os.path.join(HERE, "MANIFEST.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            bad = [n for n in VECTORS if open(build(n, tmp), "rb").read() != open(os.path.join(HERE, f"{n}.aqm"), "rb").read()]
        print("identical" if not bad else f"differ: {bad}")
        return 1 if bad else 0
    for name in args.names or [n for n in VECTORS if n not in manifest]:
        if name in manifest:
            print(f"{name}: frozen, not rewritten", file=sys.stderr)
            continue
        path = build(name, HERE)
        manifest[name] = {"file_sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
                          "tensors": digest(path)}
        print(f"wrote {path}")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
