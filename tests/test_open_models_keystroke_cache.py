"""The opt-in keystroke cache of open models: approximate context keys/values carried between requests.

On tiny random checkpoints of each family (tools/tiny_open.py), CPU, fp32:
reused keys are moved to new positions exactly; a request whose context did
not change fills exactly as recomputation does; after typing, the unchanged
prefix is reused and the fill is well formed; a full pass comes back after
`refresh_after` reuses or when too little would be reused; the bytes held are
bounded; it is off unless asked for.
"""
from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from denoiser.backend import Cancelled, DecodeSettings
from denoiser.open_models import load_open_model
from denoiser.open_models.keystroke_cache import ContextSnapshot, KeystrokeCache, KeystrokeCachePolicy, plan_reuse
from denoiser.open_models.network import KVStore
from denoiser.open_models.span_decoder import SpanDecoder, SpanDecodeSettings
from fim.context import ContextOptions, build_request
from fim.request import FimRequest
from lsp_server.settings import Settings, parse_settings
from tools.tiny_open import make_tiny_checkpoint

FAMILIES = ("open-dcoder", "dream", "llada")
DECODE = DecodeSettings(steps=4, confidence_threshold=0.9)
TEXT = Path(textwrap.__file__).read_text()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        make_tiny_checkpoint(d, family, seed=5)
        out[family] = d
    return out


