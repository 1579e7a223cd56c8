"""Hugging Face sharded safetensors folders (model.safetensors.index.json) read as one model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from aqformat.converters.sources import open_source
from aqformat.errors import AqmInputError

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _folder(tmp_path, shards=None, index=None):
    rng = np.random.default_rng(0)
    shards = shards or {"model-00001-of-00002.safetensors": ["a.weight", "b.weight"],
                        "model-00002-of-00002.safetensors": ["c.weight"]}
    for f, names in shards.items():
        safetensors_numpy.save_file({n: rng.standard_normal((4, 8)).astype(np.float32) for n in names},
                                    str(tmp_path / f))
    index = index if index is not None else {n: f for f, names in shards.items() for n in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_shards_read_as_one_model(tmp_path):
    folder = _folder(tmp_path)
    # a consolidated copy beside the shards is not read twice
    safetensors_numpy.save_file({"a.weight": np.zeros((4, 8), np.float32)}, str(folder / "consolidated.safetensors"))
    src = open_source(str(folder))
    assert [s.name for s in src.specs] == ["a.weight", "b.weight", "c.weight"]
    assert src.load("c.weight").shape == (4, 8)


@pytest.mark.parametrize("index,match", [
    ({"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
      "c.weight": "model-00002-of-00002.safetensors", "d.weight": "model-00002-of-00002.safetensors"},
     "'d.weight': the index puts it in model-00002-of-00002.safetensors, which lacks it"),
    ({"a.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors"},
     "'b.weight': model-00001-of-00002.safetensors holds it, the index does not"),
    ({"a.weight": "missing.safetensors"}, "shard missing.safetensors is missing"),
    ({"a.weight": "../x.safetensors"}, "not a .safetensors file name in the folder"),
    ({}, "no weight_map"),
])
def test_inconsistent_index_is_one_line(tmp_path, index, match):
    with pytest.raises(AqmInputError, match=match):
        open_source(str(_folder(tmp_path, index=index)))
