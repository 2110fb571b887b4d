"""Approximate context keys/values carried from one keystroke to the next (opt-in).

Open diffusion models attend bidirectionally: every context position's keys
and values depend on the span and on the suffix, so nothing can be reused
exactly once the user types. This module reuses them anyway, within bounds:

- per document, the keys/values of the last request (`ContextSnapshot`: the
  head and tail token ids they were computed for, and the span length
  between them) are kept, all documents together under a byte bound, the
  least recently used dropped first (`KeystrokeCache`);
- the next request in the same document reuses the head's longest common
  token prefix at the same positions, and the tail's longest common token
  prefix moved to its new positions (`shift_keys`: cached keys are rotated
  by the shift, values do not depend on position); with `suffix="reencode"`
  the tail is always computed afresh. The tokens typed since, the span and
  whatever could not be reused are computed in one pass against the reused
  rest (`plan_reuse` says which);
- staleness is bounded: after `refresh_after` requests built on one full pass,
  or when less than `min_reuse` of the context would be reused (the user
  moved, or the window start jumped), the request makes a full pass instead.

What it trades: the reused keys/values were computed before the latest edits,
so they do not "see" the typed tokens or the new span; the fill can differ
from the one exact recomputation would give. This module knows nothing of
text, requests or decoding; it moves tensors and counts bytes.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from denoiser.kv_cache import common_prefix_length

from denoiser.open_models.network import BidirectionalTransformer, KVStore

SUFFIX_MODES = ("shift", "reencode")


@dataclass(frozen=True)
class KeystrokeCachePolicy:
    """How far approximate reuse may go before a request pays for a full pass again."""

    refresh_after: int = 8  # requests served from one full pass, at most
    min_reuse: float = 0.5  # share of the context tokens (head + tail) reused, at least
    max_bytes: int = 256 * 1024 ** 2  # all documents' cached keys/values together
    suffix: str = "shift"  # "shift": reuse the tail at its new positions; "reencode": compute it afresh

    def __post_init__(self) -> None:
        if self.refresh_after < 1:
            raise ValueError("refresh_after must be >= 1 (1: every request after a full pass may reuse it once)")
        if not 0.0 <= self.min_reuse <= 1.0:
            raise ValueError("min_reuse must be a share from 0 to 1")
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if self.suffix not in SUFFIX_MODES:
            raise ValueError(f"suffix must be one of {SUFFIX_MODES}, not {self.suffix!r}")


@dataclass
class ContextSnapshot:
    """Keys/values of one sequence `head + [span tokens] + tail`, and how old they are."""

    head: list[int]
    tail: list[int]
    span: int
    kv: KVStore
    reuses: int = 0  # requests built on these keys/values since their last full pass

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@dataclass
class ReusePlan:
    """The new sequence's keys/values with the reusable parts in place, and what is left to compute."""

    kv: KVStore
    fresh: torch.Tensor  # positions the first pass recomputes (ascending)
    reused: int  # context tokens whose keys/values were reused
    reuses: int  # the age the result will have (snapshot's + 1; a span growth keeps it)


def plan_reuse(model: BidirectionalTransformer, snapshot: ContextSnapshot, head: list[int], tail: list[int],
               span: int, *, shift: int, suffix: str = "shift", min_reuse: float = 0.0,
               age: int | None = None) -> ReusePlan | None:
    """Reuse `snapshot` for `head + [span] + tail`, or None when less than `min_reuse` of it would be reused.

    `shift` (1 for families whose logits are shifted by one) keeps the token before the span among the
    recomputed ones: its output predicts the span's first token. `age`: the reuse count of the result
    (default: the snapshot's + 1)."""
    held = snapshot.kv
    if len(held.keys) != len(model.layers) or held.length != len(snapshot.head) + snapshot.span + len(snapshot.tail):
        return None  # not a whole pass's keys/values (a pass that failed half-way): start afresh
    start, tail_at = len(head), len(head) + span
    keep_head = min(common_prefix_length(snapshot.head, head), max(start - shift, 0))
    keep_tail = common_prefix_length(snapshot.tail, tail) if suffix == "shift" else 0
    context = len(head) + len(tail)
    if context == 0 or keep_head + keep_tail < min_reuse * context:
        return None
    old_tail_at = len(snapshot.head) + snapshot.span
    delta = tail_at - old_tail_at
    total = tail_at + len(tail)
    kv = KVStore()
    for keys, values in zip(snapshot.kv.keys, snapshot.kv.values):
        k = keys.new_empty(keys.shape[0], keys.shape[1], total, keys.shape[3])
        v = values.new_empty(k.shape)
        k[:, :, :keep_head] = keys[:, :, :keep_head]
        v[:, :, :keep_head] = values[:, :, :keep_head]
        if keep_tail:
            moved = keys[:, :, old_tail_at:old_tail_at + keep_tail]
            k[:, :, tail_at:tail_at + keep_tail] = model.shift_keys(moved, delta)
            v[:, :, tail_at:tail_at + keep_tail] = values[:, :, old_tail_at:old_tail_at + keep_tail]
        kv.keys.append(k)
        kv.values.append(v)
    fresh = torch.cat([torch.arange(keep_head, tail_at), torch.arange(tail_at + keep_tail, total)])
    return ReusePlan(kv=kv, fresh=fresh.to(model.device), reused=keep_head + keep_tail,
                     reuses=snapshot.reuses + 1 if age is None else age)


class KeystrokeCache:
    """One `ContextSnapshot` per document, all under `max_bytes`, least recently used dropped first."""

    def __init__(self, policy: KeystrokeCachePolicy) -> None:
        self.policy = policy
        self._held: OrderedDict[str, tuple[ContextSnapshot, int]] = OrderedDict()  # with its bytes when put
        self._bytes = 0
        self._lock = threading.Lock()  # stats are read from other threads than the fills

    def get(self, document: str) -> ContextSnapshot | None:
        """The document's snapshot, if it may still be reused (fewer than `refresh_after` reuses)."""
        with self._lock:
            held = self._held.get(document)
            if held is None:
                return None
            self._held.move_to_end(document)
            snapshot = held[0]
            return snapshot if snapshot.reuses < self.policy.refresh_after else None

    def put(self, document: str, snapshot: ContextSnapshot) -> None:
        with self._lock:
            self._drop(document)
            size = snapshot.nbytes
            if size > self.policy.max_bytes:
                return  # would not fit even alone: keep nothing rather than break the bound
            while self._held and self._bytes + size > self.policy.max_bytes:
                self._drop(next(iter(self._held)))
            self._held[document] = (snapshot, size)
            self._bytes += size

    def forget(self, document: str) -> None:
        with self._lock:
            self._drop(document)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0

    def _drop(self, document: str) -> None:
        old = self._held.pop(document, None)
        if old is not None:
            self._bytes -= old[1]

    def __len__(self) -> int:
        return len(self._held)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._held), "bytes": self._bytes, "max_bytes": self.policy.max_bytes}
