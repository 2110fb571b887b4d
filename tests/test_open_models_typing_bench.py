"""`tools/open_model_bench.py --cpu-costs --typing` on a tiny random checkpoint: what it measures and writes."""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from tools.open_model_bench import (TYPING_CONFIGS, TypingPlan, keystroke_agreement, measure_typing, plot_typing,
                                    typed_requests, typing_summary)
from tools.tiny_open import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-dcoder")
    make_tiny_checkpoint(d, "open-dcoder", seed=4)
    return d


def test_typed_requests_grow_the_prefix_and_keep_the_suffix():
    plan = TypingPlan(requests=5, chars=3, context=256)
    requests = typed_requests(Path(__file__).read_text(), plan, len)
    assert len(requests) == 5
    for a, b in pairwise(requests):
        assert b.prefix.startswith(a.prefix) and len(b.prefix) == len(a.prefix) + 3
        assert b.suffix == a.suffix


def test_typing_measures_every_configuration_with_fixed_work(tiny, tmp_path):
    plan = TypingPlan(requests=6, context=256, schedules=("8x2",), off_every=3, cold_requests=2, threads=1)
    result = measure_typing(tiny, "fp32", plan)
    s = result["schedules"]["8x2"]
    assert set(s["configs"]) == set(TYPING_CONFIGS)
    for name, row in s["configs"].items():
        on = TYPING_CONFIGS[name][0] is not None
        series = row["per_request"]
        assert len(series) == (6 if on else 2)
        assert all(r["steps"] == 2 for r in series)  # no early stop: the same work every request
        if on:
            assert series[0]["reused"] == 0 and all(r["reused"] > 0 for r in series[1:])
            assert row["refreshes"] == 1 and row["keystroke_s"]["n"] == 5
        else:
            assert all(r["reused"] == 0 for r in series)
    assert s["cold_s"]["off, one full pass"]["n"] == 2
    assert result["load_average"]["max"] >= result["load_average"]["min"]
    assert any("keystroke p50" in line for line in typing_summary(result))
    report = {"plan": {"schedules": ["8x2"], "context": 256, "chars": 3}, "machine": {"threads": 1, "cpu": "test"},
              "shapes": [{"models": ["tiny"], "results": [result]}]}
    plot_typing(report, tmp_path / "typing.png")
    assert (tmp_path / "typing.png").stat().st_size > 0


def test_agreement_compares_each_schedule_with_exact_recomputation():
    out = keystroke_agreement(TypingPlan(requests=6, context=128), families=("llada",), steps=2, span=8)
    row = out["llada"]
    assert row["exact (every step a full pass)"]["vs_exact"] == {"tokens_equal": 1.0, "fills_identical": 1.0}
    assert row["off, one full pass"]["vs_one_full_pass"]["fills_identical"] == 1.0
    first = row["first_pass_top1"]["shift"]
    assert first["reusing_requests"] == 5 and 0 <= first["top1_equal"] <= 1
