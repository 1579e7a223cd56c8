"""Where a converted EfficientNet-Lite0 loses its fidelity: each tensor's share of the KL to fp32.

The default file (``--codec auto`` with the bench's 256 calibration crops, at 1/8 of the ONNX
file: the 8x whole-file target) is read back, and each tensor's decoded values are put alone into
the fp32 ONNX model, which ONNX Runtime runs on the bench's 400 evaluation crops. Reported per
tensor: its codec, stored bytes, share of the file, and the top-1 agreement and KL against fp32 of
the model with that tensor alone coded; then the same with every coded weight (2-D and more) and
with every coded small tensor (biases) at once. The KLs of single tensors add up to about the
whole file's: the ranking says where bits or a better method would pay.

Usage: python -m bench.error_attribution [--aqm FILE] [--eval 400] [--calib 256]
                                         [--out bench/results/error_attribution.json]
(``--aqm``: a file already converted from the bench's ONNX export, instead of converting one.)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np

from bench import onnx_models as om
from bench import report, tasks
from bench.report import save_json


def _metrics(model: Any, arrays: dict[str, np.ndarray], x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    session = tasks.ort_session(tasks.onnx_with_weights(model, arrays))
    return {k: round(v, 6) for k, v in om.classifier_metrics(ref, om.session_logits(session, x, batch=100)).items()}


def attribute(onnx_path: str, aqm_path: str, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Per-tensor rows (largest KL first) and the all-weights and all-small-tensors rows."""
    import onnx
    from onnx import numpy_helper

    import aqformat
    model = onnx.load(onnx_path)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    size = os.path.getsize(aqm_path)
    with aqformat.open(aqm_path) as f:
        coded = {n: f.read(n).astype(np.float32).reshape(shapes[n]) for n in f.names()
                 if n in shapes and f.info(n).codec != "raw"}
        infos = {n: f.info(n) for n in coded}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = []
    for n, value in coded.items():
        if np.array_equal(value, originals[n]):
            continue
        i = infos[n]
        rows.append({"tensor": n, "shape": list(i.shape), "codec": i.codec, "stored_bytes": i.stored_bytes,
                     "file_share": round(i.stored_bytes / size, 4), **_metrics(model, {n: value}, x, ref)})
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: -r["kl"])
    weights = {n: v for n, v in coded.items() if len(shapes[n]) >= 2}
    small = {n: v for n, v in coded.items() if len(shapes[n]) < 2}
    return {"file_bytes": size, "tensors": rows, "sum_of_single_kl": round(sum(r["kl"] for r in rows), 6),
            "all_weights": _metrics(model, weights, x, ref), "all_small_tensors": _metrics(model, small, x, ref),
            "whole_file": _metrics(model, coded, x, ref)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aqm", help="an .aqm converted from the bench's EfficientNet-Lite0 export")
    ap.add_argument("--eval", type=int, default=400, help="photo crops evaluated (the full bench's)")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (the full bench's)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "error_attribution.json"))
    args = ap.parse_args(argv)
    from aqformat.converters import from_onnx
    with tempfile.TemporaryDirectory() as tmp:
        path, x, ref, calib = om.efficientnet_bench(tmp, args.eval, 0 if args.aqm else args.calib)
        aqm = args.aqm
        if aqm is None:
            aqm = os.path.join(tmp, "m.aqm")
            tasks.run_quietly(lambda: from_onnx(path, aqm, calib=calib, progress=False,
                                                target_size=os.path.getsize(path) // int(report.WHOLE_FILE_TARGET)))
        result = attribute(path, aqm, x, ref)
        save_json(args.out, {"model": "EfficientNet-Lite0 (ImageNet), exported to ONNX", "eval_crops": args.eval,
                             "calib_crops": None if args.aqm else args.calib,
                             "converted": args.aqm or "--codec auto --calib, --target-size 1/8 of the .onnx",
                             "onnx_file_bytes": os.path.getsize(path), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
