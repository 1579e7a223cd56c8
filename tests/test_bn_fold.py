"""BatchNorm folding (aqformat.converters.bn_fold): folded models compute what the originals do,
in ONNX Runtime and in torch, and patterns where folding would change the result are left alone."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import aqformat  # noqa: E402
from aqformat.converters import from_onnx, from_torch  # noqa: E402
from aqformat.converters.bn_fold import FOLDED_KEY, fold_source  # noqa: E402
from aqformat.converters.sources import onnx_source, torch_source  # noqa: E402

helper, TP = onnx.helper, onnx.TensorProto
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ ONNX graphs

def _init(name, *shape, low=None):
    a = RNG.uniform(0.2, 3.0, shape) if low == "var" else RNG.normal(0, 1, shape)
    return onnx.numpy_helper.from_array(a.astype(np.float32), name)


def _bn(name, x, y, c, **attrs):
    """A BatchNormalization node ``x -> y`` over ``c`` channels and its four initializers."""
    inits = [_init(f"{name}.g", c), _init(f"{name}.b", c), _init(f"{name}.m", c), _init(f"{name}.v", c, low="var")]
    node = helper.make_node("BatchNormalization", [x, *(t.name for t in inits)], [y], name=name, epsilon=1e-3,
                            **attrs)
    return node, inits


_SHAPES = {"logits": [2, 10], "out2": [2, 6], "g": [2, 6]}


def _model(nodes, inits, outputs, inputs=("x",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TP.FLOAT, [2, 4, 8, 8]) for i in inputs],
                              [helper.make_tensor_value_info(o, TP.FLOAT, _SHAPES.get(o, [2, 16, 8, 8])) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _cnn():
    """Conv (no bias) -> BN -> Relu -> depthwise Conv (bias) -> BN -> 1x1 Conv -> BN ->
    GlobalAveragePool -> Flatten -> Gemm (transB) -> BN, and a Gemm (no transB, [1, N] bias) -> BN."""
    inits = [_init("w0", 16, 4, 3, 3), _init("w1", 16, 1, 3, 3), _init("b1", 16), _init("w2", 24, 16, 1, 1),
             _init("fc", 10, 24), _init("fcb", 10), _init("fc2", 10, 6), _init("fc2b", 1, 6)]
    bns = {}
    for name, x, y, c in (("bn0", "c0", "n0", 16), ("bn1", "c1", "n1", 16), ("bn2", "c2", "n2", 24),
                          ("bn3", "f", "logits", 10), ("bn4", "f2", "out2", 6)):
        bns[name], ts = _bn(name, x, y, c)
        inits += ts
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), bns["bn0"],
             helper.make_node("Relu", ["n0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], group=16, pads=[1, 1, 1, 1]), bns["bn1"],
             helper.make_node("Conv", ["n1", "w2"], ["c2"]), bns["bn2"],
             helper.make_node("GlobalAveragePool", ["n2"], ["p"]), helper.make_node("Flatten", ["p"], ["fl"]),
             helper.make_node("Gemm", ["fl", "fc", "fcb"], ["f"], transB=1, alpha=0.5, beta=2.0), bns["bn3"],
             helper.make_node("Gemm", ["logits", "fc2", "fc2b"], ["f2"]), bns["bn4"]]
    return _model(nodes, inits, ["logits", "out2"])


def _x():
    return RNG.normal(0, 1, (2, 4, 8, 8)).astype(np.float32)


def test_onnx_conv_depthwise_pointwise_and_gemm_batchnorms_fold_to_the_same_outputs():
    model = _cnn()
    x = _x()
    ref = _run(model, x)
    src = fold_source(onnx_source(model))
    ops = [n.op_type for n in src.onnx_model.graph.node]
    assert "BatchNormalization" not in ops and len(src.info[FOLDED_KEY]) == 5
    folded = src.onnx_model
    for t in folded.graph.initializer:  # the stored data is the folded data the source reads
        if t.name in {s.name for s in src.specs}:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), src.load(t.name))
    onnx.checker.check_model(folded)
    for a, b in zip(ref, _run(folded, x)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:the .aqm file takes")  # every tensor kept raw
def test_onnx_folded_conversion_runs_in_the_runtime_and_records_the_pairs(tmp_path):
    from aqformat.runtime import InferenceSession
    model = _cnn()
    x = _x()
    ref = _run(model, x)
    from_onnx(model, tmp_path / "m.aqm", bits=8, keep=["*"], progress=False)  # every tensor raw: exact
    got = InferenceSession(str(tmp_path / "m.aqm")).run(None, {"x": x})
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    with aqformat.open(tmp_path / "m.aqm") as f:
        assert len(f.source[FOLDED_KEY]) == 5


def _folded_names(model):
    return {bn for _, bn in fold_source(onnx_source(model)).info.get(FOLDED_KEY, [])}


def _conv_bn(extra_nodes=(), outputs=("y",), bn_attrs=None, inputs=("x",), w_name="w"):
    node, ts = _bn("bn", "c", "y", 16, **(bn_attrs or {}))
    nodes = [helper.make_node("Conv", ["x", w_name], ["c"], pads=[1, 1, 1, 1]), node, *extra_nodes]
    return _model(nodes, [_init("w", 16, 4, 3, 3), *ts], list(outputs), inputs)


def test_onnx_folding_applies_when_the_batchnorm_output_has_several_readers():
    model = _conv_bn([helper.make_node("Relu", ["y"], ["r"]), helper.make_node("Sigmoid", ["y"], ["s"])],
                     outputs=("y", "r", "s"))
    x = _x()
    ref = _run(model, x)
    assert _folded_names(model) == {"bn"}
    for a, b in zip(ref, _run(model, x)):  # fold_source rewrote ``model`` in place
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["conv output read elsewhere", "conv output is a graph output",
                                  "training mode", "weight shared", "bn parameter is a graph input",
                                  "conv feeds two batchnorms"])
def test_onnx_patterns_that_would_change_the_result_are_left_unfolded(case):
    x = _x()
    if case == "conv output read elsewhere":
        model = _conv_bn([helper.make_node("Relu", ["c"], ["r"])], outputs=("y", "r"))
    elif case == "conv output is a graph output":
        model = _conv_bn(outputs=("y", "c"))
    elif case == "training mode":  # batch statistics: the running ones do not describe the output
        node, ts = _bn("bn", "c", "y", 16, training_mode=1)
        model = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), node],
                       [_init("w", 16, 4, 3, 3), *ts], ["y"])
        model.opset_import[0].version = 15
    elif case == "weight shared":
        model = _conv_bn([helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1])], outputs=("y", "c2"))
    elif case == "bn parameter is a graph input":
        model = _conv_bn()
        model.graph.input.append(helper.make_tensor_value_info("bn.m", TP.FLOAT, [16]))
    else:
        node2, ts2 = _bn("bn2", "c", "y2", 16)
        model = _conv_bn([node2], outputs=("y", "y2"))
        model.graph.initializer.extend(ts2)
    before = model.SerializeToString()
    ref = _run(model, x) if case != "training mode" else None
    assert _folded_names(model) == set()
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) >= 1
    if ref is not None:
        for a, b in zip(ref, _run(model, x)):
            np.testing.assert_array_equal(a, b)
    if case != "bn parameter is a graph input":
        onnx_copy = onnx.ModelProto()
        onnx_copy.ParseFromString(before)
        assert [n.op_type for n in onnx_copy.graph.node] == [n.op_type for n in model.graph.node]


def test_onnx_batchnorm_parameters_read_through_identity_nodes_fold(tmp_path):
    """The TorchScript exporter passes equal parameters (a fresh BatchNorm's weight and running_var)
    through Identity nodes when it does not fold constants."""
    import io
    import warnings
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 4, 8, 8),), buf, dynamo=False, do_constant_folding=False,
                          input_names=["x"])
    model = onnx.load_from_string(buf.getvalue())
    assert "Identity" in [n.op_type for n in model.graph.node]
    x = _x()
    ref = _run(model, x)[0]
    folded = fold_source(onnx_source(model))
    assert len(folded.info[FOLDED_KEY]) == 1
    np.testing.assert_allclose(_run(folded.onnx_model, x)[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_onnx_conv_transpose_batchnorm_folds_on_the_output_channel_axis_unless_grouped(group):
    """ConvTranspose weights are ``[C_in, C_out/group, k, k]``: BatchNorm scales axis 1. Grouped, the
    output channels span both axes, and the pair is left unfolded."""
    bn, inits = _bn("bn", "t", "y", 16)
    inits += [_init("wt", 4, 16 // group, 3, 3), _init("bt", 16)]
    model = _model([helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["t"], pads=[1, 1, 1, 1], group=group),
                    bn], inits, ["y"])
    x = _x()
    ref = _run(model, x)[0]
    assert _folded_names(model) == ({"bn"} if group == 1 else set())
    np.testing.assert_allclose(_run(model, x)[0], ref, rtol=1e-4, atol=1e-4)  # folded in place


def test_onnx_gemm_with_a_full_bias_matrix_is_not_folded():
    node, ts = _bn("bn", "f", "g", 6)
    model = _model([helper.make_node("Flatten", ["x"], ["fl"]), helper.make_node("Gemm", ["fl", "w", "c"], ["f"]),
                    node], [_init("w", 256, 6), _init("c", 2, 6), *ts], ["g"])
    assert _folded_names(model) == set()


# ------------------------------------------------------------------ torch modules

class StaticPadConv(torch.nn.Conv2d):
    """A Conv2d subclass calling ``F.conv2d`` itself (as EfficientNet's same-padding conv does)."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias,
                                          self.stride, 0, self.dilation, self.groups)


class WeightStdConv(torch.nn.Conv2d):
    """Weight standardisation in forward: scaling the weight would be undone, so it must not fold."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c0, self.b0 = nn.Conv2d(4, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)   # depthwise
        self.c2, self.b2 = StaticPadConv(16, 32, 3), nn.BatchNorm2d(32, eps=1e-3)
        self.c3, self.b3 = nn.Conv2d(32, 32, 1, groups=4), nn.BatchNorm2d(32)                 # grouped 1x1
        self.c4, self.b4 = WeightStdConv(32, 8, 1), nn.BatchNorm2d(8)
        self.fc, self.b5 = nn.Linear(8, 10), nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b3(self.c3(torch.relu(self.b2(self.c2(x)))))
        return self.b5(self.fc(self.b4(self.c4(x)).mean((2, 3))))


def _randomise_bn(net):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_()
                m.running_var.uniform_(0.1, 4.0)
                if m.weight is not None:
                    m.weight.normal_()
                    m.bias.normal_()
    return net.eval()


def test_torch_conv_batchnorm_pairs_fold_to_the_same_outputs_and_the_module_is_untouched():
    net = _randomise_bn(Net())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    src = fold_source(torch_source(net))
    assert sorted(bn for _, bn in src.info[FOLDED_KEY]) == ["b0", "b1", "b2", "b3"]   # not b4 (standardised), b5
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert [s.name for s in src.specs] == list(state)
    x = torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(src.module(x), net(x), rtol=1e-4, atol=1e-4)
    folded = src.module.state_dict()
    assert torch.all(folded["b0.weight"] == 1) and torch.allclose(folded["b0.running_var"], torch.tensor(1 - 1e-5))
    assert torch.equal(folded["b4.running_var"], state["b4.running_var"])


@pytest.mark.parametrize("groups", [1, 2])
def test_torch_conv_transpose_batchnorm_folds_on_the_output_channel_axis_unless_grouped(groups):
    net = _randomise_bn(torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 8, 3, stride=2, groups=groups),
                                            torch.nn.BatchNorm2d(8)))
    src = fold_source(torch_source(net))
    assert src.info.get(FOLDED_KEY, []) == ([["0.weight", "1"]] if groups == 1 else [])
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(src.module(x), net(x), rtol=1e-4, atol=1e-4)


class ConvBN(torch.nn.Module):
    """A conv ``c`` and a BatchNorm ``b``; subclasses wire them so that folding would be wrong."""

    def __init__(self, bn=None):
        super().__init__()
        self.c, self.b = torch.nn.Conv2d(4, 4, 3, padding=1), bn or torch.nn.BatchNorm2d(4)


class Residual(ConvBN):
    def forward(self, x):  # the conv's output is also added back
        y = self.c(x)
        return self.b(y) + y


class TwoBN(ConvBN):
    def __init__(self):
        super().__init__()
        self.b2 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y) * self.b2(y)


class Tied(ConvBN):
    def __init__(self):
        super().__init__()
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c.weight

    def forward(self, x):
        return self.b(self.c(x)) + self.c2(x)


class Twice(ConvBN):
    def forward(self, x):  # one conv applied twice, once before the BatchNorm
        return self.b(self.c(x)) + self.c(x)


class Untraceable(ConvBN):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.b(self.c(x))
        return self.b(self.c(-x))


class BatchStats(ConvBN):
    def __init__(self):
        super().__init__(torch.nn.BatchNorm2d(4, track_running_stats=False))

    def forward(self, x):
        return self.b(self.c(x))


@pytest.mark.parametrize("cls", [Residual, TwoBN, Tied, Twice, Untraceable, BatchStats])
def test_torch_patterns_that_would_change_the_result_are_left_unfolded(cls):
    net = _randomise_bn(cls())
    src = torch_source(net)
    assert fold_source(src) is src


def test_torch_batchnorm_in_training_mode_is_left_unfolded():
    net = torch.nn.Sequential()
    net.add_module("c", torch.nn.Conv2d(4, 4, 3))
    net.add_module("b", torch.nn.BatchNorm2d(4))
    src = torch_source(net.train())
    assert fold_source(src) is src
    assert fold_source(torch_source(net.eval())).info[FOLDED_KEY] == [["c.weight", "b"]]


@pytest.mark.filterwarnings("ignore:the .aqm file takes")
def test_torch_folded_file_loads_into_the_same_module_and_no_fold_keeps_the_statistics(tmp_path):
    from aqformat.runtime import load_torch
    net = _randomise_bn(Net())
    x = torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        ref = net(x)
    s = from_torch(net, tmp_path / "f.aqm", bits=8, keep=["*"], progress=False)  # raw: exact
    assert s.raw
    got = load_torch(str(tmp_path / "f.aqm"), model=_randomise_bn(Net()), lazy=False)
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref, rtol=1e-4, atol=1e-4)
    from_torch(net, tmp_path / "n.aqm", bits=8, keep=["*"], progress=False, fold_batchnorm=False)
    with aqformat.open(tmp_path / "n.aqm") as f, aqformat.open(tmp_path / "f.aqm") as g:
        assert FOLDED_KEY not in f.source and len(g.source[FOLDED_KEY]) == 4
        for name, v in net.state_dict().items():
            np.testing.assert_array_equal(f.read(name), v.numpy())
        assert not np.array_equal(g.read("b0.running_var"), net.b0.running_var.numpy())


def test_state_dict_with_model_code_is_folded(tmp_path):
    net = _randomise_bn(Net())
    torch.save(net.state_dict(), tmp_path / "net.pt")
    s = from_torch(str(tmp_path / "net.pt"), tmp_path / "f.aqm", bits=4, progress=False,
                   model_code=lambda: _randomise_bn(Net()))
    with aqformat.open(tmp_path / "f.aqm") as f:
        assert len(f.source[FOLDED_KEY]) == 4
    assert s.aqm_bytes > 0


class Heads(torch.nn.Module):
    """Conv1d -> BatchNorm1d and Linear -> BatchNorm1d (2-D), and a Linear on [N, L, F] before a
    BatchNorm1d over L = F = 6: BatchNorm1d's channels are the Linear's only for 2-D outputs."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv, self.bc = nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)
        self.tok, self.bt = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.fc, self.bf = nn.Linear(6, 1024), nn.BatchNorm1d(1024)

    def forward(self, x):
        y = self.bc(self.conv(x))                    # [N, 6, 4]
        y = self.bt(self.tok(y[:, :, :4].transpose(1, 2).reshape(-1, 6, 4)))  # [N, 6, 6]: axis 1 is L
        return self.bf(self.fc(y.mean(2)))           # [N, 1024]


def test_torch_batchnorm1d_folds_only_where_a_calibration_input_shows_the_channel_axis(tmp_path):
    from aqformat.converters.bn_fold import fold_calibrated
    from aqformat.converters.calib import calibration_batches
    net = _randomise_bn(Heads())
    x = torch.randn(8, 3, 6)
    np.save(tmp_path / "calib.npy", x.numpy())
    src = torch_source(net)
    assert fold_source(src) is src  # no input: no BatchNorm1d pair is folded
    calib = calibration_batches(str(tmp_path / "calib.npy"), src)
    folded, calib2 = fold_calibrated(src, calib)
    assert sorted(bn for _, bn in folded.info[FOLDED_KEY]) == ["bc", "bf"]  # not bt (axis 1 is not tok's)
    assert calib2[0] is folded.module and calib2[1] is calib[1]
    with torch.no_grad():
        torch.testing.assert_close(folded.module(x), net(x), rtol=1e-4, atol=1e-4)
    s = from_torch(net, tmp_path / "h.aqm", bits=4, calib=str(tmp_path / "calib.npy"), progress=False,
                   encoder={"bits_per_code": 4, "d": 2})
    with aqformat.open(s.path) as f:
        assert len(f.source[FOLDED_KEY]) == 2


@pytest.mark.slow
def test_efficientnet_lite0_folds_every_batchnorm_to_the_same_outputs(tmp_path):
    """The real model: 49 BatchNorms folded in torch, and in its ONNX export with the BatchNorms kept
    (no constant folding), each giving the original's logits."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from bench.onnx_models import efficientnet_lite0
    net = efficientnet_lite0()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = net(x)
    src = fold_source(torch_source(net))
    assert len(src.info[FOLDED_KEY]) == 49
    with torch.no_grad():
        torch.testing.assert_close(src.module(x), ref, rtol=1e-4, atol=1e-3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "e.onnx"), dynamo=False, do_constant_folding=False,
                          input_names=["x"])
    model = onnx.load(str(tmp_path / "e.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 49
    folded = fold_source(onnx_source(model))
    assert len(folded.info[FOLDED_KEY]) == 49
    assert not any(n.op_type == "BatchNormalization" for n in folded.onnx_model.graph.node)
    np.testing.assert_allclose(_run(folded.onnx_model, x.numpy())[0], ref.numpy(), rtol=1e-4, atol=1e-3)
