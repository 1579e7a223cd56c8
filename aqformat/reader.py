"""Memory-mapped .aqm reader.

``open`` parses the preamble and header only; tensor bytes are touched when a
tensor is read, and each section's checksum is verified the first time it is
used. Raw uncompressed tensors are returned as read-only views of the mapping.
"""
from __future__ import annotations

import math
import mmap
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from . import codecs
from .dtypes import itemsize
from .errors import AqmFormatError, AqmInputError, AqmIntegrityError, AqmIOError, AqmUnsupportedError
from .header import (ENCODINGS, PREAMBLE_SIZE, CodebookGroup, Header, Section, TensorHead, TensorRecord, parse_header,
                     parse_preamble)


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

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            # O_NONBLOCK so that a FIFO planted under a model's name cannot block open() forever.
            with builtins_open(self.path, "rb", opener=_nonblocking) as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise AqmInputError(f"{self.path} is not a regular file")
                size = st.st_size
                if size < PREAMBLE_SIZE:
                    raise AqmFormatError(f"file is {size} bytes, too small to be an .aqm file")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise AqmInputError(f"no such file: {self.path}") from None
        except IsADirectoryError:
            raise AqmInputError(f"{self.path} is a directory, not an .aqm file") from None
        except PermissionError:
            raise AqmInputError(f"permission denied: {self.path}") from None
        except OSError as e:  # e.g. ELOOP, ENAMETOOLONG, EIO
            raise AqmIOError(f"cannot open {self.path}: {e.strerror or e}") from None
        self.size = size
        pre = parse_preamble(self._mm[:PREAMBLE_SIZE], size)
        self.version = (pre.major, pre.minor)
        self._h: Header = parse_header(self._mm[pre.header_offset: pre.header_offset + pre.header_length], pre)
        self._by_name = {t.name: t for t in self._h.tensors}
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self._check_tensor_sizes()

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
        Raw uncompressed tensors are read-only views of the file mapping.

        Raises
        ------
        KeyError
            No tensor has this name.
        AqmIntegrityError
            A section of this tensor fails its checksum.
        """
        t = self._record(name)
        w = self._decode(t, lambda codec: codec.decode(t, self))
        # float codecs may decode to float32; a float16 tensor is returned as float16
        return w.astype(np.float16, copy=False) if t.dtype == "float16" else w

    def decode_with(self, name: str, decode: Callable[[codecs.Codec], Any]) -> Any:
        """``decode(codec)`` for tensor ``name``'s codec, with the reader's error handling.

        Unknown codecs raise AqmUnsupportedError, and checksum failures name the
        tensor. The torch runtime decodes through this with the codec's torch decoder.
        """
        return self._decode(self._record(name), decode)

    def _decode(self, t: TensorRecord, decode: Callable[[codecs.Codec], Any]) -> Any:
        codec = codecs.get(t.codec)
        if codec is None:
            raise AqmUnsupportedError(f"tensor {t.name!r} uses codec {t.codec!r}, unknown to this reader "
                                      f"(format {self.version[0]}.{self.version[1]})")
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
        return g["format"], bytes(self.section_bytes(g["section"]))

    def group_bytes(self, name: str) -> int:
        """Stored bytes of codebook group ``name``."""
        for g in self._h.codebooks:
            if g.name == name:
                return self._h.sections[g.section].length
        raise KeyError(f"no codebook group named {name!r}")

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

    def _stored(self, index: int) -> np.ndarray:
        """Stored bytes of section ``index``, CRC-checked the first time they are used."""
        s: Section = self._h.sections[index]
        stored = np.frombuffer(self._mm, dtype=np.uint8, count=s.length, offset=s.offset)
        if index not in self._verified:
            if zlib.crc32(stored) != s.crc32:
                raise AqmIntegrityError(f"section {index} checksum mismatch (file is corrupted)")
            with self._lock:
                self._verified.add(index)
        return stored

    def section_bytes(self, index: int, expect: int | None = None) -> np.ndarray:
        """Decoded bytes of section ``index`` as a uint8 array (a view when not compressed).

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
        data = stored.tobytes()
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
        """Section ``index`` as an array of ``dtype`` and ``shape`` (read-only; its size is checked)."""
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
        """Release the mapping (deferred while read views of it are alive)."""
        try:
            self._mm.close()
        except BufferError:
            pass  # numpy views still use the mapping; it is released with them

    def __enter__(self) -> "AqmFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AqmFile {self.path!r} v{self.version[0]}.{self.version[1]}, {len(self)} tensors>"


builtins_open = open


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open(path: str | os.PathLike) -> AqmFile:  # noqa: A001 - mirrors builtins.open by design
    """Open an .aqm file: parse and validate its header, map its data lazily.

    Parameters
    ----------
    path : str or os.PathLike
        Path to the file.

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
    return AqmFile(path)
