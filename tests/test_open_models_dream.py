"""Dream family (Dream-v0, Dream-Coder, DiffuCoder): parafill's loader against transformers' Qwen2.

The oracle is `transformers.Qwen2Model` with a full (non-causal) attention mask
plus Dream's one-position logit shift; parafill never imports transformers itself.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from denoiser.backend import DecodeSettings  # noqa: E402
from denoiser.open_models import detect_family, load_open_model  # noqa: E402
from denoiser.open_models.network import KVStore  # noqa: E402
from fim.request import FimRequest, SpanPlan  # noqa: E402
from tools.tiny_open import make_tiny_checkpoint  # noqa: E402


def qwen2_reference_logits(config: dict, state: dict[str, torch.Tensor], ids: torch.Tensor, shift: bool) -> torch.Tensor:
    cfg = transformers.Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"], max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config["tie_word_embeddings"], attn_implementation="eager",
    )
    model = transformers.Qwen2Model(cfg).eval()
    model.load_state_dict({k[len("model."):]: v.float() for k, v in state.items() if k.startswith("model.")}, strict=True)
    t = ids.shape[0]
    with torch.no_grad():
        # An all-zero additive 4-D mask: every position attends to every position.
        hidden = model(input_ids=ids[None], attention_mask=torch.zeros(1, 1, t, t)).last_hidden_state[0]
    head = state["model.embed_tokens.weight"] if config["tie_word_embeddings"] else state["lm_head.weight"]
    logits = hidden @ head.float().T
    return torch.cat([logits[:1], logits[:-1]]) if shift else logits


def ours_all_rows(backend, ids: torch.Tensor) -> torch.Tensor:
    rows = (torch.arange(ids.shape[0]) - 1).clamp(min=0)  # Dream: token i is predicted at position i-1
    return backend.model.full(ids, rows=rows)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dream")
    config, state = make_tiny_checkpoint(d, "dream", seed=1)
    return d, config, state


def test_detected_as_dream(dream_dir):
    _, config, _ = dream_dir
    assert detect_family(config) == "dream"
    assert detect_family({"model_type": "Dream", "architectures": ["DreamModel"]}) == "dream"


def test_logits_match_transformers_qwen2_with_shift(dream_dir):
    d, config, state = dream_dir
    backend = load_open_model(d, "cpu")
    ids = torch.randint(0, config["vocab_size"], (37,), generator=torch.Generator().manual_seed(3))
    ref = qwen2_reference_logits(config, state, ids, shift=True)
    ours = ours_all_rows(backend, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    # The shift matters: unshifted logits are far from the reference.
    assert (backend.model.full(ids) - ref).abs().max().item() > 1e-2


def test_sharded_bf16_checkpoint_matches_reference(tmp_path):
    config, state = make_tiny_checkpoint(tmp_path, "dream", shards=3, dtype=torch.bfloat16, seed=2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    backend = load_open_model(tmp_path, "cpu", dtype=torch.float32)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    ids = torch.randint(0, config["vocab_size"], (21,), generator=torch.Generator().manual_seed(4))
    ref = qwen2_reference_logits(config, rounded, ids, shift=True)
    assert (ours_all_rows(backend, ids) - ref).abs().max().item() <= 1e-4


def test_prompt_layout_is_bos_prefix_masks_suffix_eos(dream_dir):
    d, _, _ = dream_dir
    backend = load_open_model(d, "cpu")
    tok = backend.tokenizer
    request = FimRequest(preamble="# a.py\n", prefix="x = ", suffix="\ny = 2\n", span=SpanPlan("line", 8))
    head, tail = backend.layout(request, 8)
    assert head == [tok.special.bos] + tok.encode("# a.py\nx = ")
    assert tail == tok.encode("\ny = 2\n") + [tok.special.eos]
    assert tok.decode(head[1:]) == "# a.py\nx = "


def test_dual_cache_window_equals_full_right_after_refresh_and_stays_close_after(dream_dir):
    d, config, _ = dream_dir
    backend = load_open_model(d, "cpu")
    model = backend.model
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (48,), generator=gen)
    start, end = 20, 36  # the span
    kv = KVStore()
    model.full(ids, kv=kv)
    window = model.window(ids[start - 1:end], start - 1, kv)
    exact = model.full(ids, rows=torch.arange(start - 1, end))
    assert (window - exact).abs().max().item() <= 1e-4
    # Commit a few span tokens: the cached prefix/suffix K/V are now stale (the approximation).
    changed = ids.clone()
    changed[start:start + 6] = torch.randint(0, 100, (6,), generator=gen)
    approx = model.window(changed[start - 1:end], start - 1, kv)
    exact = model.full(changed, rows=torch.arange(start - 1, end))
    diff = (approx - exact).abs().max().item()
    assert 0 < diff <= 0.25 * exact.abs().max().item()


def test_dual_cache_with_refresh_every_step_fills_exactly_like_no_cache(dream_dir):
    d, _, _ = dream_dir
    backend = load_open_model(d, "cpu", initial_span=10)
    request = FimRequest(preamble="", prefix="def f(a, b):\n    return ", suffix="\n\nprint(f(1, 2))\n", span=SpanPlan("line", 10))
    decode = DecodeSettings(steps=0, confidence_threshold=0.5)

    def fill(mode: str, refresh_every: int):
        backend.cache_mode, backend.refresh_every = mode, refresh_every
        return backend.fill(request, decode, document="u", is_cancelled=lambda: False)

    exact = fill("none", 1)
    assert fill("dual", 1) == exact
    approx = fill("dual", 4)
    assert 0 < approx.tokens <= 10 and approx.steps <= 10
