"""BatchNorm folded into the convolutions before coding, against BatchNorm kept apart, at equal
file size: EfficientNet-Lite0 (ImageNet weights, state_dict + its model code), top-1 agreement
with the fp32 model on crops of real photos, without data and with calibration crops.

Usage: python -m bench.bn_fold_bench [--bits 4 3] [--eval 200] [--calib 64] [--beam 4] [--iters 3]
                                     [--out bench/results/bn_fold.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from aqformat.converters import from_torch
from aqformat.runtime import load_torch
from bench import onnx_models as om
from bench.report import save_json


def _logits(model: torch.nn.Module, x: np.ndarray, batch: int = 50) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0])
    ap.add_argument("--eval", type=int, default=200, help="evaluation crops")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (0: data-free rows only)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bn_fold.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = om.efficientnet_lite0()
    x = om.imagenet_batch(np.stack(om.photo_crops(args.eval, seed=0)))
    ref = _logits(model, x)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "lite0.pt")
        torch.save(model.state_dict(), weights)
        calib_path = os.path.join(tmp, "calib.npy")
        np.save(calib_path, om.imagenet_batch(np.stack(om.photo_crops(args.calib, seed=1))) if args.calib else 0)
        for bits in args.bits:
            for calib in ([None, calib_path] if args.calib else [None]):
                for fold in (False, True):
                    out = os.path.join(tmp, "m.aqm")
                    t0 = time.monotonic()
                    s = from_torch(weights, out, bits=bits, codec="aq", calib=calib, progress=False,
                                   model_code=om.efficientnet_lite0, fold_batchnorm=fold,
                                   encoder={"beam": args.beam, "iters": args.iters})
                    got = _logits(load_torch(out, model=om.efficientnet_lite0(), lazy=False).eval(), x)
                    row = {"bits": bits, "calibration_crops": args.calib if calib else 0, "folded": fold,
                           "file_bytes": os.path.getsize(out), "ratio": s.ratio,
                           "bits_per_weight": s.bits_per_weight, "seconds": time.monotonic() - t0,
                           **om.classifier_metrics(ref, got)}
                    rows.append(row)
                    print(row, flush=True)
                    os.unlink(out)
    save_json(args.out, {"model": "EfficientNet-Lite0 (ImageNet), state_dict + model code",
                         "eval_crops": args.eval, "beam": args.beam, "iters": args.iters, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
