"""Long structure-aware fuzzing run of the .aqm reader (``make fuzz``).

Seeds are a file using every section kind (tests/craft.py:write_sample) and
the frozen spec vectors. Each input is a mutant (tests/craft.py:mutant) that
is opened, fully read, and verified. Reported: inputs tried, outcomes,
crashes (any exception that is not an AqmError), hangs (inputs past
``--hang-seconds``), and peak RSS against the largest input size. Crashing
and hanging inputs are saved under ``--out`` for replay. Exit code 1 if any.

    python -m fuzz.fuzz_reader --examples 20000 [--seed 0] [--out fuzz/crashes]
"""
from __future__ import annotations

import argparse
import collections
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
from tests.craft import mutant, read_everything, write_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    path = os.path.join(work, "sample.aqm")
    write_sample(path)
    out = [("sample", open(path, "rb").read())]
    vectors = os.path.join(ROOT, "spec", "vectors")
    for name in sorted(os.listdir(vectors)) if os.path.isdir(vectors) else []:
        if name.endswith(".aqm"):
            with open(os.path.join(vectors, name), "rb") as f:
                out.append((name, f.read()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=1.0)
    p.add_argument("--out", default=os.path.join(ROOT, "fuzz", "crashes"), help="where failing inputs go")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # hostile float16 scales overflow to inf: valid data, not a bug
    np.seterr(all="ignore")
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    crashes = hangs = 0
    slowest = largest = 0.0
    with tempfile.TemporaryDirectory() as work:
        bases = seeds(work)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        path = os.path.join(work, "input.aqm")
        t_start = time.perf_counter()
        for i in range(args.examples):
            base_name, base = bases[i % len(bases)]
            data = mutant(rng, base)
            largest = max(largest, len(data))
            with open(path, "wb") as f:
                f.write(data)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, max(10.0, 10 * args.hang_seconds))
            failure = None
            try:
                outcomes[exercise(path)] += 1
            except Hang:
                failure = "hang"
            except BaseException as e:  # noqa: BLE001 - any non-AqmError is the finding
                if isinstance(e, KeyboardInterrupt):
                    raise
                failure = f"{type(e).__name__}: {str(e)[:120]}"
                traceback.print_exc(limit=-4)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            slowest = max(slowest, elapsed)
            if elapsed > args.hang_seconds and failure is None:
                failure = f"slow ({elapsed:.2f} s)"
            if failure:
                hangs += failure.startswith(("hang", "slow"))
                crashes += not failure.startswith(("hang", "slow"))
                outcomes["FAIL " + failure.split(":")[0]] += 1
                os.makedirs(args.out, exist_ok=True)
                saved = os.path.join(args.out, f"{base_name}-{args.seed}-{i}.aqm")
                with open(saved, "wb") as f:
                    f.write(data)
                print(f"input {i} (mutant of {base_name}): {failure}; saved {saved}", flush=True)
            if (i + 1) % 2000 == 0:
                print(f"{i + 1} inputs, {time.perf_counter() - t_start:.0f} s", flush=True)
        total = time.perf_counter() - t_start
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        grown = rss_mib - rss0 / 1024
    print(f"inputs tried: {args.examples} in {total:.0f} s (seed {args.seed}, {len(bases)} seed files)")
    for name, n in sorted(outcomes.items()):
        print(f"  {name:<36} {n}")
    print(f"crashes (non-AqmError): {crashes}")
    print(f"hangs or inputs slower than {args.hang_seconds} s: {hangs} (slowest {slowest * 1000:.0f} ms)")
    print(f"peak RSS {rss_mib:.0f} MiB (grew {grown:.0f} MiB while fuzzing); largest input {largest / 1024:.0f} KiB")
    return 1 if crashes or hangs or any(k.startswith("MULTILINE") for k in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
