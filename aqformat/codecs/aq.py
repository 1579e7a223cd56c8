"""Codec ``aq``, additive quantization (spec/FORMAT.md 4.3, 5.1, 5.2).

A tensor's matrix view is cut into ``d``-vectors; each vector is the sum of
one codeword from each of the ``M`` codebooks of its codebook group, chosen
by bit-packed codes. This module reads and checks the record's fields,
decodes with numpy, and (torch being optional) decodes on a torch device:
``assemble_aq`` is the one torch implementation of the layout, which the
runtime decodes with and fine-tuning trains through.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bitpack import pack, packed_size, unpack
from ..dtypes import FLOAT_DTYPES, itemsize, numpy_dtype
from ..errors import AqmFormatError, AqmInputError
from ..layout import from_matrix, matrix_shape, unview
from . import Codec, register

if TYPE_CHECKING:
    import torch

    from ..header import CodebookGroup, RecordFields, TensorRecord
    from ..reader import AqmFile

NAME = "aq"
SCALE_DTYPES = ("float16", "float32")
_CHUNK_VECTORS = 1 << 16  # bounds temporaries and keeps the running sum in cache


def decode_vectors(codes: np.ndarray, codebooks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum one codeword per codebook for every vector.

    Parameters
    ----------
    codes : numpy.ndarray
        Integer codes, shape ``(n, M)``.
    codebooks : numpy.ndarray
        float32 codebooks, shape ``(M, K, d)``.
    out : numpy.ndarray, optional
        float32 output of shape ``(n, d)``.

    Returns
    -------
    numpy.ndarray
        Decoded vectors, shape ``(n, d)``, float32.
    """
    n, M = codes.shape
    d = codebooks.shape[2]
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    # Viewing each codeword as one opaque d*4-byte item makes the gather a plain
    # item copy instead of d separate element copies.
    rows = np.ascontiguousarray(codebooks, dtype=np.float32).view(np.dtype((np.void, 4 * d)))
    rows = rows.reshape(M, -1)
    out_items = out.view(np.dtype((np.void, 4 * d))).reshape(n)
    tmp = np.empty((min(n, _CHUNK_VECTORS), d), dtype=np.float32)
    for s in range(0, n, _CHUNK_VECTORS):
        e = min(n, s + _CHUNK_VECTORS)
        np.take(rows[0], codes[s:e, 0], out=out_items[s:e])
        for m in range(1, M):
            t = tmp[: e - s]
            np.take(rows[m], codes[s:e, m], out=t.view(np.dtype((np.void, 4 * d))).reshape(e - s))
            out[s:e] += t
    return out


def decode_aq(codes: np.ndarray, codebooks: np.ndarray, shape: Sequence[int],
              scale: np.ndarray | None, perm: np.ndarray | None,
              axes: Sequence[int] | None, rows: int, cols: int) -> np.ndarray:
    """Rebuild a float32 tensor from its codes (see spec, "Layout").

    Steps 1-3 of the spec's AQ decoding run in the compiled kernel when numba
    is installed (:mod:`aqformat.kernels.decode`), else in numpy; both give
    the same bits.
    """
    from ..kernels.decode import decode_rows  # the kernel module builds on decode_vectors above
    w = decode_rows(codes, codebooks, scale, cols)
    return from_matrix(w, shape, axes, perm)


@dataclass(frozen=True)
class AQParts:
    """The compressed pieces of an AQ tensor, for decoders on other devices."""

    codes: np.ndarray          # [n_vectors, M] uint8/uint16
    codebooks: np.ndarray      # [M, K, d] float32, shared and read-only (AqmFile.codebooks)
    scale: np.ndarray | None   # [rows]
    perm: np.ndarray | None    # [cols] uint32
    axes: list[int] | None
    rows: int
    cols: int


# -- the container's contract --------------------------------------------------------------
def parse(fields: RecordFields) -> dict[str, Any]:
    return {"axes": fields.axes(), "group": fields.group(), "codes": fields.section("codes"),
            "scale": fields.section("scale", optional=True),
            "scale_dtype": fields.choice("scale_dtype", SCALE_DTYPES, default="float16"),
            "perm": fields.section("perm", optional=True)}


