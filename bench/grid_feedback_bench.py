"""Calibrated lattice and uniform indices rounded with error feedback, against plain rounding, on
EfficientNet-Lite0 from its ONNX export.

Each setting is converted twice with the default codec (auto) and the same calibration crops: as
the converter does it (the grid codecs' indices chosen with GPTQ's error feedback under each
layer's ``X^T X``, :func:`aqformat.converters.lattice.feedback_indices`) and with the feedback off
(plain rounding, as before it existed). Reported per file: the whole-file ratio to the .onnx file,
bits per parameter (the whole file over every parameter), top-1 agreement, top-5 overlap and KL
against fp32 on photo crops.

Usage: python -m bench.grid_feedback_bench [--bits 4 3] [--eighth] [--eval 400] [--calib 256]
                                           [--out bench/results/grid_feedback.json]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Any
from unittest import mock

import numpy as np

from bench import onnx_models as om
from bench import report
from bench.report import save_json


def _convert(path: str, out: str, calib: str, feedback: bool, x: np.ndarray, ref: np.ndarray,
             **kw: Any) -> dict[str, Any]:
    from aqformat.converters import codec_choice, from_onnx
    off = mock.patch.object(codec_choice._Candidate, "feedback", property(lambda self: None))
    t0 = time.monotonic()
    with contextlib.nullcontext() if feedback else off:
        s = from_onnx(path, out, calib=calib, progress=False, **kw)
    seconds = round(time.monotonic() - t0, 1)
    m = om.classifier_metrics(ref, om.session_logits(om.aqm_session(out), x))
    row = {"feedback": feedback, **kw, "file_bytes": os.path.getsize(out),
           "whole_file_ratio": round(os.path.getsize(path) / os.path.getsize(out), 3),
           "file_bits_per_parameter": round(s.bits_per_weight, 3),
           "seconds": seconds, **{k: round(v, 4) for k, v in m.items()}}
    os.unlink(out)
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="*", default=[4.0, 3.0])
    ap.add_argument("--eighth", action="store_true",
                    help="also --target-size of 1/8 of the .onnx file (the 8x whole-file target)")
    ap.add_argument("--eval", type=int, default=400, help="photo crops evaluated (the full bench's)")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (the full bench's)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grid_feedback.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path, x, ref, calib = om.efficientnet_bench(tmp, args.eval, args.calib)
        settings = [{"bits": b} for b in args.bits]
        if args.eighth:
            settings.insert(1, {"target_size": os.path.getsize(path) // int(report.WHOLE_FILE_TARGET)})
        rows = []
        for kw in settings:
            for feedback in (True, False):
                rows.append(_convert(path, os.path.join(tmp, "m.aqm"), calib, feedback, x, ref, **kw))
                save_json(args.out, {"model": "EfficientNet-Lite0 (ImageNet), exported to ONNX",
                                     "eval_crops": args.eval, "calib_crops": args.calib,
                                     "onnx_file_bytes": os.path.getsize(path), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
