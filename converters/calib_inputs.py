"""Calibration inputs of an ONNX model, as feeds of numpy arrays (no torch).

``--calib`` for an ONNX source is one of:

- ``.npy``: the model's one input; rows (axis 0) are samples;
- ``.npz``: one array per model input, keyed by input name, rows are samples;
- a folder of images, preprocessed as stated by :class:`ImagePreprocess`
  (ImageNet defaults: shorter side resized to ``size / 0.875``, centre crop of
  ``size``, RGB scaled to [0, 1], normalised by ``mean`` and ``std``);
- a text file, one sentence a line, tokenised with the ``tokenizer.json`` of a
  tokenizer folder (the ``tokenizers`` library).

Every mismatch with the model's inputs (names, dtypes, ranks, fixed
dimensions), an empty or unreadable folder or an unreadable file is a one-line
:class:`~aqformat.errors.AqmInputError`, raised before any encoding starts.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqformat.errors import AqmInputError, AqmWarning

__all__ = ["InputSpec", "ImagePreprocess", "CalibSet", "model_inputs", "load_calibration"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_TEXT_EXTENSIONS = (".txt", ".text")
_MAX_TOKENS = 512  # as the Hugging Face path truncates


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (``None`` for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ImagePreprocess:
    """How images become a model input.

    Attributes
    ----------
    size : int, optional
        Side of the square crop; default the model input's fixed spatial size, else 224.
    resize : int, optional
        The shorter side is resized to this before the centre crop; default ``round(size / 0.875)``.
    mean, std : sequence of float
        Per-channel normalisation of RGB values in [0, 1] (ImageNet's by default).
    layout : {"NCHW", "NHWC"}, optional
        Default: where the model input has a fixed dimension of 3, else NCHW.
    """

    size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str | None = None

    def describe(self, size: int, layout: str) -> str:
        resize = self.resize or round(size / 0.875)
        return (f"resize {resize}, centre crop {size}, mean {list(self.mean)}, std {list(self.std)}, "
                f"{layout}")


@dataclass
class CalibSet:
    """Calibration feeds of an ONNX model.

    Attributes
    ----------
    batches : list of dict
        Feeds for the statistics (``input name -> array``); text comes one
        unpadded sentence a batch, since padding would bias ``X^T X``.
    train : list of dict
        Feeds for fine-tuning: several samples a step (sentences of similar
        length, padded).
    description : str
        What the data is and how it was prepared (for the summary).
    """

    batches: list[dict[str, np.ndarray]]
    train: list[dict[str, np.ndarray]] = field(default_factory=list)
    description: str = ""


def model_inputs(model: Any) -> list[InputSpec]:
    """The inputs an ONNX ``ModelProto`` must be fed (graph inputs that are not initializers)."""
    from onnx import helper
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise AqmInputError(f"model input {vi.name!r} has a type calibration cannot feed") from None
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        out.append(InputSpec(vi.name, dtype, dims))
    return out


def load_calibration(calib: Any, inputs: Sequence[InputSpec], *, tokenizer: str | None = None,
                     image: ImagePreprocess | None = None, batch_size: int = 8) -> CalibSet:
    """Read ``calib`` (a path, or a list of feed dicts) and check it against the model's inputs.

    Parameters
    ----------
    calib : str, os.PathLike or sequence of dict
        ``.npy``, ``.npz``, an image folder, a text file, or feeds already built.
    inputs : sequence of InputSpec
        The model's inputs (:func:`model_inputs`).
    tokenizer : str, optional
        Tokenizer folder (holding ``tokenizer.json``) for text calibration.
    image : ImagePreprocess, optional
        Image preprocessing (ImageNet defaults).
    batch_size : int
        Samples per batch of arrays and images (and per fine-tuning step of text).

    Raises
    ------
    AqmInputError
        The data does not fit the model's inputs, or cannot be read.
    """
    if not inputs:
        raise AqmInputError("the model has no inputs to feed calibration data to")
    if batch_size < 1:
        raise AqmInputError(f"batch size must be >= 1, got {batch_size}")
    if not isinstance(calib, (str, os.PathLike)):
        feeds = [_check_feed(dict(b), inputs, f"calibration batch {i}") for i, b in enumerate(calib)]
        if not feeds:
            raise AqmInputError("calibration set is empty")
        return CalibSet(feeds, feeds, f"{len(feeds)} batches")
    path = os.fspath(calib)
    if os.path.isdir(path):
        return _images(path, inputs, image or ImagePreprocess(), batch_size)
    if not os.path.isfile(path):
        raise AqmInputError(f"no such calibration file or folder: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in _TEXT_EXTENSIONS:
        return _text(path, inputs, tokenizer, batch_size)
    if tokenizer is not None:
        raise AqmInputError(f"--tokenizer is for text calibration (.txt), not {ext or path}")
    if ext == ".npy":
        if len(inputs) != 1:
            raise AqmInputError(f"{path}: a .npy feeds a model with one input; this one has "
                                f"{len(inputs)} ({', '.join(i.name for i in inputs)}): use .npz")
        arrays = {inputs[0].name: _load_npy(path)}
    elif ext == ".npz":
        arrays = _load_npz(path)
    else:
        raise AqmInputError(f"{path}: calibration data for an ONNX model must be .npy, .npz, "
                            "a .txt of sentences (with --tokenizer) or a folder of images")
    return _arrays(path, arrays, inputs, batch_size)


# ------------------------------------------------------------------ arrays

def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AqmInputError(f"{path}: not a readable .npy array ({_first_line(e)})") from None


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise AqmInputError(f"{path}: not a readable .npz archive ({_first_line(e)})") from None


def _arrays(path: str, arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec],
            batch_size: int) -> CalibSet:
    names = [i.name for i in inputs]
    missing, extra = [n for n in names if n not in arrays], [k for k in arrays if k not in names]
    if missing or extra:
        raise AqmInputError(f"{path}: arrays {sorted(arrays)} do not match the model's inputs {names}"
                            + (f" (missing {missing})" if missing else "")
                            + (f" (unknown {extra})" if extra else ""))
    lengths = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise AqmInputError(f"{path}: every array needs the same number of samples (rows) and at "
                            f"least one; got {sorted(lengths)}")
    n = lengths.pop()
    fixed = {i.shape[0] for i in inputs if i.shape and i.shape[0] is not None}
    step = fixed.pop() if len(fixed) == 1 else batch_size  # a fixed batch dimension decides
    if n % step and fixed:
        n -= n % step
    if n == 0:
        raise AqmInputError(f"{path}: fewer samples than the model's fixed batch size {step}")
    feeds = [_check_feed({k: v[i:i + step] for k, v in arrays.items()}, inputs, path)
             for i in range(0, n, step)]
    return CalibSet(feeds, feeds, f"{n} samples from {os.path.basename(path)}")


def _check_feed(feed: dict[str, Any], inputs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Names, dtype kinds, ranks and fixed dimensions of one feed; arrays cast to the input dtypes."""
    names = [i.name for i in inputs]
    if sorted(feed) != sorted(names):
        raise AqmInputError(f"{where}: inputs {sorted(feed)} do not match the model's inputs {names}")
    out = {}
    for spec in inputs:
        a = np.asarray(feed[spec.name])
        if _kind(a.dtype) != _kind(spec.dtype):
            raise AqmInputError(f"{where}: input {spec.name!r} is {a.dtype}, the model takes {spec.dtype}")
        if a.ndim != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, a.shape)):
            want = "x".join("?" if d is None else str(d) for d in spec.shape)
            raise AqmInputError(f"{where}: input {spec.name!r} has shape {list(a.shape)}, the model "
                                f"takes [{want}] (rows are samples)")
        out[spec.name] = np.ascontiguousarray(a, dtype=spec.dtype)
    return out


