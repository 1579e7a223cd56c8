"""Where a conversion's tasks run: in this process, in local worker processes, or on Ray.

A conversion has two kinds of parallel work: training one codebook group
(:func:`aqformat.converters.grouping.train_codebooks`) and coding one tensor
against its group's codebooks (:meth:`TensorEncoder.task`). A task is a
module-level function and its arguments, so it can run anywhere. Large
objects many tasks read, or that are computed once in this process
(codebooks, calibration statistics), go through :meth:`Executor.share`: on
Ray they are put in the object store once and passed by reference.

Results come back in submission order (:func:`ordered`), with at most
``limit`` tasks in flight, so the single writer appends tensors in file order
and memory stays bounded whatever the model size. Every task computes the
same thing wherever it runs, and workers use one thread each, so on the CPU
the file is byte-identical for 1, 2 or N workers (a GPU's float sums are not
reproducible from run to run, and nor are codes that depend on them).

A task that fails for a reason of the data (NaN weights) raises its
:class:`AqmError` here, naming the tensor; anything else a worker raises, or
a worker that dies, becomes one :class:`AqmError` naming the task.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aqformat.errors import AqmError, AqmInputError

__all__ = ["Executor", "LocalProcesses", "RayCluster", "make_executor", "ordered", "Task"]

# (label, function, arguments); function None: the arguments' first element is the result itself
Task = tuple[str, Callable[..., Any] | None, tuple[Any, ...]]

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


class Executor:
    """Runs tasks here, at once (the default: no workers)."""

    workers = 1

    @property
    def read_ahead(self) -> int:
        """Tasks kept in flight by :func:`ordered`: two per worker, so none waits for the reader
        (none here, where a task is done when submitted)."""
        return 0 if type(self) is Executor else 2 * self.workers

    def share(self, obj: Any) -> Any:
        """What tasks are given for ``obj`` (a reference where an object store exists)."""
        return obj

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start ``fn(*args)``; :meth:`result` gives its value."""
        return fn(*args)

    def result(self, handle: Any, label: str) -> Any:
        """The value of a submitted task (``label`` names it in errors)."""
        return handle

    def close(self) -> None:
        """Stop the workers (nothing to stop here)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()




def _worker_init() -> None:
    """One compute thread per worker process: N workers use N cores, and results do not
    depend on how many threads a BLAS splits a product over."""
    import torch
    torch.set_num_threads(1)


def _failure(label: str, e: BaseException) -> AqmError:
    """The one-line error of a failed task: its own when it is an AqmError, else one naming it."""
    if isinstance(e, AqmError):
        return e
    return AqmError(f"{label}: the worker failed ({type(e).__name__}: {str(e)[:300]})")


class LocalProcesses(Executor):
    """``workers`` local processes (``forkserver`` where available, else ``spawn``).

    The processes start with one thread per math library (the environment
    variables are set while they start), and are started at once so that a
    worker that cannot start fails here, not in the middle of the file.
    """

    def __init__(self, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        if workers < 1:
            raise AqmInputError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
            for f in [self._pool.submit(os.getpid) for _ in range(workers)]:
                f.result()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def result(self, handle: Any, label: str) -> Any:
        from concurrent.futures.process import BrokenProcessPool
        try:
            return handle.result()
        except BrokenProcessPool:
            raise AqmError(f"{label}: a worker process died (out of memory, or killed)") from None
        except Exception as e:  # noqa: BLE001 - every failure of a task becomes one line naming it
            raise _failure(label, e) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayCluster(Executor):
    """Tasks on a Ray cluster: ``address`` ``"auto"`` (the cluster this machine belongs to, else a
    local one started here) or ``host:port`` / ``ray://host:port``.

    Tasks are retried when their worker dies (``max_retries``), so a lost
    worker costs time, not the conversion; a task that raises is not retried.
    """

    CONNECT_TIMEOUT_S = 20.0

    def __init__(self, address: str, *, workers: int | None = None, max_retries: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise AqmInputError("--ray needs Ray: pip install 'aqformat[ray]'") from None
        self._ray = ray
        self._own = not ray.is_initialized()
        if self._own:
            _ray_init(ray, address, workers, self.CONNECT_TIMEOUT_S)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable[..., Any], Any] = {}
        self._max_retries = max_retries

    def share(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=self._max_retries)(_in_worker(fn))
        return remote.remote(*args)

    def result(self, handle: Any, label: str) -> Any:
        from ray import exceptions as rx
        try:
            return self._ray.get(handle)
        except rx.RayTaskError as e:  # the task raised: its own exception, without Ray's traceback
            raise _failure(label, e.cause if getattr(e, "cause", None) is not None else e) from None
        except rx.RayError as e:
            raise AqmError(f"{label}: Ray could not run the task ({type(e).__name__}: {str(e)[:300]})") from None

    def close(self) -> None:
        if self._own:
            self._ray.shutdown()


def _in_worker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the worker set to one compute thread first (Ray reuses its workers)."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        _worker_init()
        return fn(*args)
    return run


def _ray_init(ray: Any, address: str, workers: int | None, timeout: float) -> None:
    """Connect to (or, for ``auto`` without a cluster, start) Ray, failing within ``timeout`` seconds
    with an AqmInputError when the address does not answer."""
    import logging
    if address != "auto":
        _check_reachable(address, timeout)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                              "include_dashboard": False, "configure_logging": False}
    if address == "auto":
        try:
            ray.init(address="auto", **kwargs)
            return
        except (ConnectionError, RuntimeError):  # no running cluster: start a local one
            kwargs["num_cpus"] = workers
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises several kinds for one unusable address
        raise AqmInputError(f"--ray {address}: cannot connect ({type(e).__name__}: {str(e)[:200]})") from None


def _check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to ``address``'s host and port within ``timeout`` seconds, else AqmInputError
    (Ray itself retries an unreachable address for minutes)."""
    import socket
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise AqmInputError(f"--ray {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise AqmInputError(f"--ray {address}: cannot reach {host}:{port} ({e.strerror or e})") from None


def make_executor(workers: int | None = None, ray: str | None = None) -> Executor:
    """The executor of ``--workers N`` / ``--ray ADDRESS`` (in this process when neither is given)."""
    if ray is not None:
        return RayCluster(ray, workers=workers)
    if workers is None:
        return Executor()
    return LocalProcesses(workers)


def ordered(executor: Executor, tasks: Iterable[Task], limit: int) -> Iterator[tuple[str, Any]]:
    """``(label, result)`` of each task, in the order given, with at most ``limit`` tasks (or ready
    values waiting for their turn) held between steps: the next task is taken from ``tasks``
    (which may read it from disk) only when the oldest has been handed on."""
    pending: collections.deque[tuple[str, bool, Any]] = collections.deque()
    for label, fn, args in tasks:
        pending.append((label, fn is not None, executor.submit(fn, *args) if fn is not None else args[0]))
        while len(pending) > limit or (pending and not pending[0][1]):
            yield _pop(executor, pending)
    while pending:
        yield _pop(executor, pending)


def _pop(executor: Executor, pending: collections.deque[tuple[str, bool, Any]]) -> tuple[str, Any]:
    label, submitted, value = pending.popleft()
    return label, executor.result(value, label) if submitted else value
