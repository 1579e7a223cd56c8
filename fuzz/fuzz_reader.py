"""Structure-aware fuzzing of the .aqm reader and of the embedded ONNX graph (``make fuzz``).

Seeds are a file using every section kind (tests/craft.py:write_sample), a
file with an embedded ONNX graph whose stubs name its tensors
(write_graph_sample) and the frozen spec vectors. Each input is a mutant:
of the header, sections and bytes (tests/craft.py:mutant) or of the graph's
protobuf (graph_mutant: hostile stubs and external references, wrong wire
types, lying lengths, deep nesting, huge runs of fields). It is opened,
fully read, its graph scanned as the runtime and aqm-info do, and verified,
under a decode budget (``--decode-budget``).

Reported: inputs tried and their outcomes, crashes (any exception that is
not an AqmError, or a message of more than one line), hangs (inputs slower
than ``--hang-seconds``), and each worker's peak RSS against the decode
budget + 100 MiB. Failing inputs are saved under ``--out`` for replay
(``--replay FILE``). Exit code 1 if any. Input ``i`` of a run is fully
determined by ``--seed`` and ``i``, whatever ``--jobs``.

    python -m fuzz.fuzz_reader --examples 20000 [--jobs 2] [--seed 0] [--out fuzz/crashes]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

import aqformat
from tests.craft import graph_mutant, mutant, read_everything, write_graph_sample, write_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_SLACK = 100 << 20  # peak RSS allowed above the decode budget: interpreter, numpy, one input


class Hang(Exception):
    """Raised by the alarm when one input runs far past the hang threshold."""


def _alarm(signum, frame):
    raise Hang()


def exercise(path: str) -> str:
    """Open, read every tensor and the graph, verify; return the outcome's name."""
    try:
        read_everything(path)
        return "ok"
    except aqformat.AqmError as e:
        return "one-line " + type(e).__name__ if "\n" not in str(e) else "MULTILINE " + type(e).__name__


def seeds(work: str) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every seed file."""
    out = []
    for name, write in (("sample", write_sample), ("graph", write_graph_sample)):
        path = os.path.join(work, f"{name}.aqm")
        write(path)
        with open(path, "rb") as f:
            out.append((name, f.read()))
    vectors = os.path.join(ROOT, "spec", "vectors")
    for name in sorted(os.listdir(vectors)) if os.path.isdir(vectors) else []:
        if name.endswith(".aqm"):
            with open(os.path.join(vectors, name), "rb") as f:
                out.append((name, f.read()))
    return out


def make_input(seed: int, i: int, bases: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """Input ``i`` of the run with ``seed``: the seed file it mutates, and its bytes."""
    rng = random.Random(seed * 1_000_003 + i)
    name, base = bases[i % len(bases)]
    if name == "graph" and rng.random() < 0.6:
        return name, graph_mutant(rng, base)
    return name, mutant(rng, base)


def _worker(worker: int, jobs: int, args: argparse.Namespace) -> dict:
    """Run inputs ``worker, worker + jobs, ...``; return counts, failures and peak RSS."""
    warnings.simplefilter("ignore")  # hostile float16 scales overflow to inf: valid data, not a bug
    np.seterr(all="ignore")
    aqformat.set_decode_budget(args.decode_budget)
    signal.signal(signal.SIGALRM, _alarm)
    work = tempfile.mkdtemp(prefix="aqm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    bases = seeds(work)
    path = os.path.join(work, "input.aqm")
    result = {"outcomes": collections.Counter(), "failures": [], "slowest": 0.0, "largest": 0,
              "rss_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10}
    for i in range(worker, args.examples, jobs):
        base_name, data = make_input(args.seed, i, bases)
        result["largest"] = max(result["largest"], len(data))
        with open(path, "wb") as f:
            f.write(data)
        failure = None
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 2 * args.hang_seconds)
        try:
            result["outcomes"][exercise(path)] += 1
        except Hang:
            failure = "hang"
        except Exception as e:  # noqa: BLE001 - any non-AqmError is the finding
            failure = f"{type(e).__name__}: {str(e)[:120]}"
            traceback.print_exc(limit=-4)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - t0
        result["slowest"] = max(result["slowest"], elapsed)
        if failure is None and elapsed > args.hang_seconds:
            failure = f"slow ({elapsed:.2f} s)"
        if failure:
            result["outcomes"]["FAIL " + failure.split(":")[0].split(" (")[0]] += 1
            os.makedirs(args.out, exist_ok=True)
            saved = os.path.join(args.out, f"{base_name}-{args.seed}-{i}.aqm")
            with open(saved, "wb") as f:
                f.write(data)
            result["failures"].append(f"input {i} (mutant of {base_name}): {failure}; saved {saved}")
            print(result["failures"][-1], flush=True)
        if worker == 0 and (i // jobs + 1) % 5000 == 0:
            print(f"{i + 1} inputs", flush=True)
    os.unlink(path) if os.path.exists(path) else None
    result["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return result


def replay(path: str, budget: int) -> int:
    """Run one saved input, showing its outcome or traceback."""
    aqformat.set_decode_budget(budget)
    t0 = time.perf_counter()
    print(f"{path}: {exercise(path)} in {time.perf_counter() - t0:.3f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=5.0)
    p.add_argument("--decode-budget", type=int, default=4 << 20, help="bytes (default 4 MiB: mutants reach it)")
    p.add_argument("--out", default=os.path.join(ROOT, "fuzz", "crashes"), help="where failing inputs go")
    p.add_argument("--replay", metavar="FILE", help="run one saved input and stop")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.decode_budget)
    jobs = max(1, min(args.jobs, args.examples))
    t_start = time.perf_counter()
    if jobs == 1:
        results = [_worker(0, 1, args)]
    else:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(_worker, range(jobs), [jobs] * jobs, [args] * jobs))
    total = time.perf_counter() - t_start
    outcomes: collections.Counter[str] = sum((r["outcomes"] for r in results), collections.Counter())
    failures = [f for r in results for f in r["failures"]]
    crashes = sum(n for k, n in outcomes.items() if k.startswith("FAIL") and "hang" not in k and "slow" not in k)
    hangs = sum(n for k, n in outcomes.items() if k.startswith(("FAIL hang", "FAIL slow")))
    multiline = sum(n for k, n in outcomes.items() if k.startswith("MULTILINE"))
    rss_peak = max(r["rss_peak"] for r in results)
    rss_limit = args.decode_budget + RSS_SLACK
    print(f"inputs tried: {args.examples} in {total:.0f} s with {jobs} process(es), "
          f"{args.examples / total:.0f} inputs/s (seed {args.seed})")
    for name, n in sorted(outcomes.items()):
        print(f"  {name:<36} {n}")
    print(f"crashes (non-AqmError or multi-line message): {crashes + multiline}")
    print(f"hangs or inputs slower than {args.hang_seconds} s: {hangs} "
          f"(slowest {max(r['slowest'] for r in results) * 1000:.0f} ms)")
    print(f"peak RSS {rss_peak / 2**20:.0f} MiB per process (limit: decode budget "
          f"{args.decode_budget / 2**20:.0f} MiB + {RSS_SLACK >> 20} MiB = {rss_limit / 2**20:.0f} MiB); "
          f"largest input {max(r['largest'] for r in results) / 1024:.0f} KiB")
    for f in failures[:20]:
        print(f)
    return 1 if crashes or hangs or multiline or rss_peak > rss_limit else 0


if __name__ == "__main__":
    sys.exit(main())
