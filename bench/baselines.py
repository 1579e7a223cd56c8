"""Weight-compression baselines, each writing a real file whose bytes are counted.

Every compressor takes ``weights`` (name -> ``(float32 array, axes)``, the
matrix view of :mod:`aqformat.layout`: rows are output channels), writes one
file under ``folder`` and returns a :class:`Packed` with the weights decoded
back FROM THAT FILE. Bits per weight are ``8 * bytes_counted / params``,
where ``bytes_counted`` is the whole file for the files written here (only
the covered weights are in them) and the weight-derived initializers for
ONNX Runtime's quantized models.

Formats (all numbers counted as stored, nothing idealised):

- ``fp16``: ``.npz`` of float16 arrays.
- ``int8``: symmetric per output channel, int8 codes + fp16 scale per row.
- ``int4-g128``: asymmetric, groups of 128 along each row, codes packed two
  per byte, fp16 scale and fp16 zero (the group minimum) per group.
- ``kmeans4``: 16 fp16 centroids per tensor (1-D Lloyd), 4-bit packed codes.
- ``faiss-rq`` / ``faiss-lsq``: faiss ResidualQuantizer / LocalSearchQuantizer
  with the same ``M, K, d`` as the .aqm files, one codebook set shared by
  every tensor, fp16 per-row scales like .aqm, codes packed at ``log2 K``
  bits, fp16 codebooks; objective: weight MSE (faiss has no output metric).
- ``nncodec``: MPEG-7 part 17 (NNR) reference codec, DeepCABAC bitstream.
- ``zstd-19``: lossless zstd level 19 of the fp32 bytes (the lossless reference).
"""
from __future__ import annotations

import os
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aqformat.bitpack import pack, unpack
from aqformat.codecs.aq import decode_vectors
from aqformat.layout import from_matrix, to_matrix

Weights = Mapping[str, tuple[np.ndarray, Sequence[int] | None]]
INT8 = "int8"  # the method of :func:`int8_per_channel`'s rows, which the report's targets compare with

__all__ = ["Packed", "Weights", "INT8", "fp16", "int8_per_channel", "int4_group", "kmeans4",
           "faiss_aq", "nncodec", "zstd19", "ort_quantized", "onnx_weight_bytes",
           "sqnr_db", "FAISS_KINDS"]


@dataclass
class Packed:
    """A baseline's file, its counted bytes and the weights decoded from it."""

    method: str
    setting: str
    path: str
    bytes_counted: int
    params: int
    seconds: float
    decoded: dict[str, np.ndarray] = field(repr=False)
    extra: dict[str, object] = field(default_factory=dict)  # method-specific figures for the report

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_counted / self.params


