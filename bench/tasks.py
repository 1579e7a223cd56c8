"""Task metrics of the benchmark models (besides MiniLM's, in tests/minilm.py).

- silero-vad: speech probability per 32 ms frame on speech synthesized with
  espeak-ng (several sentences, voices and speeds, separated by silences,
  with a little background noise), streamed through ONNX Runtime sessions the
  way silero-vad's wrapper does (512-sample chunks at 16 kHz plus 64 samples
  of context, state carried over).
  Metrics: max/mean absolute probability difference to the original model
  and agreement of the speech decision at threshold 0.5.
- digits: a small CNN trained here on scikit-learn's bundled 8x8 digits
  (real labels, fixed seed, stratified 70/30 split); metric: top-1 test
  accuracy and agreement with the original model's predictions.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

SR = 16000
CHUNK = 512
CONTEXT = 64  # samples of the previous chunk silero-vad prepends at 16 kHz
_SENTENCES = (
    "The meeting has been moved to Thursday afternoon at three o'clock.",
    "Please remember to bring the signed documents and your identification.",
    "Rain is expected across the northern region later this evening.",
    "She opened the window and listened to the birds in the garden.",
    "Our train was delayed by almost forty minutes because of the storm.",
    "Turn left at the second traffic light and continue straight ahead.",
    "The library will be closed on Monday for maintenance work.",
    "He counted slowly from one to twenty before opening his eyes.",
    "Could you tell me where the nearest pharmacy is located?",
    "The results of the experiment were better than anyone had expected.",
    "Fresh bread and coffee were waiting on the kitchen table.",
    "Every student must submit the final report before the end of May.",
)
_VOICES = ("en-us", "en", "en-us+f3", "en+m3")


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance from espeak-ng, resampled to 16 kHz float32."""
    from scipy.signal import resample_poly
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "u.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text],
                       check=True, capture_output=True)
        with wave.open(path) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    g = np.gcd(rate, SR)
    return resample_poly(x, SR // g, rate // g).astype(np.float32)


def _synthetic_utterance(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal (fallback without espeak-ng)."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 0.5
    return (0.3 * voiced * syllables / np.max(np.abs(voiced))).astype(np.float32)


def speech_audio(n_utterances: int = 12, seed: int = 0, texts: Sequence[str] = _SENTENCES) -> tuple[np.ndarray, str]:
    """Deterministic 16 kHz test audio: utterances of ``texts`` at varied levels separated by 0.4-1.6 s
    of background noise.

    Returns the signal and its source (``"espeak-ng"`` or ``"synthetic"``
    when espeak-ng is not installed).
    """
    rng = np.random.default_rng(seed)
    have_espeak = shutil.which("espeak-ng") is not None
    parts = [np.zeros(int(0.8 * SR), np.float32)]
    for i in range(n_utterances):
        if have_espeak:
            u = _espeak(texts[i % len(texts)], _VOICES[i % len(_VOICES)],
                        int(rng.integers(130, 190)), int(rng.integers(35, 70)))
        else:
            u = _synthetic_utterance(rng, rng.uniform(1.5, 3.0))
        parts += [u * rng.uniform(0.15, 1.0), np.zeros(int(rng.uniform(0.4, 1.6) * SR), np.float32)]
    x = np.concatenate(parts)
    x += rng.normal(0, 1e-2, x.shape).astype(np.float32)  # background noise: some frames near 0.5
    return x.astype(np.float32), "espeak-ng" if have_espeak else "synthetic"


def vad_stream(session: Any, audio: np.ndarray) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    """Each 512-sample chunk's feed and the speech probability ``session`` gives it, streamed as
    silero-vad's own wrapper does.

    Each call sees the last 64 samples of the previous chunk followed by the
    chunk (576 samples) and the recurrent state of the previous call.
    ``session`` is anything with ONNX Runtime's ``run(None, feeds)``
    (``onnxruntime.InferenceSession`` or ``aqformat.runtime.InferenceSession``).
    """
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = np.array(SR, np.int64)
    for i in range(len(audio) // CHUNK):
        x = np.concatenate([context, audio[None, i * CHUNK:(i + 1) * CHUNK]], axis=1)
        feed = {"input": x, "state": state, "sr": sr}
        prob, state = session.run(None, feed)
        yield feed, float(np.ravel(prob)[0])
        context = x[:, -CONTEXT:]


def vad_probs(session: Any, audio: np.ndarray) -> np.ndarray:
    """Speech probability per 512-sample chunk (:func:`vad_stream`)."""
    return np.array([p for _, p in vad_stream(session, audio)], np.float32)


def vad_metrics(ref: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Max/mean abs probability difference and speech-decision agreement to ``ref``."""
    diff = np.abs(ref - probs)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "agreement": float(np.mean((ref >= threshold) == (probs >= threshold)))}


# ------------------------------------------------------------------ digits CNN

def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as ``[n, 1, 8, 8]`` float32 in [0, 1]: train/test split 70/30."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    return Xtr, ytr.astype(np.int64), Xte, yte.astype(np.int64)


def digits_cnn():
    """The architecture: 3 conv layers (16/32/64 channels) and a 256-128-10 classifier."""
    import torch.nn as nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def train_digits(Xtr: np.ndarray, ytr: np.ndarray, epochs: int = 40, seed: int = 0):
    """Train :func:`digits_cnn` with Adam: the same model under ``seed`` on every machine and in every
    run (on one thread: the kernels' sums, and so the weights, depend on the thread count)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = digits_cnn()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        X, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(X), generator=g).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def digits_predict(model, X: np.ndarray) -> np.ndarray:
    """Predicted classes."""
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(X)).argmax(1).numpy()


def digits_metrics(pred: np.ndarray, ref_pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and agreement with the original model's predictions."""
    return {"top1": float(np.mean(pred == y)), "agreement": float(np.mean(pred == ref_pred))}


def ort_session(model: Any, threads: int = 2):
    """ONNX Runtime CPU session from a path or serialized bytes."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def onnx_with_weights(model: Any, arrays: dict[str, np.ndarray]) -> bytes:
    """Serialized copy of ONNX ``model`` with the main-graph initializers in ``arrays`` replaced."""
    import onnx
    from onnx import numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in arrays:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array(np.asarray(arrays[t.name]).astype(dtype), t.name))
    return m.SerializeToString()


def run_quietly(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with warnings silenced (exporters and quantizers are chatty)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()
