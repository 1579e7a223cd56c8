"""Measure an .aqm session against plain fp32 ONNX Runtime, each load in a fresh process.

``compare`` runs ``python -m aqformat.runtime.benchmark`` subprocesses: one per
(variant, repeat) to time session creation and the first inference and to
read the peak RSS (``ru_maxrss``) of a process that did nothing else, and one
that holds both sessions and alternates their runs so steady-state latencies
see the same machine load. Results are reported as ratios to fp32 ORT.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..cpus import allowed_cpus
from ..errors import AqmError


def peak_rss() -> int:
    """Peak resident bytes of this process since it started (exec).

    VmHWM is used where available: ``ru_maxrss`` also counts the parent's RSS
    at fork time on Linux, which would hide a small child's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open(variant: str, path: str, budget: int | None, threads: int | None, resident: str = "decoded"):
    import onnxruntime
    so = onnxruntime.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    if variant == "aqm":
        from . import InferenceSession
        return InferenceSession(path, so, memory_budget=budget, resident=resident)
    return onnxruntime.InferenceSession(path, so)


class RssSampler:
    """RSS every ``period`` seconds on a thread, as ``[[seconds since start, bytes], ...]``."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.trace, self._stop = period, [], threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        self.trace.append([time.perf_counter() - self._t0, current_rss()])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def stop(self, points: int = 400) -> list[list[float]]:
        self._stop.set()
        self._thread.join()
        self._sample()  # the trace ends now, not at the last tick
        return [*self.trace[:-1:max(1, len(self.trace) // points)], self.trace[-1]]


def _worker_load(variant: str, path: str, feeds: dict[str, np.ndarray], budget: int | None,
                 threads: int | None, resident: str = "decoded", after: int = 5) -> dict[str, Any]:
    import onnxruntime  # noqa: F401 - counted in the interpreter baseline for both variants
    if budget is not None or resident == "compressed":
        import onnx  # noqa: F401 - streaming imports it; keep it out of the model's share
    if resident == "compressed":
        from ..kernels import decode
        decode.compiled()  # the decoder (numba) loaded before the baseline: a library, not the model's share
    base = current_rss()
    sampler = RssSampler()
    t0 = time.perf_counter()
    sess = _open(variant, path, budget, threads, resident)
    t1 = time.perf_counter()
    sess.run(None, feeds)
    t2 = time.perf_counter()
    out = {"load_s": t1 - t0, "first_output_s": t2 - t0, "peak_rss": peak_rss(), "base_rss": base,
           "rss_after_first_output": current_rss()}
    for _ in range(after):  # only for the trace: the figures above stop at the first output
        sess.run(None, feeds)
    return {**out, "rss_trace": sampler.stop()}


def _worker_latency(paths: dict[str, str], feeds: dict[str, np.ndarray], iters: int,
                    budget: int | None, threads: int | None, resident: str = "decoded") -> dict[str, float]:
    sessions = {v: _open(v, p, budget if v == "aqm" else None, threads, resident if v == "aqm" else "decoded")
                for v, p in paths.items()}
    for s in sessions.values():
        s.run(None, feeds)
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for _ in range(iters):
        for v, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def _spawn(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "aqformat.runtime.benchmark", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise AqmError(f"benchmark subprocess failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(aqm_path: str, onnx_path: str, feeds: Mapping[str, np.ndarray], *, repeats: int = 3,
            iters: int = 50, memory_budget: int | None = None, threads: int | None = None,
            resident: str = "decoded") -> dict[str, Any]:
    """Benchmark ``aqm_path`` against plain ONNX Runtime on ``onnx_path`` with ``feeds``.

    Parameters
    ----------
    aqm_path, onnx_path : str
        The .aqm file and the fp32 ONNX model it stands for.
    feeds : mapping
        Inputs for every run.
    repeats : int
        Fresh processes per variant for load/first-output/RSS (medians reported).
    iters : int
        Alternating steady-state runs per variant.
    memory_budget : int, optional
        Passed to the .aqm session (streaming when the model does not fit).
    threads : int, optional
        ONNX Runtime intra-op threads of both sessions (default: every core this
        process may use, :func:`aqformat.cpus.allowed_cpus`).
    resident : {"decoded", "compressed"}
        Passed to the .aqm session. With ``"compressed"`` the interpreter
        baseline also holds the ``onnx`` package and the compiled decoder.

    Returns
    -------
    dict
        Per-variant medians (``load_s``, ``first_output_s``, ``steady_s``,
        ``peak_rss``, ``base_rss``, ``rss_after_first_output``), the first
        run's ``rss_trace`` (``[seconds, bytes]`` from the start of loading
        through five runs after the first), ``ratios`` of aqm to onnx and the
        ``threads`` given.
    """
    threads = allowed_cpus() if threads is None else threads
    with tempfile.TemporaryDirectory() as tmp:
        feed_path = os.path.join(tmp, "feeds.npz")
        np.savez(feed_path, **{k: np.asarray(v) for k, v in feeds.items()})
        budget = [] if memory_budget is None else ["--budget", str(memory_budget)]
        budget += ["--threads", str(threads), "--resident", resident]
        runs: dict[str, list[dict[str, Any]]] = {"aqm": [], "onnx": []}
        for _ in range(repeats):
            for variant, path in (("onnx", onnx_path), ("aqm", aqm_path)):
                extra = budget if variant == "aqm" else []
                runs[variant].append(_spawn(["load", variant, path, feed_path, *extra]))
        steady = _spawn(["latency", aqm_path, onnx_path, feed_path, str(iters), *budget])
    result: dict[str, Any] = {}
    for variant, rs in runs.items():
        result[variant] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "rss_trace"}
        result[variant]["rss_trace"] = rs[0]["rss_trace"]
        result[variant]["steady_s"] = steady[variant]
    a, o = result["aqm"], result["onnx"]
    result["ratios"] = {k: a[k] / o[k] for k in ("load_s", "first_output_s", "steady_s", "peak_rss",
                                                 "rss_after_first_output")}
    result["threads"] = threads
    result["aqm_file_bytes"] = os.path.getsize(aqm_path)
    result["onnx_file_bytes"] = os.path.getsize(onnx_path)
    return result


def main(argv: list[str]) -> None:
    """Subprocess entry: ``load VARIANT PATH FEEDS [--budget B] [--threads N]`` or
    ``latency AQM ONNX FEEDS ITERS [--budget B] [--threads N]``."""
    opts: dict[str, str | None] = {"--budget": None, "--threads": None, "--resident": "decoded"}
    for flag in opts:
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
    budget, threads = (None if opts[k] is None else int(opts[k]) for k in ("--budget", "--threads"))
    resident = str(opts["--resident"])
    feeds = dict(np.load(argv[3]))
    if argv[0] == "load":
        out = _worker_load(argv[1], argv[2], feeds, budget, threads, resident if argv[1] == "aqm" else "decoded")
    else:
        out = _worker_latency({"aqm": argv[1], "onnx": argv[2]}, feeds, int(argv[4]), budget, threads, resident)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
