"""GPTQ-style error feedback of the grid codecs under calibration (converters/lattice.py)."""
import numpy as np

from aqformat.converters.aq_encode import feedback_factor
from aqformat.converters.lattice import encode_lattice, feedback_indices
from aqformat.dither import dither


def _problem(seed=0, rows=40, cols=96):
    """Weights and an ``H = X^T X`` of strongly correlated inputs, as a conv's patches give."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1, (rows, cols))
    mix = rng.normal(0, 1, (cols, cols)) * np.exp(-np.abs(np.subtract.outer(np.arange(cols), np.arange(cols))) / 4)
    X = rng.normal(0, 1, (2000, cols)) @ mix * np.exp(rng.uniform(-1, 1, cols))
    return W, X.T @ X / len(X)


def _output_error(W, decoded, H):
    E = decoded - W
    return float(np.einsum("ij,jk,ik->", E, H, E))


def test_feedback_lowers_the_output_error_of_rounding_at_the_same_step():
    W, H = _problem()
    step = np.full(W.shape[0], 0.25)
    for u in (None, dither(3, W.size).reshape(W.shape)):
        off = 0.0 if u is None else u
        plain = np.rint(W / 0.25 + off)
        fed = feedback_indices(W, step, u, feedback_factor(H, 0.01))
        err = [_output_error(W, (q - off) * 0.25, H) for q in (plain, fed)]
        assert err[1] < 0.6 * err[0], err  # 0.51x here
        # the rate hardly moves: the indices spread about as much
        assert abs(np.std(fed) / np.std(plain) - 1) < 0.05


def test_without_correlation_it_is_rounding():
    W, _ = _problem()
    H = np.diag(np.linspace(1, 3, W.shape[1]))
    q = feedback_indices(W, np.full(W.shape[0], 0.3), None, feedback_factor(H, 0.01))
    assert np.array_equal(q, np.rint(W / 0.3))


def test_rows_are_coded_independently():
    """A sample of rows codes as in the whole tensor: the choice estimates from samples."""
    W, H = _problem(1)
    U = feedback_factor(H, 0.01)
    step = np.linspace(0.2, 0.4, W.shape[0])
    q = feedback_indices(W, step, None, U)
    rows = np.array([3, 17, 30])
    assert np.array_equal(feedback_indices(W[rows], step[rows], None, U), q[rows])


def test_encode_lattice_takes_the_feedback():
    W, H = _problem(2)
    step = np.float32(0.25)
    plain, _ = encode_lattice(W, step, 5, name="w")
    fed, steps = encode_lattice(W, step, 5, name="w", feedback=feedback_factor(H, 0.01))
    u = dither(5, W.size).reshape(W.shape)
    assert fed.dtype == np.int32 and np.array_equal(steps, np.full(W.shape[0], step))
    assert _output_error(W, (fed - u) * 0.25, H) < 0.5 * _output_error(W, (plain - u) * 0.25, H)
