"""Container benchmarks: AQ decode throughput vs memcpy, and open() cost vs file size.

Every figure is a ratio to a reference measured in the same run:
decode GB/s of fp32 output (bit unpacking included) against ``np.copyto`` of
the same output size, for the numpy decoder and the compiled kernel on one
thread, and the kernel on 1, 2, 4... threads (the thread-scaling curve); the
kernel's compile time in a fresh process with an empty and with a filled
compile cache; and ``aqformat.open`` time/RSS on files of growing size.

Usage: python -m bench.container_bench [--quick] [--out bench/results/container.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from aqformat import kernels  # noqa: E402
from aqformat.bitpack import pack, unpack  # noqa: E402
from aqformat.codecs.aq import decode_vectors  # noqa: E402
from aqformat.kernels.decode import compiled, decode_rows  # noqa: E402
from bench.report import save_json  # noqa: E402

_COLS = 1024  # matrix view width of the decoded tensor (a multiple of d)


def best_of(fn, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_throughput(bits: int, d: int, M: int, n_vec: int, thread_counts: list[int]) -> dict:
    rng = np.random.default_rng(0)
    K = 1 << bits
    cb = rng.standard_normal((M, K, d)).astype(np.float32)
    packed = np.frombuffer(pack(rng.integers(0, K, (n_vec, M)), bits), np.uint8)
    out = np.empty((n_vec * d // _COLS, _COLS), np.float32)
    src = np.ones_like(out)
    t_copy = best_of(lambda: np.copyto(out, src))
    t_numpy = best_of(lambda: decode_vectors(unpack(packed, n_vec * M, bits).reshape(n_vec, M), cb,
                                             out.reshape(n_vec, d)))
    r = {"bits": bits, "d": d, "M": M, "output_bytes": out.nbytes, "memcpy_GBps": out.nbytes / t_copy / 1e9,
         "numpy_GBps": out.nbytes / t_numpy / 1e9, "numpy_ratio_to_memcpy": t_copy / t_numpy}
    if compiled():
        scaling = {}
        for n in thread_counts:
            kernels.set_threads(n)
            t = best_of(lambda: decode_rows(unpack(packed, n_vec * M, bits).reshape(n_vec, M), cb, None, _COLS, out))
            scaling[n] = {"decode_GBps": out.nbytes / t / 1e9, "ratio_to_memcpy": t_copy / t}
        kernels.set_threads(None)
        r["threads"] = scaling
        r["kernel_GBps"], r["kernel_ratio_to_memcpy"] = scaling[1]["decode_GBps"], scaling[1]["ratio_to_memcpy"]
    # the fastest decoder this install has, one thread (what the report charts)
    r["decode_GBps"] = r.get("kernel_GBps", r["numpy_GBps"])
    r["ratio_to_memcpy"] = r.get("kernel_ratio_to_memcpy", r["numpy_ratio_to_memcpy"])
    return r


_COMPILE_PROBE = r"""
import json, time
t = time.perf_counter()
from aqformat import kernels
from aqformat.kernels.decode import compiled
ok = compiled()
print(json.dumps({"compiled": ok, "compile_s": kernels.compile_seconds().get("decode", 0.0),
                  "first_call_s": time.perf_counter() - t}))
"""


def compile_time(folder: str) -> dict:
    """The decode kernel's compile time in a fresh process: empty cache, then the cache the first run filled."""
    env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(folder, "numba-cache"))
    runs = [json.loads(subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True,
                                      text=True, check=True).stdout.splitlines()[-1]) for _ in range(2)]
    return {"cold_cache_s": runs[0]["compile_s"], "warm_cache_s": runs[1]["compile_s"],
            "cold_first_call_s": runs[0]["first_call_s"], "warm_first_call_s": runs[1]["first_call_s"]}


_OPEN_PROBE = r"""
import json, resource, sys, time, psutil, aqformat
p = psutil.Process(); before = p.memory_info().rss
t = time.perf_counter(); f = aqformat.open(sys.argv[1]); names = f.names(); info = f.info(names[-1])
dt = time.perf_counter() - t
print(json.dumps({"open_s": dt, "rss_delta": p.memory_info().rss - before, "tensors": len(names)}))
"""


def open_cost(size_mb: int, folder: str) -> dict:
    import aqformat
    path = os.path.join(folder, f"m{size_mb}.aqm")
    chunk = np.random.default_rng(1).standard_normal(size_mb << 14).astype(np.float32)  # size/16
    with aqformat.Writer(path) as w:
        for i in range(16):
            w.add_tensor(f"t{i}", chunk)
    res = [json.loads(subprocess.run([sys.executable, "-c", _OPEN_PROBE, path], capture_output=True,
                                     text=True, check=True).stdout) for _ in range(3)]
    best = min(res, key=lambda r: r["open_s"])
    os.unlink(path)
    return {"file_mb": size_mb, "open_s": best["open_s"], "rss_delta_bytes": best["rss_delta"],
            "tensors": best["tensors"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "container.json"))
    args = ap.parse_args()
    n_vec = 1 << (19 if args.quick else 21)
    counts = sorted({1, 2, 4, kernels.threads()} - {c for c in (4,) if c > kernels.threads()})
    decode = [decode_throughput(b, 8, m, n_vec, counts) for m, b in ((2, 8), (4, 8), (2, 12), (4, 4))]
    for r in decode:
        curve = ", ".join(f"{n} threads {v['ratio_to_memcpy']:.2f}x" for n, v in r.get("threads", {}).items())
        print(f"decode {r['M']}x{r['bits']}-bit d={r['d']}: memcpy {r['memcpy_GBps']:.2f} GB/s; numpy "
              f"{r['numpy_GBps']:.2f} GB/s ({r['numpy_ratio_to_memcpy']:.2f}x); kernel {curve or 'not installed'}")
    # 16 tensors of growing size: open() cost must not grow with the bytes in the file.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(args.out)) as tmp:
        compile_s = compile_time(tmp) if compiled() else None
        opens = [open_cost(mb, tmp) for mb in ((10, 100) if args.quick else (10, 100, 400))]
    if compile_s:
        print(f"decode kernel compile: {compile_s['cold_cache_s']:.2f} s with an empty cache, "
              f"{compile_s['warm_cache_s']:.2f} s loading it from the cache")
    for r in opens:
        print(f"open() {r['file_mb']:>4} MB file ({r['tensors']} tensors): {r['open_s'] * 1e3:.2f} ms, "
              f"RSS +{r['rss_delta_bytes'] / 1e6:.2f} MB")
    save_json(args.out, {"decode": decode, "kernel_compile": compile_s, "open": opens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
