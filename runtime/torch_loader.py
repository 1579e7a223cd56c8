"""Fill a PyTorch module from an .aqm file, eagerly or lazily.

Lazy loading swaps every stored parameter and buffer for a placeholder of
its shape and dtype that holds no memory (one NaN seen at every index) and registers a forward pre-hook on each module that owns some:
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
from .compressed import tracing
from .torch_decode import decode_tensor

_LIST_LIMIT = 10


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(repr(n) for n in names[:_LIST_LIMIT]) + more


def load_torch(path: str | os.PathLike, model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
               lazy: bool = True, budget_bytes: int | None = None, strict: bool = True,
               resident: str = "decoded") -> torch.nn.Module:
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
    resident : {"decoded", "compressed"}
        ``"compressed"`` replaces each ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``
        and ``nn.Embedding`` whose weight is AQ-coded by a module that computes
        from the codes (:mod:`aqformat.runtime.compressed`): the weights stay
        compressed in memory; the other tensors are decoded now (``lazy`` and
        ``budget_bytes`` do not apply). On the CPU they compute with the
        compiled kernels (numpy without numba); on another device, with torch
        operations there, decoding a block of rows at a time.

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
    Before its module first runs (and after the cache evicts it), a lazily
    loaded tensor has its real shape and dtype but holds NaN (integers: their
    lowest value), so code that reads ``module.weight`` outside that module's
    forward (e.g. a tied output head using ``embedding.weight`` elsewhere)
    gets NaN, never plausible zeros: use ``lazy=False`` for such models.
    ``state_dict()`` always holds the decoded values; ``.to()`` and ``.half()``
    apply to the values decoded afterwards; ``copy.deepcopy``, tracing and
    ``torch.onnx.export`` raise AqmInputError (load with ``lazy=False`` to copy
    or export; a ``resident="compressed"`` model exports with decoded weights).
    """
    if resident not in ("decoded", "compressed"):
        raise AqmInputError(f"resident must be 'decoded' or 'compressed', got {resident!r}")
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
    if resident == "compressed":
        from .compressed import weights_left_out
        done = _compress_modules(f, model, targets, present, device)
        with weights_left_out():  # state_dict() below must not decode the compressed weights
            return _fill(f, model, {k: v for k, v in targets.items() if k not in done},
                         [k for k in present if k not in done], device, False, None)
    return _fill(f, model, targets, present, device, lazy, budget_bytes)


def _fill(f: Any, model: torch.nn.Module, targets: dict[str, torch.Tensor], present: list[str],
          device: torch.device, lazy: bool, budget_bytes: int | None) -> torch.nn.Module:
    """Decode the tensors ``present`` into ``model`` now, or install the hooks that decode them lazily."""
    if lazy and budget_bytes is not None:
        _check_budget(model, targets, present, budget_bytes)
    _rebind(model, {id(targets[k]) for k in present}, device)
    targets = model.state_dict(keep_vars=True)
    key_of = _first_keys(targets, present)
    # where each decoded value goes: (module, attribute) slots, found again at every binding because
    # .half() or .to() after loading replace buffers by new tensors
    bound: dict[str, list[Slot]] = defaultdict(list)
    for k in present:
        owner, _, local = k.rpartition(".")
        slot = (model.get_submodule(owner), local)
        key = key_of[id(targets[k])]
        if not any(m is slot[0] and n == local for m, n in bound[key]):
            bound[key].append(slot)
    codebooks: dict[str, torch.Tensor] = {}

    def decode(key: str) -> torch.Tensor:
        return decode_tensor(f, key, device, _tensor(bound[key][0]).dtype, codebooks)

    stranded = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if stranded:
        raise AqmInputError(f"tensor(s) {_listing(stranded)} are on the meta device and not in {f.path}; "
                            "materialize them (e.g. non-persistent buffers) before loading")
    if not lazy:
        with torch.no_grad():
            for key, slots in bound.items():
                value = decode(key)
                for slot in slots:
                    _bind(slot, value)
        codebooks.clear()
        model.aqm_cache = None
        return model

    shapes = {key: tuple(f.info(key).shape) for key in bound}

    def evict(key: str) -> None:
        for slot in bound[key]:
            t = _tensor(slot)
            _bind(slot, _placeholder(shapes[key], t.dtype, t.device))

    cache = WeightCache(budget_bytes, on_evict=evict)
    owned = _keys_by_module(model, key_of)
    for key in bound:
        evict(key)
    modules = dict(model.named_modules())
    for mod_name, keys in owned.items():
        _install_hooks(modules[mod_name], keys, cache, bound, decode)
    _decode_in_state_dict(model, {k: key_of[id(targets[k])] for k in present}, cache, decode)
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


