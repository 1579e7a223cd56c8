"""Many threads and processes reading one .aqm file see identical arrays."""
import hashlib
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import aqformat
from tests.craft import sample_decoded

DIGESTS = """
import hashlib, sys, aqformat
with aqformat.open(sys.argv[1]) as f:
    for _ in range(20):
        for n in f.names():
            print(n, hashlib.sha256(f.read(n).tobytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("conc") / "sample.aqm"
    expected = sample_decoded(path)
    return path, expected


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_threads_sharing_one_open_file(sample):
    """The first read of each section (CRC check, zstd) races in many threads at once."""
    path, expected = sample
    for _ in range(5):  # a fresh file object each round, so the unverified path is raced again
        f = aqformat.open(path)
        barrier = threading.Barrier(16)

        def work(i):
            barrier.wait()
            names = f.names()[i % 9:] + f.names()[: i % 9]
            return {n: f.read(n).copy() for n in names for _ in range(3)}
        with ThreadPoolExecutor(16) as pool:
            for got in pool.map(work, range(16)):
                for n, a in got.items():
                    np.testing.assert_array_equal(a, expected[n])
                    assert a.dtype == expected[n].dtype
        f.verify()


def test_threads_each_opening_the_file(sample):
    path, expected = sample

    def work(i):
        with aqformat.open(path) as f:
            return {n: digest(f.read(n)) for n in f.names()}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(32)))
    assert all(r == {n: digest(a) for n, a in expected.items()} for r in results)


def test_processes_reading_at_once(sample):
    path, expected = sample
    want = "".join(f"{n} {digest(a)}\n" for n, a in expected.items()) * 20
    procs = [subprocess.Popen([sys.executable, "-c", DIGESTS, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [want] * 4


def test_weight_cache_under_threads(sample):
    """runtime/cache.py: concurrent get() returns one consistent value per key within the budget."""
    cache_mod = pytest.importorskip("aqformat.runtime.cache")
    path, expected = sample
    f = aqformat.open(path)
    budget = sum(a.nbytes for a in expected.values()) // 2
    evicted = []
    cache = cache_mod.WeightCache(budget_bytes=budget, on_evict=evicted.append)
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        names = f.names()
        for k in range(200):
            n = names[(i + k) % len(names)]
            cache.pin([n])
            v = cache.get(n, lambda n=n: f.read(n).copy())
            np.testing.assert_array_equal(v, expected[n])
            cache.unpin([n])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    s = cache.stats
    assert s.hits + s.misses == 8 * 200 and s.resident_bytes <= budget
    assert s.resident_bytes == sum(expected[n].nbytes for n in expected if n in cache)
    assert s.evictions == len(evicted) > 0
