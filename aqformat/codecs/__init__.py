"""The codec registry: everything the container knows about each codec (spec/FORMAT.md, 4.3 and 5).

One module per codec declares one :class:`Codec` and registers it: its name,
how its header fields are read and bounds-checked, the section sizes they
imply, a numpy decoder, and optionally a torch decoder. The header parser,
the reader, the writer (``Writer.add_encoded``), ``aqm-info``, the torch
runtime and fine-tuning look codecs up here; none of them names a codec.
Adding a codec is one module here (plus its encoder in ``converters/``, the
spec and the test vectors).

Conventions every codec follows, so that generic code can rely on them:

- a record field that refers to a section of the tensor's own bytes is
  named in what ``sizes`` returns (and may be None when optional);
- a field named ``"group"`` refers to a shared codebook group.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..header import CodebookGroup, RecordFields, TensorRecord
    from ..reader import AqmFile

__all__ = ["Codec", "register", "unregister", "get", "names"]


@dataclass(frozen=True)
class Codec:
    """One codec's contract with the container.

    Attributes
    ----------
    name : str
        The ``codec`` value of its tensor records.
    parse : callable
        ``parse(fields: RecordFields) -> dict``: the record's codec fields,
        each read through ``fields`` (which bounds-checks it); raises
        ``AqmFormatError`` on any violation.
    sizes : callable
        ``sizes(record: TensorRecord, groups: Sequence[CodebookGroup]) -> dict``:
        for each field holding one of the tensor's sections, the decoded bytes
        that section must hold (None fields are absent sections).
    decode : callable
        ``decode(record, f: AqmFile) -> numpy.ndarray``: the tensor of
        ``record.shape`` in the record's dtype (bfloat16 as float32).
    float_only : bool
        The codec decodes to a float dtype only, and only non-empty tensors.
    verbatim : bool
        Decoding returns the stored values unchanged, so changed values (e.g.
        after fine-tuning) are stored back exactly with ``Writer.add_tensor``.
    work : callable
        ``work(record, groups) -> int``: bytes its numpy decoder allocates
        beyond the decoded sections and codebooks it reads (output and
        temporaries), at most; the reader checks the total against its decode
        budget before decoding (spec/FORMAT.md 6.1).
    torch_decode : callable, optional
        ``torch_decode(record, f, device, cache) -> torch.Tensor``: decode on a
        torch device (float32 for float dtypes); ``cache`` is a dict the caller
        keeps across calls (e.g. for shared codebooks already on the device).
        Without it, the numpy decoder's result is copied to the device.
    minor : int
        The format minor version that introduced the codec; a file using it
        is written with at least that minor version (spec, "Version rules").
    """

    name: str
    parse: Callable[[RecordFields], dict[str, Any]]
    sizes: Callable[[TensorRecord, Any], dict[str, int]]
    decode: Callable[[TensorRecord, AqmFile], Any]
    float_only: bool = True
    verbatim: bool = False
    work: Callable[[TensorRecord, Any], int] = lambda record, groups: 8 * record.numel
    torch_decode: Callable[..., Any] | None = None
    minor: int = 0

    def section_fields(self, record: TensorRecord, groups: list[CodebookGroup]) -> Mapping[str, int]:
        """``{field: decoded size}`` of the sections ``record`` owns (absent optional ones left out)."""
        return {k: v for k, v in self.sizes(record, groups).items() if record.fields.get(k) is not None}


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known to the header parser, reader, writer and runtimes; returns it."""
    if codec.name in _REGISTRY and _REGISTRY[codec.name] is not codec:
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def unregister(name: str) -> None:
    """Forget codec ``name`` (files using it then list, but do not read)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Codec | None:
    """The codec called ``name``, or None if this build does not know it."""
    return _REGISTRY.get(name)


def names() -> list[str]:
    """Names of the registered codecs."""
    return list(_REGISTRY)


# The built-in codecs register themselves on import.
from . import affine, aq, half, lattice, raw, uniform  # noqa: E402,F401
