"""`parafill bench --contended` measures completions idle and beside a CPU hog, and says which it picked."""
from __future__ import annotations

import json

from tools import bench


def test_contended_bench_reports_idle_and_loaded_latency(tmp_path, parafill_tiny_model):
    out = tmp_path / "contended.json"
    assert bench.main(["--contended", "--model", str(parafill_tiny_model), "--requests", "3", "--threads", "1",
                       "--hog", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    (row,) = results["rows"]
    assert row["threads"] == 1 and results["requests"] == 3
    for load in ("idle", "loaded"):
        assert row[load]["p50"] > 0 and row[load]["p99"] >= row[load]["p50"]
    assert row["p99_ratio"] > 0 and results["hog_processes"] == 1
    assert out.with_suffix(".png").stat().st_size > 0
