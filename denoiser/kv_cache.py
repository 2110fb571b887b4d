"""Per-document context keys/values, reused by longest common token prefix.

The native model's context is causal, so the K/V of its first n tokens depend
only on those n tokens. A new request for a document keeps the K/V of the
longest token prefix it shares with the last one and prefills only the rest,
as llama.cpp does for autoregressive prompts: typing extends the prefix (the
end of the context), so a keystroke costs a few tokens, not the whole window.

Memory is bounded in documents and in bytes: least recently used documents
go first once there are more than `max_documents` or their buffers together
pass `max_bytes`; buffers are allocated in steps up to the model's max positions.
This module does not build prompts or sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from collections import OrderedDict

from denoiser.model import KVBuffers, SpanDenoiser

# Buffers grow in steps of this many positions: a context of a few hundred tokens (what
# the server sends) needs no buffer sized for thousands.
CAPACITY_STEP = 256
# The default byte bound: 8 documents of 1,024 positions of the default model.
MAX_BYTES = 64 << 20


def kv_bytes(kv: KVBuffers) -> int:
    return 2 * kv.k.numel() * kv.k.element_size()


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Entry:
    kv: KVBuffers
    ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ContextSlot:
    """The K/V of `length` context tokens, ready for span steps; reused + computed == tokens added."""

    kv: KVBuffers
    length: int
    reused: int
    computed: int
    last_hidden: torch.Tensor | None


@dataclass
class CacheCounters:
    hits: int = 0  # requests that reused at least one token
    misses: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0

    @property
    def reuse_fraction(self) -> float:
        total = self.reused_tokens + self.computed_tokens
        return self.reused_tokens / total if total else 0.0


class ContextKVCache:
    def __init__(
        self,
        model: SpanDenoiser,
        *,
        max_documents: int = 8,
        max_bytes: int = MAX_BYTES,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity_step: int = CAPACITY_STEP,
    ):
        self.model = model
        self.max_documents = max_documents
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity_step = capacity_step
        self.counters = CacheCounters()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, document: str) -> bool:
        return document in self._entries

    @property
    def bytes(self) -> int:
        """Bytes of the K/V buffers the cache holds."""
        return self._bytes

    def _get(self, document: str) -> _Entry | None:
        """The document's entry, now the most recently used."""
        entry = self._entries.get(document)
        if entry is not None:
            self._entries.move_to_end(document)
        return entry

    def cached_ids(self, document: str) -> list[int]:
        entry = self._entries.get(document)
        return list(entry.ids) if entry else []

    def _capacity_for(self, tokens: int) -> int:
        limit = self.model.config.max_positions
        if tokens > limit:
            raise ValueError(f"{tokens} context tokens exceed the model's {limit} positions")
        step = self.capacity_step
        return min(limit, -(-tokens // step) * step)

    def _entry_with_room(self, document: str, tokens: int, keep: int) -> _Entry:
        """The document's entry with capacity for `tokens`, its first `keep` positions preserved."""
        entry = self._get(document)
        if entry is not None and entry.kv.capacity >= tokens:
            return entry
        kv = KVBuffers.allocate(self.model.config, 1, self._capacity_for(tokens), self.device, self.dtype)
        if entry is not None and keep:
            kv.k[:, :, :, :keep] = entry.kv.k[:, :, :, :keep]
            kv.v[:, :, :, :keep] = entry.kv.v[:, :, :, :keep]
        self._drop(document)
        entry = _Entry(kv, list(entry.ids[:keep]) if entry else [])
        self._entries[document] = entry
        self._bytes += kv_bytes(kv)
        self._evict()
        return entry

    def _evict(self) -> None:
        """Drop least recently used documents while there are too many or their buffers pass
        `max_bytes`; the one just used (most recent) always stays, so no request is refused."""
        while len(self._entries) > 1 and (len(self._entries) > self.max_documents or self._bytes > self.max_bytes):
            self._drop(next(iter(self._entries)))

    def _drop(self, document: str) -> None:
        entry = self._entries.pop(document, None)
        if entry is not None:
            self._bytes -= kv_bytes(entry.kv)

    def prepare(self, document: str, ids: list[int], *, need_last_hidden: bool = False) -> ContextSlot:
        """Make the document's K/V hold exactly `ids`, reusing the longest common prefix.

        With need_last_hidden, at least the last token is recomputed so its
        hidden state (for next-token prediction) can be returned.
        """
        if not ids:
            raise ValueError("a context needs at least one token")
        entry = self._entries.get(document)
        reused = common_prefix_length(entry.ids, ids) if entry else 0
        if need_last_hidden:
            reused = min(reused, len(ids) - 1)
        entry = self._entry_with_room(document, len(ids), reused)
        if reused:
            self.counters.hits += 1
        else:
            self.counters.misses += 1
        return self._fill(entry, ids, reused)

    def extend(self, document: str, more: list[int]) -> ContextSlot:
        """Append tokens after the document's cached context (e.g. a committed span)."""
        entry = self._entries.get(document)
        if entry is None:
            raise KeyError(f"no cached context for {document!r}")
        have = list(entry.ids)
        entry = self._entry_with_room(document, len(have) + len(more), len(have))
        # Not counted as reuse: these tokens were just computed by this same request.
        return self._fill(entry, have + list(more), len(have), count_reuse=False)

    def _fill(self, entry: _Entry, ids: list[int], reused: int, count_reuse: bool = True) -> ContextSlot:
        computed = len(ids) - reused
        # Forget the old tail first: if prefill fails half way, the entry stays truthful.
        del entry.ids[reused:]
        last_hidden = None
        if computed:
            new = torch.tensor([ids[reused:]], dtype=torch.long, device=self.device)
            last_hidden = self.model.prefill(new, entry.kv, reused)
            entry.ids.extend(ids[reused:])
        if count_reuse:
            self.counters.reused_tokens += reused
        self.counters.computed_tokens += computed
        return ContextSlot(entry.kv, len(ids), reused, computed, last_hidden)

    def forget(self, document: str) -> None:
        self._drop(document)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
