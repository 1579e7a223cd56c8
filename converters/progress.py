"""Progress over a conversion pass: tqdm when installed, else a plain bar on stderr.

Progress is counted in weights (elements), so the ETA is right even when
tensor sizes differ by orders of magnitude; the tensor count is shown beside it.
"""
from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A progress bar over ``total`` weights in ``count`` tensors.

    Parameters
    ----------
    desc : str
        Label of the pass (e.g. ``"encode"``).
    total : int
        Weights to process.
    count : int
        Tensors to process.
    enabled : bool
        Show nothing when False.
    unit : str
        tqdm unit label of ``total``.
    """

    def __init__(self, desc: str, total: int, count: int, enabled: bool = True, unit: str = "w"):
        self.desc, self.total, self.count = desc, max(1, total), count
        self.enabled = enabled and count > 0
        self._done = self._n = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._bar: Any = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=unit == "w",
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, weights: int, name: str) -> None:
        """Record one finished tensor of ``weights`` elements."""
        self._done += weights
        self._n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._n}/{self.count} {name[-40:]}", refresh=False)
            self._bar.update(weights)
            return
        now = time.monotonic()
        if now - self._last < 0.5 and self._n < self.count:
            return
        self._last = now
        frac = self._done / self.total
        elapsed = now - self._t0
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        filled = int(30 * frac)
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f}% "
                         f"{self._n}/{self.count} tensors, ETA {eta:5.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
