"""Rate-distortion-optimised lattice indices (converters/lattice.py, rdoq_indices)."""
import numpy as np

from aqformat import rans
from aqformat.converters.lattice import encode_lattice, lattice_step, rdoq_indices
from aqformat.dither import dither


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.laplace(0, 1, (48, 400)) * np.exp(rng.uniform(-1, 1, (48, 1)))).astype(np.float64)


def _point(W, bits, lam):
    step = lattice_step(W, bits).astype(np.float64)
    u = dither(9, W.size).reshape(W.shape)
    x = W / step[:, None] + u
    q = rdoq_indices(x, lam)
    stored = 8 * len(rans.encode(q.astype(np.int16))) / W.size
    mse = float(np.mean((W - (q - u) * step[:, None]) ** 2))
    return x, q, stored, mse


def test_zero_lambda_is_rounding_and_indices_stay_next_to_x():
    W = _weights()
    x, q, _, _ = _point(W, 3.0, 0.0)
    assert np.array_equal(q, np.rint(x))
    x, q, _, _ = _point(W, 3.0, 0.2)
    assert np.all((q == np.floor(x)) | (q == np.floor(x) + 1))
    assert not np.array_equal(q, np.rint(x))


def test_it_trades_error_for_bits_better_than_a_larger_step():
    """At 3 bits RDOQ reaches a lower rate; a plain step reaching the same rate has a larger error."""
    W = _weights()
    _, _, r0, d0 = _point(W, 3.0, 0.0)
    _, _, r1, d1 = _point(W, 3.0, 0.1)
    assert r1 < r0 and d1 > d0
    # plain rounding at the rate RDOQ reached, by interpolating its own curve in log-distortion
    lo, hi = _point(W, 2.75, 0.0), _point(W, 3.0, 0.0)
    t = (r1 - lo[2]) / (hi[2] - lo[2])
    d_plain = np.exp(np.log(lo[3]) + t * (np.log(hi[3]) - np.log(lo[3])))
    assert d1 < d_plain


def test_encode_lattice_takes_the_trade():
    W = _weights(1).astype(np.float32)
    q0, s0 = encode_lattice(W, 3.0, 5)
    q1, s1 = encode_lattice(W, 3.0, 5, rdoq=0.1)
    assert np.array_equal(s0, s1) and q1.dtype == np.int32
    assert 0 < np.count_nonzero(q0 != q1) < q0.size // 4 and np.abs(q0 - q1).max() == 1
