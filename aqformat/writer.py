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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zstandard

from . import __version__, codecs, rans, tempfiles
from .codecs import aq, lattice, raw
from .dtypes import dtype_name, numpy_dtype
from .errors import AqmFormatError, AqmInputError, AqmIOError
from .header import (ALIGNMENT, CODEBOOK_DTYPES, ENCODING_MINOR, MAJOR, MAX_HEADER_BYTES, MAX_NAME_BYTES, PREAMBLE_SIZE,
                     CodebookGroup, Preamble, graph_size_limit, pack_preamble, parse_group, parse_header,
                     parse_tensor, plain_value_problem)

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
    alignment : int
        Every section and the header start at a multiple of it (spec, "Preamble"): a power of
        two in [8, 65536]. 64 (the default) suits SIMD loads; 8 keeps every dtype aligned for
        zero-copy reads and pads less, which counts in small files.

    Examples
    --------
    >>> with Writer("model.aqm", source={"framework": "numpy"}) as w:
    ...     w.add_tensor("bias", np.zeros(4, np.float32))
    """

    def __init__(self, path: str | os.PathLike, *, producer: str | None = None,
                 source: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                 alignment: int = ALIGNMENT):
        self.path = os.fspath(path)
        if not (isinstance(alignment, int) and 8 <= alignment <= 1 << 16 and alignment & (alignment - 1) == 0):
            raise AqmInputError(f"alignment must be a power of two in [8, 65536], got {alignment!r}")
        self.alignment = alignment
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise AqmInputError(f"output directory {directory} does not exist")
        self._producer = producer or f"aqformat {__version__}"
        if not isinstance(self._producer, str) or len(self._producer.encode()) > MAX_NAME_BYTES:
            raise AqmInputError(f"producer must be a string of at most {MAX_NAME_BYTES} bytes")
        self._source = _plain("source", dict(source or {}))
        self._metadata = _plain("metadata", dict(metadata or {}))
        self._sections: list[dict[str, Any]] = []
        self._groups: list[dict[str, Any]] = []
        self._group_records: list[CodebookGroup] = []  # the same groups, as a reader sees them
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

    def _section(self, data: bytes | np.ndarray, compress: bool = False,
                 size_limit: Callable[[int], int] | None = None, integers: np.ndarray | None = None) -> int:
        """Encode ``data`` (zstd if asked, smaller, and within ``size_limit(stored bytes)``; ``rans`` or
        ``rans-context`` too when ``integers``, the same bytes as a 2-D signed integer array, is given,
        and the smallest wins), append it, return its index."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        raw = memoryview(data)
        stored: bytes | memoryview = raw
        encoding = "raw"
        if compress and raw.nbytes:
            z = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False).compress(raw)
            if len(z) < raw.nbytes and (size_limit is None or raw.nbytes <= size_limit(len(z))):
                stored, encoding = z, "zstd"
        if integers is not None and integers.size:
            model = rans.plan(integers)
            r = rans.encode(integers, model)
            if len(r) < len(stored) and raw.nbytes <= max(1 << 20, len(r) * rans.MAX_RATIO):
                stored, encoding = r, model.encoding
        return self._append(stored, raw.nbytes, encoding, zlib.crc32(stored))

    def _append(self, stored: bytes | memoryview, size: int, encoding: str, crc: int) -> int:
        """Write already-encoded section bytes at the next aligned offset."""
        if self._closed:
            raise AqmInputError("writer is closed")
        self._write(b"\0" * (-self._pos % self.alignment))
        self._sections.append({"offset": self._pos, "length": len(stored), "size": size,
                               "encoding": encoding, "crc32": crc})
        self._write(stored)
        return len(self._sections) - 1

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise AqmInputError("tensor names must be non-empty strings")
        if name in self._names:
            raise AqmInputError(f"duplicate tensor name {name!r}")

    # -- public API ----------------------------------------------------------------
    def add_encoded(self, name: str, codec: str, shape: Sequence[int], fields: Mapping[str, Any], *,
                    dtype: str = "float32", compress: Collection[str] = (), entropy: Collection[str] = ()) -> None:
        """Add a tensor already encoded by ``codec``: the one way every tensor is added.

        The record is checked by the codec's own header rules and section
        sizes (:mod:`aqformat.codecs`), exactly as a reader will check it, so
        the writer cannot produce a file its reader refuses.

        Parameters
        ----------
        name : str
            Unique tensor name.
        codec : str
            A registered codec's name.
        shape : sequence of int
            Logical shape of the decoded tensor.
        fields : mapping
            The record's codec fields, in the order they are written. A
            ``numpy.ndarray`` or ``bytes`` value is a section payload: it is
            appended and its index stored under its key. None values are left out.
        dtype : str
            Decoded dtype (see spec, "Data types").
        compress : collection of str
            Keys of the sections to zstd-compress (where that makes them smaller).
        entropy : collection of str
            Keys of sections given as 2-D int8/int16/int32 arrays (e.g. lattice
            indices) to store with the ``rans`` encoding (format 1.2) where that is
            smaller than raw and zstd, each row with its own fitted model.
        """
        spec = codecs.get(codec)
        if spec is None:
            raise AqmInputError(f"{name}: unknown codec {codec!r} (registered: {', '.join(codecs.names())})")
        self._check_name(name)
        shape = [int(x) for x in shape]
        rec: dict[str, Any] = {"name": name, "shape": shape, "dtype": dtype, "codec": codec}
        payloads: dict[str, memoryview] = {}
        integers: dict[str, np.ndarray] = {}
        for key, value in fields.items():
            if isinstance(value, np.ndarray):
                if key in entropy and value.ndim == 2 and value.dtype.kind == "i" and value.itemsize in rans.WIDTHS:
                    integers[key] = value.astype(value.dtype.newbyteorder("<"), copy=False)
                value = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            if isinstance(value, (np.ndarray, bytes, bytearray, memoryview)):
                payloads[key] = memoryview(value)
                rec[key] = len(self._sections) + len(payloads) - 1  # the index it will get
            elif value is not None:
                rec[key] = value
        try:
            parsed = parse_tensor(rec, len(self._tensors), len(self._sections) + len(payloads), self._group_records)
        except AqmFormatError as e:
            raise AqmInputError(f"{name}: {str(e).removeprefix('invalid header: ')}") from None
        expected = spec.section_fields(parsed, self._group_records)
        if set(expected) != set(payloads):
            raise AqmInputError(f"{name}: codec {codec} stores sections {sorted(expected)}, got {sorted(payloads)}")
        for key, size in expected.items():
            if payloads[key].nbytes != size:
                raise AqmInputError(f"{name}: section {key!r} must hold {size} bytes, got {payloads[key].nbytes}")
        self._names.add(name)
        for key, data in payloads.items():
            self._section(data, key in compress, integers=integers.get(key))
        self._tensors.append(rec)

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
            dtype = dtype_name(array.dtype)
            if dtype is None:
                raise AqmInputError(f"unsupported array dtype {array.dtype}")
        self.add_encoded(name, raw.NAME, array.shape, raw.fields(array, dtype), dtype=dtype,
                         compress=("data",) if compress else ())

    def add_codebooks(self, name: str, codebooks: np.ndarray, *, dtype: str = "float16") -> int:
        """Add a codebook group ``[M, K, d]`` shared by AQ tensors; returns its index."""
        cb = np.asarray(codebooks)
        if cb.ndim != 3 or cb.shape[1] < 2 or cb.shape[1] & (cb.shape[1] - 1):
            raise AqmInputError(f"codebooks must be [M, K, d] with K a power of two, got {cb.shape}")
        if dtype not in CODEBOOK_DTYPES or not np.all(np.isfinite(cb)):
            raise AqmInputError(f"codebook group {name!r} must be finite float16/float32")
        if any(g["name"] == name for g in self._groups):
            raise AqmInputError(f"duplicate codebook group {name!r}")
        M, K, d = cb.shape
        g = {"name": name, "M": M, "K": K, "d": d, "dtype": dtype, "section": len(self._sections)}
        try:  # the reader's own rules, before anything is written
            parse_group(g, len(self._groups), len(self._sections) + 1)
        except AqmFormatError as e:
            raise AqmInputError(str(e).removeprefix("invalid header: ")) from None
        g["section"] = self._section(cb.astype(numpy_dtype(dtype)))
        self._groups.append(g)
        self._group_records.append(CodebookGroup(**g))
        return len(self._groups) - 1

    def add_aq(self, name: str, shape: Sequence[int], codes: np.ndarray, *, group: int | str,
               dtype: str = "float32", scale: np.ndarray | None = None,
               scale_dtype: str = "float16", perm: np.ndarray | None = None,
               axes: Sequence[int] | None = None) -> None:
        """Add an additive-quantized tensor (codec ``aq``, fields from :func:`aqformat.codecs.aq.fields`).

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
        index = self._group(group)
        fields = aq.fields(name, shape, codes, index, self._group_records[index], dtype=dtype, scale=scale,
                           scale_dtype=scale_dtype, perm=perm, axes=axes)
        self.add_encoded(name, aq.NAME, shape, fields, dtype=dtype)

    def add_lattice(self, name: str, shape: Sequence[int], q: np.ndarray, step: np.ndarray,
                    seed: int, *, dtype: str = "float32", axes: Sequence[int] | None = None,
                    entropy: bool = False) -> None:
        """Add a dithered-lattice tensor (codec ``lattice``, fields from
        :func:`aqformat.codecs.lattice.fields`); indices are zstd-coded, or ``rans``-coded
        (format 1.2) when ``entropy`` and that is smaller.

        ``q`` holds the integer lattice indices of the matrix view (``[rows, cols]``),
        ``step`` the per-row step, ``seed`` the dither seed (see spec, "Dither").
        """
        self.add_encoded(name, lattice.NAME, shape, lattice.fields(name, shape, q, step, seed, axes),
                         dtype=dtype, compress=("data",), entropy=("data",) if entropy else ())

    def copy_tensor(self, src: AqmFile, name: str) -> None:
        """Copy a tensor from an open file verbatim (stored bytes, no re-encoding).

        Tensors that use a codebook group are not copied: the group is not.
        """
        rec = src.record(name)
        codec = codecs.get(rec.codec)
        if codec is None or "group" in rec.fields:
            raise AqmInputError(f"{name}: only tensors of a known codec without a codebook group are "
                                f"copied verbatim, not {rec.codec}")
        owned = codec.section_fields(rec, src.codebook_groups)
        self._check_name(name)
        self._names.add(name)
        out: dict[str, Any] = {"name": name, "shape": list(rec.shape), "dtype": rec.dtype, "codec": rec.codec}
        for key, value in rec.fields.items():
            if key in owned:
                value = self._copy_section(*src.stored_section(value))
            if value is not None:
                out[key] = value
        self._tensors.append(out)

    def _copy_section(self, section: Section, stored: np.ndarray) -> int:
        return self._append(memoryview(stored), section.size, section.encoding, section.crc32)

    def set_graph(self, model: bytes, *, format: str = "onnx") -> None:
        """Embed a model graph (e.g. an ONNX ModelProto without its initializers).

        It is zstd-coded unless that would expand more than a reader accepts
        for a graph (spec 4.1); then it is stored as is.
        """
        if not isinstance(format, str) or len(format.encode()) > MAX_NAME_BYTES:
            raise AqmInputError(f"graph format must be a string of at most {MAX_NAME_BYTES} bytes")
        self._graph = {"format": format, "section": self._section(model, compress=True, size_limit=graph_size_limit)}

    def update_metadata(self, **items: Any) -> None:
        """Add or replace model metadata entries."""
        self._metadata.update(_plain("metadata", items))

    def _group(self, group: int | str) -> int:
        if isinstance(group, str):
            for i, g in enumerate(self._groups):
                if g["name"] == group:
                    return i
        elif isinstance(group, int) and 0 <= group < len(self._groups):
            return group
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
        offset = self._pos + (-self._pos % self.alignment)
        # The oldest minor version that describes every codec and section encoding used, so older
        # 1.x files stay byte-identical.
        minor = max([codecs.get(t["codec"]).minor for t in self._tensors]
                    + [ENCODING_MINOR[s["encoding"]] for s in self._sections], default=0)
        try:  # the whole header as a reader will check it: no file its reader refuses is written
            parse_header(header, Preamble(MAJOR, minor, offset, len(header), zlib.crc32(header), self.alignment,
                                          offset + len(header)))
        except AqmFormatError as e:
            self.abort()
            raise AqmInputError(f"{self.path} would not be readable: {str(e).removeprefix('invalid header: ')}") from None
        self._write(b"\0" * (-self._pos % self.alignment))
        self._write(header)
        pre = pack_preamble(minor, offset, len(header), zlib.crc32(header), self._pos, self.alignment)
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
