"""Bit packing of codes (spec/FORMAT.md, "Packed codes").

Codes of ``b`` bits (1 <= b <= 16) form one little-endian bit stream: code
``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first,
and stream bit ``j`` is bit ``j % 8`` (LSB = 0) of byte ``j // 8``. The stream
is ``ceil(n*b/8)`` bytes; unused high bits of the last byte are zero.

Every 8 codes fill exactly ``b`` bytes, so both directions work on groups of
8 codes with one vectorised pass per position inside the group.
"""
from __future__ import annotations

import numpy as np

from .errors import AqmFormatError


def packed_size(count: int, bits: int) -> int:
    """Number of bytes of ``count`` codes packed at ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integer ``codes`` (any shape, C order) at ``bits`` bits.

    Parameters
    ----------
    codes : numpy.ndarray
        Integer codes, each in ``[0, 2**bits)``.
    bits : int
        Code width, 1 to 16.

    Returns
    -------
    bytes
        The packed stream, ``packed_size(codes.size, bits)`` bytes.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"code width must be 1..16 bits, got {bits}")
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    n = flat.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint32)
    padded[:n] = flat
    padded = padded.reshape(groups, 8)
    # Each group of 8 codes is b bytes; accumulate it as up to 128 bits in two words.
    lo = np.zeros(groups, dtype=np.uint64)
    hi = np.zeros(groups, dtype=np.uint64)
    for j in range(8):
        v = padded[:, j].astype(np.uint64)
        pos = j * bits
        if pos < 64:
            lo |= v << np.uint64(pos)
            if pos + bits > 64:
                hi |= v >> np.uint64(64 - pos)
        else:
            hi |= v << np.uint64(pos - 64)
    out = np.concatenate([lo.astype("<u8").view(np.uint8).reshape(groups, 8),
                          hi.astype("<u8").view(np.uint8).reshape(groups, 8)], axis=1)
    return out[:, :bits].tobytes()[: packed_size(n, bits)]


def unpack(data: np.ndarray | bytes, count: int, bits: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits from a packed stream.

    Parameters
    ----------
    data : numpy.ndarray or bytes
        The packed stream; exactly ``packed_size(count, bits)`` bytes.
    count : int
        Number of codes.
    bits : int
        Code width, 1 to 16.

    Returns
    -------
    numpy.ndarray
        ``uint8`` codes for ``bits <= 8``, else ``uint16``; shape ``(count,)``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size != packed_size(count, bits):
        raise AqmFormatError(
            f"packed codes are {buf.size} bytes, expected {packed_size(count, bits)}")
    if bits == 8:
        return buf
    if bits == 16:
        return buf.view("<u2")
    groups = -(-count // 8)
    # Two spare bytes let every position read a 3-byte window without bounds checks.
    padded = np.zeros(groups * bits + 2, dtype=np.uint8)
    padded[: buf.size] = buf
    body = padded[: groups * bits].reshape(groups, bits)
    tail = padded[bits: groups * bits + 2]  # bytes beyond each group's start, for windows
    out = np.empty((groups, 8), dtype=np.uint8 if bits <= 8 else np.uint16)
    mask = np.uint32((1 << bits) - 1)
    for j in range(8):
        pos = j * bits
        k, shift = pos >> 3, np.uint32(pos & 7)
        window = body[:, k].astype(np.uint32)
        if shift + bits > 8:
            window |= _byte_column(body, tail, k + 1, bits) << np.uint32(8)
        if shift + bits > 16:
            window |= _byte_column(body, tail, k + 2, bits) << np.uint32(16)
        out[:, j] = (window >> shift) & mask
    return out.reshape(-1)[:count]


def _byte_column(body: np.ndarray, tail: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Byte ``k`` of every group, where ``k`` may run past the group into the next."""
    if k < bits:
        return body[:, k].astype(np.uint32)
    return tail[k - bits:: bits][: body.shape[0]].astype(np.uint32)
