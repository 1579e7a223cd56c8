"""Fine-tuning of an .aqm model: codes fixed, codebooks and small tensors trained.

The student is the user's architecture whose quantized weights are computed
every step from the shared codebooks (a differentiable gather), so one update
of a group's codebooks improves every layer that shares it. Per-row scales
and the raw float tensors (norms, biases and, by default, tensors kept
uncompressed such as embeddings) are trained too. The objective is
either distillation from the original model on calibration inputs (no labels)
or the user's own task loss. Items held out of training choose the step
whose values are written, so fine-tuning does not give a file worse on
them than the one it started from.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import aqformat
from aqformat import codecs
from aqformat.codecs import affine as affine_codec
from aqformat.codecs import half as half_codec
from aqformat.codecs import aq
from aqformat.codecs.aq import assemble_aq
from aqformat.errors import AqmInputError

from .affine import encode_affine
from .calib import model_output
from .half import encode_half
from .options import FinetuneOptions

_REFRESH_BEAM = 4  # code search width of a refresh
# Every 8th calibration item (given 8 or more) is held out of training; its loss, measured before
# training and about 10 times during it, chooses the step whose values are written.
_HOLD_OUT_EVERY = 8
_HOLD_OUT_MIN = 8
_HOLD_OUT_CHECKS = 10


@dataclass
class FinetuneReport:
    """What a fine-tuning run did."""

    objective: str
    steps: int
    steps_done: int
    loss_first: float
    loss_last: float
    seconds: float
    trained_tensors: int
    stopped_early: str | None = None
    refreshes: int = 0
    train_raw: str = "all"
    held_out: int = 0                     # calibration items kept out of training to choose the result
    held_out_first: float | None = None   # their loss before training
    held_out_kept: float | None = None    # ... and at the kept step
    kept_step: int | None = None          # the step whose values were written (0: the file as coded)

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        refresh = f", {self.refreshes} code refreshes" if self.refreshes else ""
        stop = f" ({self.stopped_early})" if self.stopped_early else ""
        held = (f", held-out loss {self.held_out_first:.4g} -> {self.held_out_kept:.4g} (kept step "
                f"{self.kept_step})" if self.held_out else "")
        return (f"fine-tuned by {self.objective}: {self.steps_done}/{self.steps} steps{refresh}, "
                f"loss {self.loss_first:.4g} -> {self.loss_last:.4g}{held}, {self.seconds:.0f} s{stop}")


def call_model(model, item: Any):
    """Run ``model`` on one calibration item: a dict of kwargs, a tuple of args, or a tensor."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


