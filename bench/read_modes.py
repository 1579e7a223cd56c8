"""What reading a section costs when the file may change under the reader: mmap views vs owned copies.

A memory-mapped file raises SIGBUS in the process when it is truncated while
mapped (``cp new.aqm model.aqm`` over a served model does it), so the reader
reads every section with ``pread`` into memory it owns. This measures that
choice against the alternatives, on one raw section already in the page cache
(reads of a served model hit the cache), each value touched once (summed):

* ``mmap view`` (reference): a fresh mapping, the values summed through it;
* ``mmap copy``: the same, copied out of the mapping first;
* ``pread``: ``os.preadv`` into a new numpy array (what the reader does);
* ``pread + crc32``: the same with the section's checksum verified again.

Figures are times and ratios to the reference, best of ``--repeat``.

Usage: python -m bench.read_modes [--mib 256] [--repeat 5] [--out bench/results/read_modes.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import tempfile
import zlib

import numpy as np

from bench.container_bench import best_of


def measure(path: str, nbytes: int, repeat: int) -> dict[str, float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, nbytes, 0)  # into the page cache

        def mmap_view() -> None:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                a = np.frombuffer(mm, np.float32)
                a.sum()
                del a

        def mmap_copy() -> None:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                view = np.frombuffer(mm, np.float32)
                a = view.copy()
                del view
            a.sum()

        def pread() -> np.ndarray:
            a = np.empty(nbytes // 4, np.float32)
            os.preadv(fd, [memoryview(a).cast("B")], 0)
            a.sum()
            return a

        def pread_crc() -> None:
            zlib.crc32(pread())

        times = {name: best_of(fn, repeat) for name, fn in
                 (("mmap view", mmap_view), ("mmap copy", mmap_copy), ("pread", pread), ("pread + crc32", pread_crc))}
    finally:
        os.close(fd)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="section size in MiB (default 256)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    nbytes = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "section.bin")
        np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32).tofile(path)
        times = measure(path, nbytes, args.repeat)
    ref = times["mmap view"]
    result = {"section_bytes": nbytes, "seconds": times, "ratio_to_mmap_view": {k: v / ref for k, v in times.items()},
              "gb_per_s": {k: nbytes / v / 1e9 for k, v in times.items()}}
    for name, t in times.items():
        print(f"{name:14} {t * 1e3:8.1f} ms  {nbytes / t / 1e9:6.2f} GB/s  x{t / ref:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
