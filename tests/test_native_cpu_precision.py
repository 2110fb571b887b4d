"""How a native backend on the CPU runs its span steps: PARAFILL_CPU_PRECISION / `cpu_precision`,
and fills in fp32 that are the reference step's fills."""
import pytest
import torch

from denoiser import native_backend
from denoiser.backend import DecodeSettings
from denoiser.native_backend import NativeBackend, resolve_cpu_precision
from fim.request import FimRequest, SpanPlan
from tools.tiny_native import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_precision_from_the_argument_the_environment_or_the_cpu(monkeypatch):
    monkeypatch.delenv("PARAFILL_CPU_PRECISION", raising=False)
    monkeypatch.setattr(native_backend, "cpu_has_native_bf16", lambda: True)
    assert resolve_cpu_precision() == "bf16"
    monkeypatch.setattr(native_backend, "cpu_has_native_bf16", lambda: False)
    assert resolve_cpu_precision() == "fp32" and resolve_cpu_precision("auto") == "fp32"
    monkeypatch.setenv("PARAFILL_CPU_PRECISION", " BF16 ")
    assert resolve_cpu_precision() == "bf16"
    assert resolve_cpu_precision("reference") == "reference"  # the argument wins over the environment


def test_a_bad_precision_says_what_would_do(monkeypatch):
    monkeypatch.setenv("PARAFILL_CPU_PRECISION", "fp8")
    with pytest.raises(ValueError, match=r"'fp8' is not one of auto, bf16, fp32, reference .*PARAFILL_CPU_PRECISION"):
        resolve_cpu_precision()


@pytest.mark.parametrize(("precision", "matmul", "screened"), [
    ("fp32", torch.float32, False), ("bf16", torch.bfloat16, True), ("reference", None, None)])
def test_the_backend_prepares_the_step_it_was_asked_for(model_dir, precision, matmul, screened):
    backend = NativeBackend(model_dir, "cpu", cpu_precision=precision)
    assert backend.cpu_precision == precision
    step = backend.model.cpu_inference
    if matmul is None:
        assert step is None
    else:
        assert step.matmul_dtype == matmul and (step.screen_head is not None) == screened
    assert backend.moved_to("cpu").cpu_precision == precision


def test_fp32_fills_are_the_reference_fills(model_dir):
    requests = [FimRequest("# path: demo.py\n", prefix, "\n\nprint(add(1, 2))\n", SpanPlan(mode, 16),
                           language="python", path="demo.py")
                for prefix in ("def add(a, b):\n    return", "import os\n\ndef main(", "x = [")
                for mode in ("line", "block")]
    decode = DecodeSettings(steps=4, confidence_threshold=0.5)
    fills = {}
    for precision in ("reference", "fp32"):
        backend = NativeBackend(model_dir, "cpu", cpu_precision=precision)
        fills[precision] = [backend.fill(r, decode, document=f"d{i}") for i, r in enumerate(requests)]
    for want, got in zip(fills["reference"], fills["fp32"]):
        assert (got.text, got.steps) == (want.text, want.steps)
        assert got.confidence == pytest.approx(want.confidence, rel=1e-4)


def test_bf16_steps_of_the_shipped_model_pick_the_fp32_tokens():
    """One step of the shipped model over a real prompt (this file's code): the bf16 step's greedy
    tokens are the fp32 step's at nearly every position, with nearly the same probability."""
    from pathlib import Path

    from denoiser.config import MASK_ID
    from denoiser.loading import default_model_dir

    text = Path(__file__).read_text(encoding="utf-8")
    cut = text.index("def test_fp32_fills_are_the_reference_fills")
    request = FimRequest("# path: test_native_cpu_precision.py\n", text[:cut], text[cut:], SpanPlan("block", 32),
                         language="python", path="test_native_cpu_precision.py")
    results = {}
    for precision in ("fp32", "bf16"):
        backend = NativeBackend(default_model_dir(), "cpu", cpu_precision=precision)
        slot = backend.context_cache.prepare("doc", backend.context_ids(request))
        written = backend.tokenizer.encode("    def test_step(self):\n")[:8]  # some positions decided already
        span = torch.full((1, 32), MASK_ID)
        span[0, :len(written)] = torch.tensor(written)
        results[precision] = backend.model.span_tokens(span, slot.kv, slot.length, banned_ids=backend.batcher.banned,
                                                       vocab_limit=backend.tokenizer.vocab_size)
    (want_tokens, want_confidence), (tokens, confidence) = results["fp32"], results["bf16"]
    assert (tokens == want_tokens).float().mean() >= 0.9
    same = tokens == want_tokens
    assert (confidence[same] - want_confidence[same]).abs().max() < 0.05