class _Student:
    """Trainable parameters of an .aqm file and how they rebuild the model's tensors."""

    def __init__(self, f: aqformat.AqmFile, names: set[str], params: set[str], device, train_raw: str):
        import torch
        self.f = f
        self.device = device
        self.groups: dict[str, torch.nn.Parameter] = {}
        self.scales: dict[str, torch.nn.Parameter] = {}
        self.aq: dict[str, tuple] = {}
        self.inv_perm: dict[str, torch.Tensor] = {}  # per permuted AQ tensor, fixed for the run
        self.trainable_raw: dict[str, torch.nn.Parameter] = {}
        # trained affine and half tensors: value -> the coded tensor to write (None: store it raw)
        self.recode: dict[str, Callable[[np.ndarray], Any]] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        for info in f.tensors():
            # tensors decoded through a shared codebook group train that group and their row scales
            if info.name not in names:
                if info.group is not None:
                    raise AqmInputError(f"quantized tensor {info.name!r} of the .aqm is not in the model")
                continue  # e.g. a buffer older library versions saved; copied to the output as is
            if info.group is not None:
                p = aq.parts(f, info.name)
                if info.group not in self.groups:
                    self.groups[info.group] = torch.nn.Parameter(
                        torch.tensor(np.asarray(p.codebooks, np.float32), device=device))
                scale = p.scale if p.scale is not None else np.ones(p.rows, np.float32)
                self.scales[info.name] = torch.nn.Parameter(torch.tensor(np.asarray(scale, np.float32), device=device))
                codes = torch.as_tensor(np.ascontiguousarray(p.codes.T), device=device).long()  # [M, n]
                self.aq[info.name] = (info.group, codes, p.perm, p.axes, info.shape, p.rows, p.cols)
                if p.perm is not None:  # decoded every step: invert the permutation once
                    self.inv_perm[info.name] = torch.as_tensor(np.argsort(p.perm), device=device)
            else:
                value = torch.as_tensor(np.array(f.read(info.name)), device=device)
                # buffers (e.g. BatchNorm running statistics) stay fixed: the model runs in
                # eval mode, where they are constants and not differentiable inputs
                codec = codecs.get(info.codec)
                # affine and half tensors are trained as floats and coded again when written
                scalar = info.codec in _RECODED
                floating = (codec is not None and (codec.verbatim or scalar)
                            and info.dtype in ("float32", "float16", "float64") and info.name in params)
                if floating and (value.dim() == 1 or (train_raw == "all" and value.dim() > 1)):
                    self.trainable_raw[info.name] = torch.nn.Parameter(value.float())
                    if scalar:
                        self.recode[info.name] = _recoder(info.codec, f.record(info.name).fields)
                else:
                    self.fixed[info.name] = value

    def parameters(self) -> list:
        return [*self.groups.values(), *self.scales.values(), *self.trainable_raw.values()]

    def tensors(self) -> dict[str, Any]:
        """Every tensor of the file, the quantized ones decoded differentiably."""
        out = dict(self.fixed)
        out.update(self.trainable_raw)
        for name, (group, codes, _perm, axes, shape, rows, cols) in self.aq.items():
            out[name] = assemble_aq(codes, self.groups[group], self.scales[name], self.inv_perm.get(name),
                                    axes, shape, rows, cols)
        return out

    def refresh_codes(self, originals: dict[str, Any], beam: int) -> None:
        """Re-run the code search of every AQ tensor against the current codebooks.

        Codes and scales are re-fitted to the original weights (plain weight
        error): the codebooks moved during training, so other codewords may now
        be closer. Decoding is unchanged; only the trained values differ.
        """
        import torch

        from .aq_encode import encode_tensor
        from .options import AQConfig
        for name, (group, _codes, perm, axes, shape, rows, cols) in self.aq.items():
            C = self.groups[group].detach()
            M, K, d = C.shape
            cfg = AQConfig(M=M, b=K.bit_length() - 1, d=d, beam=beam)
            t = encode_tensor(name, originals[name], C.float(), cfg, axes=axes, perm=perm, device=self.device)
            codes = torch.as_tensor(np.ascontiguousarray(t.codes.T), device=self.device).long()
            self.aq[name] = (group, codes, perm, axes, shape, rows, cols)
            with torch.no_grad():
                self.scales[name].copy_(torch.as_tensor(t.scale.astype(np.float32)))

    def state(self) -> tuple[list, dict]:
        """Snapshot of the trained values and the codes (a refresh changes both)."""
        return [p.detach().clone() for p in self.parameters()], dict(self.aq)

    def restore(self, state: tuple[list, dict]) -> None:
        import torch
        values, self.aq = state[0], dict(state[1])
        with torch.no_grad():
            for p, v in zip(self.parameters(), values):
                p.copy_(v)


