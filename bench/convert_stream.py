"""Streaming conversion: a >= 2 GB fp32 safetensors model converted in < 1 GB of memory.

Writes a synthetic safetensors model (``--gb`` of fp32 in ``--tensor-mb``
tensors, streamed to disk so this process stays small), then converts it in
a fresh subprocess and reads that child's peak RSS (``ru_maxrss``). The
reference measured in the same run is a child that only imports the
converter (torch included), so the report separates the interpreter's fixed
cost from what the conversion adds. ``--coded`` tensors are AQ-coded (with a
cheap encoder setting: on CPU the encoder, not the streaming, sets the time);
the rest pass through the same two streaming passes and are stored raw.

Run: ``python -m bench.convert_stream [--gb 2.0] [--tensor-mb 32] [--coded 1]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD_CONVERT = """
import json, sys, time
from aqformat.converters import convert
t = time.monotonic()
s = convert(sys.argv[1], sys.argv[2], bits=2, codec="aq", keep=json.loads(sys.argv[3]), progress=False,
            encoder={"bits_per_code": 8, "d": 8, "beam": 2, "iters": 1, "reservoir": 8192})
print(json.dumps({"seconds": time.monotonic() - t, "aqm_bytes": s.aqm_bytes,
                  "coded": s.compressed, "source_bytes": s.source_bytes}))
"""
CHILD_IMPORT = "import torch, safetensors, aqformat.converters.api, aqformat.converters.aq_encode"


def write_safetensors(path: str, n: int, rows: int, cols: int, seed: int = 0) -> list[str]:
    """Stream ``n`` fp32 ``[rows, cols]`` tensors into a safetensors file; returns their names."""
    names = [f"layers.{i}.weight" for i in range(n)]
    size = rows * cols * 4
    header = {name: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [i * size, (i + 1) * size]}
              for i, name in enumerate(names)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _ in names:
            fh.write((rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).tobytes())
    return names


def child_peak(code: str, *args: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; return (peak RSS in MB, stdout)."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    if r.returncode != 0:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run children in increasing size.
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="fp32 model size (GB, 1e9 bytes)")
    ap.add_argument("--tensor-mb", type=float, default=32.0, help="size of each tensor (MB)")
    ap.add_argument("--coded", type=int, default=1, help="tensors AQ-coded (the rest stored raw)")
    ap.add_argument("--cols", type=int, default=4096, help="columns of each tensor (the encoder's "
                    "per-tensor statistics grow as cols^2)")
    ap.add_argument("--limit-mb", type=float, default=1024.0, help="peak RSS allowed")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()

    cols = args.cols
    rows = max(1, int(args.tensor_mb * 1e6 / 4 / cols))
    n = max(1, int(np.ceil(args.gb * 1e9 / (rows * cols * 4))))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        src, out = os.path.join(d, "model.safetensors"), os.path.join(d, "model.aqm")
        t = time.monotonic()
        names = write_safetensors(src, n, rows, cols)
        print(f"wrote {n} x [{rows}, {cols}] fp32 = {os.path.getsize(src) / 1e9:.2f} GB "
              f"in {time.monotonic() - t:.0f} s")
        base_mb, _ = child_peak(CHILD_IMPORT)
        keep = json.dumps(names[args.coded:])
        peak_mb, stdout = child_peak(CHILD_CONVERT, src, out, keep)
        res = json.loads(stdout.strip().splitlines()[-1])
    tensor_mb = rows * cols * 4 / 1e6
    print(f"converted in {res['seconds']:.0f} s: {res['source_bytes'] / 1e9:.2f} GB -> "
          f"{res['aqm_bytes'] / 1e9:.2f} GB ({len(res['coded'])} tensors AQ-coded, the rest raw)")
    print(f"peak RSS {peak_mb:.0f} MB (limit {args.limit_mb:.0f} MB); imports alone {base_mb:.0f} MB; "
          f"conversion adds {peak_mb - base_mb:.0f} MB = {(peak_mb - base_mb) / tensor_mb:.1f} x the "
          f"largest tensor ({tensor_mb:.0f} MB); model / peak RSS = {res['source_bytes'] / 1e6 / peak_mb:.1f}x")
    if peak_mb >= args.limit_mb:
        raise SystemExit(f"FAIL: peak RSS {peak_mb:.0f} MB >= {args.limit_mb:.0f} MB")
    print("OK")


if __name__ == "__main__":
    main()
