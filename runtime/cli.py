"""``aqm run`` and ``aqm bench``: run an .aqm ONNX model, or benchmark it against fp32 ONNX Runtime."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cpus import default_threads
from ..dtypes import ONNX_TYPES, ORT_TYPE_NAMES, numpy_dtype
from ..errors import AqmInputError
from ..units import UNITS_HELP, format_size, parse_size
from ..terminal import printable

# ONNX Runtime's input type strings -> numpy dtype (bfloat16 inputs cannot be made from numpy)
_NUMPY_OF = {f"tensor({ORT_TYPE_NAMES[code]})": numpy_dtype(name) for name, code in ONNX_TYPES.items()
             if name != "bfloat16"}
_DIM_HELP = ("size of a dynamic dimension: NAME=N for a named (symbolic) one, INPUT:AXIS=N for any, "
             "e.g. --dim batch=4 --dim input:1=512 (repeatable; default 1)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` and ``bench`` subcommands to the ``aqm`` parser."""
    p = sub.add_parser("run", help="run an .aqm ONNX model with ONNX Runtime",
                       description="Run the model once on the given or random inputs (twice, to time "
                                   "a warm run) and print each output's shape, timings and peak memory.")
    _input_args(p)
    p.add_argument("--output", metavar="FILE.npz", help="save the outputs, by name, to an .npz file (default: not saved)")
    p.add_argument("--print", action="store_true", dest="print_values",
                   help="print the output values, summarised numpy-style (default: shapes only)")
    p.add_argument("--stats", action="store_true", help="print decoded-weight cache counters (default off)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="compare load time, latency and peak RSS with fp32 ONNX Runtime",
                       description="Time loading, the first output and steady-state runs of the .aqm "
                                   "session against plain ONNX Runtime on an fp32 model, each load in a "
                                   "fresh process, both with the same thread count.")
    _input_args(p)
    p.add_argument("--onnx", metavar="ORIGINAL.onnx",
                   help="the original model (default: the .aqm exported to an fp32 ONNX model)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="fresh processes per variant (default 3)")
    p.add_argument("--iters", type=int, default=50, metavar="N", help="steady-state runs per variant (default 50)")
    p.set_defaults(func=_cmd_bench)


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=".aqm file with an ONNX graph")
    p.add_argument("--input", action="append", metavar="[NAME=]FILE.npy",
                   help="an input array; unnamed ones fill the graph inputs in order (repeatable); "
                        "with --random-input, the inputs it names are read and the rest are random")
    p.add_argument("--random-input", action="store_true",
                   help="random inputs: standard normal floats, integers in {0, 1}, dynamic dimensions "
                        "1 unless --dim (default: off; then --input names every input)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help=_DIM_HELP)
    p.add_argument("--memory-budget", metavar="SIZE",
                   help=f"decoded weights allowed in memory at once, e.g. 64MB ({UNITS_HELP}); a smaller "
                        "budget than the model needs streams the graph in stages (default: no limit)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="ONNX Runtime intra-op threads (default: the cores this process may use, by CPU "
                        "affinity and cgroup quota, less those busy by the 1-minute load average)")


def _parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise AqmInputError(f"{what} must be NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _dim_sizes(inputs: Sequence[Any], dims: Sequence[str]) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """``--dim`` values as sizes of symbolic dimensions by name and of any dimension by (input, axis)."""
    symbolic = {d for spec in inputs for d in (spec.shape or []) if isinstance(d, str)}
    ranks = {spec.name: len(spec.shape or []) for spec in inputs}
    by_name: dict[str, int] = {}
    by_axis: dict[tuple[str, int], int] = {}
    for key, value in _parse_pairs(dims, "--dim").items():
        size = _positive_int(value, key)
        if key in symbolic:
            by_name[key] = size
            continue
        name, sep, axis = key.rpartition(":")
        if not sep or name not in ranks or not axis.lstrip("-").isdigit():
            raise AqmInputError(f"--dim {key}: no dynamic dimension of that name and not INPUT:AXIS; the "
                                f"named ones are {sorted(symbolic) or 'none'}, the inputs {list(ranks)}")
        a = int(axis)
        if not -ranks[name] <= a < ranks[name]:
            raise AqmInputError(f"--dim {key}: input {name!r} has {ranks[name]} axes")
        by_axis[(name, a % ranks[name])] = size
    return by_name, by_axis


def build_feeds(inputs: Sequence[Any], files: Sequence[str] | None, dims: Sequence[str],
                seed: int = 0, random: bool | None = None) -> dict[str, np.ndarray]:
    """Feeds for graph ``inputs``: the ``.npy`` ``files``, and random values for the others when
    ``random`` (default: when ``files`` is None), sized by ``dims`` (see ``--dim``)."""
    random = files is None if random is None else random
    feeds = _read_inputs(inputs, files or [])
    if not random:
        missing = [i.name for i in inputs if i.name not in feeds]
        if missing:
            raise AqmInputError(f"no --input for {missing}: give them, or add --random-input")
        return feeds
    by_name, by_axis = _dim_sizes(inputs, dims)
    rng = np.random.default_rng(seed)
    for spec in inputs:
        if spec.name in feeds:
            continue
        dtype = _NUMPY_OF.get(spec.type)
        if dtype is None:
            raise AqmInputError(f"cannot make random values for input {spec.name!r} of type {spec.type}")
        shape = [by_axis.get((spec.name, a), d if isinstance(d, int) else by_name.get(d, 1))
                 for a, d in enumerate(spec.shape or [])]
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _read_inputs(inputs: Sequence[Any], files: Sequence[str]) -> dict[str, np.ndarray]:
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


def _dynamic_defaults(inputs: Sequence[Any], dims: Sequence[str]) -> list[str]:
    """The dynamic dimensions ``--random-input`` set to 1 because no ``--dim`` sized them."""
    by_name, by_axis = _dim_sizes(inputs, dims)
    return [f"{spec.name}:{a}" + (f" ({d})" if isinstance(d, str) else "")
            for spec in inputs for a, d in enumerate(spec.shape or [])
            if not isinstance(d, int) and (spec.name, a) not in by_axis and d not in by_name]


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise AqmInputError(f"--dim {name} must be a positive integer, got {value!r}")
    return int(value)


def _session(args: argparse.Namespace, **kwargs: Any):
    """The .aqm session with ``--threads``, and the thread count."""
    import onnxruntime

    from .ort_session import InferenceSession
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        raise AqmInputError(f"--threads must be at least 1, got {threads}")
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    if args.verbosity < 1:  # its errors reach the user as the one-line message; its log only with -v
        so.log_severity_level = 4
    return InferenceSession(args.file, so, **kwargs), threads


def _feeds(args: argparse.Namespace, sess: Any) -> dict[str, np.ndarray]:
    return build_feeds(sess.get_inputs(), args.input, args.dim, random=args.random_input)


def _first_run(args: argparse.Namespace, sess: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run once; a failure on random inputs says which dynamic dimensions were guessed."""
    try:
        return sess.run(None, feeds)
    except AqmInputError as e:
        guessed = _dynamic_defaults(sess.get_inputs(), args.dim) if args.random_input else []
        if not guessed:
            raise
        raise AqmInputError(f"{e} -- with random inputs whose dynamic dimensions {', '.join(guessed)} "
                            f"were set to 1; size them with --dim (e.g. --dim {guessed[0].split()[0]}=512)") from None


def _cmd_run(args: argparse.Namespace) -> int:
    from .benchmark import peak_rss
    if not args.input and not args.random_input:
        raise AqmInputError("give the inputs with --input FILE.npy, or --random-input")
    budget = parse_size(args.memory_budget) if args.memory_budget is not None else None
    t0 = time.perf_counter()
    sess, threads = _session(args, memory_budget=budget)
    t1 = time.perf_counter()
    feeds = _feeds(args, sess)
    outputs = _first_run(args, sess, feeds)
    t2 = time.perf_counter()
    sess.run(None, feeds)
    t3 = time.perf_counter()
    specs = sess.get_outputs()
    if args.output:
        _save_npz(args.output, {spec.name: out for spec, out in zip(specs, outputs)})
    if args.verbosity < 0:
        return 0
    for spec, out in zip(specs, outputs):
        print(f"{printable(spec.name)}: shape {list(out.shape)} {out.dtype}")
        if args.print_values:
            print(np.array2string(out, threshold=50, edgeitems=3, precision=5))
    mode = f"streaming, {sess.num_stages} stages" if sess.streaming else "resident"
    print(f"mode: {mode}, {threads} thread{'s' if threads != 1 else ''}")
    print(f"load: {1e3 * (t1 - t0):.1f} ms, first inference: {1e3 * (t2 - t1):.1f} ms, "
          f"second inference: {1e3 * (t3 - t2):.1f} ms")
    print(f"peak RSS: {format_size(peak_rss())}")
    if args.output:
        print(f"outputs saved to {args.output}")
    if args.stats:
        s = sess.cache.stats
        print(f"cache: {s.hits} hits, {s.misses} misses, {s.evictions} evictions, "
              f"decode {1e3 * s.decode_seconds:.1f} ms, resident {format_size(s.resident_bytes)}, "
              f"peak {format_size(s.peak_bytes)}")
    return 0


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (a partial file never takes its place)."""
    from ..writer import finished_file_mode
    if not path.endswith(".npz"):
        raise AqmInputError(f"--output {path}: the outputs are saved as .npz; name it FILE.npz")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), finished_file_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import compare
    if not args.input and not args.random_input:
        raise AqmInputError("give the inputs with --input FILE.npy, or --random-input")
    budget = parse_size(args.memory_budget) if args.memory_budget is not None else None
    sess, threads = _session(args)
    feeds = _feeds(args, sess)
    _first_run(args, sess, feeds)  # inputs that cannot run fail here, with a hint, not in a subprocess
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
                    memory_budget=budget, threads=threads)
    if args.verbosity < 0:
        return 0
    print(f"{'':22}{'aqm':>12}{'fp32 onnx':>12}{'ratio':>8}")
    rows = [("load", "load_s", 1e3, "ms"), ("first output", "first_output_s", 1e3, "ms"),
            ("steady latency", "steady_s", 1e3, "ms"), ("peak RSS", "peak_rss", 1e-6, "MB"),
            ("RSS after 1st run", "rss_after_first_output", 1e-6, "MB")]
    for label, key, mult, unit in rows:
        print(f"{label + ' (' + unit + ')':22}{r['aqm'][key] * mult:12.2f}{r['onnx'][key] * mult:12.2f}"
              f"{r['ratios'][key]:8.3f}")
    print(f"file size: {format_size(r['aqm_file_bytes'])} (.aqm) vs {format_size(r['onnx_file_bytes'])} (.onnx); "
          f"{threads} thread{'s' if threads != 1 else ''}")
    return 0