def finetune(aqm_path: str | os.PathLike, out_path: str | os.PathLike, model, calib: Sequence[Any], *,
             loss_fn: Callable[[Any, Any], Any] | None = None,
             forward: Callable[[Any, Any], Any] | None = None, steps: int = 300, lr: float = 1e-3,
             refresh_every: int = 0, train_raw: str = "all", seed: int = 0,
             device: str | None = None, progress: bool = True) -> FinetuneReport:
    """Fine-tune the codebooks, scales and raw float tensors of an .aqm file; write a new .aqm.

    Parameters
    ----------
    aqm_path : str or os.PathLike
        The quantized model. Never modified (unless ``out_path`` is the same
        path and the run succeeds, in which case it is replaced atomically).
    out_path : str or os.PathLike
        Where the fine-tuned file is written.
    model : torch.nn.Module
        The architecture, holding the ORIGINAL weights: it is the teacher for
        distillation and the template of the student.
    calib : sequence
        Calibration items; each is passed to the model as kwargs (dict),
        args (tuple) or a single tensor. With ``loss_fn`` these are the
        user's training batches. Of 8 or more items every 8th is held out:
        its loss, before training and about 10 times during it, chooses the
        step whose values are written (step 0 writes the values as coded).
    loss_fn : callable, optional
        ``loss_fn(outputs, item) -> scalar``: the task objective. Without it,
        the objective is distillation: the mean squared error to the original
        model's outputs, relative to their variance.
    forward : callable, optional
        ``forward(model, item) -> outputs``, for items that are not plain
        model inputs (e.g. ``(x, label)`` batches); default :func:`call_model`.
    steps : int
        Optimiser steps (Adam, cosine-decayed learning rate).
    lr : float
        Peak learning rate.
    refresh_every : int
        Every this many steps, re-run the code search of every quantized
        tensor against the current codebooks (codes closest to the original
        weights, scales re-fitted), as the seed papers do between epochs;
        0 keeps the codes fixed throughout.
    train_raw : {"all", "1d"}
        Which uncompressed float tensors train beside the codebooks and
        scales: ``"all"`` (default) adds those kept raw at conversion, e.g.
        embeddings (MiniLM at 4 bits, 300 steps: embedding cosine 0.9937 -> 0.9944);
        ``"1d"`` trains norms and biases only (less optimiser memory). Rows
        the calibration never reaches, e.g. unseen tokens' embeddings, keep
        their values. Only the model's parameters train: buffers such as
        BatchNorm running statistics keep their values (the student runs in
        eval mode, BatchNorm's affine weight and bias train).
    seed : int
        Seed of the batch order; the run is deterministic under a seed.
    device : str, optional
        ``"cuda"`` when available by default, else ``"cpu"``.
    progress : bool
        Show a progress bar with the loss.

    Returns
    -------
    FinetuneReport
        Also recorded in the output file's metadata under ``"finetune"``.
    """
    import torch

    opts = FinetuneOptions(steps=steps, lr=lr, train_raw=train_raw, refresh_every=refresh_every, seed=seed,
                           device=device, progress=progress)
    task = _Task(list(calib), forward or call_model, loss_fn)
    if not task.calib:
        raise AqmInputError("calibration set is empty")
    if steps < 1:
        raise AqmInputError("steps must be at least 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    # the caller's model serves as the teacher in place (no second copy of it); it is moved to the
    # training device and put in eval mode for the run, then handed back where and as it was
    home = next(itertools.chain(model.parameters(), model.buffers()), None)
    was_training = model.training
    try:
        teacher = model.to(dev).eval()
        student = copy.deepcopy(teacher)
        if loss_fn is None:
            task.targets = _teacher_outputs(teacher, task, dev)
        names = set(student.state_dict())
        params = {n for n, _ in student.named_parameters(remove_duplicate=False)}
        with aqformat.open(aqm_path) as f:
            st = _Student(f, names, params, dev, train_raw)
            originals = teacher.state_dict() if refresh_every else {}
            report = _train(st, student, task, opts, originals, dev)
            _write(f, out_path, st, report)
    finally:
        if home is not None:
            model.to(home.device)
        model.train(was_training)
    return report


@dataclass
class _Task:
    """The training data and objective: items, how to run the model on one, and the loss."""

    calib: list[Any]
    forward: Callable[[Any, Any], Any]
    loss_fn: Callable[[Any, Any], Any] | None
    targets: list[Any] = field(default_factory=list)  # the teacher's outputs, for distillation
    held: list[int] = field(default_factory=list)     # items never trained on: they choose the step kept

    def __post_init__(self) -> None:
        if len(self.calib) >= _HOLD_OUT_MIN:
            self.held = list(range(_HOLD_OUT_EVERY - 1, len(self.calib), _HOLD_OUT_EVERY))

    def trained(self) -> np.ndarray:
        """The indices of the items trained on."""
        return np.setdiff1d(np.arange(len(self.calib)), self.held)

    def run_student(self, student: Any, tensors: dict[str, Any], item: Any) -> Any:
        """The student's outputs on ``item`` with its parameters and buffers replaced by ``tensors``."""
        from torch.func import functional_call
        return self.forward(lambda *a, **k: functional_call(student, tensors, a, k), item)

    def loss(self, out: Any, i: int, item: Any) -> Any:
        """The task loss, or the distillation loss: MSE to the teacher relative to its variance."""
        import torch
        if self.loss_fn is not None:
            return self.loss_fn(out, item)
        y, t = model_output(out), self.targets[i]
        return torch.mean((y - t) ** 2) / t.var().clamp_min(1e-12)


class _Keeper:
    """The held-out loss, measured before training and about :data:`_HOLD_OUT_CHECKS` times during it;
    the values of the step where it was lowest are the ones written (step 0: the file as coded), so
    fine-tuning that over-fits its training items gives back what it lost."""

    def __init__(self, st: _Student, student: Any, task: _Task, dev: Any, steps: int):
        self.st, self.student, self.task, self.dev = st, student, task, dev
        self.every = max(1, steps // _HOLD_OUT_CHECKS)
        self.first = self.best = self._loss() if task.held else None
        self.best_step, self.checked, self.best_state = 0, 0, st.state() if task.held else None

    def _loss(self) -> float:
        import torch
        total = 0.0
        with torch.no_grad():
            tensors = self.st.tensors()  # decoded once for all the held-out items
            for i in self.task.held:
                item = _to(self.task.calib[i], self.dev)
                total += float(self.task.loss(self.task.run_student(self.student, tensors, item), i, item))
        return total / len(self.task.held)

    def check(self, done: int, final: bool = False) -> None:
        """Measure at every ``every`` steps (and at the end); remember the best step's values."""
        if not self.task.held or done == self.checked or (done % self.every and not final):
            return
        self.checked = done
        value = self._loss()
        if value < self.best:
            self.best, self.best_step, self.best_state = value, done, self.st.state()

    def finish(self, done: int) -> dict[str, Any]:
        """Put the best step's values back; the report's held-out fields."""
        if not self.task.held:
            return {}
        self.check(done, final=True)
        if self.best_step != done:
            self.st.restore(self.best_state)
        return {"held_out": len(self.task.held), "held_out_first": self.first, "held_out_kept": self.best,
                "kept_step": self.best_step}


def _teacher_outputs(teacher: Any, task: _Task, dev: Any) -> list[Any]:
    """The original model's output on every calibration item (the distillation targets)."""
    import torch
    out = []
    with torch.no_grad():
        for item in task.calib:
            try:
                out.append(model_output(task.forward(teacher, _to(item, dev))).detach())
            except (TypeError, ValueError, RuntimeError) as e:
                raise AqmInputError(f"calibration input does not fit the model: {_first_line(e)}") from None
    return out


def _train(st: _Student, student: Any, task: _Task, opts: FinetuneOptions, originals: dict[str, Any],
           dev: Any) -> FinetuneReport:
    """Adam with a cosine-decayed rate over ``opts.steps`` items; stops at a non-finite loss."""
    import torch

    steps = opts.steps
    opt = torch.optim.Adam(st.parameters(), lr=opts.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    order = np.random.default_rng(opts.seed).permutation(np.resize(task.trained(), steps))
    first = last = float("nan")
    good, stopped, done, refreshes = st.state(), None, 0, 0
    t0 = time.perf_counter()
    keeper = _Keeper(st, student, task, dev, steps)
    bar = _bar(steps, opts.progress)
    for step, i in enumerate(order):
        item = _to(task.calib[i], dev)
        try:
            out = task.run_student(student, st.tensors(), item)
        except (TypeError, ValueError, RuntimeError) as e:
            raise AqmInputError(f"calibration input does not fit the model: {_first_line(e)}") from None
        loss = task.loss(out, i, item)
        value = float(loss.detach())
        if not math.isfinite(value):
            st.restore(good)
            stopped = f"non-finite loss at step {step}; kept the parameters of step {done}"
            break
        good = st.state()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = value if step == 0 else first
        last, done = value, step + 1
        if opts.refresh_every and done % opts.refresh_every == 0 and done < steps:
            st.refresh_codes(originals, _REFRESH_BEAM)
            refreshes += 1
        keeper.check(done)
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        bar.update(1)
    bar.close()
    held = keeper.finish(done)
    return FinetuneReport("task" if task.loss_fn is not None else "distill", steps, done, first, last,
                          time.perf_counter() - t0, len(st.aq) + len(st.trainable_raw), stopped, refreshes,
                          opts.train_raw, **held)


def _write(f: aqformat.AqmFile, out_path, st: _Student, report: FinetuneReport) -> None:
    """Copy ``f`` to ``out_path`` with the trained values and the (possibly refreshed) codes."""
    groups = {g.name: g for g in f.codebook_groups}
    with aqformat.Writer(out_path, producer=f.producer, source=f.source, alignment=f.alignment,
                         metadata={**f.metadata, "finetune": report.as_metadata()}) as w:
        for name, p in st.groups.items():
            w.add_codebooks(name, p.detach().cpu().numpy(), dtype=groups[name].dtype)
        for info in f.tensors():
            if info.group is not None:
                parts = aq.parts(f, info.name)
                codes = st.aq[info.name][1].T.cpu().numpy().astype(parts.codes.dtype)  # refreshed or not
                w.add_aq(info.name, info.shape, codes, group=info.group, dtype=info.dtype,
                         scale=st.scales[info.name].detach().cpu().numpy(),
                         scale_dtype=str(parts.scale.dtype) if parts.scale is not None else "float32",
                         perm=parts.perm, axes=parts.axes)
            elif info.name in st.recode:
                value = st.trainable_raw[info.name].detach().cpu().numpy()
                coded = st.recode[info.name](value)
                if coded is None:  # trained beyond float16's range: stored raw
                    w.add_tensor(info.name, value.astype(_np_dtype(info.dtype)))
                else:
                    coded.write(w, info.name, info.shape, info.dtype)
            elif info.name in st.trainable_raw:
                w.add_tensor(info.name, st.trainable_raw[info.name].detach().cpu().numpy().astype(_np_dtype(info.dtype)))
            else:
                w.copy_tensor(f, info.name)
        graph = f.graph()
        if graph is not None:
            w.set_graph(graph[1], format=graph[0])


_RECODED = (affine_codec.NAME, half_codec.NAME)


def _recoder(codec: str, fields: dict[str, Any]) -> Callable[[np.ndarray], Any]:
    """How a trained affine or half tensor is coded again: with its record's settings."""
    if codec == half_codec.NAME:
        return lambda value: encode_half(value, fields["format"])
    return lambda value: encode_affine(value, fields["bits"], fields["axes"], fields["scope"])


def _bar(steps: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=steps, desc="fine-tune", unit="step", disable=not enabled, leave=False)


def _np_dtype(name: str):
    return {"float16": np.float16, "float64": np.float64}.get(name, np.float32)


def _to(item: Any, dev):
    """``item`` with its tensors and numpy arrays (e.g. an ONNX source's feeds) as tensors on ``dev``."""
    import torch
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(item, device=dev)
    if isinstance(item, dict):
        return {k: _to(v, dev) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_to(v, dev) for v in item)
    return item


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
