"""LLaDA: parafill's loader (LLaDA's own tensor names) against transformers' Llama, no shift.

The oracle is `transformers.LlamaModel` with a full (non-causal) attention mask;
LLaDA's OLMo-style names are mapped onto Llama's by the test, not by parafill.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from denoiser.backend import Cancelled, DecodeSettings  # noqa: E402
from denoiser.open_models import detect_family, load_open_model  # noqa: E402
from fim.request import FimRequest, SpanPlan  # noqa: E402
from tools.tiny_open import make_tiny_checkpoint  # noqa: E402

TO_LLAMA = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}


def llama_reference_logits(config: dict, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    cfg = transformers.LlamaConfig(
        vocab_size=config["embedding_size"], hidden_size=config["d_model"], intermediate_size=config["mlp_hidden_size"],
        num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
        num_key_value_heads=config["n_kv_heads"], rope_theta=config["rope_theta"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_sequence_length"], attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = transformers.LlamaModel(cfg).eval()
    mapped = {"embed_tokens.weight": state["model.transformer.wte.weight"], "norm.weight": state["model.transformer.ln_f.weight"]}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[2] == "blocks":
            mapped[f"layers.{parts[3]}.{TO_LLAMA[parts[4]]}.weight"] = tensor
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    t = ids.shape[0]
    with torch.no_grad():
        hidden = model(input_ids=ids[None], attention_mask=torch.zeros(1, 1, t, t)).last_hidden_state[0]
    return hidden @ state["model.transformer.ff_out.weight"].float().T


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada")
    config, state = make_tiny_checkpoint(d, "llada", seed=11)
    return d, config, state, load_open_model(d, "cpu", initial_span=8)


def test_detected_as_llada(llada):
    assert detect_family(llada[1]) == "llada"
    assert detect_family({"architectures": ["LLaDAModelLM"], "model_type": "llada"}) == "llada"


def test_logits_match_transformers_llama_without_shift(llada):
    _, config, state, backend = llada
    ids = torch.randint(0, config["vocab_size"], (33,), generator=torch.Generator().manual_seed(12))
    ref = llama_reference_logits(config, state, ids)
    assert (backend.model.full(ids) - ref).abs().max().item() <= 1e-4
    assert backend.spec.shift_logits is False


def test_sharded_bf16_llada_matches_reference(tmp_path):
    config, state = make_tiny_checkpoint(tmp_path, "llada", shards=2, dtype=torch.bfloat16, seed=13)
    backend = load_open_model(tmp_path, "cpu", dtype=torch.float32)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    ids = torch.randint(0, config["vocab_size"], (19,), generator=torch.Generator().manual_seed(14))
    assert (backend.model.full(ids) - llama_reference_logits(config, rounded, ids)).abs().max().item() <= 1e-4


def test_mask_token_comes_from_config_and_layout_has_bos_no_eos(llada):
    _, config, _, backend = llada
    tok = backend.tokenizer
    assert tok.special.mask == config["mask_token_id"]
    assert tok.tokenizer.id_to_token(tok.special.mask) == "<|mdm_mask|>"
    request = FimRequest(preamble="", prefix="a = [", suffix="]\n", span=SpanPlan("line", 6))
    head, tail = backend.layout(request, 6)
    assert head == [tok.special.bos] + tok.encode("a = [")
    assert tail == tok.encode("]\n")


def test_fill_never_emits_mask_and_respects_span_limit(llada):
    _, _, _, backend = llada
    request = FimRequest(preamble="", prefix="for i in range(", suffix="):\n    pass\n", span=SpanPlan("line", 12))
    result = backend.fill(request, DecodeSettings(steps=3), document="d", is_cancelled=lambda: False)
    assert result.tokens <= 12
    # 8 masks in at most 3 steps, then (when no end token) 4 more in at most 3 steps.
    assert result.steps <= 6
    assert "<|mdm_mask|>" not in result.text


def test_cancellation_stops_between_steps(llada):
    _, _, _, backend = llada
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2

    request = FimRequest(preamble="", prefix="x = ", suffix="\n", span=SpanPlan("line", 8))
    with pytest.raises(Cancelled):
        backend.fill(request, DecodeSettings(confidence_threshold=1.0), document="d", is_cancelled=cancelled)
    assert len(calls) == 3
