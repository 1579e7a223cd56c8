"""The compiled decode kernel: bit-identical to the numpy decoder, bounded, optional."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import aqformat
from aqformat import kernels
from aqformat.codecs.aq import decode_vectors
from aqformat.kernels import decode as kd
from aqformat.kernels import matmul as km

VEC = os.path.join(os.path.dirname(__file__), "..", "spec", "vectors")
MANIFEST = json.load(open(os.path.join(VEC, "MANIFEST.json")))
needs_numba = pytest.mark.skipif(not kd.compiled(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def kernel_for_any_size(monkeypatch):
    """The kernel decodes even the small matrices here (by default they stay in numpy)."""
    monkeypatch.setattr(kd, "_MIN_KERNEL_VALUES", 0)


def _reference(codes, cb, scale, cols):
    """The numpy decoder of spec 5.2 steps 1-3, written out."""
    M, K, d = cb.shape
    nch = -(-cols // d)
    w = decode_vectors(codes, cb).reshape(-1, nch * d)[:, :cols]
    if scale is not None:
        w *= scale.astype(np.float32)[:, None]
    return w


CASES = [(M, bits, d, cols, scaled) for M, bits, d, cols, scaled in [
    (1, 8, 8, 64, False), (2, 8, 8, 200, True), (4, 8, 8, 384, True), (3, 4, 8, 37, False),
    (2, 12, 8, 96, True), (2, 16, 4, 30, False), (4, 8, 3, 50, True), (1, 1, 16, 33, True), (2, 7, 1, 9, False)]]


@needs_numba
@pytest.mark.parametrize("M,bits,d,cols,scaled", CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_bit_identical_to_numpy(M, bits, d, cols, scaled, threads):
    rng = np.random.default_rng(M * 1000 + bits * 10 + d)
    K, rows = 1 << bits, 300
    cb = (rng.standard_normal((M, K, d)) * rng.uniform(0.01, 10)).astype(np.float32)
    codes = rng.integers(0, K, (rows * -(-cols // d), M)).astype(np.uint8 if bits <= 8 else np.uint16)
    scale = rng.uniform(0.1, 3, rows).astype(np.float32) if scaled else None
    kernels.set_threads(threads)
    try:
        kd_min = kd._MIN_TASK_ADDS
        kd._MIN_TASK_ADDS = 64  # split even these small matrices over the threads
        got = kd.decode_rows(codes, cb, scale, cols)
        part = kd.decode_rows(codes, cb, scale, cols, np.empty((100, cols), np.float32), row_start=150)
    finally:
        kd._MIN_TASK_ADDS = kd_min
        kernels.set_threads(None)
    ref = _reference(codes, cb, scale, cols)
    assert got.tobytes() == ref.tobytes()
    assert part.tobytes() == ref[150:250].tobytes()


def _decode_vectors_file(name):
    with aqformat.open(os.path.join(VEC, f"{name}.aqm")) as f:
        return {t: hashlib.sha256(np.ascontiguousarray(f.read(t)).tobytes()).hexdigest() for t in f.names()}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_numpy_fallback_decodes_frozen_vectors(name, monkeypatch):
    """With the kernel off, the numpy path still decodes every frozen vector to its recorded digest."""
    monkeypatch.setattr(kd, "_loaded_kernel", lambda: None)
    assert _decode_vectors_file(name) == {t: r["sha256"] for t, r in MANIFEST[name]["tensors"].items()}


@needs_numba
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_kernel_decodes_frozen_vectors(name):
    assert _decode_vectors_file(name) == {t: r["sha256"] for t, r in MANIFEST[name]["tensors"].items()}


@pytest.mark.parametrize("use_kernel", [True, False])
def test_out_of_range_codes_raise_integrity_error(use_kernel, monkeypatch):
    if not use_kernel:
        monkeypatch.setattr(kd, "_loaded_kernel", lambda: None)
    cb = np.ones((2, 16, 8), np.float32)
    codes = np.zeros((10, 2), np.uint8)
    codes[7, 1] = 200  # a 4-bit codebook indexed by a byte that cannot come from 4-bit codes
    with pytest.raises(aqformat.AqmIntegrityError, match="1 code"):
        kd.decode_rows(codes, cb, None, 16)
    with pytest.raises(aqformat.AqmIntegrityError):
        kd.decode_rows(codes.astype(np.int16) - 300, cb, None, 16)


def test_full_width_codes_need_no_check():
    """uint8 codes into 256 codewords are in range by construction: the check reads nothing."""
    codes = np.broadcast_to(np.uint8(255), (1 << 30, 2))  # a check would scan 2 GiB
    kd.check_codes(codes, 256)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="do not match"):
        kd.decode_rows(np.zeros((10, 2), np.uint8), np.ones((2, 256, 8), np.float32), None, 16,
                       np.empty((3, 16), np.float32), row_start=4)


_NO_NUMBA = r"""
import sys
sys.modules["numba"] = None  # as if numba were not installed
import numpy as np, aqformat
from aqformat.kernels import decode
with aqformat.open(sys.argv[1]) as f:
    print(sum(float(np.abs(f.read(n).astype(np.float64)).sum()) for n in f.names()))
