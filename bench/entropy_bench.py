"""The lattice indices' entropy coder on real models: rans against zstd, constriction and the entropy.

For EfficientNet-Lite0, silero-vad (16 kHz, opset 15) and MiniLM, every
weight matrix of at least 4096 values is lattice-coded
(:func:`aqformat.converters.lattice.encode_lattice`) at several rates, with
the default per-row step (equal bits per row) and with one step per tensor
(the allocation of item 2 of the plan: rows then differ in spread). Rates
are bits per index, everything stored counted:

* ``zstd``: zstd level 19 on the narrowest integer array (the 1.0-1.1 writer);
* ``rans``: the ``rans`` section (format 1.2): tables, row classes, lane
  states, escape bits included;
* ``model``: the indices' code length under the tables rans chose (what an
  ideal entropy coder spends with that model); ``rans / model`` is the
  coder's overhead;
* ``H0``: the empirical order-0 entropy of each tensor's indices (one
  histogram a tensor, its cost not counted);
* ``constriction``: constriction's ANS coder (``pip install constriction``,
  optional) with a quantized Gaussian per row (mean and deviation stored
  as 2 float16 each), the parametric alternative.

Decode throughput (million indices per second, best of ``--repeat``, all
tensors of a model) is reported for zstd (reference), rans in numpy and
rans compiled (numba), as ratios to zstd in the same run. Then rate-distortion
optimised quantization (:func:`aqformat.converters.lattice.rdoq`): the
weight SQNR at the rate RDOQ reaches, against plain rounding interpolated to
that rate on its own curve (steps swept), so the gain is at equal rate.
Last, the coders alone against NNCodec's (EfficientNet, silero-vad): all at
one global step, each one's bits at each NNCodec file's weight SQNR
(:func:`nncodec_gap`): the lattice and uniform codecs as files hold them, and
ideal code lengths of rounding and of trellis (dependent) quantization,
order-0 and with neighbour contexts, which split NNCodec's lead between its
two tools.

Usage: nice python -m bench.entropy_bench [--quick | --gap-only] [--models effnet,silero,minilm]
       [--out bench/results/entropy.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import zstandard

from aqformat import rans
from aqformat.converters.lattice import encode_lattice, lattice_step, rdoq_indices
from aqformat.dither import dither
from bench.container_bench import best_of
from bench.report import save_json

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_VALUES = 4096


def matrices(model: str) -> dict[str, np.ndarray]:
    """The model's weight matrices of at least MIN_VALUES values, as ``[rows, cols]`` float32."""
    out: dict[str, np.ndarray] = {}
    if model == "effnet":
        from bench.onnx_models import efficientnet_lite0
        arrays = {k: v.numpy() for k, v in efficientnet_lite0().state_dict().items() if v.ndim >= 2}
    elif model == "minilm":
        from tests.minilm import load_minilm
        arrays = {k: v.numpy() for k, v in load_minilm()[0].state_dict().items() if v.ndim >= 2}
    else:
        import onnx
        import silero_vad
        from onnx import numpy_helper
        m = onnx.load(os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad_16k_op15.onnx"))
        arrays = {}

        def walk(g):
            for t in g.initializer:
                arrays[t.name] = numpy_helper.to_array(t)
            for n in g.node:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        arrays[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)
        walk(m.graph)
    for k, v in arrays.items():
        if v.dtype.kind == "f" and v.ndim >= 2 and v.size >= MIN_VALUES:
            out[k] = np.ascontiguousarray(v.reshape(v.shape[0], -1), np.float32)
    return out


def narrow(q: np.ndarray) -> np.ndarray:
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= q.min() and q.max() <= np.iinfo(dt).max:
            return q.astype(dt)
    raise ValueError("indices exceed int32")


def order0_bits(q: np.ndarray) -> float:
    _, c = np.unique(q, return_counts=True)
    return float(-(c * np.log2(c / q.size)).sum())


def constriction_bytes(q: np.ndarray) -> int | None:
    try:
        import constriction
    except ImportError:
        return None
    coder = constriction.stream.stack.AnsCoder()
    mean, sd = q.mean(1), np.maximum(q.std(1), 0.3)
    model = constriction.stream.model.QuantizedGaussian(int(q.min()) - 1, int(q.max()) + 1)
    coder.encode_reverse(q.reshape(-1).astype(np.int32), model, np.repeat(mean, q.shape[1]),
                         np.repeat(sd, q.shape[1]))
    return int(coder.get_compressed().nbytes) + 4 * q.shape[0]


def steps(W: np.ndarray, bits: float, scope: str) -> np.ndarray:
    s = lattice_step(W, bits)
    return s if scope == "row" else np.full_like(s, np.median(s))


def rates(mats: dict[str, np.ndarray], bits: float, scope: str, repeat: int) -> dict:
    n = 0
    tot = dict(zstd=0.0, rans=0.0, model=0.0, H0=0.0, constriction=0.0)
    streams, zs = [], []
    for i, (name, W) in enumerate(mats.items()):
        q = narrow(encode_lattice(W, steps(W, bits, scope), i + 1)[0])
        m = rans.plan(q)
        s = rans.encode(q, m)
        z = zstandard.ZstdCompressor(level=19).compress(q.tobytes())
        c = constriction_bytes(q)
        n += q.size
        tot["zstd"] += 8 * len(z)
        tot["rans"] += 8 * len(s)
        tot["model"] += rans.model_bits(q, m)
        tot["H0"] += order0_bits(q)
        tot["constriction"] = None if c is None or tot["constriction"] is None else tot["constriction"] + 8 * c
        streams.append((np.frombuffer(s, np.uint8), q.nbytes))
        zs.append(z)
    out = {k: (None if v is None else v / n) for k, v in tot.items()}
    out.update(indices=n, rans_over_model=tot["rans"] / tot["model"], rans_over_H0=tot["rans"] / tot["H0"],
               rans_over_zstd=tot["rans"] / tot["zstd"])
    out["decode"] = throughput(streams, zs, n, repeat)
    return out


def throughput(streams, zs, n: int, repeat: int) -> dict:
    """Million indices a second decoding every tensor: zstd, rans (numpy), rans (compiled)."""
    dz = zstandard.ZstdDecompressor()
    t_zstd = best_of(lambda: [dz.decompress(z) for z in zs], repeat)
    choose = rans._kernel_for
    try:
        rans._kernel_for = lambda n: None
        t_numpy = best_of(lambda: [rans.decode(s, size) for s, size in streams], repeat)
        rans._kernel_for = lambda n: rans._kernel()
        t_comp = best_of(lambda: [rans.decode(s, size) for s, size in streams], repeat) if rans.compiled() else None
    finally:
        rans._kernel_for = choose
    out = {"zstd_M_per_s": n / t_zstd / 1e6, "rans_numpy_M_per_s": n / t_numpy / 1e6,
           "rans_numpy_vs_zstd": t_zstd / t_numpy}
    if t_comp is not None:
        out.update(rans_compiled_M_per_s=n / t_comp / 1e6, rans_compiled_vs_zstd=t_zstd / t_comp)
    return out


def rd_point(mats: dict[str, np.ndarray], step_of: Callable[[np.ndarray], np.ndarray],
             lam: float) -> tuple[float, float]:
    """(bits per weight in rans bytes, weight SQNR in dB) of the model at the per-row steps
    ``step_of(W)``, RDOQ at ``lam``."""
    nbits, err, sig, n = 0, 0.0, 0.0, 0
    for i, (name, W) in enumerate(mats.items()):
        W64 = W.astype(np.float64)
        step = np.asarray(step_of(W), np.float64)
        u = dither(i + 1, W.size).reshape(W.shape)
        q = rdoq_indices(W64 / step[:, None] + u, lam)
        nbits += 8 * len(rans.encode(narrow(q)))
        err += float(np.sum((W64 - (q - u) * step[:, None]) ** 2))
        sig += float(np.sum(W64 ** 2))
        n += W.size
    return nbits / n, 10 * math.log10(sig / err)


def rdoq_gains(mats: dict[str, np.ndarray], bits_list: list[float], lams: list[float]) -> list[dict]:
    grid = np.arange(min(bits_list) - 1, max(bits_list) + 0.75, 0.5)
    plain = [rd_point(mats, lambda W, b=b: lattice_step(W, b), 0.0) for b in grid]
    pr, ps = np.array([p[0] for p in plain]), np.array([p[1] for p in plain])
    out = []
    for bits in bits_list:
        for lam in lams:
            r, s = rd_point(mats, lambda W: lattice_step(W, bits), lam)
            ref = float(np.interp(r, pr, ps))
            out.append({"bits": bits, "lambda": lam, "rate": r, "sqnr_db": s, "plain_sqnr_db_at_rate": ref,
                        "gain_db": s - ref})
    return out


#: The 4-state machine of dependent quantization (MPEG NNR, VVC): next state by the parity of the
#: index just coded; states 0 and 1 reconstruct on even multiples of the half step, 2 and 3 on odd ones.
TRELLIS_NEXT = np.array([[0, 2], [2, 0], [1, 3], [3, 1]], np.int64)


def _trellis_levels(k: np.ndarray, odd: np.ndarray | bool) -> np.ndarray:
    """Reconstruction of index ``k`` in half steps: ``2k`` on the even quantizer, ``2k - sgn(k)`` on the odd."""
    return np.where(odd, 2 * k - np.sign(k), 2 * k)


def trellis_quantize(W: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Dependent (trellis-coded) quantization of each row of ``W`` at ``step``: the indices of least
    squared error through the 4-state machine (Viterbi, every row at once, a loop over columns) and
    the weights they decode to. An experiment for the coder gap: no codec of the format decodes it."""
    R, C = W.shape
    x = W.astype(np.float64) / (step / 2)
    cost = np.full((R, 4), np.inf)
    cost[:, 0] = 0.0
    came, took = np.zeros((C, R, 4), np.int8), np.zeros((C, R, 4), np.int64)
    rows, near = np.arange(R), np.arange(-2, 3)
    for j in range(C):
        k = np.rint(x[:, j] / 2).astype(np.int64)[:, None] + near  # candidates around the even quantizer's
        arc = {}
        for odd in (0, 1):
            err = (x[:, j, None] - _trellis_levels(k, bool(odd))) ** 2
            for parity in (0, 1):
                e = np.where((k & 1) == parity, err, np.inf)
                i = np.argmin(e, axis=1)
                arc[odd, parity] = e[rows, i], k[rows, i]
        new = np.full((R, 4), np.inf)
        for state in range(4):
            for parity in (0, 1):
                e, kk = arc[int(state >= 2), parity]
                to = TRELLIS_NEXT[state, parity]
                better = cost[:, state] + e < new[:, to]
                new[:, to] = np.where(better, cost[:, state] + e, new[:, to])
                came[j, :, to] = np.where(better, state, came[j, :, to])
                took[j, :, to] = np.where(better, kk, took[j, :, to])
        cost = new
    q = np.empty((R, C), np.int64)
    state = np.argmin(cost, axis=1)
    for j in range(C - 1, -1, -1):
        q[:, j] = took[j, rows, state]
        state = came[j, rows, state]
    state, dec = np.zeros(R, np.int64), np.empty((R, C))
    for j in range(C):
        dec[:, j] = _trellis_levels(q[:, j], state >= 2) * (step / 2)
        state = TRELLIS_NEXT[state, q[:, j] & 1]
    return q, dec


def context_bits(q: np.ndarray) -> float:
    """Ideal bits of ``q`` under a static model per context, the context the sum of the two
    previous magnitudes in the row (capped at 5, as DeepCABAC's neighbour contexts), tables not counted."""
    a = np.abs(q)
    ctx = np.zeros_like(a)
    ctx[:, 1:] += a[:, :-1]
    ctx[:, 2:] += a[:, :-2]
    ctx = np.minimum(ctx, 5).ravel()
    flat = q.ravel()
    return sum(order0_bits(flat[ctx == c]) for c in np.unique(ctx))


def _coders(W: np.ndarray, step: float, seed: int, lam: float) -> dict[str, tuple[float, float]]:
    """``{coder: (bits, squared error)}`` of ``W`` at one ``step``: the lattice and uniform codecs as
    the converter writes them (RDOQ at ``lam``, the rans or rans-context bytes), and ideal code lengths of plain
    rounding and of trellis quantization, order-0 and with neighbour contexts."""
    W64 = W.astype(np.float64)
    u = dither(seed, W.size).reshape(W.shape)
    out = {}
    for name, d in (("lattice, as written", u), ("uniform, as written", 0.0)):
        q = rdoq_indices(W64 / step + d, lam)
        out[name] = 8 * len(rans.encode(narrow(q))), float(np.sum((W64 - (q - d) * step) ** 2))
    q = np.rint(W64 / step).astype(np.int64)
    err = float(np.sum((W64 - q * step) ** 2))
    out["rounding, order-0"], out["rounding, contexts"] = (order0_bits(q), err), (context_bits(q), err)
    q, dec = trellis_quantize(W, step)
    err = float(np.sum((W64 - dec) ** 2))
    out["trellis, order-0"], out["trellis, contexts"] = (order0_bits(q), err), (context_bits(q), err)
    return out


def nncodec_gap(mats: dict[str, np.ndarray], qps: list[int]) -> list[dict]:
    """NNCodec against the format's coders and two it lacks, all at one global step (NNCodec's
    allocation): each one's bits per weight at the weight SQNR of each NNCodec file, interpolated on
    a sweep of steps (:func:`_coders`). The lattice and uniform rows are what files hold; the
    rounding and trellis rows split what is left of NNCodec's lead between DeepCABAC's context
    modelling and its dependent quantization."""
    import tempfile

    from aqformat.converters.lattice import RDOQ_LAMBDA
    from bench import baselines as B
    n = sum(W.size for W in mats.values())
    sig = sum(float(np.sum(np.square(W, dtype=np.float64))) for W in mats.values())
    curves: dict[str, list[tuple[float, float]]] = {}
    for k in range(4, 22):
        step = 2.0 ** (-k / 2)
        total: dict[str, list[float]] = {}
        for i, W in enumerate(mats.values()):
            for name, (bits, err) in _coders(W, step, i + 1, RDOQ_LAMBDA).items():
                t = total.setdefault(name, [0.0, 0.0])
                t[0], t[1] = t[0] + bits, t[1] + err
        for name, (bits, err) in total.items():
            curves.setdefault(name, []).append((10 * math.log10(sig / err), bits / n))
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for qp in qps:
            p = B.nncodec({k: (W, None) for k, W in mats.items()}, folder, qp)
            err = sum(float(np.sum((p.decoded[k].astype(np.float64) - W) ** 2)) for k, W in mats.items())
            s = 10 * math.log10(sig / err)
            row = {"qp": qp, "sqnr_db": s, "nncodec_bits": 8 * p.bytes_counted / n, "bits_at_sqnr": {}}
            for name, pts in curves.items():
                pts = sorted(pts)
                sq, bits = np.array([a for a, _ in pts]), np.array([b for _, b in pts])
                row["bits_at_sqnr"][name] = float(np.interp(s, sq, bits)) if sq[0] <= s <= sq[-1] else None
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="effnet,silero,minilm")
    p.add_argument("--quick", action="store_true", help="4 bits only, no RDOQ sweep")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gap-only", action="store_true",
                   help="only the coder gap to NNCodec (effnet, silero), written to results/coder_gap.json")
    p.add_argument("--out", default=None, help="default results/entropy.json (coder_gap.json with --gap-only)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results", "coder_gap.json" if args.gap_only else "entropy.json")
    bits_list = [] if args.gap_only else [4.0] if args.quick else [3.0, 4.0, 5.0, 6.0]
    results: dict = {}
    for model in args.models.split(","):
        mats = matrices(model)
        results[model] = {} if args.gap_only else {"rates": {}, "rdoq": None}
        for scope in ("row", "tensor"):
            for bits in bits_list:
                r = rates(mats, bits, scope, args.repeat)
                results[model]["rates"][f"{scope} step, {bits:g} bits"] = r
                d = r["decode"]
                print(f"{model:7s} {scope:6s} step {bits:g} bits: bits/index zstd {r['zstd']:.3f} rans {r['rans']:.3f} "
                      f"model {r['model']:.3f} H0 {r['H0']:.3f} constriction "
                      f"{'-' if r['constriction'] is None else format(r['constriction'], '.3f')} | rans/model "
                      f"{r['rans_over_model']:.4f} rans/H0 {r['rans_over_H0']:.4f} rans/zstd {r['rans_over_zstd']:.3f} | "
                      f"decode M/s zstd {d['zstd_M_per_s']:.0f} rans numpy {d['rans_numpy_M_per_s']:.1f} "
                      f"compiled {d.get('rans_compiled_M_per_s', float('nan')):.0f}", flush=True)
        if not args.quick and not args.gap_only and model != "minilm":  # MiniLM: 22M weights, the sweep takes too long
            results[model]["rdoq"] = rdoq_gains(mats, [2.0, 3.0, 4.0, 5.0], [0.05, 0.1, 0.2])
            for g in results[model]["rdoq"]:
                print(f"{model:7s} RDOQ {g['bits']:g} bits lambda {g['lambda']}: rate {g['rate']:.3f} "
                      f"SQNR {g['sqnr_db']:.2f} dB, plain at that rate {g['plain_sqnr_db_at_rate']:.2f} dB, "
                      f"gain {g['gain_db']:+.2f} dB", flush=True)
        if model != "minilm":
            results[model]["nncodec_gap"] = nncodec_gap(mats, [-32, -26, -20] if args.quick else [-38, -32, -26, -20, -14])
            for g in results[model]["nncodec_gap"]:
                ours = ", ".join(f"{k} {'-' if v is None else format(v, '.3f')}" for k, v in g["bits_at_sqnr"].items())
                print(f"{model:7s} one global step, NNCodec QP {g['qp']}: {g['sqnr_db']:.2f} dB at "
                      f"{g['nncodec_bits']:.3f} b/w; at that SQNR: {ours}", flush=True)
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
