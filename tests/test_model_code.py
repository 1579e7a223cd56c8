"""``--model module:Callable``: a state_dict file (.pt, .safetensors) gets calibration,
sensitivity-weighted allocation and fine-tuning from the model's own code.

The model is the digits CNN of the bench (bench/tasks.py), trained here for a
few epochs on scikit-learn's digits; its state_dict is what a user has.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import aqformat
from aqformat.cli import main as aqm_main
from aqformat.errors import AqmInputError
from bench.tasks import digits_data, digits_predict, train_digits
from aqformat.converters.model_code import resolve_model_code

FAST = ["--iters", "2", "--beam", "2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """``(folder, model, X_test)``: the trained CNN as .pt and .safetensors, calibration rows as .npy."""
    d = tmp_path_factory.mktemp("model_code")
    Xtr, ytr, Xte, _ = digits_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread trains faster than two on a busy machine
    try:
        model = train_digits(Xtr, ytr, epochs=3)
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), d / "cnn.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "cnn.safetensors"))
    np.save(d / "calib.npy", Xtr[:128])
    (d / "arch.py").write_text("from bench.tasks import digits_cnn as build\n")
    return d, model, Xte


def _aqm(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = aqm_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _fidelity(path, model, X) -> tuple[float, float]:
    """Agreement of predicted classes with the original model, and relative logit error."""
    from aqformat.runtime import load_torch
    from bench.tasks import digits_cnn
    student = load_torch(path, digits_cnn().eval(), lazy=False)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(X)), student(torch.from_numpy(X))
    agreement = float(np.mean(digits_predict(student, X) == digits_predict(model, X)))
    return agreement, float(((got - ref) ** 2).mean() / (ref ** 2).mean())


def test_safetensors_calibrated_allocated_and_finetuned_from_the_cli(digits, capsys):
    d, model, Xte = digits
    plain, tuned = d / "plain.aqm", d / "tuned.aqm"
    common = ["--bits", "2", "--grouping", "shared", *FAST]
    rc, out, err = _aqm(capsys, "convert", d / "cnn.safetensors", "-o", plain, *common)
    assert rc == 0 and "no --calib" in out
    rc, out, err = _aqm(capsys, "convert", d / "cnn.safetensors", "-o", tuned, *common,
                        "--model", "bench.tasks:digits_cnn", "--calib", d / "calib.npy", "--finetune", "40")
    assert rc == 0 and "fine-tuned by distill" in out and "not used" not in out
    with aqformat.open(tuned) as f:
        assert f.metadata["conversion"]["calibrated"] is True
        assert f.metadata["finetune"]["steps_done"] == 40
    # distillation on held-out digits: a fraction of the plain file's logit error (0.003 vs 0.025 measured)
    agree_plain, err_plain = _fidelity(plain, model, Xte)
    agree_tuned, err_tuned = _fidelity(tuned, model, Xte)
    assert err_tuned < 0.5 * err_plain and agree_tuned >= 0.95


def test_pt_checkpoint_with_model_code_from_a_file(digits, capsys):
    d, model, Xte = digits
    out_path = d / "pt.aqm"
    rc, out, err = _aqm(capsys, "convert", d / "cnn.pt", "-o", out_path, "--bits", "3", *FAST,
                        "--grouping", "shared", "--allocate", "--model", f"{d / 'arch.py'}:build",
                        "--calib", d / "calib.npy")
    assert rc == 0 and err == ""
    with aqformat.open(out_path) as f:
        assert f.metadata["conversion"]["calibrated"] is True and f.metadata["conversion"]["allocated"]
    assert _fidelity(out_path, model, Xte)[0] >= 0.8  # 3 bits with every byte counted: 0.88 measured


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_here:Net", "cannot import no_such_module_here (ModuleNotFoundError"),
    ("bench.tasks:NoSuchNet", "bench.tasks has no attribute NoSuchNet"),
    ("bench.tasks", "expected module:Callable"),
    ("bench.tasks:digits_data", "returned a tuple, not a torch.nn.Module"),
    ("{arch_bad}:broken", "calling it failed (ValueError: no weights here)"),
    ("torch.nn:Identity", "does not accept the checkpoint: tensors 10 not in the model (0.weight, 0.bias, "
                          "2.weight, ...)"),
    ("{arch_bad}:build", "does not accept the checkpoint: tensors 1 of another shape "
                         "(9.weight: checkpoint [128, 256], model [128, 64])"),
    ("{missing}:build", "no such file"),
])
def test_bad_model_code_is_one_line_before_encoding(digits, capsys, spec, message):
    d, _, _ = digits
    (d / "arch_bad.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),\n"
        "        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
        "        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))\n"
        "def broken():\n"
        "    raise ValueError('no weights here')\n")
    spec = spec.format(arch_bad=d / "arch_bad.py", missing=d / "missing.py")
    out_path = d / "bad.aqm"
    rc, out, err = _aqm(capsys, "convert", d / "cnn.pt", "-o", out_path, "--model", spec,
                        "--calib", d / "calib.npy", *FAST)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert not out_path.exists()


def test_model_code_with_an_onnx_or_module_source(digits, tmp_path):
    from aqformat.converters import convert, from_torch
    d, model, _ = digits
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "m.onnx"), dynamo=False)
    with pytest.raises(AqmInputError, match="an ONNX model carries its own graph"):
        convert(str(tmp_path / "m.onnx"), tmp_path / "o.aqm", model_code="bench.tasks:digits_cnn")
    with pytest.raises(AqmInputError, match="has its code already"):
        from_torch(model, tmp_path / "o.aqm", model_code="bench.tasks:digits_cnn", progress=False)
    assert resolve_model_code(len) is len
