"""CPU span steps compiled ahead of time in child processes (denoiser/cpu_compile.py): the same
hidden states and head tokens as the uncompiled passes, for any cached context length; each
model runs its own weights; packages found again by the next start; eager steps whenever a
shape is not ready, its inputs are laid out otherwise, or compiling failed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from denoiser.cpu_compile import resolve_cpu_compile, unavailable_reason
from denoiser.model import KVBuffers
from denoiser.native_backend import NativeBackend
from tests.test_model_cpu_inference import BANNED, VOCAB, filled_kv, make_model, span_ids

REPO = Path(__file__).resolve().parents[1]
# Compiling needs a C++ compiler, as it does on a user's machine.
needs_compiler = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One package cache for this file: a test that needs what another compiled loads it."""
    path = tmp_path_factory.mktemp("parafill-cache")
    before = os.environ.get("PARAFILL_CACHE")
    os.environ["PARAFILL_CACHE"] = str(path)
    yield path
    if before is None:
        del os.environ["PARAFILL_CACHE"]
    else:
        os.environ["PARAFILL_CACHE"] = before


def eager_hidden(cpu, span, kv, ctx_len):
    compiled, cpu.compiled = cpu.compiled, None
    try:
        return cpu.hidden(span, kv, ctx_len)
    finally:
        cpu.compiled = compiled


