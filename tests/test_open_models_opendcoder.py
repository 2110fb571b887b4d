"""Open-dCoder (Open-dLLM, Qwen2.5-Coder-0.5B trained as masked diffusion): loader, layout, variable span.

Logits are checked against `transformers.Qwen2Model` (tied embeddings, full
non-causal mask, Open-dLLM's one-position shift). The variable-length tests
shape the tiny model's output head so its predictions are known: always the
end-of-text token (the fill trims to nothing), or never (the span grows to its limit).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from denoiser.backend import DecodeSettings, ModelLoadError  # noqa: E402
from denoiser.open_models import detect_family, load_open_model  # noqa: E402
from fim.request import FimRequest, SpanPlan  # noqa: E402
from tools.tiny_open import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def dcoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("dcoder")
    config, state = make_tiny_checkpoint(d, "open-dcoder", seed=21)
    return d, config, state


def test_detected_from_plain_qwen2_config(dcoder):
    assert detect_family(dcoder[1]) == "open-dcoder"
    assert dcoder[1]["tie_word_embeddings"] is True


def test_logits_match_transformers_qwen2_tied_with_shift(dcoder):
    d, config, state = dcoder
    backend = load_open_model(d, "cpu")
    cfg = transformers.Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"], tie_word_embeddings=True, attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, strict=True)
    ids = torch.randint(0, config["vocab_size"], (29,), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        ref = model(input_ids=ids[None], attention_mask=torch.zeros(1, 1, 29, 29)).logits[0]
    ref = torch.cat([ref[:1], ref[:-1]])  # Open-dLLM's sampler: token i from position i-1
    ours = backend.model.full(ids, rows=(torch.arange(29) - 1).clamp(min=0))
    assert (ours - ref).abs().max().item() <= 1e-4


def test_layout_is_prefix_masks_suffix_without_special_tokens(dcoder):
    backend = load_open_model(dcoder[0], "cpu")
    tok = backend.tokenizer
    request = FimRequest(preamble="", prefix="def add(a, b):\n    ", suffix="\n", span=SpanPlan("line", 16))
    head, tail = backend.layout(request, 16)
    assert head == tok.encode("def add(a, b):\n    ")
    assert tail == tok.encode("\n")
    assert tok.special.mask == tok.tokenizer.token_to_id("<|mask|>")


def test_long_context_is_trimmed_far_from_the_cursor(dcoder):
    backend = load_open_model(dcoder[0], "cpu", max_context_tokens=64)
    request = FimRequest(preamble="", prefix="a" * 100 + "NEAR", suffix="next" + "b" * 100, span=SpanPlan("line", 16))
    head, tail = backend.layout(request, 16)
    assert len(head) + len(tail) + 16 <= 64
    assert backend.tokenizer.decode(head).endswith("NEAR")
    assert backend.tokenizer.decode(tail).startswith("next")


def _shaped(d, *, predict: str, scale: float = 50.0):
    """Load, then make the output head predict `predict`: 'eos' always, or 'a'/'b' (never an end token)."""
    backend = load_open_model(d, "cpu", initial_span=16)
    model, tok = backend.model, backend.tokenizer.tokenizer
    head = torch.zeros_like(model.embed)
    norm = torch.zeros_like(model.final_norm)
    norm[0] = 1.0  # the final hidden state is +-|x_0| e_0
    if predict == "eos":
        head[backend.tokenizer.special.eos, 0] = 0.0  # all logits 0: ties go to the lowest id, the eos (id 0)
        assert backend.tokenizer.special.eos == 0
    else:
        head[tok.token_to_id("a"), 0] = scale
        head[tok.token_to_id("b"), 0] = -scale
    model.lm_head, model.final_norm = head, norm
    return backend


def test_span_trims_at_end_of_text(dcoder):
    backend = _shaped(dcoder[0], predict="eos")
    request = FimRequest(preamble="", prefix="x = 1\n", suffix="", span=SpanPlan("block", 40))
    result = backend.fill(request, DecodeSettings(), document="d", is_cancelled=lambda: False)
    assert (result.text, result.tokens) == ("", 0)
    assert result.steps == 1  # the first committed token is the end: nothing left to decode


def test_span_grows_when_full_and_commits_confident_tokens_in_parallel(dcoder):
    backend = _shaped(dcoder[0], predict="ab")
    request = FimRequest(preamble="", prefix="x = ", suffix="\n", span=SpanPlan("block", 40))
    result = backend.fill(request, DecodeSettings(confidence_threshold=0.9), document="d", is_cancelled=lambda: False)
    assert result.tokens == 40 and set(result.text) <= {"a", "b"}
    # Every position is confident, so each block (16, then +16, then +8) takes one step.
    assert result.steps == 3


def test_step_budget_forces_several_commits_per_step(dcoder):
    # A soft head (|logit| <= 8 over 128 tokens) never reaches confidence 1.0.
    backend = _shaped(dcoder[0], predict="ab", scale=1.0)
    request = FimRequest(preamble="", prefix="x = ", suffix="\n", span=SpanPlan("block", 16))
    result = backend.fill(request, DecodeSettings(steps=4, confidence_threshold=1.0), document="d", is_cancelled=lambda: False)
    assert result.tokens == 16 and result.steps == 4


def test_qwen2_checkpoint_without_mask_token_is_refused(tmp_path):
    config, _ = make_tiny_checkpoint(tmp_path, "open-dcoder", seed=23)
    config.pop("mask_token_id")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    # The tiny tokenizer still holds "<|mask|>"; an autoregressive Qwen2 tokenizer would not.
    tok = (tmp_path / "tokenizer.json").read_text().replace("<|mask|>", "<|unused|>")
    (tmp_path / "tokenizer.json").write_text(tok)
    with pytest.raises(ModelLoadError, match="autoregressive"):
        load_open_model(tmp_path, "cpu")
