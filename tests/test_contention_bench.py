"""`parafill bench --contended` measures completions idle and beside a CPU hog, for fixed thread
counts and for parafill's own (automatic) choice."""
from __future__ import annotations

import json

import pytest

from tools import bench, contention_bench


@pytest.mark.parametrize("hog", ["torch", "python"])
def test_contended_bench_reports_idle_and_loaded_latency(tmp_path, parafill_tiny_model, hog):
    out = tmp_path / "contended.json"
    assert bench.main(["--contended", "--model", str(parafill_tiny_model), "--requests", "3", "--threads", "1,auto",
                       "--hog", hog, "--hog-processes", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    fixed, automatic = results["rows"]
    assert (fixed["threads"], fixed["automatic"], automatic["threads"], automatic["automatic"]) == ("1", False, "auto", True)
    assert results["requests"] == 3 and results["hog"]["kind"] == hog and results["hog"]["processes"] == 1
    assert results["hog"]["threads_each"] >= 1 and results["automatic_cap"] >= 1
    for row in results["rows"]:
        for load in ("idle", "loaded"):
            assert row[load]["p50"] > 0 and row[load]["p99"] >= row[load]["p50"]
            assert sum(row[load]["threads_used"].values()) == 3
        assert row["p99_ratio"] > 0 and row["p99_within_2x"] == (row["p99_ratio"] <= 2)
    assert fixed["loaded"]["threads_used"] == {"1": 3}
    assert set(results["busy_tasks"]) == {"idle", "loaded"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_hog_that_cannot_start_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setitem(contention_bench.HOGS, "python", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="did not start"):
        contention_bench.start_hog("python", 2)


def test_thread_counts_are_checked():
    assert contention_bench.parse_threads("1, 2,auto") == ["1", "2", "auto"]
    with pytest.raises(SystemExit):
        contention_bench.parse_threads("0,auto")
