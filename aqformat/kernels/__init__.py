"""Compiled CPU kernels (numba), with numpy fallbacks that give the same results.

numba is optional (``pip install 'aqformat[fast]'``). Without it, or with
``AQFORMAT_KERNELS=numpy`` in the environment, every kernel user falls back
to numpy and one line saying so is logged (once per process) on the
``aqformat`` logger. Work done once per file (reading a tensor, a resident
decoded session) stays in numpy unless a compiled kernel is already loaded
or ``AQFORMAT_KERNELS=numba`` asks for it (:func:`requested`): loading numba
costs about a second and 60 MB, more than it saves on one pass.

Compiled kernels are cached on disk between runs (numba ``cache=True``): next
to this package when it is writable, otherwise in ``NUMBA_CACHE_DIR``, which
is set here, when the user has not set it, to a per-user cache folder (or a
per-user folder under the temporary directory), so that a read-only install
still keeps its compiled kernels.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_log = logging.getLogger("aqformat")
_compile_seconds: dict[str, float] = {}
_lock = threading.RLock()
_threads: int | None = None
_pool: Any = None  # a concurrent.futures.ThreadPoolExecutor, made on first use


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cache_dir() -> str:
    """Where numba keeps this package's compiled kernels."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    if _writable(os.path.join(here, "__pycache__")):
        return os.path.join(here, "__pycache__")
    import tempfile
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (os.path.join(base, "aqformat", "numba"),
                   os.path.join(tempfile.gettempdir(), f"aqformat-numba-{os.getuid() if hasattr(os, 'getuid') else 0}")):
        if _writable(folder):
            return folder
    return ""


@functools.lru_cache(maxsize=None)
def numba_module() -> Any:
    """The ``numba`` module, or None (numba missing or ``AQFORMAT_KERNELS=numpy``), logging why once."""
    if os.environ.get("AQFORMAT_KERNELS", "").lower() == "numpy":
        _log.warning("aqformat: AQFORMAT_KERNELS=numpy, compiled kernels disabled; using numpy")
        return None
    if "NUMBA_CACHE_DIR" not in os.environ:
        here = os.path.dirname(os.path.abspath(__file__))
        folder = cache_dir()
        if folder and not folder.startswith(here):
            # read-only install: numba's in-tree cache is unusable, point it at a user folder
            os.environ["NUMBA_CACHE_DIR"] = folder
    try:
        import numba
    except ImportError:
        _log.warning("aqformat: numba is not installed; using the numpy kernels "
                     "(pip install 'aqformat[fast]' for the compiled ones)")
        return None
    return numba


def requested() -> bool:
    """Whether ``AQFORMAT_KERNELS=numba`` asks for the compiled kernels even for work done once per file."""
    return os.environ.get("AQFORMAT_KERNELS", "").lower() == "numba"


def available() -> bool:
    """Whether the compiled (numba) kernels are in use."""
    return numba_module() is not None


def compile_seconds() -> dict[str, float]:
    """Seconds each kernel's first call took to compile or load from the cache, by kernel name."""
    return dict(_compile_seconds)


@functools.lru_cache(maxsize=None)
def _inlined(fn: Callable[..., Any]) -> Any:
    return numba_module().njit(inline="always", nogil=True)(getattr(fn, "py_func", fn))


def compile_kernel(name: str, fn: Callable[..., Any], signatures: Callable[[Any], list[Any]],
                   helpers: tuple[Callable[..., Any], ...] = (), fastmath: frozenset[str] = frozenset()) -> Any:
    """``fn`` compiled by numba for ``signatures(numba.types)`` (or loaded from the cache), or None without numba.

    Compiled eagerly, with the SLP vectoriser on and ``nogil``; the time it
    takes is recorded under ``name`` in :func:`compile_seconds`. ``helpers``
    are plain functions ``fn`` calls by name: each is compiled to be inlined
    into ``fn`` and bound under its name in ``fn``'s module (so that the
    kernels share one source of it). ``fastmath``: LLVM fast-math flags for
    ``fn`` (e.g. ``reassoc`` to vectorise a sum, which then adds in another
    order).
    """
    nb = numba_module()
    if nb is None:
        return None
    t = time.perf_counter()
    for h in helpers:
        fn.__globals__[h.__name__] = _inlined(h)
    with slp_vectorize(nb):
        kernel = nb.njit(signatures(nb.types), cache=True, nogil=True, fastmath=set(fastmath) or False)(fn)
    with _lock:
        _compile_seconds[name] = _compile_seconds.get(name, 0.0) + time.perf_counter() - t
    return kernel


def threads() -> int:
    """Threads the compiled kernels split large work over (default: the CPUs this process may use)."""
    global _threads
    if _threads is None:
        _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return _threads


def set_threads(n: int | None) -> int:
    """Split large kernel work over ``n`` threads (None: every CPU this process may use); return the number."""
    global _threads
    _threads = None if n is None else max(1, int(n))
    return threads()


def run_parallel(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Run ``fn(*args)`` for each pair, the first on this thread and the rest on the pool; return the results.

    The kernels release the GIL (numba ``nogil``), so the calls run at once.
    Plain threads rather than numba's ``prange`` keep the kernels safe to call
    from several threads at the same time, which numba's default threading
    layer is not.
    """
    global _pool
    if len(calls) == 1:
        fn, args = calls[0]
        return [fn(*args)]
    from concurrent.futures import ThreadPoolExecutor
    with _lock:
        if _pool is None or _pool._max_workers < len(calls) - 1:  # noqa: SLF001 - grown, never shrunk
            _pool = ThreadPoolExecutor(max_workers=len(calls) - 1, thread_name_prefix="aqformat-kernel")
        pool = _pool
    futures = [pool.submit(fn, *args) for fn, args in calls[1:]]
    fn, args = calls[0]
    first = fn(*args)
    return [first] + [f.result() for f in futures]


@contextlib.contextmanager
def slp_vectorize(nb: Any) -> Iterator[None]:
    """Compile with LLVM's SLP vectoriser on (numba leaves it off by default).

    The d = 8 decode keeps a codeword's 8 floats in scalar variables; the SLP
    pass turns their loads, additions and stores into single vector
    instructions (about twice the decode speed). The setting is read when a
    function is compiled, so it is restored right after.
    """
    with _lock:
        old = nb.config.SLP_VECTORIZE
        nb.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            nb.config.SLP_VECTORIZE = old
