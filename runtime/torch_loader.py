"""Fill a PyTorch module from an .aqm file, eagerly or lazily.

Lazy loading swaps every stored parameter and buffer for an empty
placeholder and registers a forward pre-hook on each module that owns some:
the module's tensors are decoded (on the target device) when it first runs,
kept in a :class:`WeightCache`, pinned while the module's forward runs, and
turned back into placeholders when the cache evicts them under its budget.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch

from .. import open as open_aqm
from ..errors import AqmInputError
from .cache import WeightCache
from .torch_decode import decode_tensor

_LIST_LIMIT = 10


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(repr(n) for n in names[:_LIST_LIMIT]) + more


def load_torch(path: str | os.PathLike, model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
               lazy: bool = True, budget_bytes: int | None = None, strict: bool = True) -> torch.nn.Module:
    """Load the weights of an .aqm file into ``model``.

    Parameters
    ----------
    path : str or os.PathLike
        The .aqm file; tensor names are ``state_dict`` keys.
    model : torch.nn.Module
        The module to fill (its architecture is not stored in the file). It may
        have been built on the ``meta`` device.
    device : str or torch.device
        Where weights are decoded and placed.
    lazy : bool
        Decode each module's weights on its first forward instead of now.
    budget_bytes : int, optional
        With ``lazy``, most bytes of decoded weights kept; least recently used
        modules' weights are evicted and decoded again when next needed.
    strict : bool
        Require the file's tensors and the model's ``state_dict`` keys to match,
        as ``load_state_dict(strict=True)`` does.

    Returns
    -------
    torch.nn.Module
        ``model``; its :class:`WeightCache` is ``model.aqm_cache``.

    Raises
    ------
    AqmInputError
        ``model`` is missing, keys or shapes do not match, or ``budget_bytes`` is
        smaller than the weights of one module (the message gives the size).

    Notes
    -----
    A lazily loaded tensor is only valid inside its owning module's forward:
    code that reads ``module.weight`` from elsewhere (e.g. a tied output head
    using ``embedding.weight`` in another module's forward) sees an empty
    placeholder and fails loudly. Use ``lazy=False`` for such models.
    """
    if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes <= 0):
        raise AqmInputError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    f = open_aqm(path)
    if model is None:
        stored = f.graph_format
        what = f"an {stored!r} graph" if stored else "no model program"
        hint = "; for ONNX use aqformat.runtime.InferenceSession" if stored == "onnx" else ""
        raise AqmInputError(f"{f.path} stores {what}, only weights for PyTorch: pass model= "
                            f"(an nn.Module of the original architecture){hint}")
    if not isinstance(model, torch.nn.Module):
        raise AqmInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = _usable_device(device)
    targets = model.state_dict(keep_vars=True)
    present = _matching_keys(f, model, targets, strict)
    if lazy and budget_bytes is not None:
        _check_budget(model, targets, present, budget_bytes)
    _rebind(model, {id(targets[k]) for k in present}, device)
    targets = model.state_dict(keep_vars=True)
    key_of = _first_keys(targets, present)
    bound: dict[str, list[torch.Tensor]] = defaultdict(list)
    for k in present:
        key = key_of[id(targets[k])]
        if not any(t is targets[k] for t in bound[key]):
            bound[key].append(targets[k])
    codebooks: dict[str, torch.Tensor] = {}

    def decode(key: str) -> torch.Tensor:
        return decode_tensor(f, key, device, bound[key][0].dtype, codebooks)

    stranded = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if stranded:
        raise AqmInputError(f"tensor(s) {_listing(stranded)} are on the meta device and not in {f.path}; "
                            "materialize them (e.g. non-persistent buffers) before loading")
    if not lazy:
        with torch.no_grad():
            for key, tensors in bound.items():
                value = decode(key)
                for t in tensors:
                    t.data = value
        codebooks.clear()
        model.aqm_cache = None
        return model

    placeholders = {key: torch.empty(0, dtype=ts[0].dtype, device=device) for key, ts in bound.items()}

    def evict(key: str) -> None:
        for t in bound[key]:
            t.data = placeholders[key]

    cache = WeightCache(budget_bytes, on_evict=evict)
    owned = _keys_by_module(model, key_of)
    for key in bound:
        evict(key)
    modules = dict(model.named_modules())
    for mod_name, keys in owned.items():
        _install_hooks(modules[mod_name], keys, cache, bound, decode)
    model.aqm_cache = cache
    return model


def _usable_device(device: Any) -> torch.device:
    """``device`` as a torch.device on which a tensor can be made, else AqmInputError."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # AssertionError: torch built without CUDA
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AqmInputError(f"device {device!r} is not usable here: {first}") from None
    return dev


def _matching_keys(f, model: torch.nn.Module, targets: dict[str, torch.Tensor], strict: bool) -> list[str]:
    """The ``state_dict`` keys the file holds, with equal shapes; all of them when ``strict``."""
    missing = [k for k in targets if k not in f]
    unexpected = [n for n in f.names() if n not in targets]
    if strict and (missing or unexpected):
        parts = ([f"missing key(s) in the file: {_listing(missing)}"] if missing else []) + \
                ([f"unexpected key(s) in the file: {_listing(unexpected)}"] if unexpected else [])
        raise AqmInputError(f"cannot load {f.path} into {type(model).__name__}: " + "; ".join(parts))
    present = [k for k in targets if k in f]
    for k in present:
        file_shape, model_shape = tuple(f.info(k).shape), tuple(targets[k].shape)
        if file_shape != model_shape:
            raise AqmInputError(f"size mismatch for {k!r}: the file has {list(file_shape)}, the model {list(model_shape)}")
    return present


def _check_budget(model: torch.nn.Module, targets: dict[str, torch.Tensor], present: list[str],
                  budget_bytes: int) -> None:
    """Refuse a lazy-loading budget smaller than one module's weights (naming the size needed)."""
    sizes = {k: targets[k].numel() * targets[k].element_size() for k in present}
    owned = _keys_by_module(model, _first_keys(targets, present))
    per_module = {name: sum(sizes[k] for k in keys) for name, keys in owned.items()}
    worst = max(per_module, key=per_module.get, default=None)
    if worst is not None and per_module[worst] > budget_bytes:
        raise AqmInputError(f"budget_bytes={budget_bytes} is smaller than module {worst or type(model).__name__!r}'s "
                            f"weights; lazy loading needs budget_bytes >= {per_module[worst]}")


def _rebind(model: torch.nn.Module, wanted: set[int], device: torch.device) -> None:
    """Replace the stored tensors that are not on ``device`` (e.g. ``meta``) by empty ones there.

    A tensor's ``.data`` cannot be swapped across devices of different kinds,
    so such parameters are replaced by new Parameter objects (tied ones stay tied).
    """
    new_of: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for local, t in store.items():
                if t is None or id(t) not in wanted or t.device == device:
                    continue
                if id(t) not in new_of:
                    empty = torch.empty(0, dtype=t.dtype, device=device)
                    new_of[id(t)] = (torch.nn.Parameter(empty, requires_grad=t.requires_grad)
                                     if isinstance(t, torch.nn.Parameter) else empty)
                store[local] = new_of[id(t)]


def _first_keys(targets: dict[str, torch.Tensor], present: list[str]) -> dict[int, str]:
    """Tensor id -> its first ``state_dict`` key: tied tensors are decoded once, under that key."""
    key_of: dict[int, str] = {}
    for k in present:
        key_of.setdefault(id(targets[k]), k)
    return key_of


def _keys_by_module(model: torch.nn.Module, key_of: dict[int, str]) -> dict[str, list[str]]:
    """Module name -> cache keys of the tensors it owns directly."""
    owned: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        keys = []
        for local, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            key = key_of.get(id(t)) if t is not None else None
            if key is not None and key not in keys:
                keys.append(key)
        if keys and mod_name not in owned:
            owned[mod_name] = keys
    return owned


def _install_hooks(module: torch.nn.Module, keys: list[str], cache: WeightCache,
                   bound: dict[str, list[torch.Tensor]], decode: Any) -> None:
    def pre_hook(mod: torch.nn.Module, args: Any) -> None:
        cache.pin(keys)
        for key in keys:
            value = cache.get(key, lambda key=key: decode(key))
            for t in bound[key]:
                t.data = value

    def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> None:
        cache.unpin(keys)

    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(post_hook, always_call=True)
