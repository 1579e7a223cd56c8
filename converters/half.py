"""Encoder of codec ``half`` (:mod:`aqformat.codecs.half`): float tensors kept at 16 bits.

:func:`encode_half` gives a :class:`HalfTensor` with the interface of the small-tensor
codecs' results (record fields, decoded values, stored bytes, ``write``), so a planner
can weigh it beside affine codes and raw float32; ``--keep PATTERN:fp16`` (or ``:bf16``)
stores the matching tensors with it (:func:`split_keep`, :func:`write_kept`).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aqformat.codecs import half
from aqformat.errors import AqmWarning
from aqformat.writer import Writer

from .affine import AffineTensor

__all__ = ["HalfTensor", "encode_half", "split_keep", "kept_format", "write_kept", "KEEP_SUFFIXES", "RECORD_BYTES"]

RECORD_BYTES = 16
"""Header bytes a ``half`` record takes beyond a raw one: ``"format": "float16"`` and the longer codec
name, in msgpack (the section fields' integers may differ by a byte or two either way)."""
#: ``--keep PATTERN:SUFFIX`` suffixes and the 16-bit format each stores.
KEEP_SUFFIXES = {"fp16": "float16", "bf16": "bfloat16"}


@dataclass
class HalfTensor:
    """One tensor coded by :func:`encode_half`: the writer's record fields and the values read back."""

    fields: dict[str, Any]
    decoded: np.ndarray

    # the section is one "data" field, written zstd-encoded where smaller, as the affine codec's
    stored_bytes = AffineTensor.stored_bytes

    def write(self, writer: Writer, name: str, shape: Sequence[int], dtype: str) -> None:
        """Append the tensor to ``writer`` (its section zstd-coded where that is smaller)."""
        writer.add_encoded(name, half.NAME, shape, self.fields, dtype=dtype, compress=("data",))


def encode_half(w: np.ndarray, fmt: str = "float16") -> HalfTensor | None:
    """``w`` (any float dtype) stored as 16-bit ``fmt`` floats (``"float16"`` or ``"bfloat16"``).

    Returns None when a finite value of ``w`` lies beyond the format's range (float16:
    magnitudes that round past 65504): it would decode as an infinity, so the caller keeps
    the tensor another way (float32).
    """
    if fmt not in half.FORMATS:
        raise ValueError(f"16-bit format must be one of {half.FORMATS}, not {fmt!r}")
    fields = half.encode(w, fmt)
    if fields is None:
        return None
    return HalfTensor(fields, half.widen(fields["data"], fmt).reshape(np.shape(w)))


def split_keep(patterns: Iterable[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``--keep`` patterns as ``(every pattern, ((pattern, 16-bit format), ...))``: ``PATTERN:fp16``
    and ``PATTERN:bf16`` keep the tensors uncoded, at 16 bits; other patterns (ONNX names such as
    ``onnx::Conv_12`` included) are kept as they are."""
    plain, halves = [], []
    for p in patterns:
        stem, _, suffix = p.rpartition(":")
        if stem and suffix in KEEP_SUFFIXES:
            plain.append(stem)
            halves.append((stem, KEEP_SUFFIXES[suffix]))
        else:
            plain.append(p)
    return tuple(plain), tuple(halves)


def kept_format(name: str, halves: Sequence[tuple[str, str]]) -> str | None:
    """The 16-bit format the first matching ``(pattern, format)`` gives tensor ``name``, else None."""
    import fnmatch
    return next((fmt for pattern, fmt in halves if fnmatch.fnmatchcase(name, pattern)), None)


def write_kept(w: Writer, name: str, array: np.ndarray, dtype: str, fmt: str | None) -> HalfTensor | None:
    """Write a tensor kept uncoded: at 16 bits when ``fmt`` is given and its values fit, else as
    stored. Returns the 16-bit coding, or None when it went as stored (a tensor that does not
    fit is said in a warning)."""
    if fmt is not None and dtype in ("float32", "float64"):
        coded = encode_half(array, fmt)
        if coded is not None:
            coded.write(w, name, np.shape(array), dtype)
            return coded
        warnings.warn(f"--keep: tensor {name!r} has values beyond {fmt}'s range; kept as {dtype}",
                      AqmWarning, stacklevel=3)
    w.add_tensor(name, array, dtype="bfloat16" if dtype == "bfloat16" else None)
    return None