def vector_count(shape: Sequence[int], axes: Sequence[int] | None, d: int) -> int:
    """Number of ``d``-vectors of a tensor's matrix view (each row zero-padded to a multiple of ``d``)."""
    rows, cols = matrix_shape(shape, axes)
    return rows * (-(-cols // d))


def section_sizes(shape: Sequence[int], axes: Sequence[int] | None, *, M: int, bits: int, d: int,
                  scale_dtype: str | None = "float16", perm: bool = False) -> dict[str, int]:
    """Bytes of each section an AQ tensor owns: bit-packed codes, row scales (unless
    ``scale_dtype`` is None) and the column permutation (if ``perm``). Shared codebooks are
    not counted. The one byte count of the reader, the writer, the allocator and the encoder."""
    rows, cols = matrix_shape(shape, axes)
    out = {"codes": packed_size(vector_count(shape, axes, d) * M, bits)}
    if scale_dtype is not None:
        out["scale"] = rows * itemsize(scale_dtype)
    if perm:
        out["perm"] = cols * 4
    return out


def stored_bytes(shape: Sequence[int], axes: Sequence[int] | None, *, M: int, bits: int, d: int,
                 scale_dtype: str | None = "float16", perm: bool = False) -> int:
    """Total bytes an AQ tensor's own sections take in the file (see :func:`section_sizes`)."""
    return sum(section_sizes(shape, axes, M=M, bits=bits, d=d, scale_dtype=scale_dtype, perm=perm).values())


def sizes(t: TensorRecord, groups: Sequence[CodebookGroup]) -> dict[str, int]:
    g = groups[t.fields["group"]]
    return section_sizes(t.shape, t.fields["axes"], M=g.M, bits=g.bits, d=g.d, scale_dtype=t.fields["scale_dtype"],
                         perm=True)


def work(t: TensorRecord, groups: Sequence[CodebookGroup]) -> int:
    """Decoder memory: the padded float32 matrix, unpacked codes, and three tensor-sized copies
    (layout, permutation, float16) besides the output."""
    g = groups[t.fields["group"]]
    rows, cols = matrix_shape(t.shape, t.fields["axes"])
    cols_p = -(-cols // g.d) * g.d
    return rows * cols_p * 4 + rows * (cols_p // g.d) * g.M * 2 + t.numel * 14


def parts(f: AqmFile, t: TensorRecord | str) -> AQParts:
    """Codes, codebooks, scale and permutation of AQ tensor ``t`` (a name or a record) of ``f``, undecoded."""
    if isinstance(t, str):
        t = f.record(t)
    if t.codec != NAME:
        raise AqmInputError(f"tensor {t.name!r} is not additive-quantized")
    fl = t.fields
    g = f.codebook_groups[fl["group"]]
    rows, cols = matrix_shape(t.shape, fl["axes"])
    count = rows * (-(-cols // g.d)) * g.M
    codes = unpack(f.section_bytes(fl["codes"], packed_size(count, g.bits)), count, g.bits)
    cb = f.codebooks(fl["group"])
    scale = None if fl["scale"] is None else f.section_array(fl["scale"], numpy_dtype(fl["scale_dtype"]), (rows,))
    perm = None
    if fl["perm"] is not None:
        perm = f.section_array(fl["perm"], np.dtype("<u4"), (cols,))
        if not _is_permutation(perm):
            raise AqmFormatError(f"tensor {t.name!r}: stored column permutation is not a permutation")
    return AQParts(codes.reshape(-1, g.M), cb, scale, perm, fl["axes"], rows, cols)


def decode(t: TensorRecord, f: AqmFile) -> np.ndarray:
    p = parts(f, t)
    return decode_aq(p.codes, p.codebooks, t.shape, p.scale, p.perm, p.axes, p.rows, p.cols)


def _is_permutation(p: np.ndarray) -> bool:
    seen = np.zeros(p.size, dtype=bool)
    if p.size and int(p.max()) >= p.size:
        return False
    seen[p] = True
    return bool(seen.all())


def fields(name: str, shape: Sequence[int], codes: np.ndarray, group: int, g: CodebookGroup, *,
           dtype: str = "float32", scale: np.ndarray | None = None, scale_dtype: str = "float16",
           perm: np.ndarray | None = None, axes: Sequence[int] | None = None) -> dict[str, Any]:
    """The record fields of an AQ tensor for ``Writer.add_encoded``, codes bit-packed.

    ``codes`` are ``[n_vectors, M]`` indices into group ``g`` (index ``group``);
    see :meth:`aqformat.Writer.add_aq` for the other arguments.
    """
    rows, cols = matrix_shape([int(x) for x in shape], axes)
    n_vec = rows * (-(-cols // g.d))
    codes = np.asarray(codes)
    if codes.shape != (n_vec, g.M):
        raise AqmInputError(f"{name}: codes must have shape ({n_vec}, {g.M}), got {codes.shape}")
    if dtype not in FLOAT_DTYPES:
        raise AqmInputError(f"{name}: AQ tensors decode to a float dtype, not {dtype}")
    out: dict[str, Any] = {"group": group, "axes": None if axes is None else [int(a) for a in axes],
                           "codes": pack(codes, g.bits)}
    if scale is not None:
        scale = np.asarray(scale).reshape(-1)
        if scale.shape != (rows,) or not np.all(np.isfinite(scale)):
            raise AqmInputError(f"{name}: scale must be {rows} finite values")
        out.update(scale=scale.astype(numpy_dtype(scale_dtype)), scale_dtype=scale_dtype)
    if perm is not None:
        perm = np.asarray(perm).reshape(-1)
        if perm.shape != (cols,) or not np.array_equal(np.sort(perm), np.arange(cols)):
            raise AqmInputError(f"{name}: perm must be a permutation of {cols} columns")
        out["perm"] = perm.astype("<u4")
    return out


# -- torch ---------------------------------------------------------------------------------
def assemble_aq(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None,
                inv_perm: torch.Tensor | None, axes: Sequence[int] | None, shape: Sequence[int],
                rows: int, cols: int) -> torch.Tensor:
    """Rebuild an AQ tensor from its parts, all on one device; differentiable.

    One gathered codeword per codebook summed in codebook order (the same
    float32 additions, in the same order, as :func:`decode_vectors`, so results
    are bit-identical), padding columns dropped, rows multiplied by ``scale``,
    columns un-permuted, axes transposed back.

    Parameters
    ----------
    codes : torch.Tensor
        ``[M, n_vectors]`` integer codes.
    codebooks : torch.Tensor
        ``[M, K, d]`` float codebooks.
    scale : torch.Tensor, optional
        ``[rows]`` per-row scale.
    inv_perm : torch.Tensor, optional
        ``argsort`` of the stored column permutation, on the same device
        (callers that decode repeatedly compute it once).
    axes : sequence of int, optional
        Axes order of the matrix view.
    shape : sequence of int
        Logical shape of the tensor.
    rows, cols : int
        Matrix view size (before padding to a multiple of ``d``).

    Returns
    -------
    torch.Tensor
        Of ``shape``, contiguous.
    """
    w = codeword_sum(codebooks, codes).reshape(rows, -1)[:, :cols]
    if scale is not None:
        w = w * scale[:, None]
    return unview(w, shape, axes, inv_perm).contiguous()


def codeword_sum(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The torch codeword sum: ``codebooks[M, K, d]`` and ``codes[M, n]`` give ``[n, d]``.

    One gathered codeword per codebook, added in codebook order (the float32
    additions of :func:`decode_vectors`, so results are bit-identical);
    differentiable in the codebooks.
    """
    w = codebooks[0].index_select(0, codes[0])
    for m in range(1, codebooks.shape[0]):
        w = w + codebooks[m].index_select(0, codes[m])
    return w


def _torch_parts(p: AQParts, device: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(codes [M, n] int32, scale float32, inverse permutation)`` of ``p`` on ``device``."""
    import torch
    # moved compact (uint8/uint16), widened on the device; int32 indices gather as fast as int64.
    # A writable copy: with M = 1 the transpose is still the read-only memory map.
    codes = torch.from_numpy(np.require(p.codes.T, requirements="CW")).to(device).int()
    scale = None if p.scale is None else torch.from_numpy(p.scale.astype(np.float32)).to(device)
    inv = None if p.perm is None else torch.from_numpy(np.argsort(p.perm)).to(device)
    return codes, scale, inv


def _torch_codebooks(p: AQParts, device: Any) -> torch.Tensor:
    """The group's codebooks on ``device`` as float32."""
    import torch
    # np.array copies the (small) codebooks out of the read-only file mapping
    return torch.from_numpy(np.array(p.codebooks)).to(device).float()


def torch_decode(t: TensorRecord, f: AqmFile, device: Any, cache: dict) -> torch.Tensor:
    """Decode on ``device`` as float32; ``cache`` keeps each codebook group there, by group name."""
    import torch
    p = parts(f, t)
    group = f.codebook_groups[t.fields["group"]].name
    cb = cache.get(group)
    if cb is None:
        cb = cache[group] = _torch_codebooks(p, device)
    codes, scale, inv = _torch_parts(p, device)
    with torch.no_grad():
        return assemble_aq(codes, cb, scale, inv, p.axes, t.shape, p.rows, p.cols)


CODEC = register(Codec(NAME, parse, sizes, decode, work=work, torch_decode=torch_decode))