def sqnr_db(weights: Weights, decoded: Mapping[str, np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio over all covered weights (dB)."""
    sig = sum(float(np.sum(np.square(w, dtype=np.float64))) for w, _ in weights.values())
    err = sum(float(np.sum(np.square(w.astype(np.float64) - decoded[n])))
              for n, (w, _) in weights.items())
    return float("inf") if err == 0 else 10.0 * np.log10(sig / err)


def _params(weights: Weights) -> int:
    return sum(w.size for w, _ in weights.values())


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **arrays)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _npz_method(method: str, setting: str, weights: Weights, folder: str,
                encode: Callable[[np.ndarray], dict[str, np.ndarray]],
                decode: Callable[[dict[str, np.ndarray], tuple[int, int]], np.ndarray]) -> Packed:
    """Per-tensor codec stored as one ``.npz``: encode the matrix view, decode from the file."""
    t0 = time.perf_counter()
    path = os.path.join(folder, f"{method}.npz")
    arrays = {}
    for i, (name, (w, axes)) in enumerate(weights.items()):
        for k, v in encode(to_matrix(w, axes)).items():
            arrays[f"{i}.{k}"] = v
    _save_npz(path, arrays)
    stored = _load_npz(path)
    decoded = {}
    for i, (name, (w, axes)) in enumerate(weights.items()):
        parts = {k.split(".", 1)[1]: v for k, v in stored.items() if k.split(".", 1)[0] == str(i)}
        decoded[name] = from_matrix(decode(parts, to_matrix(w, axes).shape), w.shape, axes)
    return Packed(method, setting, path, os.path.getsize(path), _params(weights),
                  time.perf_counter() - t0, decoded)


def fp16(weights: Weights, folder: str) -> Packed:
    """IEEE half precision."""
    return _npz_method("fp16", "", weights, folder, lambda W: {"w": W.astype(np.float16)},
                       lambda p, shape: p["w"].astype(np.float32))


def int8_per_channel(weights: Weights, folder: str) -> Packed:
    """Symmetric int8 with one fp16 scale per output channel."""
    def enc(W: np.ndarray) -> dict[str, np.ndarray]:
        s = (np.abs(W).max(axis=1) / 127).astype(np.float16)
        s = np.where(s > 0, s, np.float16(1))
        return {"q": np.clip(np.rint(W / s.astype(np.float32)[:, None]), -127, 127).astype(np.int8),
                "s": s}
    return _npz_method(INT8, "per-channel", weights, folder, enc,
                       lambda p, shape: p["q"].astype(np.float32) * p["s"].astype(np.float32)[:, None])


def _groups(W: np.ndarray, g: int) -> np.ndarray:
    rows, cols = W.shape
    cols_p = -(-cols // g) * g
    Wp = np.pad(W, ((0, 0), (0, cols_p - cols)), mode="edge")  # edge: padding leaves min/max intact
    return Wp.reshape(rows, cols_p // g, g)


def int4_group(weights: Weights, folder: str, group: int = 128) -> Packed:
    """Asymmetric 4-bit, fp16 scale and zero per group of ``group`` along each row."""
    def enc(W: np.ndarray) -> dict[str, np.ndarray]:
        G = _groups(W, group)
        lo = G.min(axis=2).astype(np.float16)
        s = ((G.max(axis=2) - lo.astype(np.float32)) / 15).astype(np.float16)
        s = np.where(s > 0, s, np.float16(1))
        q = np.clip(np.rint((G - lo.astype(np.float32)[..., None]) / s.astype(np.float32)[..., None]), 0, 15)
        return {"q": np.frombuffer(pack(q.astype(np.uint8).ravel(), 4), np.uint8), "s": s, "z": lo}

    def dec(p: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        rows, ng = p["s"].shape
        q = unpack(p["q"], rows * ng * group, 4).reshape(rows, ng, group).astype(np.float32)
        W = q * p["s"].astype(np.float32)[..., None] + p["z"].astype(np.float32)[..., None]
        return W.reshape(rows, -1)[:, :shape[1]]
    return _npz_method("int4-g128", f"group {group}", weights, folder, enc, dec)


def _lloyd_1d(x: np.ndarray, k: int, iters: int = 25) -> np.ndarray:
    """1-D k-means: centroids at quantiles, then Lloyd steps via sorted boundaries."""
    c = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        cnt = np.bincount(idx, minlength=k)
        c = np.where(cnt > 0, np.bincount(idx, weights=x, minlength=k) / np.maximum(cnt, 1), c)
        c = np.sort(c)
    return c


def kmeans4(weights: Weights, folder: str) -> Packed:
    """16-level scalar k-means per tensor: fp16 centroids + 4-bit packed codes."""
    def enc(W: np.ndarray) -> dict[str, np.ndarray]:
        x = W.ravel().astype(np.float64)
        c = np.sort(_lloyd_1d(x, 16).astype(np.float16))
        cf = c.astype(np.float64)
        idx = np.searchsorted((cf[1:] + cf[:-1]) / 2, x)
        return {"q": np.frombuffer(pack(idx.astype(np.uint8), 4), np.uint8), "c": c}
    return _npz_method("kmeans4", "16 levels/tensor", weights, folder, enc,
                       lambda p, shape: p["c"].astype(np.float32)[
                           unpack(p["q"], shape[0] * shape[1], 4).astype(np.int64)].reshape(shape))


FAISS_KINDS = ("rq", "lsq")


def _row_vectors(W: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 per-row RMS scales and the scaled, zero-padded ``d``-vectors of a matrix."""
    rows, cols = W.shape
    s = np.sqrt(np.mean(np.square(W), axis=1)).astype(np.float16)
    s = np.where(s > 0, s, np.float16(1))
    Wp = np.zeros((rows, -(-cols // d) * d), np.float32)
    Wp[:, :cols] = W / s.astype(np.float32)[:, None]
    return s, Wp.reshape(-1, d)


def faiss_aq(weights: Weights, folder: str, kind: str, M: int, nbits: int = 8, d: int = 8,
             train_vectors: int = 1 << 16, seed: int = 0) -> Packed:
    """faiss additive quantizer with one codebook set shared by all tensors.

    Parameters
    ----------
    kind : {"rq", "lsq"}
        ResidualQuantizer (beam search) or LocalSearchQuantizer (LSQ++).
    M, nbits, d : int
        Codebooks, bits per code, vector length (as in the .aqm files).
    train_vectors : int
        Vectors sampled (uniformly, seeded) to train the codebooks.
    """
    import faiss
    t0 = time.perf_counter()
    scales, vecs = {}, {}
    for name, (w, axes) in weights.items():
        scales[name], vecs[name] = _row_vectors(to_matrix(w, axes), d)
    allv = np.concatenate(list(vecs.values()))
    rng = np.random.default_rng(seed)
    train = allv[rng.choice(len(allv), min(train_vectors, len(allv)), replace=False)]
    q = (faiss.ResidualQuantizer(d, M, nbits) if kind == "rq"
         else faiss.LocalSearchQuantizer(d, M, nbits))
    if kind == "lsq":
        q.random_seed = seed
    q.train(np.ascontiguousarray(train))
    cb = faiss.vector_to_array(q.codebooks).reshape(M, 1 << nbits, d).astype(np.float16)
    arrays = {"codebooks": cb}
    for i, name in enumerate(weights):
        codes = _faiss_codes(q, vecs[name], M, nbits)
        arrays[f"{i}.codes"] = np.frombuffer(pack(codes.ravel(), nbits), np.uint8)
        arrays[f"{i}.scale"] = scales[name]
    path = os.path.join(folder, f"faiss-{kind}-M{M}.npz")
    _save_npz(path, arrays)
    stored = _load_npz(path)
    C = stored["codebooks"].astype(np.float32)
    decoded = {}
    for i, (name, (w, axes)) in enumerate(weights.items()):
        rows, cols = to_matrix(w, axes).shape
        n_vec = rows * (-(-cols // d))
        codes = unpack(stored[f"{i}.codes"], n_vec * M, nbits).reshape(n_vec, M)
        v = decode_vectors(codes, C).reshape(rows, -1)[:, :cols]
        decoded[name] = from_matrix(v * stored[f"{i}.scale"].astype(np.float32)[:, None], w.shape, axes)
    return Packed(f"faiss-{kind}", f"M={M} K={1 << nbits} d={d} shared", path, os.path.getsize(path),
                  _params(weights), time.perf_counter() - t0, decoded)


def _faiss_codes(q, x: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """Code indices ``[n, M]`` (faiss packs them LSB-first into ``code_size`` bytes)."""
    raw = q.compute_codes(np.ascontiguousarray(x, dtype=np.float32))
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :M * nbits].reshape(len(x), M, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=2)


def _nncodec():
    """``nncodec.nnc.compression`` without ``nncodec.framework``.

    nncodec's package import pulls its model-zoo glue (``nncodec.framework``:
    TensorFlow/PyTorch training loops and torchvision ImageNet loaders), and
    PyPI has no torchvision build matching the CPU torch pinned here. The
    codec itself (``nnc_core``: quantizer and DeepCABAC) needs none of it, so
    the glue module is replaced by an empty one before importing the codec.
    """
    if "nncodec.framework" not in sys.modules:
        glue = types.ModuleType("nncodec.framework")
        glue.tensorflow_model = glue.pytorch_model = glue.use_case_init = None
        sys.modules["nncodec.framework"] = glue
    from nncodec.nnc import compression
    return compression


def nncodec(weights: Weights, folder: str, qp: int) -> Packed:
    """NNCodec (uniform quantization with dependent quantization, DeepCABAC) at ``qp``."""
    nnc = _nncodec()
    t0 = time.perf_counter()
    path = os.path.join(folder, f"nncodec_qp{qp}.nnc")
    params = {n: np.ascontiguousarray(w, dtype=np.float32) for n, (w, _) in weights.items()}
    nnc.compress(params, bitstream_path=path, qp=qp, verbose=False)
    with open(path, "rb") as f:
        dec = nnc.decompress(bytearray(f.read()), verbose=False)
    decoded = {n: np.asarray(dec[n], np.float32).reshape(w.shape) for n, (w, _) in weights.items()}
    return Packed("nncodec", f"QP {qp}", path, os.path.getsize(path), _params(weights),
                  time.perf_counter() - t0, decoded)


def zstd19(weights: Weights, folder: str) -> Packed:
    """Lossless zstd-19 of the concatenated fp32 bytes (the lossless reference)."""
    import zstandard
    t0 = time.perf_counter()
    path = os.path.join(folder, "zstd19.zst")
    blob = b"".join(np.ascontiguousarray(w, np.float32).tobytes() for w, _ in weights.values())
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=19, threads=-1).compress(blob))
    with open(path, "rb") as f:
        raw = np.frombuffer(zstandard.ZstdDecompressor().decompress(f.read()), np.float32)
    decoded, off = {}, 0
    for n, (w, _) in weights.items():
        decoded[n] = raw[off:off + w.size].reshape(w.shape)
        off += w.size
    return Packed("zstd-19", "lossless", path, os.path.getsize(path), _params(weights),
                  time.perf_counter() - t0, decoded)


# ------------------------------------------------------------------ ONNX Runtime quantizers

def onnx_weight_bytes(path: str, exclude: Iterable[str]) -> int:
    """Bytes of the initializers of an ONNX file, except those named in ``exclude`` or derived
    from them (the quantizers name derived tensors ``<original>_quantized``, ``<original>_scale``...)."""
    import onnx
    m = onnx.load(path)
    skip = tuple(exclude)
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
               for t in m.graph.initializer if not t.name.startswith(skip))


def ort_quantized(onnx_path: str, folder: str, kind: str, covered: Sequence[str]) -> Packed:
    """ONNX Runtime's own quantizers on ``onnx_path``: ``"dynamic-int8"`` or ``"matmul-4bits"``.

    The counted bytes are every initializer of the quantized file except the
    original ones that are not covered weights (embeddings, biases, norms),
    i.e. the quantized weights with their scales and zero points. ``decoded``
    is empty: these files are evaluated by running them.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    t0 = time.perf_counter()
    out = os.path.join(folder, f"ort-{kind}.onnx")
    if kind == "dynamic-int8":
        # The layers whose weights every method compresses (not Gather: embeddings stay raw).
        quantize_dynamic(onnx_path, out, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm", "Conv", "LSTM", "GRU"])
        setting = "QInt8 per-channel, int8 activations"
    elif kind == "matmul-4bits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        qz = MatMulNBitsQuantizer(onnx.load(onnx_path), block_size=128, is_symmetric=False)
        qz.process()
        qz.model.save_model_to_file(out, use_external_data_format=False)
        setting = "block 128 asymmetric"
    else:
        raise ValueError(kind)
    base = onnx.load(onnx_path)
    keep = {t.name for t in base.graph.initializer} - set(covered)
    params = sum(int(np.prod(t.dims)) for t in base.graph.initializer if t.name in set(covered))
    if params == 0:
        raise ValueError("the weights are not main-graph initializers (Constant nodes inside If "
                         "subgraphs), so the quantized file's bytes cannot be attributed to them")
    return Packed(f"ort-{kind}", setting, out, onnx_weight_bytes(out, keep), params,
                  time.perf_counter() - t0, {})
