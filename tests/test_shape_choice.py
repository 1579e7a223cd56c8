"""The AQ codebook shape chosen by rate and distortion on request (converters/shape_choice.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import aqformat  # noqa: E402
from aqformat.converters import from_torch  # noqa: E402
from aqformat.converters.options import ConvertOptions, EncoderOptions  # noqa: E402
from aqformat.converters.shape_choice import choose_shape, shape_errors  # noqa: E402
from aqformat.errors import AqmInputError  # noqa: E402


def _never(name):
    raise AssertionError(f"{name} was read: the shape should not have been measured")


def test_a_large_model_keeps_the_default_shape_without_measuring():
    opts = ConvertOptions(bits_per_weight=4, encoder=EncoderOptions(bits_per_code="auto"))
    # 16 KiB of codebooks against 2 MB of codes: under 1%
    assert choose_shape(opts, {"w": (2000, 2000)}, _never, {}) is opts


def test_the_shape_is_chosen_only_when_asked():
    for enc in (EncoderOptions(), EncoderOptions(bits_per_code=8), EncoderOptions(d=4)):
        opts = ConvertOptions(bits_per_weight=4, encoder=enc)
        assert choose_shape(opts, {"w": (256, 256)}, _never, {}) is opts
    assert EncoderOptions.of({"bits_per_code": "auto"}).choose_shape
    with pytest.raises(AqmInputError, match="vector length too"):
        EncoderOptions(bits_per_code="auto", d=4)


def test_errors_are_measured_at_the_code_rate_and_longer_codebooks_code_better():
    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    err = shape_errors(x, 2.0, EncoderOptions(beam=2, iters=1), seed=0)
    assert {(c.b, c.d, c.M) for c in err} == {(8, 8, 2), (8, 4, 1), (4, 8, 4), (4, 4, 2), (4, 2, 1)}
    assert all(c.code_bits == 2.0 for c in err)
    # a Gaussian at 2 bits: 1/16 of its variance at the bound (the codebooks, trained on these very
    # vectors, may dip a little under it); 8-vectors beat 2-vectors
    assert 0.05 < min(err.values()) < 0.2
    assert err[next(c for c in err if (c.b, c.d) == (8, 8))] < err[next(c for c in err if (c.b, c.d) == (4, 2))]


def test_a_small_model_gets_small_codebooks_that_pay_for_themselves(tmp_path):
    """A 55 k-weight model at 3 bits: the default's 8-bit codebooks (12 KiB a group) cost more than
    they save; the chosen shape gives a smaller file with less error per byte."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 384), torch.nn.ReLU(), torch.nn.Linear(384, 64))
    kw = dict(bits=3, codec="aq", progress=False, grouping="shared")
    chosen = from_torch(net, tmp_path / "auto.aqm", encoder={"beam": 2, "iters": 1, "bits_per_code": "auto"}, **kw)
    fixed = from_torch(net, tmp_path / "fixed.aqm", encoder={"beam": 2, "iters": 1, "bits_per_code": 8, "d": 8}, **kw)
    with aqformat.open(tmp_path / "auto.aqm") as f:
        (group,) = f.codebook_groups
        assert (group.K, group.d) != (256, 8) and group.M * np.log2(group.K) / group.d == 3
    assert chosen.codebook_bytes < fixed.codebook_bytes / 4
    assert os.path.getsize(tmp_path / "auto.aqm") < os.path.getsize(tmp_path / "fixed.aqm")
    err = {k: np.mean([10 ** (-s.weight_sqnr_db[n] / 10) for n in ("0.weight", "2.weight")])
           for k, s in (("auto", chosen), ("fixed", fixed))}
    bits = {k: 8 * os.path.getsize(tmp_path / f"{k}.aqm") / (2 * 64 * 384) for k in ("auto", "fixed")}
    # equal bytes: each bit per weight saved is worth 6 dB
    assert err["auto"] * 4 ** bits["auto"] < err["fixed"] * 4 ** bits["fixed"]


def test_the_cli_takes_auto_and_refuses_other_words(tmp_path, capsys):
    from aqformat.cli import main as aqm_main
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 384), torch.nn.ReLU(), torch.nn.Linear(384, 64))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "m.aqm"
    args = ["convert", str(tmp_path / "m.pt"), "-o", str(out), "--bits", "3", "--grouping", "shared",
            "--beam", "2", "--iters", "1", "--no-progress", "-q"]
    assert aqm_main([*args, "--bits-per-code", "auto"]) == 0
    with aqformat.open(out) as f:
        assert [(g.K, g.d) for g in f.codebook_groups] != [(256, 8)]
    with pytest.raises(SystemExit) as e:
        aqm_main([*args, "--bits-per-code", "many"])
    assert e.value.code == 2 and "expected a number of bits or 'auto'" in capsys.readouterr().err
