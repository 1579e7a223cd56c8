""".aqm reader: parses the header on open, reads and decodes a tensor when asked.

``open`` parses the preamble and header only; a tensor's sections are read when
the tensor is, with ``pread`` into memory the reader owns, and each section's
checksum is verified the first time it is used. The file is not memory-mapped:
a mapped file truncated or rewritten in place kills the process with SIGBUS
(spec/FORMAT.md 6.2), while a read here raises an AqmError when the file
changed since it was opened. Decoding one tensor, or the graph, may allocate at
most the file's decode budget (6.1).
"""
from __future__ import annotations

import math
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from . import codecs, rans
from .dtypes import itemsize, numpy_dtype
from .errors import (AqmBudgetError, AqmFormatError, AqmInputError, AqmIntegrityError, AqmIOError,
                     AqmUnsupportedError)
from .header import (ENCODINGS, PREAMBLE_SIZE, CodebookGroup, Header, Section, TensorHead, TensorRecord,
                     parse_header, parse_preamble)

DEFAULT_DECODE_BUDGET = 1 << 30
_default_budget = DEFAULT_DECODE_BUDGET


def _check_budget(nbytes: Any) -> int:
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise AqmInputError(f"a decode budget is a positive number of bytes, got {nbytes!r}")
    return nbytes


def set_decode_budget(nbytes: int) -> int:
    """Set the decode budget of files opened from now on in this process; return the previous one.

    The budget is the most bytes of memory that decoding one tensor, or the
    graph, may allocate (spec/FORMAT.md 6.1); 1 GiB unless changed. A tensor
    needing more raises :class:`AqmBudgetError` before anything is allocated.
    """
    global _default_budget
    previous, _default_budget = _default_budget, _check_budget(nbytes)
    return previous


@dataclass(frozen=True)
class TensorInfo(TensorHead):
    """What the header says about one tensor."""

    stored_bytes: int          # bytes of this tensor's own sections (not shared codebooks)
    group: str | None          # name of the codebook group it uses, if any

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.numel if self.numel else 0.0


