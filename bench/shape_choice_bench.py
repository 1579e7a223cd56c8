"""The AQ codebook shape chosen by ``--bits-per-code auto`` against fixed shapes, on the digits CNN.

The CNN is trained here on scikit-learn's digits (:mod:`bench.tasks`) and
converted at 2, 3 and 4 bits three ways: with the shape chosen by
:mod:`aqformat.converters.shape_choice`, with the default (8-bit codes over
8-vectors) and with the bench's hand setting (4-bit codes over 4-vectors). Printed per file: its bytes, bits per parameter and ratio to
fp32 (whole file), top-1 accuracy and agreement with the fp32 model on the
held-out images, and the codebook groups ``(M, K, d)``.

Usage: ``python -m bench.shape_choice_bench``
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import aqformat
from aqformat.converters import from_torch
from bench import tasks

SETTINGS = (("auto (chosen)", {"bits_per_code": "auto"}), ("8-bit codes, d=8 (default)", {}),
            ("4-bit codes, d=4", {"bits_per_code": 4, "d": 4}))


def silero() -> None:
    import silero_vad

    from aqformat.converters import from_onnx
    from aqformat.runtime import InferenceSession
    audio, source = tasks.speech_audio(12)
    src = os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad_16k_op15.onnx")
    ref = tasks.vad_probs(tasks.ort_session(src, threads=1), audio)
    print(f"silero_vad_16k_op15.onnx, {len(audio) / tasks.SR:.1f} s of {source} audio")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vad.aqm")
        for bits in (3, 4):
            for label, enc in SETTINGS[:2]:
                from_onnx(src, path, bits=bits, codec="aq", progress=False, encoder=enc)
                m = tasks.vad_metrics(ref, tasks.vad_probs(InferenceSession(path), audio))
                with aqformat.open(path) as f:
                    groups = [(g.M, g.K, g.d) for g in f.codebook_groups]
                print(f"--bits {bits} {label:26s} {os.path.getsize(path):8,d} B  mean |dp| {m['mean_abs_diff']:.4f} "
                      f"agreement {m['agreement']:.4f}  groups (M, K, d) {groups}", flush=True)


def digits() -> None:
    Xtr, ytr, Xte, yte = tasks.digits_data()
    model = tasks.train_digits(Xtr, ytr)
    ref = tasks.digits_predict(model, Xte)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    print(f"digits CNN: {params} parameters, {4 * params} bytes in fp32, top-1 "
          f"{tasks.digits_metrics(ref, ref, yte)['top1']:.4f}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "digits.aqm")
        for bits in (2, 3, 4):
            for label, enc in SETTINGS:
                t = time.perf_counter()
                from_torch(model, path, bits=bits, codec="aq", progress=False, encoder=enc)
                with aqformat.open(path) as f:
                    decoded = {n: torch.from_numpy(np.array(f.read(n))) for n in state}
                    groups = [(g.M, g.K, g.d) for g in f.codebook_groups]
                model.load_state_dict({**state, **decoded})
                m = tasks.digits_metrics(tasks.digits_predict(model, Xte), ref, yte)
                model.load_state_dict(state)
                size = os.path.getsize(path)
                print(f"--bits {bits} {label:26s} {size:7,d} B {8 * size / params:5.2f} b/param "
                      f"{4 * params / size:5.2f}x  top-1 {m['top1']:.4f} agreement {m['agreement']:.4f}  "
                      f"groups (M, K, d) {groups}  {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "silero"), default="digits")
    {"digits": digits, "silero": silero}[ap.parse_args().model]()


if __name__ == "__main__":
    main()
