"""`parafill bench --train` writes what it measured: tokens/s and GFLOP/s per variant."""
from __future__ import annotations

import json

from tools import train_bench


def test_train_bench_reports_rates_against_the_matmul(tmp_path):
    out = tmp_path / "train-step.json"
    assert train_bench.main(["--d-model", "64", "--n-layers", "1", "--n-heads", "1", "--d-ff", "128", "--vocab", "512",
                             "--context-tokens", "64", "--batch-size", "2", "--ar-positions", "8", "--steps", "1",
                             "--variants", "fp32,bf16", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["precision"] for r in results["variants"]] == ["fp32", "bf16"]
    assert set(results["matmul_gflops"]) == {"fp32", "bf16"} and results["matmul_gflops"]["fp32"] > 0
    for row in results["variants"]:
        assert row["tokens_per_s"] > 0 and row["gflops"] > 0 and 0 < row["of_matmul_rate"]
    assert results["variants"][0]["speedup_over_fp32"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0


def test_unknown_variant_is_a_usage_error(capsys):
    assert train_bench.main(["--variants", "fp8"]) == 2
    assert "--variants" in capsys.readouterr().err


def test_bench_train_flag_hands_over_to_the_training_bench(capsys):
    from tools import bench

    assert bench.main(["--train", "--variants", "fp8"]) == 2  # train_bench's own usage error
    assert "parafill bench --train" in capsys.readouterr().err
