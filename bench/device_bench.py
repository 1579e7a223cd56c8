"""Compressed weights on a torch device (a GPU): decode speed and the batch-1 product from codes.

For MiniLM-shaped AQ weights (4 codebooks of 256 codewords over 8-vectors, the
4-bit setting; 6 layers of 384x384 x4, 1536x384 and 384x1536), on ``--device``:

- **decode**: :meth:`DeviceAQWeight.decode` of every weight, in GB/s of float32
  produced, against a host-to-device copy of the same weights in float16 (from
  pinned memory when the device is a GPU): what loading decoded fp16 weights costs;
- **matvec**: one input row times every weight from codes
  (:meth:`DeviceAQWeight.times_rows`) against the fp16 product with the
  decoded weights (cuBLAS on a GPU).

Medians of ``--iters`` runs after a warm-up, synchronised. On the CPU it runs
as a smoke test of the same code (the CPU modes use the compiled kernels
instead; see bench/compressed_bench.py). Run::

    .venv/bin/python -m bench.device_bench --device cuda [--out bench/results/device.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from aqformat.runtime.aq_weight import AQWeight
from aqformat.runtime.aq_weight_torch import DeviceAQWeight
from bench.report import save_json

SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
LAYERS = 6


def weights(device: torch.device, seed: int = 0) -> list[DeviceAQWeight]:
    """MiniLM-shaped AQ weights with random codes and Gaussian codebooks, on ``device``."""
    rng = np.random.default_rng(seed)
    cb = (rng.standard_normal((4, 256, 8)) * 0.02).astype(np.float32)
    out = []
    for rows, cols in SHAPES * LAYERS:
        codes = rng.integers(0, 256, (rows * cols // 8, 4)).astype(np.uint8)
        aq = AQWeight(codes, cb, None, None, None, rows, cols, (rows, cols))
        out.append(DeviceAQWeight.from_weight(aq, device))
    return out


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds of ``fn`` (after one warm-up run), synchronising the device around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(device: torch.device, iters: int) -> dict:
    ws = weights(device)
    values = sum(r * c for r, c in SHAPES) * LAYERS
    host = torch.empty(values, dtype=torch.float16, pin_memory=device.type == "cuda")
    t_decode = timed(lambda: [w.decode() for w in ws], device, iters)
    t_copy = timed(lambda: host.to(device, non_blocking=True), device, iters)
    dense = [w.decode().half() for w in ws]
    xs = {c: torch.randn(1, c, device=device) for c in {c for _, c in SHAPES}}
    t_codes = timed(lambda: [w.times_rows(xs[w.host.cols]) for w in ws], device, iters)
    t_fp16 = timed(lambda: [torch.nn.functional.linear(xs[d.shape[1]].half(), d) for d in dense], device, iters)
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "weights": values, "iters": iters,
            "decode_GB_per_s": 4 * values / t_decode / 1e9, "h2d_fp16_GB_per_s": 2 * values / t_copy / 1e9,
            "decode_s": t_decode, "h2d_fp16_s": t_copy, "decode_vs_h2d_time": t_decode / t_copy,
            "matvec_codes_s": t_codes, "matvec_fp16_s": t_fp16, "matvec_codes_vs_fp16": t_codes / t_fp16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    res = measure(torch.device(args.device), args.iters)
    print(json.dumps(res, indent=1))
    if args.out:
        save_json(args.out, res)


if __name__ == "__main__":
    main()