print("compiled:", decode.compiled())
"""


def test_missing_numba_falls_back_with_one_line_notice():
    path = os.path.join(VEC, "aq_8bit_shared.aqm")
    proc = subprocess.run([sys.executable, "-c", _NO_NUMBA, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notice = proc.stderr.strip().splitlines()
    assert len(notice) == 1 and "numba is not installed" in notice[0] and "aqformat[fast]" in notice[0]
    assert proc.stdout.splitlines()[-1] == "compiled: False"
    with aqformat.open(path) as f:
        expected = sum(float(np.abs(f.read(n).astype(np.float64)).sum()) for n in f.names())
    assert float(proc.stdout.splitlines()[0]) == expected


_ONE_SHOT = r"""
import sys
import numpy as np
from aqformat.kernels import decode
rng = np.random.default_rng(0)
codes = rng.integers(0, 256, (512 * 48, 4)).astype(np.uint8)  # 512 x 384: above the kernel's threshold
w = decode.decode_rows(codes, rng.standard_normal((4, 256, 8)).astype(np.float32), None, 384)
print("numba" in sys.modules, float(np.abs(w).sum()))
"""


@needs_numba
def test_one_shot_decode_does_not_load_numba_unless_asked():
    """A single decode stays in numpy (loading numba costs more than it saves); AQFORMAT_KERNELS=numba
    asks for the kernel, with the same bits."""
    env = {k: v for k, v in os.environ.items() if k != "AQFORMAT_KERNELS"}
    runs = [subprocess.run([sys.executable, "-c", _ONE_SHOT], env=dict(env, **extra), capture_output=True, text=True,
                           check=True, timeout=300).stdout.split() for extra in ({}, {"AQFORMAT_KERNELS": "numba"})]
    assert runs[0][0] == "False" and runs[1][0] == "True"
    assert runs[0][1] == runs[1][1]


def test_cache_dir_for_a_read_only_install(monkeypatch, tmp_path):
    """A package folder that cannot be written sends the cache to the user's cache folder, else to a temp one."""
    here = os.path.dirname(kernels.__file__)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(kernels, "_writable", lambda folder: not folder.startswith(here))
    assert kernels.cache_dir() == str(tmp_path / "user" / "aqformat" / "numba")
    monkeypatch.setattr(kernels, "_writable", lambda folder: folder.startswith(str(tmp_path / "tmp")))
    assert kernels.cache_dir().startswith(str(tmp_path / "tmp" / "aqformat-numba-"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "chosen"))
    assert kernels.cache_dir() == str(tmp_path / "chosen")


_COMPILE = r"""
import json
from aqformat import kernels
from aqformat.kernels import decode
decode.compiled()
print(json.dumps(kernels.compile_seconds()))
"""


@needs_numba
def test_compile_is_timed_and_cached_between_runs(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [json.loads(subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                                      check=True, timeout=300).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0]["decode"] > 0 and runs[1]["decode"] > 0
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*")), "no cache index written"
    assert runs[1]["decode"] < runs[0]["decode"]


@needs_numba
@pytest.mark.parametrize("M,bits,cols,scaled,T", [(4, 8, 384, True, 1), (2, 8, 200, False, 10), (3, 12, 37, True, 16),
                                                   (1, 4, 64, True, 7)])
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_matmul_matches_decoded_product(M, bits, cols, scaled, T, threads, monkeypatch):
    """Decode-and-multiply equals x @ W.T with W the (bit-exact) decoded matrix, up to float32 rounding."""
    rng = np.random.default_rng(M * 100 + T)
    K, rows, d = 1 << bits, 301, 8  # rows not a multiple of the kernel's 4
    nch = -(-cols // d)
    cb = rng.standard_normal((M, K, d)).astype(np.float32)
    codes = rng.integers(0, K, (rows * nch, M)).astype(np.uint8 if bits <= 8 else np.uint16)
    scale = rng.uniform(0.1, 3, rows).astype(np.float32) if scaled else None
    x = np.zeros((T, nch * d), np.float32)
    x[:, :cols] = rng.standard_normal((T, cols))
    monkeypatch.setattr(km, "_MIN_TASK_VALUES", 64)  # split even these small products over the threads
    kernels.set_threads(threads)
    try:
        got = km.decode_matmul(x, codes, cb, scale, rows)
    finally:
        kernels.set_threads(None)
    ref = x[:, :cols].astype(np.float64) @ _reference(codes, cb, scale, cols).T.astype(np.float64)
    assert got.shape == (T, rows) and got.dtype == np.float32
    # float32 sums of cols products in another order
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.sqrt(cols) * float(np.abs(ref).max()) + 1e-6)


def test_decode_matmul_needs_d8():
    cb = np.ones((2, 16, 4), np.float32)
    assert not km.decode_matmul_ok(np.zeros((2, 2), np.uint8), cb)
    with pytest.raises(RuntimeError, match="d = 8"):
        km.decode_matmul(np.zeros((1, 8), np.float32), np.zeros((2, 2), np.uint8), cb, None, 1)
