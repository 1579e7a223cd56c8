"""Tests of the quantization engine (AQ search and encoding, grouping, calib, allocate, permute, lattice)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from aqformat.dither import dither
from aqformat.converters.allocate import aq_tensor_bytes, allocate
from aqformat.converters.aq_encode import aq_eligible, decode_tensor, encode_tensor, output_error
from aqformat.converters.aq_search import beam_search, decode_vectors, kmeans, train_aq, update_codebooks
from aqformat.converters.grouping import GroupTrainer, group_tensors
from aqformat.converters.options import AQConfig
from aqformat.converters.calib import collect_hessians, collect_output_sensitivity
from aqformat.converters.lattice import encode_lattice
from aqformat.converters.permute import search_permutation, subvector_logdet
from aqformat.errors import AqmInputError, TooSmallForAQ
from aqformat.layout import to_matrix

torch.set_num_threads(2)


def _sqnr(x: torch.Tensor, xh: torch.Tensor) -> float:
    return 10 * math.log10(float(x.pow(2).sum() / (x - xh).pow(2).sum()))


@pytest.fixture(scope="module")
def gauss2bit():
    torch.manual_seed(0)
    x = torch.randn(8192, 8)
    C, codes = train_aq(x, AQConfig(M=2, b=8, d=8, beam=8, iters=3))
    return x, C, codes


def test_gaussian_sqnr_2bit(gauss2bit):
    x, C, codes = gauss2bit
    assert C.dtype == torch.float32 and torch.equal(C, C.half().float())  # fp16 values
    # Lloyd-Max scalar is 9.30 dB, the rate-distortion bound 12.04 dB.
    assert _sqnr(x, decode_vectors(C, codes)) > 10.0


def test_beam_beats_greedy(gauss2bit):
    x, C, _ = gauss2bit
    greedy = beam_search(x, C, beam=1, icm_sweeps=0)
    beam = beam_search(x, C, beam=8, icm_sweeps=0)
    assert _sqnr(x, decode_vectors(C, beam)) > _sqnr(x, decode_vectors(C, greedy)) + 0.1


def test_least_squares_update_lowers_error():
    torch.manual_seed(1)
    x = torch.randn(4096, 4)
    c0, a0 = kmeans(x, 16, iters=5)
    c1, a1 = kmeans(x - c0[a0], 16, iters=5)
    C = torch.stack([c0, c1])
    codes = torch.stack([a0, a1], 1)
    before = float((x - decode_vectors(C, codes)).pow(2).sum())
    after = float((x - decode_vectors(update_codebooks(x, codes, C), codes)).pow(2).sum())
    assert after < before * 0.999
    # Per-vector metrics: the weighted error decreases too.
    G = torch.diag_embed(torch.rand(4096, 4) + 0.1)

    def werr(Cx):
        e = x - decode_vectors(Cx, codes)
        return float((e[:, None, :] @ G @ e[:, :, None]).sum())
    assert werr(update_codebooks(x, codes, C, G)) < werr(C)


def _skewed(rows=128, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) * torch.logspace(-1.5, 0.5, cols)
    return torch.randn(rows, cols, generator=g), X.T @ X / X.shape[0]


def test_data_aware_lowers_output_error():
    W, H = _skewed()
    cfg = AQConfig(M=1, b=6, d=4, beam=4, iters=2)
    errs = {}
    for label, h in (("mse", None), ("aware", H)):
        tr = GroupTrainer(cfg)
        tr.add("w", W, h)
        C = tr.train("cpu")
        Wh = torch.from_numpy(decode_tensor(encode_tensor("w", W, C, cfg, h, device="cpu"), C))
        errs[label] = output_error(W, Wh, H)
    assert errs["aware"] < 0.85 * errs["mse"]


def test_row_scales_fit_the_weights_not_the_calibration():
    """Row scales are fitted to the plain weight error, even under a calibration H.

    With H from inputs that barely excite some features, a scale fitted under
    H grows to match the excited columns alone and multiplies the error in the
    others, which unseen inputs do excite (on MiniLM this collapsed sentence
    embeddings); the fitted scale must stay the plain least-squares one.
    """
    g = torch.Generator().manual_seed(5)
    cols, rows = 64, 256
    W = torch.randn(rows, cols, generator=g)
    seen = torch.ones(cols)
    seen[1::2] = 0.01  # features the calibration barely excites (rare in its inputs)
    X = torch.randn(24, cols, generator=g) * seen
    cfg = AQConfig(M=1, b=6, d=4, beam=4, iters=2)
    tr = GroupTrainer(cfg)
    tr.add("w", W, X.T @ X / 24)
    C = tr.train("cpu")
    t = encode_tensor("w", W, C, cfg, X.T @ X / 24, device="cpu")
    Wh = torch.from_numpy(decode_tensor(t, C))
    s = torch.from_numpy(t.scale.astype("float32"))[:, None]
    unscaled = Wh / s
    best = (unscaled * W).sum(1, keepdim=True) / (unscaled * unscaled).sum(1, keepdim=True)
    torch.testing.assert_close(s, best, rtol=2e-3, atol=0.0)  # fp16 rounding of the LS scale


def test_feedback_mode_runs_and_beats_plain_mse():
    W, H = _skewed(seed=3)
    cfg = AQConfig(M=1, b=6, d=4, beam=4, iters=2, feedback=True)
    tr = GroupTrainer(cfg)
    tr.add("w", W, H)
    C = tr.train("cpu")
    Wh = torch.from_numpy(decode_tensor(encode_tensor("w", W, C, cfg, H, device="cpu"), C))
    plain = AQConfig(M=1, b=6, d=4, beam=4, iters=2)
    tr = GroupTrainer(plain)
    tr.add("w", W)
    Cp = tr.train("cpu")
    Wp = torch.from_numpy(decode_tensor(encode_tensor("w", W, Cp, plain, device="cpu"), Cp))
    assert output_error(W, Wh, H) < output_error(W, Wp, H)


def test_shared_group_two_magnitudes_and_layout_contract():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(64, 30, generator=g) * 0.01  # cols not a multiple of d: padding
    big = torch.randn(40, 24, generator=g) * 100.0  # stored [in, out]: axes=(1, 0)
    cfg = AQConfig(M=2, b=5, d=8, beam=4, iters=2)
    tr = GroupTrainer(cfg, reservoir=200)
    tr.add("a", small)
    tr.add("b", big, axes=(1, 0))
    assert tr.n_kept == 200 and tr.n_seen == 64 * 4 + 24 * 5
    C = tr.train("cpu")
    ta = encode_tensor("a", small, C, cfg, device="cpu")
    tb = encode_tensor("b", big, C, cfg, axes=(1, 0), device="cpu")
    for t, w, axes in ((ta, small, None), (tb, big, (1, 0))):
        rel = float(((torch.from_numpy(decode_tensor(t, C)) - w).pow(2).sum() / w.pow(2).sum()))
        assert rel < 0.35
        # Decode by the format's definition, independently of decode_tensor.
        Wm = to_matrix(w.numpy(), axes)
        vec = sum(C.numpy()[m][t.codes[:, m].astype(int)] for m in range(cfg.M))
        cols = Wm.shape[1]
        dec = vec.reshape(Wm.shape[0], -1)[:, :cols] * t.scale.astype(np.float32)[:, None]
        np.testing.assert_allclose(to_matrix(decode_tensor(t, C), axes), dec, rtol=1e-5, atol=1e-6)
        assert t.codes.dtype == np.uint8 and t.codes.max() < cfg.K and t.scale.dtype == np.float16
        assert t.nbytes() == aq_tensor_bytes(tuple(w.shape), cfg, axes)


def test_allocation_meets_budget_and_prefers_sensitive():
    opts = {"aq2": (2, 1.0), "aq4": (4, 0.1), "fp16": (16, 0.0)}
    names = ["t0", "t1", "t2"]
    errors = {n: {o: e for o, (_, e) in opts.items()} for n in names}
    nbytes = {n: {o: b * 1000 // 8 for o, (b, _) in opts.items()} for n in names}
    gb = {"aq2": 50, "aq4": 50}
    budget = 250 + 500 + 250 + 100  # one tensor can be upgraded to 4 bits
    choice = allocate(errors, nbytes, budget, gb, sensitivity={"t1": 10.0})
    spent = sum(nbytes[n][o] for n, o in choice.items()) + sum(gb.get(o, 0) for o in set(choice.values()))
    assert spent <= budget
    assert choice == {"t0": "aq2", "t1": "aq4", "t2": "aq2"}
    with pytest.raises(AqmInputError, match="smallest achievable is 800"):
        allocate(errors, nbytes, 700, gb)


def test_permutation_valid_and_never_worse():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 6)) @ rng.standard_normal((6, 36)) + 0.05 * rng.standard_normal((48, 36))
    W = W[:, rng.permutation(36)]
    r = search_permutation(W, 4, iters=300, seed=1)
    assert r.perm is not None and sorted(r.perm.tolist()) == list(range(36))
    assert r.logdet_after < r.logdet_before
    assert abs(subvector_logdet(W, 4, r.perm) - r.logdet_after) < 1e-9
    iid = rng.standard_normal((32, 8))  # nothing to gain on 2 columns per vector
    r2 = search_permutation(iid, 4, iters=50)
    assert r2.logdet_after <= r2.logdet_before


def test_lattice_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3, 4)).astype(np.float32) * np.array([1, 10, 0.1])[None, :, None]
    seed = 2**63 + 12345
    q, step = encode_lattice(w, 4.0, seed)
    assert q.dtype == np.int32 and step.dtype == np.float32 and q.shape == (5, 12)
    u = dither(seed, q.size).reshape(q.shape)
    dec = (q - u) * step.astype(np.float64)[:, None]
    W = to_matrix(w)
    assert np.all(np.abs(dec - W) <= step[:, None] / 2 * (1 + 1e-6))
    q2, step2 = encode_lattice(w, np.full(5, 0.5, np.float32), seed)
    assert np.all(step2 == 0.5) and np.abs((q2 - u) * 0.5 - W).max() <= 0.25 + 1e-6


def test_bad_inputs():
    w = torch.randn(64, 16)
    w[3, 4] = float("nan")
    cfg = AQConfig(M=1, b=4, d=4)
    with pytest.raises(AqmInputError, match="layer.bad"):
        GroupTrainer(cfg).add("layer.bad", w)
    with pytest.raises(AqmInputError, match="layer.bad"):
        encode_tensor("layer.bad", w, torch.zeros(1, 16, 4), cfg)
    with pytest.raises(AqmInputError, match="layer.inf"):
        encode_lattice(np.array([[1.0, np.inf]]), 4.0, 1, name="layer.inf")
    assert not aq_eligible((3,), cfg) and not aq_eligible((4, 4), cfg)  # < d; < K vectors
    with pytest.raises(TooSmallForAQ):
        GroupTrainer(cfg).add("tiny", torch.randn(4, 4))
    tr = GroupTrainer(AQConfig(M=1, b=8, d=4))
    tr.add("few", torch.randn(64, 16))  # 256 vectors: enough to code, fine
    tr2 = GroupTrainer(AQConfig(M=1, b=10, d=4))
    with pytest.raises(TooSmallForAQ):
        tr2.add("few", torch.randn(64, 16))
    with pytest.raises(AqmInputError):
        AQConfig(b=17)


def test_grouping():
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.0.output.dense.weight", "encoder.layer.0.attention.output.dense.weight",
             "features.0.weight", "pooler.dense.weight"]
    g = group_tensors(names, "by-kind", {"features.0.weight": (8, 3, 3, 3)})
    assert g["attention"] == [names[0], names[3]] and g["mlp"] == names[1:3]
    assert g["conv"] == ["features.0.weight"] and g["other"] == ["pooler.dense.weight"]
    assert list(group_tensors(names, "shared")) == ["shared"]
    assert len(group_tensors(names, "per-layer")) == len(names)


def test_collect_hessians_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    xs = [torch.randn(2, 2, 5, 5) for _ in range(3)]
    H = collect_hessians(model, lambda m, x: m(x), xs)
    X = torch.cat(xs)
    patches = nn.functional.unfold(X, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(H["0.weight"], (patches.T @ patches / patches.shape[0]).float(),
                               rtol=1e-4, atol=1e-5)
    A = model[1](model[0](X)).detach()
    torch.testing.assert_close(H["2.weight"], (A.T @ A / A.shape[0]).float(), rtol=1e-4, atol=1e-5)


def test_output_sensitivity_is_the_gauss_newton_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    xs = [torch.randn(1, 4) for _ in range(3000)]
    S = collect_output_sensitivity(model, lambda m, x: m(x), xs)
    W2 = model[1].weight.detach()
    # dL/dh = W2^T r with r ~ N(0, I): E[(W2^T r)_i^2] = (W2^T W2)_ii; the last layer gets 1.
    torch.testing.assert_close(S["0.weight"], (W2.T @ W2).diagonal(), rtol=0.1, atol=0.0)
    torch.testing.assert_close(S["1.weight"], torch.ones(3), rtol=0.1, atol=0.0)
    assert model[0].weight.requires_grad is False and model[1].weight.requires_grad is True