def _kind(dt: np.dtype) -> str:
    """Castable families: floats take floats, integers take integers."""
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(np.dtype(dt).kind, str(dt))


# ------------------------------------------------------------------ images

def _image_input(inputs: Sequence[InputSpec], pre: ImagePreprocess) -> tuple[InputSpec, int, str]:
    if len(inputs) != 1:
        raise AqmInputError(f"image calibration feeds a model with one input; this one has "
                            f"{len(inputs)} ({', '.join(i.name for i in inputs)})")
    spec = inputs[0]
    if len(spec.shape) != 4 or _kind(spec.dtype) != "float":
        raise AqmInputError(f"image calibration needs a 4-D float input; {spec.name!r} is "
                            f"{spec.dtype} of rank {len(spec.shape)}")
    layout = pre.layout or ("NHWC" if spec.shape[3] == 3 and spec.shape[1] != 3 else "NCHW")
    if layout not in ("NCHW", "NHWC"):
        raise AqmInputError(f"image layout must be NCHW or NHWC, not {layout!r}")
    hw = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    size = pre.size or (hw[0] if hw[0] is not None and hw[0] == hw[1] else 224)
    if len(pre.mean) != 3 or len(pre.std) != 3 or min(pre.std) <= 0 or size < 1:
        raise AqmInputError("image preprocessing needs 3 means, 3 positive stds and a positive size")
    return spec, size, layout


