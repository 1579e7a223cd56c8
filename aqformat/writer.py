"""Streaming, atomic, deterministic .aqm writer.

Sections are appended to a temporary file in the target directory as tensors
are added, so the model never has to be in memory at once. ``close`` writes
the header and the preamble, fsyncs, and renames the temporary file onto the
target: a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zstandard

from . import __version__, tempfiles
from .bitpack import pack
from .errors import AqmInputError, AqmIOError
from .header import (ALIGNMENT, DTYPES, FLOAT_DTYPES, MAX_HEADER_BYTES, MINOR, PREAMBLE_SIZE, pack_preamble,
                     plain_value_problem)
from .layout import matrix_shape

if TYPE_CHECKING:
    from .header import Section
    from .reader import AqmFile

ZSTD_LEVEL = 19
_UMASK = os.umask(0)  # read once: temp files are 0600, finished files get the usual mode
os.umask(_UMASK)


def finished_file_mode() -> int:
    """Permissions of a finished output file: what ``open()`` would give it under the umask
    (temporary files are created 0600 and set to this before they are renamed into place)."""
    return 0o666 & ~_UMASK


_NAME_OF = {(np.dtype(code).kind, np.dtype(code).itemsize): name
            for name, (code, _) in DTYPES.items() if name != "bfloat16"}


def _dtype_name(arr: np.ndarray) -> str:
    try:
        return _NAME_OF[(arr.dtype.kind, arr.dtype.itemsize)]
    except KeyError:
        raise AqmInputError(f"unsupported array dtype {arr.dtype}") from None


class Writer:
    """Write an .aqm file one tensor at a time.

    Parameters
    ----------
    path : str or os.PathLike
        Target file. Replaced atomically on :meth:`close`.
    producer : str, optional
        Name and version of the producing tool.
    source : dict, optional
        Where the weights came from, e.g. ``{"framework": "pytorch", "name": ...}``.
    metadata : dict, optional
        Free-form msgpack-serialisable model metadata.

    Examples
    --------
    >>> with Writer("model.aqm", source={"framework": "numpy"}) as w:
    ...     w.add_tensor("bias", np.zeros(4, np.float32))
    """

    def __init__(self, path: str | os.PathLike, *, producer: str | None = None,
                 source: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None):
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise AqmInputError(f"output directory {directory} does not exist")
        self._producer = producer or f"aqformat {__version__}"
        self._source = _plain("source", dict(source or {}))
        self._metadata = _plain("metadata", dict(metadata or {}))
        self._sections: list[dict[str, Any]] = []
        self._groups: list[dict[str, Any]] = []
        self._tensors: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._graph: dict[str, Any] | None = None
        fd, self._tmp = tempfiles.create(self.path)
        self._file = os.fdopen(fd, "wb")
        self._pos = 0
        self._closed = False
        self._write(b"\0" * PREAMBLE_SIZE)

    # -- low level -----------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise AqmIOError(f"disk full while writing {self.path}; nothing was written") from None
            raise AqmIOError(f"cannot write {self.path}: {e.strerror}") from None
        self._pos += len(data)

    def _section(self, data: bytes | np.ndarray, compress: bool = False) -> int:
        """Encode ``data`` (zstd if asked and smaller), append it, return its index."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        raw = memoryview(data)
        stored: bytes | memoryview = raw
        encoding = "raw"
        if compress and raw.nbytes:
            z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False).compress(raw)
            if len(z) < raw.nbytes:
                stored, encoding = z, "zstd"
        return self._append(stored, raw.nbytes, encoding, zlib.crc32(stored))

    def _append(self, stored: bytes | memoryview, size: int, encoding: str, crc: int) -> int:
        """Write already-encoded section bytes at the next aligned offset."""
        if self._closed:
            raise AqmInputError("writer is closed")
        self._write(b"\0" * (-self._pos % ALIGNMENT))
        self._sections.append({"offset": self._pos, "length": len(stored), "size": size,
                               "encoding": encoding, "crc32": crc})
        self._write(stored)
        return len(self._sections) - 1

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise AqmInputError("tensor names must be non-empty strings")
        if name in self._names:
            raise AqmInputError(f"duplicate tensor name {name!r}")
        self._names.add(name)

    # -- public API ----------------------------------------------------------------
    def add_tensor(self, name: str, array: np.ndarray, *, dtype: str | None = None,
                   compress: bool = False) -> None:
        """Store ``array`` as is (codec ``raw``).

        Parameters
        ----------
        name : str
            Unique tensor name (e.g. a ``state_dict`` key or ONNX initializer name).
        array : numpy.ndarray
            The tensor. Stored little-endian.
        dtype : str, optional
            ``"bfloat16"`` to mark a ``uint16`` array as bfloat16 bits.
        compress : bool
            zstd-compress the section if that makes it smaller.
        """
        array = np.asarray(array)
        if dtype == "bfloat16":
            if array.dtype != np.uint16:
                raise AqmInputError("bfloat16 tensors are given as their uint16 bit patterns")
        else:
            dtype = _dtype_name(array)
        self._claim(name)
        data = array.astype(DTYPES[dtype][0], copy=False)
        self._tensors.append({"name": name, "shape": list(array.shape), "dtype": dtype,
                              "codec": "raw", "data": self._section(data, compress)})

    def add_codebooks(self, name: str, codebooks: np.ndarray, *, dtype: str = "float16") -> int:
        """Add a codebook group ``[M, K, d]`` shared by AQ tensors; returns its index."""
        cb = np.asarray(codebooks)
        if cb.ndim != 3 or cb.shape[1] < 2 or cb.shape[1] & (cb.shape[1] - 1):
            raise AqmInputError(f"codebooks must be [M, K, d] with K a power of two, got {cb.shape}")
        if dtype not in ("float16", "float32") or not np.all(np.isfinite(cb)):
            raise AqmInputError(f"codebook group {name!r} must be finite float16/float32")
        if any(g["name"] == name for g in self._groups):
            raise AqmInputError(f"duplicate codebook group {name!r}")
        M, K, d = cb.shape
        self._groups.append({"name": name, "M": M, "K": K, "d": d, "dtype": dtype,
                             "section": self._section(cb.astype(DTYPES[dtype][0]))})
        return len(self._groups) - 1

    def add_aq(self, name: str, shape: Sequence[int], codes: np.ndarray, *, group: int | str,
               dtype: str = "float32", scale: np.ndarray | None = None,
               scale_dtype: str = "float16", perm: np.ndarray | None = None,
               axes: Sequence[int] | None = None) -> None:
        """Add an additive-quantized tensor (codec ``aq``).

        Parameters
        ----------
        name : str
            Unique tensor name.
        shape : sequence of int
            Logical shape of the decoded tensor.
        codes : numpy.ndarray
            ``[n_vectors, M]`` codes into the group's codebooks (see spec, "Layout").
        group : int or str
            Codebook group index or name (added earlier with :meth:`add_codebooks`).
        dtype : str
            Decoded dtype: float32, float16 or bfloat16.
        scale : numpy.ndarray, optional
            Per-row scale, ``[rows]``.
        perm : numpy.ndarray, optional
            Column permutation, ``[cols]``: the matrix stored is ``W[:, perm]``.
        axes : sequence of int, optional
            Transpose applied to the tensor before it is viewed as a matrix.
        """
        g = self._group(group)
        shape = [int(x) for x in shape]
        rows, cols = matrix_shape(shape, axes)
        n_vec = rows * (-(-cols // g["d"]))
        codes = np.asarray(codes)
        if codes.shape != (n_vec, g["M"]):
            raise AqmInputError(f"{name}: codes must have shape ({n_vec}, {g['M']}), got {codes.shape}")
        if dtype not in FLOAT_DTYPES:
            raise AqmInputError(f"{name}: AQ tensors decode to a float dtype, not {dtype}")
        self._claim(name)
        rec: dict[str, Any] = {"name": name, "shape": shape, "dtype": dtype, "codec": "aq",
                               "group": self._groups.index(g)}
        if axes is not None:
            rec["axes"] = [int(a) for a in axes]
        rec["codes"] = self._section(pack(codes, g["K"].bit_length() - 1))
        if scale is not None:
            scale = np.asarray(scale).reshape(-1)
            if scale.shape != (rows,) or not np.all(np.isfinite(scale)):
                raise AqmInputError(f"{name}: scale must be {rows} finite values")
            rec["scale"] = self._section(scale.astype(DTYPES[scale_dtype][0]))
            rec["scale_dtype"] = scale_dtype
        if perm is not None:
            perm = np.asarray(perm).reshape(-1)
            if perm.shape != (cols,) or not np.array_equal(np.sort(perm), np.arange(cols)):
                raise AqmInputError(f"{name}: perm must be a permutation of {cols} columns")
            rec["perm"] = self._section(perm.astype("<u4"))
        self._tensors.append(rec)

    def add_lattice(self, name: str, shape: Sequence[int], q: np.ndarray, step: np.ndarray,
                    seed: int, *, dtype: str = "float32", axes: Sequence[int] | None = None) -> None:
        """Add a dithered-lattice tensor (codec ``lattice``); indices are zstd-coded.

        ``q`` holds the integer lattice indices of the matrix view (``[rows, cols]``),
        ``step`` the per-row step, ``seed`` the dither seed (see spec, "Dither").
        """
        shape = [int(x) for x in shape]
        rows, cols = matrix_shape(shape, axes)
        q = np.asarray(q)
        step = np.asarray(step, dtype=np.float32).reshape(-1)
        if q.size != rows * cols or step.shape != (rows,) or not (0 <= int(seed) < 1 << 64):
            raise AqmInputError(f"{name}: lattice indices/steps do not match shape {shape}")
        lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
        index_dtype = next(t for t in ("int8", "int16", "int32")
                           if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        self._claim(name)
        rec: dict[str, Any] = {"name": name, "shape": shape, "dtype": dtype, "codec": "lattice"}
        if axes is not None:
            rec["axes"] = [int(a) for a in axes]
        rec.update({"data": self._section(q.astype(DTYPES[index_dtype][0]), compress=True),
                    "index_dtype": index_dtype, "step": self._section(step.astype("<f4")),
                    "seed": int(seed)})
        self._tensors.append(rec)

    def copy_tensor(self, src: AqmFile, name: str) -> None:
        """Copy a raw or lattice tensor from an open file verbatim (stored bytes, no re-encoding)."""
        rec = src.record(name)
        if rec.codec not in ("raw", "lattice"):
            raise AqmInputError(f"{name}: only raw and lattice tensors are copied verbatim, not {rec.codec}")
        self._claim(name)
        out: dict[str, Any] = {"name": name, "shape": list(rec.shape), "dtype": rec.dtype, "codec": rec.codec}
        for key, value in rec.fields.items():
            if key in ("data", "step"):
                value = self._copy_section(*src.stored_section(value))
            if value is not None:
                out[key] = value
        self._tensors.append(out)

    def _copy_section(self, section: Section, stored: np.ndarray) -> int:
        return self._append(memoryview(stored), section.size, section.encoding, section.crc32)

    def set_graph(self, model: bytes, *, format: str = "onnx") -> None:
        """Embed a model graph (e.g. an ONNX ModelProto without its initializers)."""
        self._graph = {"format": format, "section": self._section(model, compress=True)}

    def update_metadata(self, **items: Any) -> None:
        """Add or replace model metadata entries."""
        self._metadata.update(_plain("metadata", items))

    def _group(self, group: int | str) -> dict[str, Any]:
        if isinstance(group, str):
            for g in self._groups:
                if g["name"] == group:
                    return g
        elif isinstance(group, int) and 0 <= group < len(self._groups):
            return self._groups[group]
        raise AqmInputError(f"unknown codebook group {group!r}")

    def close(self) -> None:
        """Write header and preamble, then atomically move the file into place."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException:  # e.g. KeyboardInterrupt during fsync: never leave the temp file
            self.abort()
            raise

    def _finish(self) -> None:
        doc = {"producer": self._producer, "source": self._source, "metadata": self._metadata,
               "sections": self._sections, "codebooks": self._groups, "tensors": self._tensors}
        if self._graph is not None:
            doc["graph"] = self._graph
        try:
            header = msgpack.packb(doc, use_bin_type=True)
        except (TypeError, ValueError) as e:
            self.abort()
            raise AqmInputError(f"metadata is not serialisable: {e}") from None
        if len(header) > MAX_HEADER_BYTES:
            self.abort()
            raise AqmInputError(f"header of {len(header)} bytes exceeds the format's {MAX_HEADER_BYTES}-byte limit "
                                "(too many tensors or too much metadata)")
        self._write(b"\0" * (-self._pos % ALIGNMENT))
        offset = self._pos
        self._write(header)
        pre = pack_preamble(MINOR, offset, len(header), zlib.crc32(header), self._pos)
        try:
            self._file.seek(0)
            self._file.write(pre)
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), finished_file_mode())
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise AqmIOError(f"cannot write {self.path}: {e.strerror}") from None
        tempfiles.release(self._tmp)
        self._closed = True
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Discard everything written; the target path is left untouched."""
        self._closed = True
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        tempfiles.release(self._tmp)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _plain(what: str, items: dict[str, Any]) -> dict[str, Any]:
    """``items`` if the reader will accept it as source/metadata, else AqmInputError."""
    problem = plain_value_problem(items)
    if problem:
        raise AqmInputError(f"{what} {problem}; use None, bool, int, float, str, lists and string-keyed maps")
    return items


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
