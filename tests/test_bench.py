"""`parafill bench --quick` on a tiny random model: the report has every section, named by
device, with sane values (no timing thresholds: CI machines vary)."""
import json
import math

import pytest

from tools import bench


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--tiny", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    (json_name,) = [f for f in files if f.endswith(".json")]
    assert json_name.replace(".json", ".png") in files
    data = json.loads((out / json_name).read_text())
    return json_name, data


def test_named_by_device_and_model(report):
    name, data = report
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert name.startswith(bench.slug(data["device"]["name"])[:20]) and name.endswith("__tiny-random__quick.json")
    assert data["command"].startswith("parafill bench --tiny --quick")
    assert positive(data["device"]["bandwidth"]["gbps"]) and "measured" in data["device"]["bandwidth"]["method"]
    assert data["model"]["parameters"] > 0 and data["model"]["step_runner"] == "EagerStep"


def test_denoiser_rows_cover_spans_batches_and_steps(report):
    _, data = report
    rows = data["denoiser"]["rows"]
    plan = bench.Plan(quick=True)
    assert {(r["span"], r["batch"]) for r in rows} == {(s, b) for s in plan.spans for b in plan.batches}
    for r in rows:
        assert positive(r["step_ms"]) and positive(r["weights_gbps"]) and r["weights_and_kv_gbps"] > r["weights_gbps"]
        assert 0 < r["bandwidth_fraction"]
        by_steps = {int(k): v for k, v in r["tokens_per_s_by_steps"].items()}
        assert set(by_steps) == {s for s in plan.steps if s <= r["span"]}
        # Same step time: twice the steps, half the tokens/s.
        assert by_steps[1] == pytest.approx(r["span"] * r["batch"] / (r["step_ms"] / 1000), rel=0.01)
        assert by_steps[1] > by_steps[max(by_steps)]


def test_each_step_beside_its_bound_at_the_rate_of_the_dtype_it_runs_in(report):
    _, data = report
    dtypes = data["denoiser"]["flop_dtypes"]
    assert dtypes["attention"] == "float32"
    assert dtypes["linear"] == ("bfloat16" if data["model"]["cpu_precision"] == "bf16" else "float32")
    for dtype in set(dtypes.values()):
        rate = data["device"]["matmul"] if dtype == "float32" else data["device"][f"matmul_{dtype}"]
        assert rate["dtype"] == dtype and positive(rate["gflops"])
    for r in data["denoiser"]["rows"]:
        assert r["x_bound"] == pytest.approx(r["step_ms"] / r["bound_ms"], rel=0.02)
        if dtypes["linear"] != "float32":  # the bound with every FLOP in fp32 too, to compare precisions
            assert r["x_bound_float32"] == pytest.approx(r["step_ms"] / r["bound_float32_ms"], rel=0.02)
    assert "x_bound" in data["headline"]["step"]


def test_flops_by_kind_add_up():
    from denoiser.config import ModelConfig

    config = ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=704)
    parts = bench.span_step_flop_parts(config, 1, 1024, 32)
    assert parts["attention"] == 4 * 4 * (1024 + 32) * 256 * 32
    assert sum(parts.values()) == bench.span_step_flops(config, 1, 1024, 32)
    rates = {"float32": {"gflops": 100.0}, "bfloat16": {"gflops": 200.0}}
    mixed = bench.step_bound_s(parts, {"linear": "bfloat16", "attention": "float32"}, rates)
    assert mixed == pytest.approx(parts["linear"] / 200e9 + parts["attention"] / 100e9)


def test_autoregressive_baseline_and_ratio(report):
    _, data = report
    ar = data["autoregressive"]
    assert positive(ar["tokens_per_s"]) and positive(ar["token_ms"]) and ar["tokens"] == bench.Plan(True).ar_tokens
    head = data["headline"]
    assert head["span"] == 32 and head["autoregressive_tokens_per_s"] == ar["tokens_per_s"]
    for steps, ratio in head["ratio_to_autoregressive_by_steps"].items():
        assert ratio == pytest.approx(head["denoiser_tokens_per_s_by_steps"][steps] / ar["tokens_per_s"], rel=0.02)
    fills = data["real_fills"]
    assert fills["denoiser"]["requests"] == fills["autoregressive"]["requests"] > 0
    # Steps were capped at 4 per span (a span may grow once): at most 8 passes per request.
    assert fills["denoiser"]["forward_passes"] <= 8 * fills["denoiser"]["requests"]
    latency = fills["denoiser"]["latency_ms"]
    assert latency["n"] == fills["denoiser"]["requests"] and positive(latency["p50"]) and latency["p50"] <= latency["p99"]
    assert head["complete_cold_context_ms"] == latency


def test_context_scaling_and_concurrency(report):
    _, data = report
    scaling = data["context_scaling"]
    assert [r["context"] for r in scaling["rows"]] == [512, 1024] and not scaling["skipped"]
    assert all(positive(r["step_ms"]) and positive(r["cold_prefill_ms"]) for r in scaling["rows"])
    rows = data["concurrency"]["rows"]
    assert [r["clients"] for r in rows] == [1, 4]
    for r in rows:
        assert r["requests"] == r["clients"] * bench.Plan(True).requests_per_client
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert rows[0]["batching"]["shared_steps"] == 0


def test_end_to_end_lsp_session_and_memory(report):
    _, data = report
    e2e = data["e2e_lsp"]
    latency = e2e["latency_ms"]
    assert latency["inline_automatic"]["n"] == e2e["keystrokes"] == 8
    assert latency["completion_invoked"]["n"] >= 1
    assert latency["all"]["n"] == sum(v["n"] for k, v in latency.items() if k != "all")
    assert 0 < latency["all"]["p50"] <= latency["all"]["p90"] <= latency["all"]["p99"]
    status = e2e["server_status"]
    assert status["state"] == "ready" and status["requests"]["errors"] == 0
    memory = data["memory"]
    assert positive(memory["bench_process_peak_rss_mib"]) and positive(memory["server_peak_rss_mib"])
    assert memory["gpu_peak_allocated_mib"] is None


def test_skipped_context_lengths_say_why():
    class Config:
        max_positions = 1024
        context_tokens = 512

    class Backend:  # only what bench_context_scaling reads before it measures
        model = type("M", (), {"config": Config()})()
        max_context_tokens = 512

    plan = bench.Plan(quick=True)
    plan.contexts = (2048, 4096)
    result = bench.bench_context_scaling(Backend(), plan)
    assert result["rows"] == [] and [s["context"] for s in result["skipped"]] == [2048, 4096]
    assert all("1024 positions" in s["reason"] for s in result["skipped"])


def test_soak_flag_hands_over_to_the_soak_module(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("tools.soak")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "tools.soak", fake)
    import tools

    monkeypatch.setattr(tools, "soak", fake, raising=False)
    assert bench.main(["--soak", "50", "--tiny", "--device", "cpu", "--seed", "3"]) == 0
    assert seen == [["--operations", "50", "--tiny", "--device", "cpu", "--seed", "3"]]