def typed_requests(count: int, chars: int = 3, context_tokens: int = 256) -> list[FimRequest]:
    """`count` requests at a cursor typing a line of textwrap.py back, `chars` characters each."""
    lines = TEXT.splitlines(keepends=True)
    start = sum(len(line) for line in lines[: len(lines) // 2])
    typed = TEXT[start:start + chars * count]
    rest = TEXT[start + len(typed):]
    out = []
    for i in range(count):
        cursor = start + chars * (i + 1)
        doc = TEXT[:cursor] + rest
        before = doc[:cursor]
        out.append(build_request(doc, before.count("\n"), len(before) - before.rfind("\n") - 1,
                                 options=ContextOptions(context_tokens=context_tokens), count_tokens=len))
    return out


def fill(backend, request, document="doc", is_cancelled=lambda: False):
    return backend.fill(request, DECODE, document=document, is_cancelled=is_cancelled)


def test_off_by_default(dirs):
    backend = load_open_model(dirs["open-dcoder"], "cpu")
    assert backend.keystroke_cache is None
    request = typed_requests(1)[0]
    assert fill(backend, request).reused_context_tokens == 0
    assert fill(backend, request).reused_context_tokens == 0
    assert backend.cache_stats()["keystroke_kv"] == {"entries": 0, "bytes": 0, "max_bytes": 0}
    assert Settings().open_model_keystroke_cache is False
    parsed, problems = parse_settings({"openModelKeystrokeCache": True})
    assert parsed.open_model_keystroke_cache is True and problems == []
    _, problems = parse_settings({"openModelKeystrokeCache": "yes"})
    assert problems and "true or false" in problems[0]


def test_shifted_keys_equal_the_keys_computed_at_the_new_positions(dirs):
    model = load_open_model(dirs["dream"], "cpu").model
    gen = torch.Generator().manual_seed(1)
    head, span, tail = (torch.randint(5, 100, (n,), generator=gen) for n in (20, 6, 15))
    typed = torch.randint(5, 100, (4,), generator=gen)
    before, after = KVStore(), KVStore()
    model.full(torch.cat([head, span, tail]), rows=torch.tensor([0]), kv=before)
    model.full(torch.cat([head, typed, span, tail]), rows=torch.tensor([0]), kv=after)
    # Layer 0's keys depend on the token and its position only: moved keys must be exact.
    old_tail, new_tail = before.keys[0][:, :, 26:], after.keys[0][:, :, 30:]
    assert (model.shift_keys(old_tail, 4) - new_tail).abs().max().item() <= 1e-5
    assert (model.shift_keys(new_tail, -4) - old_tail).abs().max().item() <= 1e-5
    assert (old_tail - new_tail).abs().max().item() > 1e-3  # the move is not a no-op
    assert torch.equal(before.values[0][:, :, 26:], after.values[0][:, :, 30:])


def test_recompute_of_any_positions_and_last_layer_rows_match_the_full_pass(dirs):
    model = load_open_model(dirs["open-dcoder"], "cpu").model
    ids = torch.randint(5, 100, (40,), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([3, 17, 30])
    kv = KVStore()
    full = model.full(ids, rows=rows, kv=kv)
    assert (full - model.full(ids)[rows]).abs().max().item() <= 1e-4
    positions = torch.tensor([3, 4, 17, 30, 31])  # not contiguous: written with index_copy
    again = model.recompute(ids[positions], positions, kv, rows=torch.tensor([0, 2, 3]))
    assert (again - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unchanged_context_fills_exactly_as_recomputation(dirs, family):
    cached = load_open_model(dirs[family], "cpu", keystroke_cache=True)
    exact = load_open_model(dirs[family], "cpu", refresh_every=0)  # the same schedule, nothing carried over
    request = typed_requests(1)[0]
    first, second = fill(cached, request), fill(cached, request)
    assert first.reused_context_tokens == 0
    shift = int(cached.spec.shift_logits)
    assert second.reused_context_tokens == second.context_tokens - shift  # all but the token before the span
    assert first.text == second.text == fill(exact, request).text
    assert first.steps == second.steps


@pytest.mark.parametrize("family", FAMILIES)
def test_after_typing_the_prefix_is_reused_and_the_fill_is_well_formed(dirs, family):
    backend = load_open_model(dirs[family], "cpu", keystroke_cache=KeystrokeCachePolicy(refresh_after=100))
    tok = backend.tokenizer
    requests = typed_requests(6)
    results = [fill(backend, r) for r in requests]
    assert results[0].reused_context_tokens == 0
    for previous, request, result in zip(requests, requests[1:], results[1:]):
        head, tail = backend.layout(request, request.span.max_tokens)
        old_head, _ = backend.layout(previous, previous.span.max_tokens)
        same = next((i for i, (a, b) in enumerate(zip(old_head, head)) if a != b), min(len(old_head), len(head)))
        # The unchanged head prefix and the whole (unchanged) suffix, bar the token before the span.
        assert result.reused_context_tokens >= min(same, len(head) - 1) + len(tail)
        assert result.reused_context_tokens < result.context_tokens
        assert isinstance(result.text, str) and 0 <= result.tokens <= request.span.max_tokens
        ids = tok.encode(result.text)
        assert tok.special.mask not in ids and not (set(ids) & tok.special.stops)
    assert backend.cache_stats()["keystroke_kv"]["entries"] == 1


def test_the_first_pass_after_typing_stays_close_to_the_exact_pass(dirs):
    backend = load_open_model(dirs["dream"], "cpu")
    decoder, model = backend.decoder, backend.model
    one, two = typed_requests(2)
    head, tail = backend.layout(one, 16)
    kv = KVStore()
    model.full(torch.tensor(head + [decoder.mask_id] * 16 + tail), rows=torch.tensor([0]), kv=kv)
    snapshot = ContextSnapshot(head=head, tail=tail, span=16, kv=kv)
    head2, tail2 = backend.layout(two, 16)
    plan = plan_reuse(model, snapshot, head2, tail2, 16, shift=1)
    seq = torch.tensor(head2 + [decoder.mask_id] * 16 + tail2)
    rows = torch.arange(len(head2) - 1, len(head2) + 15)
    approx = model.recompute(seq[plan.fresh], plan.fresh, plan.kv, rows=torch.searchsorted(plan.fresh, rows))
    exact = model.full(seq, rows=rows)
    error = (approx - exact).abs().max().item()
    assert 0 < error <= 0.25 * (exact.max() - exact.min()).item()


def test_a_full_pass_comes_back_after_the_bound_and_when_too_little_is_reused(dirs):
    backend = load_open_model(dirs["open-dcoder"], "cpu", keystroke_cache=KeystrokeCachePolicy(refresh_after=2))
    reused = [fill(backend, r).reused_context_tokens for r in typed_requests(7)]
    assert [r > 0 for r in reused] == [False, True, True, False, True, True, False]
    # Somewhere else in the file: nothing in common with the cached context, so a full pass.
    far = build_request(TEXT, 20, 0, options=ContextOptions(context_tokens=256), count_tokens=len)
    assert fill(backend, far).reused_context_tokens == 0


def test_the_bytes_held_are_bounded_least_recently_used_first(dirs):
    probe = load_open_model(dirs["open-dcoder"], "cpu", keystroke_cache=True)
    request = typed_requests(1)[0]
    fill(probe, request)
    one = probe.cache_stats()["keystroke_kv"]["bytes"]
    assert one > 0
    backend = load_open_model(dirs["open-dcoder"], "cpu",
                              keystroke_cache=KeystrokeCachePolicy(max_bytes=int(2.5 * one)))
    for doc in ("a", "b", "c", "d"):
        fill(backend, request, document=doc)
        stats = backend.cache_stats()["keystroke_kv"]
        assert stats["bytes"] <= stats["max_bytes"] == int(2.5 * one)
    assert stats["entries"] == 2
    assert fill(backend, request, document="a").reused_context_tokens == 0  # dropped first
    assert fill(backend, request, document="d").reused_context_tokens > 0
    backend.forget("d")
    assert fill(backend, request, document="d").reused_context_tokens == 0
    tiny = load_open_model(dirs["open-dcoder"], "cpu", keystroke_cache=KeystrokeCachePolicy(max_bytes=one - 1))
    fill(tiny, request)
    assert tiny.cache_stats()["keystroke_kv"] == {"entries": 0, "bytes": 0, "max_bytes": one - 1}
    backend.set_keystroke_cache(False)
    assert backend.cache_stats()["keystroke_kv"]["entries"] == 0


def test_a_request_cancelled_after_its_first_pass_leaves_its_keys_and_values(dirs):
    backend = load_open_model(dirs["llada"], "cpu", keystroke_cache=True)
    one, two = typed_requests(2)
    calls = []

    def cancel_after_first_pass() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        fill(backend, one, is_cancelled=cancel_after_first_pass)
    assert backend.cache_stats()["keystroke_kv"]["entries"] == 1
    assert fill(backend, two).reused_context_tokens > 0


def test_one_full_pass_per_request_carries_the_context_over_a_grown_span(dirs):
    model = load_open_model(dirs["dream"], "cpu").model
    decoder = SpanDecoder(model, mask_id=3, stop_ids=frozenset(), shift_logits=True, end_id=0)
    head, tail = list(range(5, 40)), list(range(40, 60))
    grow = SpanDecodeSettings(initial=8, maximum=24, grow_by=8, threshold=2.0, steps=2, refresh_every=0)
    once = decoder.decode(head, tail, grow)
    assert (once.steps, once.full_passes) == (6, 1) and len(once.tokens) == 24
    every_block = decoder.decode(head, tail, replace(grow, refresh_every=4))
    assert (every_block.steps, every_block.full_passes) == (6, 3)


def test_reencoding_the_suffix_reuses_only_the_head(dirs):
    policy = KeystrokeCachePolicy(suffix="reencode", min_reuse=0.2, refresh_after=100)
    backend = load_open_model(dirs["open-dcoder"], "cpu", keystroke_cache=policy)
    one, two = typed_requests(2)
    fill(backend, one)
    result = fill(backend, two)
    head, _ = backend.layout(two, two.span.max_tokens)
    assert 0 < result.reused_context_tokens <= len(head) - 1


def test_policy_and_cache_refuse_bad_bounds():
    with pytest.raises(ValueError):
        KeystrokeCachePolicy(refresh_after=0)
    with pytest.raises(ValueError):
        KeystrokeCachePolicy(min_reuse=1.5)
    with pytest.raises(ValueError):
        KeystrokeCachePolicy(suffix="guess")
    assert len(KeystrokeCache(KeystrokeCachePolicy())) == 0
