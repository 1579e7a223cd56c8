"""load_torch(resident="compressed"): modules computing from AQ codes match the decoded model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import aqformat
from aqformat.codecs.aq import parts as aq_parts
from aqformat.errors import AqmInputError
from aqformat.kernels import decode as kd
from aqformat.kernels import matmul as km
from aqformat.runtime import load_torch
from aqformat.runtime.aq_weight import DECODE_MATMUL_ROWS, LUT_MAX_ROWS
from aqformat.runtime.aq_weight_torch import DeviceAQWeight
from aqformat.runtime.compressed import AQConv, AQEmbedding, AQLinear

from tests.runtime_fixtures import build_torch_aqm


class Net(torch.nn.Module):
    """Every replaceable kind and layout: plain, scaled, permuted and transposed (axes) weights."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)
        self.conv = torch.nn.Conv1d(32, 48, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(48, 48, 3, padding=1, groups=4, padding_mode="reflect")
        self.fc = torch.nn.Linear(48, 1024)
        self.fc2 = torch.nn.Linear(1024, 40)
        self.img = torch.nn.Conv2d(1, 8, 3)
        self.fc3 = torch.nn.Linear(40, 64, bias=False)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)
        h = torch.relu(self.conv2(torch.relu(self.conv(h)))).transpose(1, 2)
        out = self.fc3(torch.relu(self.fc2(torch.relu(self.fc(h)))))
        return out + self.img(out[:, None, :, :8].contiguous()).mean((1, 2, 3))[:, None, None]


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("comp") / "net.aqm")
    build_torch_aqm(Net().state_dict(), path, d=8, min_aq=64)
    return path


def _pair(path):
    ref = load_torch(path, Net().eval(), lazy=False)
    return ref, load_torch(path, Net().eval(), resident="compressed")


