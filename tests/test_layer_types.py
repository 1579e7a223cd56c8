"""Every weight-bearing layer type converts and runs with bounded error, from torch and from ONNX.

Each model has one layer large enough for AQ (>= 4,096 weights) and small tensors (biases,
depthwise kernels) for the affine codec; the torch route loads the decoded state_dict into the
module, the ONNX route runs the .aqm in the ONNX Runtime session of aqformat.runtime.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
nn = torch.nn

import aqformat  # noqa: E402
from aqformat.converters import from_torch, from_torch_via_onnx  # noqa: E402

FAST = {"bits_per_code": 4, "d": 4, "beam": 2, "iters": 1, "reservoir": 1024}


class _First(nn.Module):
    """The first output of a module returning a tuple (recurrent layers, attention)."""

    def __init__(self, inner: nn.Module, self_attention: bool = False) -> None:
        super().__init__()
        self.inner, self.self_attention = inner, self_attention

    def forward(self, x):
        return (self.inner(x, x, x, need_weights=False) if self.self_attention else self.inner(x))[0]


def _models():
    """name -> (module, example input)."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv1d": (nn.Sequential(nn.Conv1d(8, 32, 5), nn.ReLU(), nn.Conv1d(32, 64, 3)), torch.randn(2, 8, 40, generator=g)),
        "conv2d-grouped-depthwise-1x1": (nn.Sequential(nn.Conv2d(32, 64, 3, groups=4), nn.ReLU(),
                                                       nn.Conv2d(64, 64, 3, groups=64, padding=1), nn.ReLU(),
                                                       nn.Conv2d(64, 128, 1)), torch.randn(2, 32, 10, 10, generator=g)),
        "convtranspose": (nn.Sequential(nn.ConvTranspose2d(32, 16, 4, stride=2), nn.ReLU(), nn.Flatten(2),
                                        nn.ConvTranspose1d(16, 4, 3)), torch.randn(2, 32, 6, 6, generator=g)),
        "linear": (nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), torch.randn(4, 64, generator=g)),
        "matmul": (nn.Sequential(nn.Linear(64, 128, bias=False)), torch.randn(3, 5, 64, generator=g)),
        "embedding": (nn.Sequential(nn.Embedding(200, 32), nn.Flatten(), nn.Linear(32 * 6, 8)),
                      torch.randint(0, 200, (4, 6), generator=g)),
        "lstm": (_First(nn.LSTM(32, 64, batch_first=True)), torch.randn(2, 7, 32, generator=g)),
        "gru": (_First(nn.GRU(32, 64, batch_first=True)), torch.randn(2, 7, 32, generator=g)),
        "attention": (_First(nn.MultiheadAttention(64, 4, batch_first=True), self_attention=True),
                      torch.randn(2, 9, 64, generator=g)),
    }


MODELS = _models()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_source(tmp_path, name):
    torch.manual_seed(0)
    model, x = _models()[name]
    model.eval()
    s = from_torch(model, tmp_path / "m.aqm", bits=4, codec="aq", progress=False, encoder=FAST)
    assert s.groups and s.affine_bits or name in ("matmul",), str(s)  # AQ and affine both used
    with aqformat.open(tmp_path / "m.aqm") as f:
        state = {k: torch.from_numpy(np.array(f.read(k))) for k in f.names()}
    with torch.no_grad():
        want = model(x).numpy()
        model.load_state_dict(state)
        got = model(x).numpy()
    assert _rel(got, want) < 0.2, _rel(got, want)


# the ONNX half of the default suite: the layouts the torch half does not share (ConvTranspose's
# [in, out] weights, ONNX's LSTM gate order, fused attention projections); the rest is slow
FAST_ONNX = ("conv2d-grouped-depthwise-1x1", "convtranspose", "lstm", "attention")


@pytest.mark.parametrize("name", [n if n in FAST_ONNX else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_onnx_source(tmp_path, name):
    from aqformat.runtime import InferenceSession
    torch.manual_seed(0)
    model, x = _models()[name]
    model.eval()
    from_torch_via_onnx(model, x, tmp_path / "m.aqm", input_names=["x"], bits=4, codec="aq", progress=False,
                        encoder=FAST)
    with aqformat.open(tmp_path / "m.aqm") as f:
        assert "aq" in {t.codec for t in f.tensors()}
    with torch.no_grad():
        want = model(x).numpy()
    got = InferenceSession(str(tmp_path / "m.aqm")).run(None, {"x": x.numpy()})[0]
    assert got.shape == want.shape and _rel(got, want) < 0.2, _rel(got, want)
