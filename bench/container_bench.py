"""Container benchmarks: AQ decode throughput vs memcpy, and open() cost vs file size.

Every figure is a ratio to a reference measured in the same run:
decode GB/s of fp32 output against ``np.copyto`` of the same output size (one
thread), and ``aqformat.open`` time/RSS on files of growing size.

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

from aqformat.bitpack import pack, unpack  # noqa: E402
from aqformat.codecs.aq import decode_vectors  # noqa: E402


def best_of(fn, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_throughput(bits: int, d: int, M: int, n_vec: int) -> dict:
    rng = np.random.default_rng(0)
    K = 1 << bits
    cb = rng.standard_normal((M, K, d)).astype(np.float32)
    packed = np.frombuffer(pack(rng.integers(0, K, (n_vec, M)), bits), np.uint8)
    out = np.empty((n_vec, d), np.float32)
    src = np.ones_like(out)
    t_copy = best_of(lambda: np.copyto(out, src))
    t_dec = best_of(lambda: decode_vectors(unpack(packed, n_vec * M, bits).reshape(n_vec, M), cb, out))
    return {"bits": bits, "d": d, "M": M, "output_bytes": out.nbytes,
            "decode_GBps": out.nbytes / t_dec / 1e9, "memcpy_GBps": out.nbytes / t_copy / 1e9,
            "ratio_to_memcpy": t_copy / t_dec}


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
    decode = [decode_throughput(b, 8, 2, n_vec) for b in (8, 12)] + [decode_throughput(4, 8, 4, n_vec)]
    for r in decode:
        print(f"decode {r['bits']:>2}-bit d={r['d']} M={r['M']}: {r['decode_GBps']:.2f} GB/s fp32, "
              f"memcpy {r['memcpy_GBps']:.2f} GB/s, ratio {r['ratio_to_memcpy']:.2f}x")
    # 16 tensors of growing size: open() cost must not grow with the bytes in the file.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(args.out)) as tmp:
        opens = [open_cost(mb, tmp) for mb in ((10, 100) if args.quick else (10, 100, 400))]
    for r in opens:
        print(f"open() {r['file_mb']:>4} MB file ({r['tensors']} tensors): {r['open_s'] * 1e3:.2f} ms, "
              f"RSS +{r['rss_delta_bytes'] / 1e6:.2f} MB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"decode": decode, "open": opens}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
