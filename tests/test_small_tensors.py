"""Small tensors and codebook-dominated groups coded by the affine codec inside the conversion's budget."""
import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sklearn.datasets import load_digits  # noqa: E402

import aqformat  # noqa: E402
from aqformat.converters import from_torch, planning, sources  # noqa: E402
from aqformat.converters.affine import RECORD_BYTES  # noqa: E402
from aqformat.converters.options import ConvertOptions  # noqa: E402


@pytest.fixture(scope="module")
def digits_mlp():
    """A 64-128-10 MLP trained on scikit-learn's digits: ``(net, X_test, y_test)``."""
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(30):
        for b in torch.randperm(1400).split(100):
            loss = torch.nn.functional.cross_entropy(net(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), X[1400:], y[1400:]


def _accuracy(net, path, X, y) -> float:
    m = copy.deepcopy(net)
    with aqformat.open(path) as f:
        m.load_state_dict({k: torch.from_numpy(np.array(f.read(k))) for k in f.names()})
    with torch.no_grad():
        return float((m(X).argmax(1) == y).float().mean())


def test_a_small_mlp_shrinks_five_times_at_4_bits_and_keeps_its_accuracy(digits_mlp, tmp_path):
    net, X, y = digits_mlp
    with torch.no_grad():
        ref = float((net(X).argmax(1) == y).float().mean())
    s = from_torch(net, tmp_path / "m.aqm", bits=4, codec="aq", progress=False)
    assert os.path.getsize(tmp_path / "m.aqm") * 5 <= s.source_bytes, str(s)  # the whole file
    assert "0.weight" in s.affine_bits and not s.groups  # 16 KiB of codebooks for 4 KiB of codes: affine
    assert _accuracy(net, tmp_path / "m.aqm", X, y) >= ref - 0.01
    with aqformat.open(tmp_path / "m.aqm") as f:
        assert f.metadata["conversion"]["small_tensors"]["tensors"] == len(s.affine_bits)


def test_planned_bytes_are_the_bytes_on_disk(digits_mlp, tmp_path):
    """What the budget counts for the tensors the affine codec takes is what the file holds."""
    net, _, _ = digits_mlp
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    specs = [sources.TensorSpec(n, a.shape, "float32") for n, a in sd.items()]
    for bits in (2, 2.5, 4, 6):
        plan, left = planning.plan_small(specs, ["0.weight"], ConvertOptions(bits_per_weight=bits, codec="aq"), {},
                                         sd.__getitem__)
        assert left == [] and sum(plan.nbytes.values()) <= plan.budget
        from_torch(net, tmp_path / "m.aqm", bits=bits, codec="aq", progress=False)
        with aqformat.open(tmp_path / "m.aqm") as f:
            for n in sd:
                info = f.info(n)
                assert info.stored_bytes + (RECORD_BYTES if info.codec == "affine" else 0) == plan.nbytes[n]
                assert (info.codec == "affine") == (n in plan.coded)


def test_fractional_rates_mix_widths_and_are_not_rounded(digits_mlp, tmp_path):
    net, _, _ = digits_mlp
    sizes = {}
    for bits in (2, 2.5, 3):
        from_torch(net, tmp_path / f"{bits}.aqm", bits=bits, codec="aq", progress=False)
        sizes[bits] = os.path.getsize(tmp_path / f"{bits}.aqm")
    assert sizes[2] < sizes[2.5] < sizes[3]


def test_batchnorm_statistics_stay_raw_and_small_convolutions_are_coded(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, groups=16), torch.nn.BatchNorm2d(16))
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.01, 4.0)
                m.running_mean.normal_()
    net.eval()
    s = from_torch(net, tmp_path / "bn.aqm", bits=4, progress=False, fold_batchnorm=False)
    with aqformat.open(tmp_path / "bn.aqm") as f:
        codecs = {t.name: t.codec for t in f.tensors()}
        for n, v in net.state_dict().items():
            if "running" in n or "num_batches" in n:
                assert codecs[n] == "raw" and np.array_equal(f.read(n), v.numpy()), n
        assert codecs["0.weight"] == "affine" and codecs["3.weight"] == "affine"  # 432 and 144 weights
        state = {k: torch.from_numpy(np.array(f.read(k))) for k in f.names()}
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
        net.load_state_dict(state)
        got = net(x)
    assert float((got - ref).norm() / ref.norm()) < 0.05 and len(s.affine_bits) >= 4


def test_summary_and_aqm_info_show_the_codebooks_share_of_the_file(tmp_path, capsys):
    from aqformat.cli import info_main
    from aqformat.inspect import describe
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    s = from_torch(net, tmp_path / "m.aqm", bits=2, progress=False,
                   encoder={"bits_per_code": 4, "d": 4, "beam": 2, "iters": 1})
    r = describe(tmp_path / "m.aqm")
    books = sum(g["bytes"] for g in r["codebook_groups"])
    assert books and r["codebook_bytes"] == s.codebook_bytes == books
    assert r["codebook_share"] == books / os.path.getsize(tmp_path / "m.aqm")
    assert f"{100 * r['codebook_share']:.1f}% of the file" in str(s)
    assert info_main([str(tmp_path / "m.aqm")]) == 0
    assert "codebook groups: " in capsys.readouterr().out


def test_aq_rates_between_two_widths_mix_them_and_out_of_range_rates_are_refused(tmp_path, capsys):
    from aqformat.cli import main as aqm_main
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    sizes = {}
    for bits in ("2", "2.5", "3"):
        out = tmp_path / f"{bits}.aqm"
        assert aqm_main(["convert", str(tmp_path / "m.pt"), "-o", str(out), "--bits", bits, "--codec", "aq",
                         "--bits-per-code", "4", "--vector-dim", "4", "--beam", "2", "--iters", "1", "--grouping", "shared",
                         "--no-progress", "-q"]) == 0
        sizes[bits] = os.path.getsize(out)
        with aqformat.open(out) as f:
            widths = {g.M for g in f.codebook_groups}
            meta = f.metadata["conversion"]
            assert {g.K for g in f.codebook_groups} == {16} and meta["bits"] == float(bits)
            achieved = meta["code_bits_per_weight"]
        assert widths == ({2, 3} if bits == "2.5" else {int(bits)})
        assert achieved == float(bits) if bits != "2.5" else 2 < achieved < 3
    assert sizes["2"] < sizes["2.5"] < sizes["3"]
    rc = aqm_main(["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "x.aqm"), "--bits", "0.5",
                   "--codec", "aq"])
    err = capsys.readouterr().err
    assert rc == 2 and "out of reach" in err and "1 to 64 bits per weight" in err and not (tmp_path / "x.aqm").exists()


def test_strict_refusal_keeps_an_existing_output(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))  # 36 floats: a header outweighs them
    out = tmp_path / "tiny.aqm"
    out.write_bytes(b"previous")
    with pytest.raises(aqformat.AqmInputError, match=r"not less than the model's .* \(--strict\)"):
        from_torch(net, out, bits=4, progress=False, strict=True)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["tiny.aqm"]
    with pytest.warns(aqformat.AqmWarning, match="not less than the model's"):
        from_torch(net, out, bits=4, progress=False)
