"""Small tensors planned by their measured effect on the model's output when calibration is given,
and exactly as before without it."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aqformat.converters import affine, from_torch, planning, sources  # noqa: E402
from aqformat.converters.options import ConvertOptions  # noqa: E402
from aqformat.converters.sensitivity import collect_tensor_gradients, small_sensitivity  # noqa: E402


class Gains(torch.nn.Module):
    """``fc(x) + 100 * loud * x + 0.01 * quiet * x``: ``loud`` and ``quiet`` hold the same values (the same
    weight error at every width) but the output feels ``loud``'s error 10^4 times more."""

    def __init__(self, n: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(n, n)
        w = torch.randn(n)
        self.loud = torch.nn.Parameter(w.clone())
        self.quiet = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return self.fc(x) + 100 * self.loud * x + 0.01 * self.quiet * x


def _small(net, calib, bits=4.0):
    """The affine plan of ``net``'s small tensors (``fc.weight`` left to AQ) with ``calib``."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    specs = [sources.TensorSpec(n, a.shape, "float32") for n, a in sd.items()]
    plan, left = planning.plan_small(specs, ["fc.weight"], ConvertOptions(bits_per_weight=bits), {},
                                     sd.__getitem__, calib=calib)
    assert left == ["fc.weight"]
    return plan


def _calib(net, n=32):
    gen = torch.Generator().manual_seed(1)
    return net, [torch.randn(4, 256, generator=gen) for _ in range(n)], lambda m, b: m(b)


def _width(plan, name):
    return plan.bits().get(name, 32)  # kept raw: float32


def test_the_tensor_the_output_feels_gets_more_bits():
    net = Gains()
    data_free = _small(net, None)
    assert _width(data_free, "loud") == _width(data_free, "quiet")  # same values, same choice
    calibrated = _small(net, _calib(net))
    assert _width(calibrated, "loud") > _width(calibrated, "quiet")
    assert _width(calibrated, "quiet") <= _width(data_free, "quiet")


def test_predicted_output_error_matches_the_measured_one():
    """``sum_k (g_k . E)^2`` over the slots against the output error the coded tensor really causes."""
    net = Gains()
    module, batches, run = _calib(net, 256)
    sens = collect_tensor_gradients(module, run, batches, ["loud", "quiet", "fc.bias", "absent"])
    assert set(sens.grads) == {"loud", "quiet", "fc.bias"}
    assert all(p.requires_grad for p in net.parameters())  # flags restored
    w = net.loud.detach().numpy()
    decoded = [affine.encode_affine(w, b).decoded for b in (2, 4)]
    predicted = sens.errors("loud", w, decoded)
    with torch.no_grad():
        ref = [run(module, b) for b in batches]
        measured = []
        for d in decoded:
            net.loud.copy_(torch.from_numpy(d))
            measured.append(sum(float((run(module, b) - r).square().sum()) for b, r in zip(batches, ref)))
        net.loud.copy_(torch.from_numpy(w))
    assert np.allclose(predicted, measured, rtol=0.35), (predicted, measured)
    assert sens.errors("quiet", w, decoded)[0] < 1e-6 * predicted[0]


def test_calibrated_plans_stay_within_the_budget_and_may_keep_a_tensor_at_16_bits():
    net = Gains()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items() if k != "fc.weight"}
    cands = {n: (a.shape, None, 8.0, a.nbytes) for n, a in sd.items()}
    sens = small_sensitivity(_calib(net), list(cands))
    plan = affine.plan_within(cands, sd.__getitem__, sens)
    assert sum(plan.nbytes.values()) <= plan.budget
    assert _width(plan, "loud") == 16 and _width(plan, "quiet") < 8  # float16 where the output feels it
    assert plan.coded["loud"].fields["format"] == "float16"


def test_a_budget_too_small_for_the_output_is_exceeded_until_the_predicted_error_is_under_its_share():
    net = Gains()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items() if k != "fc.weight"}
    cands = {n: (a.shape, None, 1.0, a.nbytes) for n, a in sd.items()}  # 1 bit per weight
    sens = small_sensitivity(_calib(net), list(cands))
    plan = affine.plan_within(cands, sd.__getitem__, sens)
    predicted = sum(float(sens.errors(n, sd[n], [t.decoded])[0]) for n, t in plan.coded.items())
    assert predicted <= affine.SMALL_OUTPUT_ERROR * sens.energy < predicted * 10
    assert sum(plan.nbytes.values()) > plan.budget and _width(plan, "loud") > _width(plan, "quiet")


def _arrays():
    rng = np.random.default_rng(0)
    a = {"norm.weight": 1 + 0.1 * rng.standard_normal(64), "norm.bias": 0.05 * rng.standard_normal(64),
         "dw.weight": rng.standard_normal((16, 1, 3, 3)), "fc.weight": 0.2 * rng.standard_normal((8, 32)),
         "fc.bias": rng.standard_normal(8) * np.linspace(0.01, 3, 8), "gain": np.exp(rng.standard_normal(48))}
    return {k: v.astype(np.float32) for k, v in a.items()}


# What the planner chose before calibration reached it (the planner of commit db13c27), per nominal rate:
# data-free plans must not move.
BEFORE = {
    4.0: ({"norm.weight": 3, "norm.bias": 6, "dw.weight": 6, "fc.weight": 5, "gain": 6},
          {"norm.weight": 52, "norm.bias": 76, "dw.weight": 136, "fc.weight": 188, "fc.bias": 32, "gain": 64}),
    5.5: ({"norm.weight": 4, "norm.bias": 7, "dw.weight": 7, "fc.weight": 7, "gain": 8},
          {"norm.weight": 60, "norm.bias": 84, "dw.weight": 154, "fc.weight": 252, "fc.bias": 32, "gain": 76}),
    6.0: ({"norm.weight": 5, "norm.bias": 8, "dw.weight": 8, "fc.weight": 7, "gain": 8},
          {"norm.weight": 68, "norm.bias": 92, "dw.weight": 172, "fc.weight": 252, "fc.bias": 32, "gain": 76}),
}


@pytest.mark.parametrize("bits", sorted(BEFORE))
def test_data_free_plans_are_unchanged(bits):
    a = _arrays()
    cands = {n: (x.shape, None, bits, x.nbytes) for n, x in a.items()}
    for plan in (affine.plan_affine(cands, a.__getitem__), affine.plan_within(cands, a.__getitem__, None)):
        assert (plan.bits(), plan.nbytes) == BEFORE[bits]


def test_calibrated_conversion_plans_small_tensors_by_output_error(tmp_path):
    net = Gains()
    module, batches, _ = _calib(net, 8)
    enc = {"bits_per_code": 4, "d": 4, "beam": 1, "iters": 1}
    free = from_torch(net, tmp_path / "free.aqm", bits=4, progress=False, encoder=enc)
    cal = from_torch(net, tmp_path / "cal.aqm", bits=4, progress=False, encoder=enc, calib=batches)
    assert free.affine_bits["loud"] == free.affine_bits["quiet"]
    assert cal.affine_bits.get("loud", 32) > cal.affine_bits.get("quiet", 32)


def test_an_onnx_source_plans_its_small_tensors_through_the_torch_interpreter(tmp_path):
    import warnings

    from aqformat.converters import from_onnx

    class Scaled(Gains):
        def forward(self, x):  # x first: the exporter cannot fold the constants into loud and quiet
            return self.fc(x) + (x * self.loud) * 100 + (x * self.quiet) * 0.01
    net = Scaled().eval()
    with torch.no_grad():  # reversed: the same errors, but not one initializer the exporter would share
        net.quiet.copy_(net.quiet.flip(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 256),), tmp_path / "g.onnx", dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
    kw = dict(bits=4, progress=False, encoder={"bits_per_code": 4, "d": 4, "beam": 1, "iters": 1})
    free = from_onnx(tmp_path / "g.onnx", tmp_path / "free.aqm", **kw)
    cal = from_onnx(tmp_path / "g.onnx", tmp_path / "cal.aqm", calib=str(tmp_path / "c.npy"), **kw)
    assert free.affine_bits["loud"] == free.affine_bits["quiet"]
    assert cal.affine_bits.get("loud", 32) > cal.affine_bits.get("quiet", 32)
