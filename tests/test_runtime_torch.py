"""aqformat.runtime.load_torch and the torch decoder against aqformat's numpy decode."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import aqformat
from aqformat.errors import AqmInputError, AqmIntegrityError
from aqformat.layout import matrix_shape
from aqformat.runtime import load_torch
from aqformat.runtime.torch_decode import decode_tensor

from tests.runtime_fixtures import build_torch_aqm


class Net(torch.nn.Module):
    """A small CNN + MLP with a buffer-carrying BatchNorm and a tied weight."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2)
        self.fc = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.fc3 = torch.nn.Linear(64, 64)
        self.fc3.weight = self.fc2.weight   # tied: one storage, two keys

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc(x)))))


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2)
        net(torch.randn(4, 3, 16, 16))
    path = str(tmp_path_factory.mktemp("rtt") / "net.aqm")
    codecs = build_torch_aqm(net.state_dict(), path, d=4)
    assert {"aq", "raw"} == set(codecs.values())
    return path


def _reference(path):
    """Net filled through load_state_dict with aqformat's numpy decode."""
    ref = Net().eval()
    with aqformat.open(path) as f:
        ref.load_state_dict({n: torch.from_numpy(np.array(f.read(n))) for n in f.names()})
    return ref


@pytest.mark.filterwarnings("error")  # read-only memory maps must not reach torch.from_numpy
def test_torch_decoder_bit_identical_to_numpy(tmp_path):
    rng = np.random.default_rng(0)
    p = str(tmp_path / "dec.aqm")
    shapes = [(24, 10), (6, 4, 5), (33, 17, 3), (5,), (16, 16)]
    with aqformat.Writer(p) as w:
        w.add_codebooks("k512", rng.standard_normal((3, 512, 8)).astype(np.float16))  # 9-bit codes
        w.add_codebooks("k4", rng.standard_normal((1, 4, 5)).astype(np.float32))
        w.add_codebooks("k256", rng.standard_normal((1, 256, 4)).astype(np.float16))  # byte codes, M = 1
        for i, shape in enumerate(shapes):
            for g, d, M, K in (("k512", 8, 3, 512), ("k4", 5, 1, 4), ("k256", 4, 1, 256)):
                axes = None if i % 2 == 0 else list(range(len(shape)))[::-1]
                rows, cols = matrix_shape(shape, axes)
                codes = rng.integers(0, K, (rows * -(-cols // d), M))
                for dt in ("float32", "float16", "bfloat16"):
                    w.add_aq(f"{g}_{i}_{dt}", shape, codes, group=g, dtype=dt, axes=axes,
                             scale=rng.uniform(0.5, 2, rows) if i != 3 else None,
                             perm=rng.permutation(cols) if i in (2, 4) else None)
        w.add_tensor("raw_f16", rng.standard_normal((3, 4)).astype(np.float16))
        w.add_tensor("raw_i64", np.arange(6, dtype=np.int64))
        w.add_tensor("raw_bool", np.array([True, False]))
    f = aqformat.open(p)
    cache = {}
    for name in f.names():
        t = decode_tensor(f, name, "cpu", codebook_cache=cache)
        ref = np.asarray(f.read(name))
        assert tuple(t.shape) == f.info(name).shape and t.is_contiguous()
        if f.info(name).dtype == "bfloat16":
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, torch.from_numpy(ref.copy()).to(torch.bfloat16))
        else:
            assert np.array_equal(t.numpy(), ref) and t.numpy().dtype == ref.dtype, name
    assert set(cache) == {"k512", "k4", "k256"}


def test_eager_load_matches_numpy(net_file):
    x = torch.randn(3, 3, 16, 16)
    net = load_torch(net_file, Net().eval(), lazy=False)
    assert net.fc3.weight is net.fc2.weight
    with torch.no_grad():
        assert torch.equal(net(x), _reference(net_file)(x))


def test_lazy_load_with_eviction(net_file):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = _reference(net_file)(x)
        net = load_torch(net_file, Net().eval())
        assert net.fc.weight.shape == (64, 32)                # nothing decoded before use: shape and dtype,
        assert net.fc.weight.isnan().all()                    # NaN values, never zeros
        assert torch.equal(net(x), expected)
        assert net.aqm_cache.stats.evictions == 0
        small = load_torch(net_file, Net().eval(), budget_bytes=20000)
        for _ in range(3):
            assert torch.equal(small(x), expected)
        s = small.aqm_cache.stats
        assert s.evictions > 0 and s.misses > len(aqformat.open(net_file).names()) - 1
        assert s.resident_bytes <= small.aqm_cache.budget_bytes


def test_lazy_budget_below_one_module(net_file):
    with pytest.raises(AqmInputError, match=r"module 'conv2'.*budget_bytes >= 18560"):
        load_torch(net_file, Net(), budget_bytes=1000)


def test_meta_model(net_file):
    x = torch.randn(1, 3, 16, 16)
    expected = _reference(net_file)(x)
    for lazy in (False, True):
        with torch.device("meta"):
            net = Net().eval()
        load_torch(net_file, net, lazy=lazy)
        with torch.no_grad():
            assert torch.equal(net(x), expected)
        assert net.fc3.weight is net.fc2.weight


def test_key_and_shape_errors(net_file, tmp_path):
    class Other(Net):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)
            del self.fc

    with pytest.raises(AqmInputError) as e:
        load_torch(net_file, Other())
    msg = str(e.value)
    assert "missing key(s) in the file: 'extra.weight', 'extra.bias'" in msg
    assert "unexpected key(s) in the file: 'fc.weight', 'fc.bias'" in msg and "\n" not in msg
    other = load_torch(net_file, Other(), strict=False, lazy=False)   # non-strict loads the overlap
    assert torch.equal(other.fc2.weight, torch.from_numpy(np.array(aqformat.open(net_file).read("fc2.weight"))))

    class Wide(Net):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 65)

    with pytest.raises(AqmInputError, match=r"size mismatch for 'fc.weight': the file has \[64, 32\], the model \[65, 32\]"):
        load_torch(net_file, Wide())
    with pytest.raises(AqmInputError, match="pass model="):
        load_torch(net_file)


