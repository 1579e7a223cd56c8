"""Structure-aware fuzzing of the reader (bounded; the long run is fuzz/fuzz_reader.py).

Mutants of a valid file that uses every section kind are made at the byte
level (bit flips, overwritten runs, truncation at section boundaries,
insertions, preamble fields) and at the header level (any field set to a
hostile value, swapped sections, duplicate records, huge shapes, zstd bombs,
unknown codecs), half of them with their CRCs fixed up so the structural
validator, not only the checksums, is exercised. Whatever the mutant, opening
it, reading every tensor and verifying must succeed or raise an AqmError, in
well under a second and without unbounded memory.
"""
import random
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import aqformat
from aqformat import rans
from aqformat.kernels.decode import compiled
from tests.craft import fix_crcs, mutant, mutate_bytes, read_everything, write_sample

AQM = [sys.executable, "-m", "aqformat.cli"]
FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    compiled()  # the decode kernels load once per process (seconds); the bound below is per input
    rans.compiled()
    path = tmp_path_factory.mktemp("fuzz") / "sample.aqm"
    write_sample(path)
    return path.read_bytes()


def exercise(path) -> str:
    """Open, read everything, verify; return the outcome's class name. Non-AqmErrors propagate."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # a hostile float16 scale may overflow to inf: valid data
            read_everything(path)
        return "ok"
    except aqformat.AqmError as e:
        assert "\n" not in str(e), repr(e)
        return type(e).__name__


def check(tmp_path, data: bytes) -> str:
    path = tmp_path / "m.aqm"
    path.write_bytes(data)
    t0 = time.perf_counter()
    outcome = exercise(path)
    assert time.perf_counter() - t0 < 1.0, "one input took more than a second"
    return outcome


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutants_fail_cleanly(tmp_path, sample, rng):
    check(tmp_path, mutant(rng, sample))


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_byte_mutants_with_fixed_crcs(tmp_path, sample, rng):
    """Only the structural checks stand between these and the decoders."""
    check(tmp_path, fix_crcs(mutate_bytes(rng, sample)))


def test_fuzzing_reaches_every_outcome_with_bounded_memory(tmp_path, sample):
    """The mutators are not trivially rejected: they reach success and every error kind."""
    rng = random.Random(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen = {check(tmp_path, mutant(rng, sample)) for _ in range(600)}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert {"ok", "AqmFormatError", "AqmIntegrityError", "AqmUnsupportedError", "AqmVersionError"} <= seen
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB on mutants of a {len(sample)}-byte file"


def test_cli_on_mutants_fails_in_one_line(tmp_path, sample):
    rng = random.Random(1)
    bad = []
    while len(bad) < 6:
        data = mutant(rng, sample)
        path = tmp_path / f"m{len(bad)}.aqm"
        path.write_bytes(data)
        if exercise(path) != "ok":
            bad.append(path)
    for path in bad:
        try:
            aqformat.open(path).check_checksums()
            info_fails = False  # e.g. an unknown codec: info lists it, only decoding fails
        except aqformat.AqmError:
            info_fails = True
        for cmd in (["info", str(path)], ["info", "--json", str(path)], ["verify", str(path)]):
            r = subprocess.run(AQM + cmd, capture_output=True, text=True, timeout=60)
            assert (r.returncode != 0) == (info_fails or cmd[0] == "verify"), (cmd, r.stdout)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 1, (cmd, r.stderr)


def test_fuzz_campaign_of_twenty_thousand_inputs(tmp_path):
    """The fuzz harness itself, 20,000 mutants on two processes: no crash, no input over 5 s,
    peak RSS within the decode budget + 100 MiB (the harness checks and reports each)."""
    r = subprocess.run([sys.executable, "-m", "fuzz.fuzz_reader", "--examples", "20000", "--jobs", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    report = r.stdout[r.stdout.find("inputs tried"):]
    assert r.returncode == 0, report + r.stderr[-3000:]
    assert "crashes (non-AqmError or multi-line message): 0" in report and "AqmBudgetError" in report, report