def test_modules_are_replaced_by_layout(net_file):
    _, comp = _pair(net_file)
    assert isinstance(comp.emb, AQEmbedding) and isinstance(comp.fc, AQLinear) and isinstance(comp.fc2, AQLinear)
    assert isinstance(comp.conv2, AQConv) and isinstance(comp.img, AQConv)
    with aqformat.open(net_file) as f:
        assert aq_parts(f, "conv.weight").axes is not None  # a transposed conv layout stays decoded
    assert type(comp.conv) is torch.nn.Conv1d and comp.conv.weight.shape == (48, 32, 3)


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("T", [3, LUT_MAX_ROWS, 30])
def test_outputs_match_decoded_model(net_file, T, numba, monkeypatch):
    if not numba:
        monkeypatch.setattr(kd, "_loaded_kernel", lambda: None)
        monkeypatch.setattr(km, "_kernel", lambda: None)
        monkeypatch.setattr(km, "_decode_matmul_kernel", lambda: None)
    elif not kd.compiled():
        pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(kd, "_MIN_KERNEL_VALUES", 0)  # the kernel even for these small weights
    ref, comp = _pair(net_file)
    ids = torch.randint(0, 100, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a, b = ref(ids), comp(ids)
    # float32 sums in another order: about 1e-6 relative per product
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("T", [3, 17])
def test_product_strategies_agree(net_file, T, monkeypatch):
    """The Linear strategies (decode-and-multiply, lookup table, decoded tiles with torch's or numpy's BLAS)
    give the same product."""
    _, comp = _pair(net_file)
    x = torch.randn(T, 48)
    aq = comp.fc.aq
    assert aq.lut_ok()
    with torch.no_grad():
        ref = x @ comp.fc.weight.T + comp.fc.bias
        first = comp.fc(x)
        if T <= DECODE_MATMUL_ROWS and km.decode_matmul_ok(aq.codes, aq.codebooks):
            monkeypatch.setattr(km, "_decode_matmul_kernel", lambda: None)  # then the lookup table
            torch.testing.assert_close(comp.fc(x), first, rtol=1e-5, atol=1e-6)
        monkeypatch.setattr("aqformat.runtime.aq_weight.TILE_BYTES", 4 * 48 * 100)  # 11 tiles of 100 rows
        monkeypatch.setattr("aqformat.runtime.aq_weight.LUT_MAX_ROWS", 0)
        monkeypatch.setattr("aqformat.runtime.aq_weight.DECODE_MATMUL_ROWS", 0)
        torch.testing.assert_close(comp.fc(x), first, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)
        xs = x.numpy()
        torch.testing.assert_close(torch.from_numpy(aq.times_rows(xs)), first - comp.fc.bias, rtol=1e-5, atol=1e-6)


def _on_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` with its compressed modules computing through the device path (torch operations) on ``device``.

    On the CPU this sets the path ``.to("cuda")`` takes, so the same code is covered without a GPU."""
    for mod in model.modules():
        if isinstance(mod, (AQLinear, AQConv, AQEmbedding)):
            mod.on_device = DeviceAQWeight.from_weight(mod.aq, torch.device(device))
    return model


@pytest.mark.parametrize("T", [3, 30])
def test_device_path_matches_decoded_model(net_file, T, monkeypatch):
    """Codes on a torch device: every layout (scaled, permuted, transposed, grouped, embedding) gives the
    decoded model's outputs, decoding a few rows at a time; ``weight`` is the file's values, bit for bit."""
    ref, comp = _pair(net_file)
    _on_device(comp, "cpu")
    monkeypatch.setattr("aqformat.runtime.aq_weight.TILE_BYTES", 4 * 1024 * 7)  # several tiles per product
    ids = torch.randint(0, 100, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a, b = ref(ids), comp(ids)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    for name in ("emb", "conv2", "fc", "fc2", "img", "fc3"):
        assert torch.equal(getattr(comp, name).weight, getattr(ref, name).weight), name
    x = torch.randn(3, 48, requires_grad=True)  # autograd through the decoded weight
    comp.fc(x).sum().backward()
    torch.testing.assert_close(x.grad, ref.fc.weight.sum(0).expand(3, 48))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path runs on the CPU above")
def test_cuda_compressed_matches_decoded(net_file):
    ref = load_torch(net_file, Net().eval(), lazy=False)
    comp = load_torch(net_file, Net().eval(), resident="compressed", device="cuda")
    assert comp.fc.on_device is not None and comp.fc.on_device.codes.is_cuda
    assert comp.fc.on_device.codebooks is comp.fc2.on_device.codebooks  # one copy of the group on the device
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        a, b = ref(ids), comp(ids.cuda()).cpu()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_weights_state_dict_and_copies(net_file):
    ref, comp = _pair(net_file)
    sd, rsd = comp.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(rsd)
    for k in sd:
        assert torch.equal(sd[k], rsd[k]), k
    assert torch.equal(comp.fc2.weight, ref.fc2.weight)  # transposed + permuted layout, decoded on access
    twin = copy.deepcopy(comp)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        assert torch.equal(twin(ids), comp(ids))
        assert comp.half()(ids).dtype == torch.float16  # the other tensors follow; codes stay as they are
    fresh = Net()
    fresh.load_state_dict(sd)  # what was saved loads into a plain model


def test_compressed_memory_is_the_codes(net_file):
    _, comp = _pair(net_file)
    with aqformat.open(net_file) as f:
        for name in ("fc", "fc2", "emb"):
            mod = getattr(comp, name)
            assert mod.aq.codes.nbytes == aq_parts(f, f"{name}.weight").codes.nbytes
            assert "weight" not in dict(mod.named_parameters(recurse=False))


def test_bad_settings_are_refused(net_file):
    with pytest.raises(AqmInputError, match="resident must be"):
        load_torch(net_file, Net(), resident="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(AqmInputError, match="not usable here"):
            load_torch(net_file, Net(), device="cuda", resident="compressed")
    comp = load_torch(net_file, Net(), resident="compressed")
    with pytest.raises(AqmInputError, match="resident='decoded'"):
        comp.to("meta")


def test_embedding_rejects_out_of_range_ids(net_file):
    _, comp = _pair(net_file)
    with pytest.raises(IndexError):
        comp.emb(torch.tensor([[100]]))


def test_onnx_export_holds_the_decoded_weights(net_file):
    """torch.onnx.export of a compressed model traces torch operations on the decoded weights (not constants)."""
    import io

    import onnxruntime as ort
    ref, comp = _pair(net_file)
    ids = torch.randint(0, 100, (2, 5))
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(comp, (ids,), buf, dynamo=False, input_names=["ids"], dynamic_axes={"ids": {0: "n"}})
        want = ref(ids).numpy()
        other = torch.randint(0, 100, (3, 5))
        want_other = ref(other).numpy()
    sess = ort.InferenceSession(buf.getvalue())
    np.testing.assert_allclose(sess.run(None, {"ids": ids.numpy()})[0], want, rtol=1e-4, atol=1e-5)
    # the input is used (a graph of constants would ignore it)
    np.testing.assert_allclose(sess.run(None, {"ids": other.numpy()})[0], want_other, rtol=1e-4, atol=1e-5)