def _compress_modules(f: Any, model: torch.nn.Module, targets: dict[str, torch.Tensor],
                      present: list[str], device: torch.device) -> set[str]:
    """Replace the modules whose weight is AQ-coded by compressed ones on ``device``; return the keys they took."""
    from ..codecs.aq import NAME as AQ
    from .compressed import AQWeight, compress, replaceable
    uses: dict[int, int] = defaultdict(int)
    for k in present:
        uses[id(targets[k])] += 1
    codebooks: dict = {}
    done: set[str] = set()
    for name, mod in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if not name or key not in present or f.info(key).codec != AQ or uses[id(targets[key])] > 1:
            continue  # tied weights stay ordinary tensors: another module reads them
        aq = AQWeight.from_file(f, key, codebooks)
        if not replaceable(mod, aq):
            continue
        bkey = f"{name}.bias" if name else "bias"
        bias = getattr(mod, "bias", None)
        if bkey in present and uses[id(targets[bkey])] == 1:
            bias = decode_tensor(f, bkey, "cpu", targets[bkey].dtype)
            done.add(bkey)
        elif bias is not None and bias.is_meta:
            raise AqmInputError(f"{bkey!r} is on the meta device and not in {f.path}")
        new = compress(mod, aq, bias)
        if device.type != "cpu":
            new.to(device)
        parent, _, local = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, local, new)
        done.add(key)
    return done


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


def _decode_in_state_dict(model: torch.nn.Module, cache_key: dict[str, str], cache: WeightCache,
                          decode: Any) -> None:
    """Make ``model.state_dict()`` hold decoded values, whatever the cache holds right now."""
    def decoded_state(module: torch.nn.Module, state: dict, prefix: str, meta: Any) -> None:
        for k, key in cache_key.items():
            entry = state.get(prefix + k)
            if entry is not None and key not in cache:
                value = decode(key).to(entry.dtype)
                state[prefix + k] = torch.nn.Parameter(value, entry.requires_grad) \
                    if isinstance(entry, torch.nn.Parameter) else value

    model.register_state_dict_post_hook(decoded_state)


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` holding one value: NaN (floats), the lowest integer, or True.

    A lazily loaded tensor shows its real shape and dtype before it is decoded;
    its values are a visible marker, never zeros that would pass for weights.
    """
    if dtype.is_floating_point or dtype.is_complex:
        fill: Any = float("nan")
    elif dtype == torch.bool:
        fill = True
    else:
        fill = torch.iinfo(dtype).min
    return torch.full((1,) * len(shape), fill, dtype=dtype, device=device).expand(shape)


Slot = tuple[torch.nn.Module, str]


def _tensor(slot: Slot) -> torch.Tensor:
    mod, local = slot
    p = mod._parameters.get(local)
    return p if p is not None else mod._buffers[local]


def _bind(slot: Slot, value: torch.Tensor) -> None:
    """Put ``value`` in ``slot``, converted to the dtype and device the tensor there has now."""
    mod, local = slot
    t = _tensor(slot)
    if (value.dtype, value.device) != (t.dtype, t.device):  # .half() / .to() since loading
        value = value.to(t.device, t.dtype)
    if local in mod._parameters:
        t.data = value  # the Parameter object stays (optimizers and tied modules hold it)
    else:
        mod._buffers[local] = value


def _install_hooks(module: torch.nn.Module, keys: list[str], cache: WeightCache,
                   bound: dict[str, list[Slot]], decode: Any) -> None:
    def pre_hook(mod: torch.nn.Module, args: Any) -> None:
        if tracing():
            raise AqmInputError("a lazily loaded model cannot be traced or exported (torch.onnx.export, "
                                "torch.jit.trace, torch.export): its weights are decoded on first use; "
                                "load it with load_torch(..., lazy=False) first")
        cache.pin(keys)
        for key in keys:
            value = cache.get(key, lambda key=key: decode(key))
            for slot in bound[key]:
                _bind(slot, value)

    def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> None:
        cache.unpin(keys)

    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(post_hook, always_call=True)