def test_corruption_raises_at_lazy_decode(net_file, tmp_path):
    bad = tmp_path / "bad.aqm"
    bad.write_bytes(open(net_file, "rb").read())
    f = aqformat.open(str(bad))
    offset = f.section(f.record("fc2.weight").fields["codes"]).offset
    f.close()
    with open(bad, "r+b") as fh:
        fh.seek(offset + 3)
        b = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([b[0] ^ 0x10]))
    net = load_torch(str(bad), Net().eval())       # lazy: nothing decoded yet
    with pytest.raises(AqmIntegrityError, match="tensor 'fc2.weight'.*checksum"):
        net(torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_minilm_lazy_and_eager(tmp_path):
    from tests.minilm import load_minilm

    model, tok = load_minilm()
    path = str(tmp_path / "minilm.aqm")
    build_torch_aqm(model.state_dict(), path)
    enc = tok(["Return the number of items in a container.", "Open a file and return a stream."],
              padding=True, return_tensors="pt")
    with aqformat.open(path) as f:
        sd = {n: torch.from_numpy(np.array(f.read(n))) for n in f.names()}
    ref = copy.deepcopy(model)
    ref.load_state_dict(sd)
    with torch.no_grad():
        expected = ref(**enc).last_hidden_state
        eager = load_torch(path, copy.deepcopy(model), lazy=False)
        assert torch.equal(eager(**enc).last_hidden_state, expected)
        lazy = load_torch(path, copy.deepcopy(model), budget_bytes=60 << 20)
        assert torch.equal(lazy(**enc).last_hidden_state, expected)
        assert torch.equal(lazy(**enc).last_hidden_state, expected)
        assert lazy.aqm_cache.stats.evictions > 0


def test_lazy_tensors_before_decoding(net_file):
    """Before the first forward: real shapes and dtypes, decoded state_dict, .half() honoured, deepcopy refused."""
    x = torch.randn(2, 3, 16, 16)
    ref = _reference(net_file)
    net = load_torch(net_file, Net().eval())
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert net.conv.weight.dtype == torch.float32 and net.conv.weight.isnan().all()
    state = net.state_dict()                       # decoded, not placeholders
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k
    assert net.conv.weight.isnan().all()           # state_dict() decoded without keeping anything
    with pytest.raises(AqmInputError, match="lazy=False"):
        copy.deepcopy(net)
    half = load_torch(net_file, Net().eval()).half()
    with torch.no_grad():
        out = half(x.half())
    assert out.dtype == torch.float16 and net.fc.weight.isnan().all()
    torch.testing.assert_close(out.float(), ref(x), rtol=0.05, atol=0.05)
    assert half.state_dict()["fc.weight"].dtype == torch.float16


def test_lazy_model_refuses_export(net_file):
    """Tracing a lazily loaded model would record placeholders: a clear error says how to export instead."""
    import io
    m = load_torch(net_file, Net().eval(), lazy=True)
    with pytest.raises(AqmInputError, match="lazy=False"):
        torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), io.BytesIO(), dynamo=False)
    with pytest.raises(AqmInputError, match="lazy=False"):
        torch.jit.trace(m, torch.randn(1, 3, 16, 16))
    eager = load_torch(net_file, Net().eval(), lazy=False)
    torch.onnx.export(eager, (torch.randn(1, 3, 16, 16),), io.BytesIO(), dynamo=False)
