"""Context K/V reuse by longest common token prefix: exact counts, exact K/V."""
import pytest
import torch

from denoiser.checkpoint import load_native_model
from denoiser.config import ModelConfig
from denoiser.kv_cache import ContextKVCache, common_prefix_length
from denoiser.model import KVBuffers, SpanDenoiser
from denoiser.native_backend import native_context_ids
from fim.request import FimRequest, SpanPlan
from tools.tiny_native import make_tiny_model

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer, _ = load_native_model(model_dir, torch.device("cpu"))
    return model, tokenizer


@pytest.fixture
def model():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_positions=512)
    m = SpanDenoiser(config)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


def fresh_kv(model, ids):
    kv = KVBuffers.allocate(model.config, 1, len(ids), "cpu", torch.float32)
    model.prefill(torch.tensor([ids]), kv, 0)
    return kv


def assert_holds(slot, model, ids):
    """The cached K/V equal a fresh prefill of exactly these ids."""
    ref = fresh_kv(model, ids)
    n = len(ids)
    assert slot.length == n
    assert (slot.kv.k[:, :, :, :n] - ref.k).abs().max().item() <= TOL
    assert (slot.kv.v[:, :, :, :n] - ref.v).abs().max().item() <= TOL


def test_append_reuses_everything_and_an_edit_recomputes_from_the_edit(model):
    cache = ContextKVCache(model, capacity_step=64)
    first = cache.prepare("a", [10, 11, 12, 13, 14])
    assert (first.reused, first.computed) == (0, 5)
    grown = cache.prepare("a", [10, 11, 12, 13, 14, 15, 16])
    assert (grown.reused, grown.computed) == (5, 2)
    assert_holds(grown, model, [10, 11, 12, 13, 14, 15, 16])
    edited = cache.prepare("a", [10, 11, 40, 13, 14, 15, 16])
    assert (edited.reused, edited.computed) == (2, 5)
    assert_holds(edited, model, [10, 11, 40, 13, 14, 15, 16])
    shorter = cache.prepare("a", [10, 11, 40])
    assert (shorter.reused, shorter.computed) == (3, 0)
    assert_holds(shorter, model, [10, 11, 40])
    assert cache.counters.hits == 3 and cache.counters.misses == 1
    assert (cache.counters.reused_tokens, cache.counters.computed_tokens) == (10, 12)


def test_typing_sequence_reuses_the_context(tiny):
    model, tokenizer = tiny
    cache = ContextKVCache(model, capacity_step=256)
    preamble = "# path: demo.py\n"
    suffix = "\n\nprint(total)\n"
    typed = "def total_of(items):\n    return sum(items)"
    start = "import os\n\n"
    previous: list[int] = []
    computed = []
    for n in range(len(typed) + 1):
        request = FimRequest(preamble, start + typed[:n], suffix, SpanPlan("line", 16))
        ids = native_context_ids(tokenizer, request, 1024)
        slot = cache.prepare("doc", ids)
        expected_reused = common_prefix_length(previous, ids)
        if n:
            # The cursor is the end of the context, so a keystroke changes only the
            # last prefix token or two and <fim_middle>; everything before is kept.
            assert expected_reused >= len(previous) - 4
        assert (slot.reused, slot.computed) == (expected_reused, len(ids) - expected_reused)
        computed.append(slot.computed)
        previous = ids
    assert_holds(slot, model, ids)
    # The first request pays for the whole context; each keystroke pays a handful of tokens.
    assert computed[0] == len(native_context_ids(tokenizer, FimRequest(preamble, start, suffix, SpanPlan("line", 16)), 1024))
    assert max(computed[1:]) <= 5
    assert cache.counters.reuse_fraction > 0.8


def test_edit_in_the_prefix_recomputes_from_the_edit(tiny):
    model, tokenizer = tiny
    cache = ContextKVCache(model, capacity_step=256)
    text = "import os\n\ndef read_lines(path):\n    with open(path) as handle:\n        return handle"
    base = FimRequest("", text, "\n", SpanPlan("line", 16))
    ids = native_context_ids(tokenizer, base, 1024)
    cache.prepare("doc", ids)
    edited = FimRequest("", text.replace("read_lines", "read_all_lines"), "\n", SpanPlan("line", 16))
    new_ids = native_context_ids(tokenizer, edited, 1024)
    slot = cache.prepare("doc", new_ids)
    # Suffix "\n" + <fim_suffix>, <fim_prefix>, then "import os\n\ndef " survive the edit.
    unchanged = 2 + len(tokenizer.encode("\n")) + len(tokenizer.encode("import os\n\ndef "))
    assert slot.reused >= unchanged - 1
    assert slot.reused == common_prefix_length(ids, new_ids)
    assert slot.computed == len(new_ids) - slot.reused
    assert slot.computed > 10  # everything after the edit, not just the tail
    assert_holds(slot, model, new_ids)


def test_documents_are_separate_and_lru_bounded(model):
    cache = ContextKVCache(model, max_documents=2, capacity_step=64)
    cache.prepare("a", [7, 8, 9])
    cache.prepare("b", [7, 8, 9])
    assert cache.counters.misses == 2  # no reuse across documents
    cache.prepare("a", [7, 8, 9, 10])  # "a" is now the most recent
    cache.prepare("c", [20])
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.prepare("b", [7, 8, 9]).reused == 0


def test_forget_drops_the_document(model):
    cache = ContextKVCache(model, capacity_step=64)
    cache.prepare("a", [7, 8, 9])
    cache.forget("a")
    cache.forget("never-seen")
    assert "a" not in cache
    assert cache.prepare("a", [7, 8, 9]).reused == 0


def test_capacity_grows_in_steps_and_keeps_the_reused_kv(model):
    cache = ContextKVCache(model, capacity_step=64)
    ids = list(range(6, 56))
    slot = cache.prepare("a", ids)
    assert slot.kv.capacity == 64
    longer = ids + list(range(6, 46))  # 90 tokens
    slot = cache.prepare("a", longer)
    assert slot.kv.capacity == 128 and (slot.reused, slot.computed) == (50, 40)
    assert_holds(slot, model, longer)
    with pytest.raises(ValueError, match="positions"):
        cache.prepare("a", [6] * 513)


def test_extend_appends_like_a_longer_prefill(model):
    cache = ContextKVCache(model, capacity_step=16)
    cache.prepare("a", list(range(6, 20)))
    slot = cache.extend("a", [30, 31, 32, 33])  # crosses a capacity step
    assert slot.kv.capacity == 32 and slot.length == 18 and slot.computed == 4
    assert_holds(slot, model, list(range(6, 20)) + [30, 31, 32, 33])
    assert cache.cached_ids("a") == list(range(6, 20)) + [30, 31, 32, 33]
    assert cache.counters.reused_tokens == 0  # extending is not reuse


def test_need_last_hidden_recomputes_the_last_token(model):
    cache = ContextKVCache(model, capacity_step=64)
    cache.prepare("a", [7, 8, 9])
    slot = cache.prepare("a", [7, 8, 9], need_last_hidden=True)
    assert (slot.reused, slot.computed) == (2, 1) and slot.last_hidden is not None
    again = cache.prepare("a", [7, 8, 9])
    assert (again.reused, again.computed) == (3, 0)
