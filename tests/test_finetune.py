"""Codebook fine-tuning on a real (small) classifier trained on scikit-learn's digits."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sklearn.datasets import load_digits  # noqa: E402

import aqformat  # noqa: E402
from aqformat.codecs.aq import parts as aq_parts  # noqa: E402
from aqformat.converters.pipeline import quantize_weights  # noqa: E402
from aqformat.converters.options import AQConfig  # noqa: E402
from aqformat.converters import finetune  # noqa: E402


def _fit(net, X, y, epochs: int) -> None:
    """Train ``net`` on the first 1,400 digits with Adam, in batches of 100."""
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        for b in torch.randperm(1400).split(100):
            loss = torch.nn.functional.cross_entropy(net(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _digits_net():
    """A small MLP trained on the digits (real labels): ``(net, X, y)``."""
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10))
    _fit(net, X, y, epochs=20)
    return net.eval(), X, y, None


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    net, X, y, _ = _digits_net()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    cbs, coded, group_of, _ = quantize_weights({k: v for k, v in sd.items() if v.ndim == 2 and v.size >= 4096},
                                               AQConfig(M=1, b=6, d=4, iters=4, beam=4))
    path = tmp_path_factory.mktemp("ft") / "q.aqm"
    with aqformat.Writer(path, source={"framework": "pytorch"}) as w:
        for g, C in cbs.items():
            w.add_codebooks(g, C.numpy())
        for k, v in sd.items():
            if k in coded:
                c = coded[k]
                w.add_aq(k, v.shape, c.codes, group=group_of[k], scale=c.scale)
            else:
                w.add_tensor(k, v)
    return net, X, y, path


def _load(net, path):
    import copy
    m = copy.deepcopy(net)
    with aqformat.open(path) as f:
        m.load_state_dict({k: torch.tensor(np.array(f.read(k))) for k in f.names()})
    return m


def _err(a, b, X):
    with torch.no_grad():
        return float(((a(X) - b(X)) ** 2).mean())


def test_distillation_reduces_output_error_and_records_itself(digits_model, tmp_path):
    net, X, _, path = digits_model
    before = path.read_bytes()
    calib = [X[i:i + 100] for i in range(0, 1400, 100)]
    rep = finetune(path, tmp_path / "ft.aqm", net, calib, steps=60, lr=3e-3, progress=False)
    assert rep.objective == "distill" and rep.steps_done == 60 and rep.loss_last < rep.loss_first
    assert path.read_bytes() == before
    held_out = X[1400:]
    assert _err(_load(net, tmp_path / "ft.aqm"), net, held_out) < 0.8 * _err(_load(net, path), net, held_out)
    with aqformat.open(tmp_path / "ft.aqm") as f:
        assert f.metadata["finetune"]["objective"] == "distill"
        with aqformat.open(path) as g:  # codes are unchanged, only codebooks/scales/biases move
            assert f.alignment == g.alignment
            for name in g.names():
                if g.info(name).codec == "aq":
                    np.testing.assert_array_equal(aq_parts(f, name).codes, aq_parts(g, name).codes)
    assert "finetune" in __import__("aqformat.inspect").inspect.render_text(
        __import__("aqformat.inspect").inspect.describe(tmp_path / "ft.aqm"))


def test_task_loss_and_determinism(digits_model, tmp_path):
    net, X, y, path = digits_model
    batches = [(X[i:i + 100], y[i:i + 100]) for i in range(0, 1400, 100)]

    def loss_fn(out, item):
        return torch.nn.functional.cross_entropy(out, item[1])

    def task_loss(p):
        m = _load(net, p)
        with torch.no_grad():
            return float(np.mean([loss_fn(m(b[0]), b) for b in batches]))
    kw = dict(loss_fn=loss_fn, forward=lambda m, item: m(item[0]), steps=40, lr=3e-3, progress=False, seed=3)
    a = finetune(path, tmp_path / "a.aqm", net, batches, **kw)
    finetune(path, tmp_path / "b.aqm", net, batches, **kw)
    assert a.objective == "task"
    assert task_loss(tmp_path / "a.aqm") < task_loss(path)
    with aqformat.open(tmp_path / "a.aqm") as fa, aqformat.open(tmp_path / "b.aqm") as fb:
        for n in fa.names():
            np.testing.assert_array_equal(fa.read(n), fb.read(n))


def test_train_raw_selects_which_uncompressed_tensors_train(digits_model, tmp_path):
    """The last layer (1,280 weights) is below the compression threshold: a raw matrix."""
    net, X, _, path = digits_model
    calib = [X[i:i + 100] for i in range(0, 1400, 100)]
    for mode in ("all", "1d"):
        finetune(path, tmp_path / f"{mode}.aqm", net, calib, steps=20, lr=3e-3, train_raw=mode, progress=False)
    with aqformat.open(path) as g, aqformat.open(tmp_path / "all.aqm") as a, aqformat.open(tmp_path / "1d.aqm") as o:
        assert g.info("4.weight").codec == "raw"
        assert not np.array_equal(a.read("4.weight"), g.read("4.weight"))
        np.testing.assert_array_equal(o.read("4.weight"), g.read("4.weight"))
        assert not np.array_equal(o.read("4.bias"), g.read("4.bias"))  # 1-D tensors train in both modes
    with pytest.raises(aqformat.AqmInputError, match="train_raw"):
        finetune(path, tmp_path / "x.aqm", net, calib, steps=5, train_raw="2d", progress=False)


def test_nan_loss_stops_and_keeps_last_good_parameters(digits_model, tmp_path):
    net, X, _, path = digits_model
    calls = {"n": 0}

    def loss_fn(out, item):
        calls["n"] += 1
        return out.pow(2).mean() * (float("nan") if calls["n"] > 5 else 1e-3)
    rep = finetune(path, tmp_path / "nan.aqm", net, [X[:100]], loss_fn=loss_fn, steps=20, progress=False)
    assert rep.steps_done == 5 and "non-finite loss" in rep.stopped_early
    with aqformat.open(tmp_path / "nan.aqm") as f:
        assert all(np.isfinite(np.asarray(f.read(n), np.float64)).all() for n in f.names())


@pytest.mark.parametrize("calib,msg", [([], "empty"), ([torch.zeros(4, 7)], "does not fit")])
def test_bad_calibration_is_a_clear_error_and_writes_nothing(digits_model, tmp_path, calib, msg):
    net, _, _, path = digits_model
    with pytest.raises(aqformat.AqmInputError, match=msg):
        finetune(path, tmp_path / "out.aqm", net, calib, steps=5, progress=False)
    assert not (tmp_path / "out.aqm").exists()


def test_code_refresh_moves_codes_and_keeps_improving(digits_model, tmp_path):
    net, X, _, path = digits_model
    calib = [X[i:i + 200] for i in range(0, 1400, 200)]  # 7 items: none held out, the last step is written
    rep = finetune(path, tmp_path / "r.aqm", net, calib, steps=60, lr=3e-3, refresh_every=20, progress=False)
    assert rep.refreshes == 2 and "2 code refreshes" in str(rep)
    with aqformat.open(tmp_path / "r.aqm") as f, aqformat.open(path) as g:
        assert f.metadata["finetune"]["refreshes"] == 2
        changed = [n for n in g.names() if g.info(n).codec == "aq"
                   and not np.array_equal(aq_parts(f, n).codes, aq_parts(g, n).codes)]
        assert changed, "a refresh re-ran the code search but no code changed"
    held_out = X[1400:]
    assert _err(_load(net, tmp_path / "r.aqm"), net, held_out) < 0.8 * _err(_load(net, path), net, held_out)


def test_held_out_items_choose_the_step_written(digits_model, tmp_path):
    """Every 8th item is never trained on; the step of lowest loss on those is written, the file as
    coded (step 0) when training only made it worse."""
    net, X, _, path = digits_model
    calib = [X[i:i + 100] for i in range(0, 1400, 100)]
    rep = finetune(path, tmp_path / "ok.aqm", net, calib, steps=60, lr=3e-3, progress=False)
    assert rep.held_out == 1 and rep.held_out_kept < rep.held_out_first and rep.kept_step > 0
    assert f"(kept step {rep.kept_step})" in str(rep)
    bad = finetune(path, tmp_path / "bad.aqm", net, calib, steps=10, lr=10.0, progress=False)
    assert bad.kept_step == 0 and bad.held_out_kept == bad.held_out_first and bad.loss_last > bad.loss_first
    with aqformat.open(tmp_path / "bad.aqm") as f, aqformat.open(path) as g:
        assert f.metadata["finetune"]["kept_step"] == 0
        for name in g.names():
            np.testing.assert_array_equal(f.read(name), g.read(name))


def test_convert_with_finetune_distils_into_the_output(tmp_path):
    """``from_torch(..., finetune_steps=N)``: the one-step path ``aqm convert --finetune`` takes."""
    from aqformat.converters import from_torch
    net, X, _, _ = _digits_net()
    np.save(tmp_path / "calib.npy", X[:256].numpy())
    enc = {"bits_per_code": 6, "d": 4, "beam": 2, "iters": 2}
    plain = from_torch(net, tmp_path / "plain.aqm", bits=1.5, codec="aq", calib=str(tmp_path / "calib.npy"),
                       progress=False, encoder=enc)
    tuned = from_torch(net, tmp_path / "tuned.aqm", bits=1.5, codec="aq", calib=str(tmp_path / "calib.npy"),
                       progress=False, encoder=enc, finetune_steps=60, finetune_lr=3e-3)
    assert plain.finetune is None and tuned.finetune.steps_done == 60 and "fine-tuned by distill" in str(tuned)
    assert sorted(os.listdir(tmp_path)) == ["calib.npy", "plain.aqm", "tuned.aqm"]  # no leftover
    held_out = X[1400:]
    assert _err(_load(net, tmp_path / "tuned.aqm"), net, held_out) < _err(_load(net, tmp_path / "plain.aqm"), net, held_out)
    with aqformat.open(tmp_path / "tuned.aqm") as f:
        assert f.metadata["finetune"]["objective"] == "distill" and f.metadata["conversion"]["calibrated"]
        assert f.metadata["finetune"]["train_raw"] == "all"
    from_torch(net, tmp_path / "norms.aqm", bits=1.5, codec="aq", calib=str(tmp_path / "calib.npy"), progress=False,
               encoder=enc, finetune_steps=20, finetune_lr=3e-3, finetune_raw="1d")
    with aqformat.open(tmp_path / "norms.aqm") as f, aqformat.open(tmp_path / "plain.aqm") as g:
        assert f.info("4.weight").codec == "affine" and f.metadata["finetune"]["train_raw"] == "1d"
        np.testing.assert_array_equal(f.read("4.weight"), g.read("4.weight"))


def test_text_calibration_is_batched_by_length():
    from aqformat.converters.pipeline import FT_TEXT_BATCH, text_batches
    rng = np.random.default_rng(0)
    sents = ["w " * int(n) for n in rng.integers(1, 60, 100)]
    out = text_batches(sents)
    assert sorted(s for b in out for s in b) == sorted(sents) and all(len(b) <= FT_TEXT_BATCH for b in out)
    assert all(max(map(len, a)) <= min(map(len, b)) for a, b in zip(out, out[1:]))  # no long/short mix


def test_convert_finetune_needs_calibration_and_model_code(tmp_path):
    from aqformat.converters import from_torch
    net = _digits_net()[0]
    with pytest.raises(aqformat.AqmInputError, match="calibration inputs"):
        from_torch(net, tmp_path / "x.aqm", finetune_steps=5, progress=False)
    np.save(tmp_path / "calib.npy", np.zeros((4, 64), np.float32))
    with pytest.raises(aqformat.AqmInputError, match="model's code"):
        from_torch(net.state_dict(), tmp_path / "x.aqm", finetune_steps=5, calib=str(tmp_path / "calib.npy"),
                   progress=False)
    assert sorted(os.listdir(tmp_path)) == ["calib.npy"]


def _digits_bn_cnn():
    """A small CNN with BatchNorm trained on the digits: ``(net, X)`` with ``X`` ``[n, 1, 8, 8]``."""
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    _fit(net, X, y, epochs=3)
    return net.eval(), X


@pytest.mark.parametrize("train_raw", ["all", "1d"])
def test_batchnorm_runs_in_eval_mode_running_stats_fixed_affine_trained(tmp_path, train_raw):
    """Calibration and fine-tuning of a model with BatchNorm: running statistics are buffers
    (kept), BatchNorm's weight and bias are parameters (trained)."""
    from aqformat.converters import from_torch
    net, X = _digits_bn_cnn()
    np.save(tmp_path / "calib.npy", X[:256].numpy())
    enc = {"bits_per_code": 6, "d": 4, "beam": 2, "iters": 2}
    kw = dict(bits=1.5, codec="aq", calib=str(tmp_path / "calib.npy"), progress=False, encoder=enc,
              min_elements=1024)
    plain = from_torch(net, tmp_path / "plain.aqm", **kw)
    tuned = from_torch(net, tmp_path / "tuned.aqm", finetune_steps=40, finetune_lr=3e-3,
                       finetune_raw=train_raw, **kw)
    assert "3.weight" in plain.compressed and tuned.finetune.steps_done == 40
    with aqformat.open(tmp_path / "tuned.aqm") as f, aqformat.open(tmp_path / "plain.aqm") as coded:
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var",
                     "1.num_batches_tracked"):  # as coded (BatchNorm folded into the convolutions)
            np.testing.assert_array_equal(f.read(name), coded.read(name))
        assert not np.array_equal(f.read("4.weight"), coded.read("4.weight"))
        assert not np.array_equal(f.read("4.bias"), coded.read("4.bias"))
    held_out = X[1400:]
    assert _err(_load(net, tmp_path / "tuned.aqm"), net, held_out) < _err(_load(net, tmp_path / "plain.aqm"), net, held_out)


def test_the_callers_model_comes_back_as_it_was(digits_model, tmp_path):
    """Fine-tuning runs the caller's model as its teacher, in eval mode on the training device, and hands it
    back in its own mode and place; numpy calibration items (an ONNX source's feeds) go to that device too."""
    from aqformat.converters.finetuning import _to
    net, X, _, path = digits_model
    net.train()
    finetune(path, tmp_path / "ft.aqm", net, [X[:100]], steps=2, progress=False, device="cpu")
    assert net.training and next(net.parameters()).device.type == "cpu"
    fed = _to({"x": X[:3].numpy(), "ids": [np.arange(2)]}, torch.device("cpu"))
    assert isinstance(fed["x"], torch.Tensor) and torch.equal(fed["x"], X[:3])
    assert isinstance(fed["ids"][0], torch.Tensor)
    net.eval()