def _images(folder: str, inputs: Sequence[InputSpec], pre: ImagePreprocess, batch_size: int) -> CalibSet:
    spec, size, layout = _image_input(inputs, pre)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise AqmInputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    try:
        from PIL import Image
    except ImportError:
        raise AqmInputError("image calibration needs Pillow (pip install 'aqformat[all]')") from None
    resize = pre.resize or round(size / 0.875)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    images, sizes = [], set()
    for f in files:
        p = os.path.join(folder, f)
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                sizes.add((w, h))
                s = resize / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                arr = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise AqmInputError(f"{p}: unreadable image ({_first_line(e)})") from None
        arr = (arr - mean) / std
        images.append(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)
    if pre.resize is None and sizes == {(size, size)} and resize != size:
        # crops already cut to the input: the default enlarges them (and drops their border), so
        # calibration would see objects bigger than inference does when the app feeds such crops
        warnings.warn(f"{folder}: every image is already {size}x{size}; resizing to {resize} and cropping "
                      f"enlarges them {resize / size:.2f}x: pass --image-resize {size} to calibrate on them "
                      "as they are", AqmWarning, stacklevel=2)
    step, fixed = spec.shape[0] or batch_size, spec.shape[0] is not None
    if fixed and len(images) < step:
        raise AqmInputError(f"{folder}: {len(images)} images, fewer than the model's fixed batch size {step}")
    usable = len(images) - len(images) % step if fixed else len(images)
    feeds = [_check_feed({spec.name: np.stack(images[i:i + step])}, inputs, folder)
             for i in range(0, usable, step)]
    return CalibSet(feeds, feeds, f"{len(images)} images from {folder} ({pre.describe(size, layout)})")


# ------------------------------------------------------------------ text

def _text(path: str, inputs: Sequence[InputSpec], tokenizer: str | None, batch_size: int) -> CalibSet:
    if tokenizer is None:
        raise AqmInputError(f"{path}: text calibration of an ONNX model needs --tokenizer FOLDER "
                            "(a folder with tokenizer.json)")
    tok = _load_tokenizer(tokenizer)
    try:
        with open(path, encoding="utf-8") as fh:
            sentences = [line.strip() for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AqmInputError(f"{path}: unreadable text file ({_first_line(e)})") from None
    if not sentences:
        raise AqmInputError(f"{path}: no sentences")
    names = [i.name for i in inputs]
    produced = {"input_ids", "attention_mask", "token_type_ids"}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise AqmInputError(f"text calibration feeds input_ids, attention_mask and token_type_ids; "
                            f"the model also takes {unknown}")

    def feed(group: list[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(group)
        cols = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        return _check_feed({n: np.asarray(cols[n], np.int64) for n in names}, inputs, path)

    batches = [feed([s]) for s in sentences]  # unpadded: padding would bias X^T X
    ordered = sorted(sentences, key=len)      # fine-tuning: similar lengths, little padding
    train = [feed(ordered[i:i + 2 * batch_size]) for i in range(0, len(ordered), 2 * batch_size)]
    return CalibSet(batches, train, f"{len(sentences)} sentences from {os.path.basename(path)}")


def _load_tokenizer(folder: str):
    file = os.path.join(folder, "tokenizer.json") if os.path.isdir(folder) else folder
    if not os.path.isfile(file):
        raise AqmInputError(f"{folder}: no tokenizer.json (the --tokenizer folder of a Hugging Face model)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise AqmInputError("text calibration needs the tokenizers package") from None
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - the Rust binding raises plain Exception on bad files
        raise AqmInputError(f"{file}: unreadable tokenizer ({_first_line(e)})") from None
    limit = _MAX_TOKENS
    cfg = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as fh:
                limit = min(limit, int(json.load(fh).get("model_max_length", limit)))
        except (OSError, ValueError, TypeError):
            pass  # an unreadable config keeps the default limit
    tok.enable_truncation(max_length=limit)
    pad = tok.padding or {}
    tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad.get("pad_token", "[PAD]"))
    return tok


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
