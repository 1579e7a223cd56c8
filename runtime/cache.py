"""Decoded-weight cache shared by the ONNX Runtime and PyTorch paths.

An LRU map from a key (usually a tensor name) to a decoded array, bounded by
a byte budget. Entries can be pinned while a consumer uses them (a running
stage, a module inside its forward) so eviction never pulls a weight out from
under a computation; an ``on_evict`` callback lets the owner drop its other
references (e.g. a torch Parameter's storage) when an entry leaves the cache.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AqmInputError


@dataclass
class CacheStats:
    """Counters of a :class:`WeightCache` (a snapshot)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    decode_seconds: float = 0.0
    resident_bytes: int = 0
    peak_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def nbytes_of(value: Any) -> int:
    """Bytes held by a numpy array or torch tensor (``nbytes`` or ``numel * element_size``)."""
    n = getattr(value, "nbytes", None)
    if n is None:
        n = value.numel() * value.element_size()
    return int(n)


class WeightCache:
    """Thread-safe LRU cache of decoded weights with a byte budget.

    Parameters
    ----------
    budget_bytes : int, optional
        Most bytes kept resident; None keeps everything.
    on_evict : callable, optional
        Called as ``on_evict(key)`` after an entry is evicted (outside the lock).
    """

    def __init__(self, budget_bytes: int | None = None,
                 on_evict: Callable[[str], None] | None = None):
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stats = CacheStats()

    def get(self, key: str, decode: Callable[[], Any]) -> Any:
        """Return the cached value of ``key``, calling ``decode()`` on a miss.

        Decoding runs outside the lock so other threads can use the cache
        meanwhile; if two threads miss the same key, the first result stored wins.
        """
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self._stats.hits += 1
                return hit[0]
            self._stats.misses += 1
        t0 = time.perf_counter()
        value = decode()
        elapsed = time.perf_counter() - t0
        size = nbytes_of(value)
        with self._lock:
            self._stats.decode_seconds += elapsed
            hit = self._items.get(key)
            if hit is not None:
                return hit[0]
            self._items[key] = (value, size)
            self._stats.resident_bytes += size
            self._stats.peak_bytes = max(self._stats.peak_bytes, self._stats.resident_bytes)
            evicted = self._evict_locked()
        self._notify(evicted)
        return value

    def pin(self, keys: list[str]) -> None:
        """Protect ``keys`` from eviction until :meth:`unpin` (pins nest)."""
        with self._lock:
            for k in keys:
                self._pins[k] = self._pins.get(k, 0) + 1

    def unpin(self, keys: list[str]) -> None:
        """Release pins taken with :meth:`pin`, evicting if over budget."""
        with self._lock:
            for k in keys:
                n = self._pins.get(k, 0) - 1
                if n > 0:
                    self._pins[k] = n
                else:
                    self._pins.pop(k, None)
            evicted = self._evict_locked()
        self._notify(evicted)

    def discard(self, key: str) -> None:
        """Drop ``key`` if present (not counted as an eviction, no callback)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._stats.resident_bytes -= item[1]

    def clear(self) -> None:
        """Drop every entry (no callbacks)."""
        with self._lock:
            self._items.clear()
            self._stats.resident_bytes = 0

    def __deepcopy__(self, memo: dict) -> "WeightCache":
        raise AqmInputError("a lazily loaded model cannot be deep-copied: its weights are decoded by hooks bound to "
                            "the original; load it with lazy=False (or resident='compressed') to copy it")

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(**self._stats.__dict__)

    def _evict_locked(self) -> list[str]:
        if self.budget_bytes is None:
            return []
        evicted = []
        for key in list(self._items):
            if self._stats.resident_bytes <= self.budget_bytes:
                break
            if key in self._pins:
                continue
            _, size = self._items.pop(key)
            self._stats.resident_bytes -= size
            self._stats.evictions += 1
            evicted.append(key)
        return evicted

    def _notify(self, evicted: list[str]) -> None:
        if self._on_evict is not None:
            for key in evicted:
                self._on_evict(key)
