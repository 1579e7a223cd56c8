"""AQ on i.i.d. Gaussian data: SQNR against the rate-distortion bound.

The bound for a Gaussian source is 6.02 dB per bit (12.04 dB at 2 bits);
Lloyd-Max scalar quantization reaches 9.30 dB at 2 bits. Rates count the
code bits plus the fp16 codebooks over the coded weights. With ``--faiss``
the same data is also coded by faiss ResidualQuantizer (beam search) and
LocalSearchQuantizer (LSQ++), when faiss is installed.

Usage: ``python -m bench.quant_gaussian --n 1048576 --configs 2,8,8 4,8,16 --faiss``
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from aqformat.converters.aq_search import decode_vectors, train_aq
from aqformat.converters.options import AQConfig


def sqnr_db(x: np.ndarray, xh: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return 10 * math.log10(float(np.sum(x.astype(np.float64) ** 2) / np.sum((x - xh).astype(np.float64) ** 2)))


def _faiss_rows(x: np.ndarray, M: int, b: int) -> list[tuple[str, float, float]]:
    try:
        import faiss
    except ImportError:
        return [("faiss not installed", float("nan"), 0.0)]
    out = []
    d = x.shape[1]
    for label, q in (("faiss RQ beam 5", faiss.ResidualQuantizer(d, M, b)),
                     ("faiss LSQ", faiss.LocalSearchQuantizer(d, M, b))):
        if isinstance(q, faiss.ResidualQuantizer):
            q.max_beam_size = 5
        t = time.perf_counter()
        q.train(x)
        xh = q.decode(q.compute_codes(x))
        out.append((label, sqnr_db(x, xh), time.perf_counter() - t))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 20, help="number of Gaussian weights")
    ap.add_argument("--configs", nargs="+", default=["2,8,8"], help="M,b,d triples")
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--faiss", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'method':24s} {'bits/w':>7s} {'SQNR dB':>8s} {'bound':>7s} {'gap':>6s} {'seconds':>8s}")
    for spec in args.configs:
        M, b, d = (int(v) for v in spec.split(","))
        cfg = AQConfig(M=M, b=b, d=d, beam=args.beam, iters=args.iters)
        x = torch.randn(args.n // d, d, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        C, codes = train_aq(x, cfg)
        secs = time.perf_counter() - t
        rate = (x.shape[0] * M * b + 16 * C.numel()) / x.numel()
        bound = 6.0206 * rate
        s = sqnr_db(x.numpy(), decode_vectors(C, codes).numpy())
        print(f"{f'AQ {M}x{b} d{d} beam {cfg.beam}':24s} {rate:7.3f} {s:8.2f} {bound:7.2f} "
              f"{bound - s:6.2f} {secs:8.1f}", flush=True)
        if args.faiss:
            for label, sf, tf in _faiss_rows(x.numpy(), M, b):
                print(f"{label:24s} {M * b / d:7.3f} {sf:8.2f} {6.0206 * M * b / d:7.2f} "
                      f"{6.0206 * M * b / d - sf:6.2f} {tf:8.1f}", flush=True)


if __name__ == "__main__":
    main()