def test_the_cache_keeps_the_newest_models_packages(tmp_path):
    from denoiser.cpu_compile import prune_compiled

    for age, name in enumerate(["newest", "newer", "older", "oldest"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text("{}")
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "inductor").mkdir()  # the compiler's own cache, not a model's folder
    prune_compiled(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inductor", "newer", "newest"]


def test_the_setting_and_what_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.delenv("PARAFILL_CPU_COMPILE")
    assert resolve_cpu_compile("off") is False
    monkeypatch.setenv("PARAFILL_CPU_COMPILE", "off")
    assert resolve_cpu_compile() is False
    monkeypatch.setenv("PARAFILL_CPU_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="PARAFILL_CPU_COMPILE"):
        resolve_cpu_compile()
    # "auto" compiles only where a C++ compiler can be found.
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "C++ compiler" in unavailable_reason()
    assert resolve_cpu_compile("auto") is False


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_steps_give_the_uncompiled_hidden_states(dtype, compile_cache):
    model = make_model()
    kv = filled_kv(model, rows=2, length=40, capacity=64)
    cpu = model.prepare_cpu_inference(dtype, screen_head=False, compiled=True)
    span = span_ids(2, 24)
    assert cpu.compiled.compile_now(2), cpu.compiled.disabled
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.15, "rtol": 0.05}
    for ctx_len in (40, 17, torch.tensor([40, 23])):
        got = model.span_hidden(span, kv, ctx_len)
        torch.testing.assert_close(got, eager_hidden(cpu, span, kv, ctx_len), **tolerance)
    # Another document's cache has another capacity: the same package serves it.
    wider = filled_kv(model, rows=2, length=40, capacity=192)
    torch.testing.assert_close(model.span_hidden(span, wider, 40), eager_hidden(cpu, span, kv, 40), **tolerance)
    assert cpu.compiled.ready == {("hidden", 2, torch.get_num_threads())}
    # Any span length: one package for every span bucket.
    longer = span_ids(2, 40)
    torch.testing.assert_close(model.span_hidden(longer, kv, 23), eager_hidden(cpu, longer, kv, 23), **tolerance)
    assert cpu.compiled.ready == {("hidden", 2, torch.get_num_threads())}
    # Two rows of a larger batch tensor are strided, unlike what was compiled: those run eagerly.
    pooled = KVBuffers(torch.cat([kv.k, kv.k], dim=1), torch.cat([kv.v, kv.v], dim=1))
    assert cpu.compiled.hidden(span, pooled, 40) is None


@needs_compiler
def test_a_new_shape_runs_eagerly_until_its_package_is_ready(compile_cache):
    model = make_model()
    kv = filled_kv(model)
    cpu = model.prepare_cpu_inference(torch.float32, screen_head=False, compiled=True)
    span = span_ids(1, 16)
    assert cpu.compiled.hidden(span, kv, 40) is None  # not compiled yet: the caller runs the eager pass
    torch.testing.assert_close(model.span_hidden(span, kv, 40), eager_hidden(cpu, span, kv, 40))
    assert cpu.compiled.wait(timeout=600)
    threads = torch.get_num_threads()
    assert ("hidden", 1, threads) in cpu.compiled.ready and cpu.compiled.disabled is None
    compiled = cpu.compiled.hidden(span, kv, 40)
    torch.testing.assert_close(compiled, eager_hidden(cpu, span, kv, 40), atol=1e-4, rtol=1e-4)
    # Compiled loops keep the thread count of their compile: another count is another package.
    torch.set_num_threads(threads + 1)
    try:
        assert cpu.compiled.hidden(span, kv, 40) is None
        assert cpu.compiled.wait(timeout=600)
        assert ("hidden", 1, threads + 1) in cpu.compiled.ready
        torch.testing.assert_close(cpu.compiled.hidden(span, kv, 40), compiled, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    # The next start (the same weights) loads every package compiled before at its first request,
    # with no child process: a shape never waits behind another's compile.
    again = make_model().prepare_cpu_inference(torch.float32, screen_head=False, compiled=True)
    started = time.monotonic()
    assert again.compiled.hidden(span, kv, 40) is None
    assert again.compiled.wait(timeout=600) and time.monotonic() - started < 20
    assert {("hidden", 1, threads), ("hidden", 1, threads + 1)} <= again.compiled.ready
    assert not list(compile_cache.rglob("*.log"))  # a compile's log is kept only when it failed


@needs_compiler
def test_two_models_of_one_shape_keep_their_own_weights(compile_cache):
    first, second = make_model(0), make_model(1)
    kv = filled_kv(first)
    span = span_ids(1, 12)
    for model in (first, second):
        cpu = model.prepare_cpu_inference(torch.float32, screen_head=False, compiled=True)
        assert cpu.compiled.compile_now(1), cpu.compiled.disabled
    for model in (first, second):
        cpu = model.cpu_inference
        torch.testing.assert_close(cpu.compiled.hidden(span, kv, 40), eager_hidden(cpu, span, kv, 40),
                                   atol=1e-4, rtol=1e-4)


@needs_compiler
def test_the_compiled_head_picks_the_eager_heads_tokens(compile_cache):
    model = make_model(3, scale=2.0)  # near-ties, as the eager screen's own test
    cpu = model.prepare_cpu_inference(torch.bfloat16, screen_head=True, compiled=True)
    assert cpu.compiled.compile_now(1), cpu.compiled.disabled
    bias = cpu._bias(VOCAB, BANNED, 90)
    g = torch.Generator().manual_seed(11)
    for rows in (2, 7, 32):
        x = torch.randn(rows, model.config.d_model, generator=g)
        tokens, confidence = cpu.compiled.head(x, bias)
        want_tokens, want_confidence = cpu._head_rows(x, bias)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(confidence, want_confidence, atol=1e-3, rtol=0)
    # One row, or more than the head's chunk, runs eagerly.
    assert cpu.compiled.head(torch.randn(1, model.config.d_model), bias) is None
    assert cpu.compiled.head(torch.randn(33, model.config.d_model), bias) is None
    tokens, _ = model.span_tokens(span_ids(1, 8), filled_kv(model), 40, banned_ids=BANNED, vocab_limit=90)
    assert not torch.isin(tokens, BANNED).any() and (tokens < 90).all()


FAILING_COMPILER = """
import json, torch
from tests.test_cpu_compile import eager_hidden
from tests.test_model_cpu_inference import filled_kv, make_model, span_ids
model = make_model(5)
kv = filled_kv(model)
cpu = model.prepare_cpu_inference(torch.float32, screen_head=False, compiled=True)
span = span_ids(1, 20)
compiled = cpu.compiled.compile_now(1)
queued = cpu.compiled.hidden(span, kv, 40)
finished = cpu.compiled.wait(timeout=5)
same = torch.equal(model.span_hidden(span, kv, 40), eager_hidden(cpu, span, kv, 40))
print(json.dumps({"compiled": compiled, "disabled": cpu.compiled.disabled, "queued": queued is not None,
                  "finished": finished, "ready": len(cpu.compiled.ready), "same": same}))
"""


def test_a_compiler_failure_leaves_the_eager_pass_serving(tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++", "PARAFILL_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", FAILING_COMPILER], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["compiled"] and "C++ compiler" in result["disabled"]
    # Nothing more is queued once compiling failed, and the eager pass serves.
    assert not result["queued"] and result["finished"] and result["ready"] == 0 and result["same"]
    assert list(tmp_path.rglob("*.log"))  # the failed compile's log stays for a look


@needs_compiler
def test_a_cpu_backend_compiles_what_it_serves(parafill_tiny_model, compile_cache):
    from denoiser.backend import DecodeSettings
    from fim.request import FimRequest, SpanPlan

    backend = NativeBackend(parafill_tiny_model, "cpu", cpu_precision="fp32", cpu_compile="auto")
    assert backend.cpu_compiled and backend.compiled_steps() == {"shapes": [], "head": [], "failed": None}
    request = FimRequest("", "def add(a, b):\n    return ", "\n", SpanPlan("line", 8), language="python")
    first = backend.fill(request, DecodeSettings(steps=4))
    assert backend.model.cpu_inference.compiled.wait(timeout=900)
    steps = backend.compiled_steps()
    assert steps["shapes"] and steps["failed"] is None  # the shape the fill used, compiled meanwhile
    second = backend.fill(request, DecodeSettings(steps=4))
    assert second.text == first.text
    assert NativeBackend(parafill_tiny_model, "cpu", cpu_compile="off").compiled_steps() is None