class AqmFile:
    """An open .aqm file. Create with :func:`aqformat.open`."""

    def __init__(self, path: str | os.PathLike, decode_budget: int | None = None):
        self.path = os.fspath(path)
        self.decode_budget = _default_budget if decode_budget is None else _check_budget(decode_budget)
        self._fd: int | None = None
        try:
            # O_NONBLOCK so that a FIFO planted under a model's name cannot block open() forever.
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                self.close()
                kind = "a directory, not an .aqm file" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise AqmInputError(f"{self.path} is {kind}")
            size = st.st_size
            if size < PREAMBLE_SIZE:
                self.close()
                raise AqmFormatError(f"file is {size} bytes, too small to be an .aqm file")
        except FileNotFoundError:
            raise AqmInputError(f"no such file: {self.path}") from None
        except IsADirectoryError:
            raise AqmInputError(f"{self.path} is a directory, not an .aqm file") from None
        except PermissionError:
            raise AqmInputError(f"permission denied: {self.path}") from None
        except OSError as e:  # e.g. ELOOP, ENAMETOOLONG, EIO
            raise AqmIOError(f"cannot open {self.path}: {e.strerror or e}") from None
        self.size = size
        self._identity = _identity(st)
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self._shared: dict[int, np.ndarray] = {}  # decoded codebook sections, least recently used first
        try:
            pre = parse_preamble(self._pread(0, PREAMBLE_SIZE).tobytes(), size)
            self.version = (pre.major, pre.minor)
            self.alignment = pre.alignment
            self._h: Header = parse_header(self._pread(pre.header_offset, pre.header_length).tobytes(), pre)
            self._by_name = {t.name: t for t in self._h.tensors}
            self._groups = {g.name: g for g in self._h.codebooks}
            self._check_tensor_sizes()
        except BaseException:
            self.close()
            raise

    # -- metadata ------------------------------------------------------------------
    @property
    def producer(self) -> str:
        return self._h.producer

    @property
    def source(self) -> dict[str, Any]:
        return self._h.source

    @property
    def metadata(self) -> dict[str, Any]:
        return self._h.metadata

    @property
    def codebook_groups(self) -> list[CodebookGroup]:
        return list(self._h.codebooks)

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return [t.name for t in self._h.tensors]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._h.tensors)

    def info(self, name: str) -> TensorInfo:
        """Header information about tensor ``name``."""
        t = self._record(name)
        group = self._h.codebooks[t.fields["group"]].name if "group" in t.fields else None
        return TensorInfo(t.name, t.shape, t.dtype, t.codec,
                          sum(self._h.sections[i].length for i in self.tensor_sections(name)), group)

    def tensors(self) -> list[TensorInfo]:
        """Information about every tensor, in file order."""
        return [self.info(n) for n in self.names()]

    # -- data ----------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """Decode tensor ``name`` to a numpy array of its stored dtype.

        bfloat16 tensors are returned as float32 (numpy has no bfloat16).
        The array is the caller's own (never a view of the file).

        Raises
        ------
        KeyError
            No tensor has this name.
        AqmIntegrityError
            A section of this tensor fails its checksum.
        AqmBudgetError
            Decoding it needs more memory than :attr:`decode_budget`.
        AqmIOError
            The file was truncated or rewritten in place since it was opened.
        """
        t = self._record(name)
        w = self._decode(t, lambda codec: codec.decode(t, self), budgeted=True)
        # float codecs may decode to float32; a float16 tensor is returned as float16
        return w.astype(np.float16, copy=False) if t.dtype == "float16" else w

    def decode_with(self, name: str, decode: Callable[[codecs.Codec], Any]) -> Any:
        """``decode(codec)`` for tensor ``name``'s codec, with the reader's error handling.

        Unknown codecs raise AqmUnsupportedError, and checksum failures name the
        tensor. The torch runtime decodes through this with the codec's torch decoder.
        """
        return self._decode(self._record(name), decode, budgeted=True)

    def decode_need(self, name: str) -> int:
        """Bytes of memory decoding tensor ``name`` allocates at most, as checked against the decode budget.

        Its decoded sections, the stored bytes of those that are compressed, a
        float32 copy of its codebook group, and the codec's working arrays.
        """
        t = self._record(name)
        codec = codecs.get(t.codec)
        if codec is None:
            return 0
        need = sum(self._section_need(t.fields[k]) for k in codec.section_fields(t, self._h.codebooks))
        if "group" in t.fields:
            g = self._h.codebooks[t.fields["group"]]
            need += self._section_need(g.section) + g.M * g.K * g.d * 4
        return need + codec.work(t, self._h.codebooks)

    def _section_need(self, index: int) -> int:
        s = self._h.sections[index]
        if s.encoding in rans.ENCODINGS:
            return s.size + s.length + rans.work_bound(s.size)
        return s.size + (s.length if s.encoding != "raw" else 0)

    def _decode(self, t: TensorRecord, decode: Callable[[codecs.Codec], Any], budgeted: bool = False) -> Any:
        codec = codecs.get(t.codec)
        if codec is None:
            raise AqmUnsupportedError(f"tensor {t.name!r} uses codec {t.codec!r}, unknown to this reader "
                                      f"(format {self.version[0]}.{self.version[1]})")
        if budgeted:
            need = self.decode_need(t.name)
            if need > self.decode_budget:
                raise AqmBudgetError(f"tensor {t.name!r} needs {need} bytes to decode, more than the decode budget "
                                     f"of {self.decode_budget} bytes (aqformat.open(..., decode_budget=...))")
        try:
            return decode(codec)
        except AqmIntegrityError as e:
            msg = str(e)
            raise AqmIntegrityError(msg if repr(t.name) in msg else f"tensor {t.name!r}: {msg}") from None

    @property
    def graph_format(self) -> str | None:
        """Format of the embedded graph (e.g. ``"onnx"``), or None."""
        return self._h.graph["format"] if self._h.graph is not None else None

    @property
    def graph_bytes(self) -> int:
        """Stored bytes of the embedded graph section (0 without a graph)."""
        g = self._h.graph
        return 0 if g is None else self._h.sections[g["section"]].length

    def graph(self) -> tuple[str, bytes] | None:
        """The embedded model graph as ``(format, bytes)``, or None."""
        g = self._h.graph
        if g is None:
            return None
        need = self._section_need(g["section"])
        if need > self.decode_budget:
            raise AqmBudgetError(f"the graph needs {need} bytes to decode, more than the decode budget "
                                 f"of {self.decode_budget} bytes (aqformat.open(..., decode_budget=...))")
        return g["format"], self.section_bytes(g["section"]).tobytes()

    def group_bytes(self, name: str) -> int:
        """Stored bytes of codebook group ``name``."""
        try:
            return self._h.sections[self._groups[name].section].length
        except KeyError:
            raise KeyError(f"no codebook group named {name!r}") from None

    def group_tensors(self) -> dict[str, list[str]]:
        """Names of the tensors using each codebook group, in file order (one pass over the tensors)."""
        out: dict[str, list[str]] = {g.name: [] for g in self._h.codebooks}
        for t in self._h.tensors:
            if "group" in t.fields:
                out[self._h.codebooks[t.fields["group"]].name].append(t.name)
        return out

    def codebooks(self, group: int) -> np.ndarray:
        """The float32 codebooks ``[M, K, d]`` of group index ``group``, decoded once and cached.

        Every AQ tensor of a group uses them: decompressing them again per tensor
        cost 0.3 s a tensor with a 128 MiB codebook. The cache keeps the most
        recently used groups within half the decode budget.
        """
        g = self._h.codebooks[group]
        with self._lock:
            cached = self._shared.pop(group, None)
            if cached is not None:
                self._shared[group] = cached
                return cached
        cb = self.section_array(g.section, numpy_dtype(g.dtype), (g.M, g.K, g.d)).astype(np.float32)
        cb.flags.writeable = False
        with self._lock:
            self._shared[group] = cb
            while len(self._shared) > 1 and sum(a.nbytes for a in self._shared.values()) > self.decode_budget // 2:
                self._shared.pop(next(iter(self._shared)))
        return cb

    def check_checksums(self) -> None:
        """Verify every section's CRC-32; raise AqmIntegrityError on the first mismatch,
        naming what the section holds (a tensor, a codebook group, the graph)."""
        owners = self.section_owners()
        for i in range(len(self._h.sections)):
            try:
                self._stored(i)  # CRCs cover stored bytes: no decompression, and unknown encodings pass
            except AqmIntegrityError as e:
                raise AqmIntegrityError(f"{owners.get(i, 'unreferenced data')}: {e}") from None

    def tensor_sections(self, name: str) -> list[int]:
        """Indices of the sections holding tensor ``name``'s own data (not shared codebooks)."""
        t = self._record(name)
        codec = codecs.get(t.codec)
        return [t.fields[k] for k in codec.section_fields(t, self._h.codebooks)] if codec is not None else []

    def section_owners(self) -> dict[int, str]:
        """What each referenced section holds: ``"tensor 'x'"``, ``"codebook group 'g'"`` or ``"graph"``."""
        owners = {i: f"tensor {t.name!r}" for t in self._h.tensors for i in self.tensor_sections(t.name)}
        owners.update((g.section, f"codebook group {g.name!r}") for g in self._h.codebooks)
        if self._h.graph is not None:
            owners[self._h.graph["section"]] = "graph"
        return owners

    def stored_section(self, index: int) -> tuple[Section, np.ndarray]:
        """Section ``index`` as stored (still compressed), after its checksum is verified."""
        return self._h.sections[index], self._stored(index)

    def section(self, index: int) -> Section:
        """The header entry of section ``index`` (offset, stored length, size, encoding, CRC-32)."""
        return self._h.sections[index]

    def record(self, name: str) -> TensorRecord:
        """The validated header record of tensor ``name`` (codec fields included)."""
        return self._record(name)

    def verify(self) -> None:
        """Check every section's checksum, decode every tensor and the graph; raise on the first fault."""
        self.check_checksums()
        for name in self.names():
            self.read(name)
        self.graph()  # a checksummed but undecodable graph would otherwise only fail at run time

    # -- internals -----------------------------------------------------------------
    def _record(self, name: str) -> TensorRecord:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    def _pread(self, offset: int, length: int) -> np.ndarray:
        """``length`` bytes at ``offset`` in a new array, or AqmIOError if the file changed since it was opened."""
        if self._fd is None:
            raise AqmInputError(f"{self.path} is closed")
        out = np.empty(length, dtype=np.uint8)
        view, done = memoryview(out), 0
        try:
            self._check_unchanged()
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
            self._check_unchanged()
        except OSError as e:
            raise AqmIOError(f"cannot read {self.path}: {e.strerror or e}") from None
        if done != length:
            raise AqmIOError(f"{self.path} changed since it was opened (truncated); reopen it, "
                             "and update model files by renaming a new file over them")
        return out

    def _check_unchanged(self) -> None:
        if _identity(os.fstat(self._fd)) != self._identity:
            raise AqmIOError(f"{self.path} changed since it was opened (rewritten in place); reopen it, "
                             "and update model files by renaming a new file over them")

    def _stored(self, index: int) -> np.ndarray:
        """Stored bytes of section ``index`` (a new array), CRC-checked the first time they are used."""
        s: Section = self._h.sections[index]
        stored = self._pread(s.offset, s.length)
        if index not in self._verified:
            if zlib.crc32(stored) != s.crc32:
                raise AqmIntegrityError(f"section {index} checksum mismatch (file is corrupted)")
            with self._lock:
                self._verified.add(index)
        return stored

    def section_bytes(self, index: int, expect: int | None = None) -> np.ndarray:
        """Decoded bytes of section ``index`` as a new uint8 array.

        The section's checksum is verified on first use; ``expect`` is the size it must have.
        """
        s: Section = self._h.sections[index]
        if expect is not None and s.size != expect:
            raise AqmFormatError(f"section {index} holds {s.size} bytes, expected {expect}")
        stored = self._stored(index)
        if s.encoding == "raw":
            return stored
        if s.encoding not in ENCODINGS:
            raise AqmUnsupportedError(f"section {index} uses encoding {s.encoding!r}, unknown to this reader")
        if s.encoding in rans.ENCODINGS:
            try:
                return rans.decode(stored, s.size, s.encoding)
            except AqmFormatError as e:
                raise AqmFormatError(f"section {index}: {e}") from None
        data = memoryview(stored)
        try:
            # zstd allocates what the frame header declares, whatever max_output_size says, so a
            # frame declaring more than the validated section size is refused before decoding.
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, s.size):
                raise AqmFormatError(f"section {index} zstd frame declares {declared} bytes, expected {s.size}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=s.size,
                                                           allow_extra_data=False)
        except zstandard.ZstdError:
            raise AqmFormatError(f"section {index} is not a valid zstd frame") from None
        if len(out) != s.size:
            raise AqmFormatError(f"section {index} decompresses to {len(out)} bytes, expected {s.size}")
        return np.frombuffer(out, dtype=np.uint8)

    def section_array(self, index: int, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
        """Section ``index`` as a new array of ``dtype`` and ``shape`` (its size is checked)."""
        dt = np.dtype(dtype)
        data = self.section_bytes(index, math.prod(shape) * dt.itemsize)
        return data.view(dt).reshape(shape)

    def _check_tensor_sizes(self) -> None:
        """Every section a tensor uses must hold exactly the bytes its record implies."""
        for t in self._h.tensors:
            codec = codecs.get(t.codec)
            if codec is None:
                continue
            for key, size in codec.section_fields(t, self._h.codebooks).items():
                self._expect(t.fields[key], size, f"tensor {t.name!r}")
        for g in self._h.codebooks:
            self._expect(g.section, g.M * g.K * g.d * itemsize(g.dtype), f"codebook group {g.name!r}")

    def _expect(self, index: int, size: int, owner: str) -> None:
        if self._h.sections[index].size != size:
            raise AqmFormatError(
                f"invalid header: {owner} needs {size} bytes in section {index}, which holds {self._h.sections[index].size}")

    def close(self) -> None:
        """Close the file (arrays read from it stay valid: they are the caller's own)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._shared = {}

    def __enter__(self) -> "AqmFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AqmFile {self.path!r} v{self.version[0]}.{self.version[1]}, {len(self)} tensors>"


def _identity(st: os.stat_result) -> tuple[int, int]:
    """What changes when a file is rewritten in place (not when another is renamed over its name)."""
    return st.st_size, st.st_mtime_ns


def open(path: str | os.PathLike, decode_budget: int | None = None) -> AqmFile:  # noqa: A001 - mirrors builtins.open
    """Open an .aqm file: parse and validate its header; tensors are read when asked.

    Parameters
    ----------
    path : str or os.PathLike
        Path to the file.
    decode_budget : int, optional
        Most bytes decoding one tensor (or the graph) may allocate; default
        :func:`set_decode_budget`'s value (1 GiB unless changed).

    Returns
    -------
    AqmFile
        Tensor names, shapes, dtypes and codecs, and ``read(name)``.

    Raises
    ------
    AqmFormatError
        The file is malformed (the message says how).
    AqmVersionError
        The file's major version is not supported.
    """
    return AqmFile(path, decode_budget)
