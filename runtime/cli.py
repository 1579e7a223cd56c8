"""``aqm run`` and ``aqm bench``: run an .aqm ONNX model, or benchmark it against fp32 ONNX Runtime."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import AqmInputError

_NUMPY_OF = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
             "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` and ``bench`` subcommands to the ``aqm`` parser."""
    p = sub.add_parser("run", help="run an .aqm ONNX model with ONNX Runtime")
    _input_args(p)
    p.add_argument("--stats", action="store_true", help="print decoded-weight cache counters")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="compare load time, latency and peak RSS with fp32 ONNX Runtime")
    _input_args(p)
    p.add_argument("--onnx", metavar="ORIGINAL.onnx",
                   help="the original model (default: the .aqm exported to an fp32 ONNX model)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (default 3)")
    p.add_argument("--iters", type=int, default=50, help="steady-state runs per variant (default 50)")
    p.set_defaults(func=_cmd_bench)


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=".aqm file with an ONNX graph")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="[NAME=]FILE.npy",
                     help="an input array; unnamed ones fill the graph inputs in order")
    src.add_argument("--random-input", action="store_true",
                     help="random inputs (symbolic dimensions 1 unless --dim; integers in {0, 1})")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic dimension for --random-input")
    p.add_argument("--memory-budget", type=int, metavar="BYTES",
                   help="bytes of decoded weights allowed at once (streams the graph in stages)")


def _parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise AqmInputError(f"{what} must be NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def build_feeds(inputs: Sequence[Any], files: Sequence[str] | None, dims: Sequence[str],
                seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for graph ``inputs`` from ``.npy`` files, or random ones when ``files`` is None."""
    if files is None:
        sizes = {k: _positive_int(v, k) for k, v in _parse_pairs(dims, "--dim").items()}
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in inputs:
            dtype = _NUMPY_OF.get(spec.type)
            if dtype is None:
                raise AqmInputError(f"cannot make random values for input {spec.name!r} of type {spec.type}")
            shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in (spec.shape or [])]
            if np.issubdtype(dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        return feeds
    names = [i.name for i in inputs]
    feeds, positional = {}, iter(names)
    for item in files:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = next(positional, None), item
            if name is None:
                raise AqmInputError(f"more --input files than the graph's inputs {names}")
        elif name not in names:
            raise AqmInputError(f"--input {item!r}: the graph has no input {name!r}; its inputs are {names}")
        if not os.path.isfile(path):
            raise AqmInputError(f"input file {path} does not exist")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise AqmInputError(f"cannot read {path} as a .npy array: {e}") from None
    return feeds


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise AqmInputError(f"--dim {name} must be a positive integer, got {value!r}")
    return int(value)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _cmd_run(args: argparse.Namespace) -> int:
    from .benchmark import peak_rss
    from .ort_session import InferenceSession
    t0 = time.perf_counter()
    sess = InferenceSession(args.file, memory_budget=args.memory_budget)
    t1 = time.perf_counter()
    feeds = build_feeds(sess.get_inputs(), None if args.random_input else args.input, args.dim)
    outputs = sess.run(None, feeds)
    t2 = time.perf_counter()
    sess.run(None, feeds)
    t3 = time.perf_counter()
    for spec, out in zip(sess.get_outputs(), outputs):
        print(f"{spec.name}: shape {list(out.shape)} {out.dtype}")
    mode = f"streaming, {sess.num_stages} stages" if sess.streaming else "resident"
    print(f"mode: {mode}")
    print(f"load: {1e3 * (t1 - t0):.1f} ms, first inference: {1e3 * (t2 - t1):.1f} ms, "
          f"second inference: {1e3 * (t3 - t2):.1f} ms")
    print(f"peak RSS: {_mib(peak_rss())}")
    if args.stats:
        s = sess.cache.stats
        print(f"cache: {s.hits} hits, {s.misses} misses, {s.evictions} evictions, "
              f"decode {1e3 * s.decode_seconds:.1f} ms, resident {_mib(s.resident_bytes)}, peak {_mib(s.peak_bytes)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import compare
    from .ort_session import InferenceSession

    sess = InferenceSession(args.file)
    feeds = build_feeds(sess.get_inputs(), None if args.random_input else args.input, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.onnx
        if onnx_path is None:
            # the baseline: the same decoded weights inlined into an ordinary fp32 .onnx file
            onnx_path = os.path.join(tmp, "fp32.onnx")
            with open(onnx_path, "wb") as out:
                out.write(sess.decoded_model())
        elif not os.path.isfile(onnx_path):
            raise AqmInputError(f"{onnx_path} does not exist")
        sess.close()
        r = compare(args.file, onnx_path, feeds, repeats=args.repeats, iters=args.iters,
                    memory_budget=args.memory_budget)
    print(f"{'':22}{'aqm':>12}{'fp32 onnx':>12}{'ratio':>8}")
    rows = [("load", "load_s", 1e3, "ms"), ("first output", "first_output_s", 1e3, "ms"),
            ("steady latency", "steady_s", 1e3, "ms"), ("peak RSS", "peak_rss", 1 / (1 << 20), "MiB"),
            ("RSS after 1st run", "rss_after_first_output", 1 / (1 << 20), "MiB")]
    for label, key, mult, unit in rows:
        print(f"{label + ' (' + unit + ')':22}{r['aqm'][key] * mult:12.2f}{r['onnx'][key] * mult:12.2f}"
              f"{r['ratios'][key]:8.3f}")
    print(f"file size: {_mib(r['aqm_file_bytes'])} (.aqm) vs {_mib(r['onnx_file_bytes'])} (.onnx)")
    return 0
