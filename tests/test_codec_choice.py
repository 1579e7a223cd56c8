"""``--codec auto``, the default: per-tensor codec choice by measured error per byte, within a budget of every byte."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import aqformat
from aqformat.errors import AqmInputError
from aqformat.inspect import describe, render_text
from aqformat.converters.codec_choice import parse_codec_for
from aqformat.converters.options import ConvertOptions

SMALL_AQ = {"bits_per_code": 4, "d": 4, "iters": 2, "beam": 4}


def _linear(kind: str, rows: int = 512, cols: int = 256) -> torch.nn.Module:
    """A Linear layer of i.i.d. Gaussian or Laplacian weights, or of clustered 4-vectors."""
    rng = np.random.default_rng(0)
    if kind == "clustered":  # 4-vectors near one of 16 prototypes: what a 16-entry codebook codes well
        w = rng.standard_normal((16, 4))[rng.integers(0, 16, rows * cols // 4)].reshape(rows, cols)
        w += 0.05 * rng.standard_normal((rows, cols))
    else:
        w = rng.standard_normal((rows, cols)) if kind == "gauss" else rng.laplace(0, 1, (rows, cols))
    m = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy((w * 0.02).astype(np.float32)))
        m.bias.copy_(torch.from_numpy(rng.uniform(-0.05, 0.05, rows).astype(np.float32)))
    return m


@pytest.fixture(scope="module")
def auto_file(tmp_path_factory):
    """Laplacian weights at 4 bits per weight: the entropy-coded lattice beats AQ and affine codes."""
    from aqformat.converters import from_torch
    path = str(tmp_path_factory.mktemp("auto") / "m.aqm")
    summary = from_torch(_linear("laplace"), path, codec="auto", bits=4, encoder=SMALL_AQ, progress=False)
    return path, summary


def test_lattice_where_it_codes_better(auto_file):
    """The Laplacian tensor goes to the lattice, whose error at its bytes is below what AQ and the affine
    codec give at more bytes."""
    path, _ = auto_file
    with aqformat.open(path) as f:
        assert f.info("weight").codec == "lattice"
        codec, _, nbytes, error, others = f.metadata["conversion"]["choice"]["weight"]
    assert codec == "lattice"
    for other in ("aq", "affine"):
        assert others[other][1] > error or others[other][0] > nbytes


def test_aq_where_it_codes_better(tmp_path):
    """At 1.5 bits per weight a tensor of clustered 4-vectors is better coded by vectors: AQ is chosen
    (the scalar codec's error exceeds AQ's there). On i.i.d. Gaussian weights at 1.5 bits the two were
    within 3% of each other in error and bytes."""
    from aqformat.converters import from_torch
    path = str(tmp_path / "g.aqm")
    from_torch(_linear("clustered"), path, codec="auto", bits=1.5, encoder=SMALL_AQ, progress=False)
    with aqformat.open(path) as f:
        assert f.info("weight").codec == "aq"
        _, _, nbytes, error, others = f.metadata["conversion"]["choice"]["weight"]
    grid = next(v for k, v in others.items() if k in ("lattice", "uniform"))
    assert grid[1] > error or grid[0] > nbytes


def test_uniform_where_the_dither_would_drown_the_weights(tmp_path):
    """At 1 bit per weight the Laplacian tensor's step is so coarse that the lattice's dither noise
    exceeds NOISY_LATTICE of its energy: it takes the uniform codec, which rounds most weights to
    zero, while the lattice forced on it cannot reach that budget at all."""
    from aqformat.converters import from_torch
    path = str(tmp_path / "u.aqm")
    from_torch(_linear("laplace"), path, codec="auto", bits=1.0, encoder=SMALL_AQ, progress=False)
    with aqformat.open(path) as f:
        codec, _, _, error, _ = f.metadata["conversion"]["choice"]["weight"]
        assert codec == f.info("weight").codec == "uniform" and error < 0.6  # 0.53 of its energy
    with pytest.raises(AqmInputError, match="out of reach"):
        from_torch(_linear("laplace"), path, codec="auto", bits=1.0, codec_for=["weight:lattice"],
                   encoder=SMALL_AQ, progress=False)


def test_bits_hold_with_every_byte_counted(auto_file):
    """--bits 4: the whole file but its raw tensors and the header's fixed part fits 4 bits per weight
    of the coded tensors (their records in the header counted)."""
    from aqformat.converters.size_target import header_bytes
    path, _ = auto_file
    with aqformat.open(path) as f:
        infos = f.tensors()
        raw = [i for i in infos if i.codec == "raw"]
        coded = sum(i.numel for i in infos if i.codec != "raw")
    fixed = header_bytes([i.name for i in raw])[1]
    assert os.path.getsize(path) - sum(i.stored_bytes for i in raw) - fixed <= 4 * coded / 8


def test_target_size_holds(tmp_path):
    from aqformat.converters import from_torch
    path = str(tmp_path / "t.aqm")
    from_torch(_linear("laplace"), path, codec="auto", target_size="40kB", encoder=SMALL_AQ, progress=False)
    assert 0.8 * 40000 <= os.path.getsize(path) <= 40000  # one tensor: steps of 1/4 bit per weight


def test_lattice_step_section_is_stored_compressed_and_counted_so(auto_file):
    """The tensor's one step repeated a row is zstd-coded (not 4 bytes a row), and the bytes the
    choice counted for the tensor are at least what it takes in the file."""
    path, _ = auto_file
    with aqformat.open(path) as f:
        step = f.section(f.record("weight").fields["step"])
        assert step.encoding == "zstd" and step.length < 64 and step.size == 512 * 4
        counted = f.metadata["conversion"]["choice"]["weight"][2]
        assert f.info("weight").stored_bytes <= counted


def test_file_reads_back_as_chosen(auto_file):
    path, summary = auto_file
    with aqformat.open(path) as f:
        for name, w in _linear("laplace").state_dict().items():
            err = np.sum((f.read(name) - w.numpy()) ** 2) / np.sum(w.numpy() ** 2)
            assert err < 0.02, name
    assert summary.weight_sqnr_db["weight"] > 17


def test_info_shows_why(auto_file):
    path, _ = auto_file
    r = describe(path)
    by_name = {t["name"]: t for t in r["tensors"]}
    assert by_name["weight"]["choice"]["codec"] == "lattice"
    assert "aq" in by_name["weight"]["choice"]["others"]
    assert "codec choice (--codec auto)" in render_text(r)


def test_forced_codec(tmp_path):
    """--codec-for forces a codec on the tensors a pattern names, small ones included."""
    from aqformat.converters import from_torch
    path = str(tmp_path / "f.aqm")
    m = torch.nn.Sequential(_linear("gauss", 128, 128), _linear("laplace", 128, 128))
    from_torch(m, path, codec="auto", bits=4, codec_for=["0.*:lattice", "1.bias:fp16", "1.weight:affine"],
               encoder=SMALL_AQ, progress=False)
    with aqformat.open(path) as f:
        assert f.info("0.weight").codec == f.info("0.bias").codec == "lattice"
        assert f.info("1.bias").codec == "half" and f.info("1.weight").codec == "affine"


def test_forced_codec_that_cannot_code_the_tensor(tmp_path):
    from aqformat.converters import from_torch
    m = torch.nn.Linear(64, 1)
    with pytest.raises(AqmInputError, match=r"tensor 'bias' cannot be coded by aq: AQ needs"):
        from_torch(m, str(tmp_path / "a.aqm"), codec="auto", codec_for=["bias:aq"], progress=False)
    big = torch.nn.Linear(64, 128)
    with torch.no_grad():
        big.weight[0, 0] = 1e30
    with pytest.raises(AqmInputError, match=r"tensor 'weight' cannot be coded by lattice: .*int32") as e:
        from_torch(big, str(tmp_path / "b.aqm"), codec="auto", codec_for=["weight:lattice"], progress=False)
    assert "\n" not in str(e.value)


def test_codec_for_parsing():
    assert parse_codec_for(["a.*:lattice", "onnx::Conv_1:fp16"]) == (("a.*", "lattice"), ("onnx::Conv_1", "half"))
    with pytest.raises(AqmInputError, match="PATTERN:CODEC"):
        parse_codec_for(["a.*:zip"])
    with pytest.raises(AqmInputError, match="--codec auto"):
        ConvertOptions.build(bits=4, target_size=None, keep=(), encoder=None, codec_for=["*:aq"], codec="aq")


def test_the_default_codec_is_auto_and_aq_options_ask_for_aq(tmp_path):
    """No --codec: the per-tensor choice, unless --permute or --allocate (AQ's options) is given, which
    with --codec auto are an error saying so. Fine-tuning keeps the per-tensor choice."""
    from aqformat.converters import from_torch

    def build(**kw):
        return ConvertOptions.build(bits=4, target_size=None, keep=(), encoder=None, **kw).codec
    assert build() == "auto"
    assert build(permute=True) == build(allocate=True) == "aq"
    assert build(codec="lattice") == "lattice"
    for option in ("permute", "allocate"):
        with pytest.raises(AqmInputError, match="AQ options"):
            build(codec="auto", **{option: True})
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
    s = from_torch(torch.nn.Sequential(_linear("gauss", 128, 256)), tmp_path / "t.aqm", bits=4, progress=False,
                   calib=str(tmp_path / "calib.npy"), finetune_steps=2)
    with aqformat.open(s.path) as f:
        assert f.metadata["conversion"]["codec"] == "auto" and f.metadata["finetune"]["steps_done"] == 2


@pytest.mark.parametrize("scale", [0.5, 3, 40, 400])
def test_estimate_bits_tracks_the_rans_stream(scale):
    """The fast rate estimate the codec choice searches with is within 2% of the rans stream's
    bytes, at low rates and at high ones, where the alphabet is wide and the tables are a large
    part of the stream (an estimate charging 3 bytes per table entry read 25% high there)."""
    from aqformat import rans
    rng = np.random.default_rng(1)
    q = np.rint(rng.laplace(0, scale, (128, 512)) * np.linspace(0.2, 2, 128)[:, None]).astype(np.int32)
    assert rans.estimate_bits(q) / 8 == pytest.approx(len(rans.encode(q)), rel=0.02)


def test_allocate_without_calibration_gives_large_weights_the_bits(tmp_path):
    """Data-free --allocate weighs every weight's squared error alike: of two tensors alike but for a
    factor of 1000 in scale, the large one gets the wider code (each tensor's relative error, the rule
    before, saw them as equal)."""
    from aqformat.converters import from_torch
    m = torch.nn.Sequential(_linear("gauss", 256, 256), _linear("gauss", 256, 256))
    with torch.no_grad():
        m[1].weight.mul_(1e-3)
    out = tmp_path / "a.aqm"
    from_torch(m, out, bits=3, allocate=True, grouping="shared", progress=False,
               encoder={"bits_per_code": 4, "d": 4, "beam": 2, "iters": 1})
    with aqformat.open(out) as f:
        books = {g.name: g.M for g in f.codebook_groups}
        M = {i.name: books[i.group] for i in f.tensors() if i.group is not None}
    assert M["0.weight"] > M["1.weight"]


def test_data_free_steps_follow_a_power_of_each_tensors_scale(tmp_path):
    """Without calibration a tensor's squared error is weighed by its mean energy to the power
    -DATA_FREE_EXPONENT, so the equal-slope lattice step grows as its RMS to the power
    DATA_FREE_EXPONENT: of two lattice tensors alike but for a factor of 100 in scale, the large
    one's step is 100 ** DATA_FREE_EXPONENT times the small one's, within 1.5x either way (steps
    lie on a grid of 4 per octave, and the budget's last bytes go by greedy upgrades, off the equal
    slope; one global step would give a ratio near 1)."""
    from aqformat.converters import from_torch
    from aqformat.converters.codec_choice import DATA_FREE_EXPONENT
    m = torch.nn.Sequential(_linear("laplace", 256, 256), _linear("laplace", 256, 256))
    with torch.no_grad():
        m[1].weight.mul_(1e-2)
    path = str(tmp_path / "s.aqm")
    from_torch(m, path, codec="auto", bits=4, codec_for=["*.weight:lattice"], encoder=SMALL_AQ, progress=False)
    with aqformat.open(path) as f:
        choice = f.metadata["conversion"]["choice"]
    step = {n: float(choice[n][1].split()[-1]) for n in ("0.weight", "1.weight")}
    expected = 100 ** DATA_FREE_EXPONENT
    assert expected / 1.5 <= step["0.weight"] / step["1.weight"] <= 1.5 * expected, step


def test_no_tensor_gets_a_lattice_step_noisier_than_zeros(tmp_path):
    """A dithered lattice step far above a tensor's spread decodes to the dither's noise (step**2 / 12
    a weight): more error than storing zeros. At 1 bit/weight the only fit for these two tensors
    was such a step for the one 100x smaller (relative error 8.96; the digits CNN got 8.6 at 1 b/w
    and lost its accuracy): forced to the lattice, that budget is out of reach, and a budget that
    fits gets no option worse than zeros. The uniform codec, auto's own, rounds small weights to
    zero instead of adding noise: it reaches 1 bit/weight with less error than zeros."""
    from aqformat.converters import from_torch
    m = torch.nn.Sequential(_linear("laplace", 256, 256), _linear("laplace", 256, 256))
    with torch.no_grad():
        m[1].weight.mul_(1e-2)
    path = str(tmp_path / "z.aqm")
    lattice = ["*.weight:lattice"]
    with pytest.raises(aqformat.AqmInputError, match="out of reach"):
        from_torch(m, path, codec="auto", bits=1.0, codec_for=lattice, encoder=SMALL_AQ, progress=False)
    for bits, codec_for in ((1.5, lattice), (1.0, [])):
        from_torch(m, path, codec="auto", bits=bits, codec_for=codec_for, encoder=SMALL_AQ, progress=False)
        with aqformat.open(path) as f:
            choice = f.metadata["conversion"]["choice"]
        assert all(choice[n][3] < 1.0 for n in ("0.weight", "1.weight")), choice
