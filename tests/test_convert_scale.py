"""bench/convert_scale.py's report: the extrapolation refuses a run where more workers were not faster."""
from __future__ import annotations

import numpy as np

from bench.convert_scale import _report, llm_shapes


def _run(wall: dict[int, float]) -> dict[int, dict]:
    return {n: {"wall_s": s, "sha256": "same"} for n, s in wall.items()}


def test_extrapolation_from_a_real_speed_up(capsys):
    _report(_run({1: 100.0, 2: 55.0}), [1, 2], 10**9)
    out = capsys.readouterr().out
    assert "speed-up 1 -> 2 workers: 1.82x" in out
    assert "serial part (reading, sampling, writing): 10 s of 100 s" in out
    assert "extrapolated 7 B" in out and "extrapolated 70 B" in out


def test_no_extrapolation_when_two_workers_were_not_faster(capsys):
    _report(_run({1: 100.0, 2: 101.0}), [1, 2], 10**9)
    out = capsys.readouterr().out
    assert "no extrapolation: 2 workers were not faster than 1" in out
    assert "extrapolated" not in out


def test_default_shapes_make_a_billion_parameters():
    params = sum(int(np.prod(s)) for _, s in llm_shapes(2048, 18, 32000))
    assert 1.0e9 < params < 1.1e9
