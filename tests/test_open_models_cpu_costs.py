"""What a catalogue model costs on a CPU: int8 weights, real-shaped random checkpoints, the cost bench.

The bench itself (`python -m tools.open_model_bench --cpu-costs`) is run at
tiny shapes here; the catalogue's real shapes are checked against the
parameter counts the catalogue states, without building them.
"""
from __future__ import annotations

import math

import pytest
import torch

from denoiser.backend import ModelLoadError
from denoiser.catalogue import CATALOGUE, DREAM, LLADA, OPEN_DCODER, CatalogueEntry, ModelShape
from denoiser.open_models import load_open_model
from denoiser.open_models.checkpoint import estimate_bytes, inspect_directory
from denoiser.open_models.families import family_spec
from denoiser.open_models.network import Int8Linear, linear
from tools import open_model_bench as bench
from tools.tiny_open import family_config, make_tiny_checkpoint

TINY = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, tied_embeddings=False,
                  rope_theta=1e6, max_positions=4096)


def test_catalogue_shapes_match_the_stated_parameter_counts():
    for entry in CATALOGUE:
        s = entry.shape
        config = family_config(entry.family, {"mask_token_id": 1}, tie=s.tied_embeddings, layers=s.layers,
                               hidden=s.hidden, heads=s.heads, kv_heads=s.kv_heads, intermediate=s.intermediate,
                               vocab_rows=s.vocab, rope_theta=s.rope_theta, max_positions=s.max_positions)
        count = family_spec(config).shape.parameter_count() / 1e9
        assert count == pytest.approx(entry.parameters_b, rel=0.02), entry.name


def test_catalogue_licences_say_where_they_were_confirmed():
    for entry in CATALOGUE:
        assert entry.licence and entry.licence_source
        if entry.licence_verified:
            assert "https://" in entry.licence_source, entry.name
        else:
            assert entry.licence.endswith("(unverified)"), entry.name


# --- int8 weights --------------------------------------------------------------------------

def test_int8_linear_is_close_to_the_float_matmul():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    x = torch.randn(2, 7, 64)
    ref = x @ w.T
    got = linear(x, Int8Linear(w), torch.ones(96))
    assert got.shape == (2, 7, 96)
    assert ((got - 1 - ref).norm() / ref.norm()) < 0.02
    # Per-token scales: one huge row does not wreck the others.
    x[0, 0] *= 1000
    rows = linear(x, Int8Linear(w))[1]
    assert ((rows - x[1] @ w.T).norm() / (x[1] @ w.T).norm()) < 0.02
    assert Int8Linear(w).nbytes < w.numel() * 2


@pytest.mark.parametrize("family", [DREAM, LLADA, OPEN_DCODER])
def test_int8_model_loads_smaller_and_predicts_close_to_fp32(tmp_path, family):
    make_tiny_checkpoint(tmp_path, family, seed=51)
    exact = load_open_model(tmp_path, "cpu")
    small = load_open_model(tmp_path, "cpu", int8=True)
    assert isinstance(small.model.layers[0].q_proj, Int8Linear) and isinstance(small.model.lm_head, Int8Linear)
    assert small.model.embed.dtype == torch.bfloat16 and small.parameters == exact.parameters
    assert small.model.weight_bytes() < exact.model.weight_bytes() / 2.5
    ids = torch.arange(48) % 100
    a, b = exact.model.full(ids), small.model.full(ids)
    # Measured 5-6 % relative error and 88-93 % equal argmaxes (bf16: 3 %, 92-98 %) on these tiny
    # random models, whose weights (std 0.2) are far larger than a trained model's.
    assert ((b - a).norm() / a.norm()) < 0.12
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_int8_estimate_is_below_bf16_and_int8_needs_a_cpu(tmp_path):
    make_tiny_checkpoint(tmp_path, DREAM, seed=52)
    spec = inspect_directory(tmp_path).spec
    assert estimate_bytes(spec, torch.float32, int8=True) < estimate_bytes(spec, torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError):
            load_open_model(tmp_path, "cuda", int8=True)


# --- real-shaped random checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("family", [DREAM, LLADA, OPEN_DCODER])
def test_random_checkpoint_of_a_shape_passes_the_loader_checks(tmp_path, family):
    shape = ModelShape(**{**TINY.__dict__, "tied_embeddings": family == OPEN_DCODER})
    bench.write_random_checkpoint(family, shape, tmp_path, shard_bytes=40_000, progress=lambda line: None)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    backend = load_open_model(tmp_path, "cpu", dtype=torch.bfloat16)
    assert backend.parameters == pytest.approx(bench.shape_parameters(shape), rel=0.01)
    assert backend.model.layers[0].q_proj.dtype == torch.bfloat16


def test_one_measurement_does_the_fixed_work(tmp_path):
    bench.write_random_checkpoint(DREAM, TINY, tmp_path, progress=lambda line: None)
    plan = bench.CostPlan(context=96, span=8, steps=4, refresh_every=2, requests=3, warmup=1, threads=1)
    result = bench.measure(tmp_path, "int8", plan, evict=True)
    assert result["steps"] == [4] and result["full_passes"] == [2]
    assert len(result["latency_s"]) == 3 and result["p50_s"] <= result["p99_s"]
    assert all(len(fill) == 8 for fill in result["fills"])
    assert result["memory_after_load"]["rss_gib"] > 0 and result["memory_ready"]["peak_gib"] > 0
    assert result["first_completion_s"] > 0 and result["cpu_p50_s"] > 0
    assert result["full_pass_s"] > 0 and result["window_pass_s"] > 0


def test_the_cost_run_measures_each_shape_once_in_fresh_processes(tmp_path):
    entries = [CatalogueEntry(f"tiny-{i}", f"org/tiny-{i}", DREAM, 0.0001, 0.0002, "mit", "https://example",
                              TINY, "tiny") for i in range(2)]
    plan = bench.CostPlan(context=64, span=8, steps=2, refresh_every=4, requests=2, warmup=0, threads=1)
    report = bench.run_cpu_costs(entries, ["fp32", "int8"], plan, tmp_path, use_cache=False, say=lambda line: None)
    (row,) = report["shapes"]
    assert row["models"] == ["tiny-0", "tiny-1"] and row["weights"] == "random, real shape"
    fp32, int8 = row["results"]
    assert "skipped" not in fp32 and "skipped" not in int8, row
    assert int8["agreement"]["against"] == "fp32" and 0 <= int8["agreement"]["tokens_equal"] <= 1
    assert int8["memory_after_load"]["rss_gib"] > 0 and fp32["load_s"] > 0
    assert not any(tmp_path.iterdir())  # the random checkpoint is removed
    assert "bidirectional" in report["kv_reuse"][DREAM]


def test_agreement_counts_tokens_and_whole_fills():
    ref = {"precision": "fp32", "fills": [[1, 2, 3], [4, 5]]}
    other = {"precision": "int8", "fills": [[1, 2, 9], [4, 5]]}
    got = bench.agreement(other, ref)
    assert got["tokens_equal"] == pytest.approx(4 / 5) and got["fills_identical"] == 0.5
    assert math.isclose(bench.agreement(ref, ref)["tokens_equal"], 1.0)
