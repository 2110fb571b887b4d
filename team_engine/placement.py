"""Which replica serves a document: its own, unless that one already holds more than its share.

A document's requests should keep reaching the replica that holds its context keys and
values, but a pure hash of the document's key piles documents unevenly on few replicas
(16 documents on 2 replicas land 10/6 or worse nearly half the time), and the busiest
replica then caps what the engine serves. So placement is consistent hashing with
bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): each document has a preferred
order of replicas (rendezvous hashing of its key), and a new document takes the first
replica in that order whose active documents are under ⌈m/n⌉ (m active documents, n
replicas). A placed document stays where it is while its replica holds at most
⌈1.25·m/n⌉, so documents move only when the load shifts far (a replica added, documents
gone idle), never back and forth. Documents idle for `idle_s` stop counting, but their
replica is remembered: a document the user comes back to returns there unless that replica
is over the bound. A replica that disappears releases its documents, which are placed
again on their next request.

Pure bookkeeping, no Ray: `team_engine.routing` uses it inside Serve's router.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

KEEP_FACTOR = 1.25
IDLE_S = 30.0
REMEMBERED = 4096  # idle documents whose replica is kept for their return


def preference(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in the document's own order (rendezvous hashing): the same for every router,
    and a replica added or removed changes no other replica's place in it."""
    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{replica}\0{key}".encode(), digest_size=8).digest()
    return sorted(replicas, key=weight, reverse=True)


class BoundedLoadPlacement:
    def __init__(self, *, idle_s: float = IDLE_S, keep_factor: float = KEEP_FACTOR,
                 clock: Callable[[], float] = time.monotonic):
        self.idle_s, self.keep_factor, self._clock = idle_s, keep_factor, clock
        # key -> (replica, last seen), least recently seen first
        self._where: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._load: Counter = Counter()
        self._replicas: frozenset = frozenset()
        self._home: OrderedDict[str, str] = OrderedDict()  # idle documents -> their last replica
        self.moved = 0  # placed documents sent elsewhere since start (each costs its replica one prefill)

    def load(self) -> dict[str, int]:
        """Active documents per replica."""
        return {replica: self._load[replica] for replica in self._replicas}

    def place(self, key: str, replicas: Sequence[str]) -> list[str]:
        """The replicas for `key`'s request, best first: its own, then the rest in its preference."""
        if not replicas:
            return []
        self._track(frozenset(replicas))
        self._expire(self._clock())
        order = preference(key, replicas)
        active = len(self._where) + (key not in self._where)
        current = self._release(key)
        if current is None:
            current = self._home.pop(key, None)
        keep_cap = math.ceil(self.keep_factor * active / len(replicas))
        if current is not None and self._load[current] < keep_cap:
            chosen = current
        else:
            cap = math.ceil(active / len(replicas))
            # Loads of the others sum to active - 1 < n·cap, so some replica is under the cap.
            chosen = next(r for r in order if self._load[r] < cap)
            self.moved += current is not None and chosen != current
        self._where[key] = (chosen, self._clock())
        self._load[chosen] += 1
        return [chosen] + [r for r in order if r != chosen]

    def forget(self, key: str) -> None:
        self._release(key)
        self._home.pop(key, None)

    def _release(self, key: str) -> str | None:
        replica, _ = self._where.pop(key, (None, 0.0))
        if replica is not None:
            self._load[replica] -= 1
        return replica

    def _track(self, replicas: frozenset) -> None:
        if replicas == self._replicas:
            return
        gone = self._replicas - replicas
        for key in [key for key, (replica, _) in self._where.items() if replica in gone]:
            self._release(key)
        for replica in gone:
            del self._load[replica]
        for key in [key for key, replica in self._home.items() if replica in gone]:
            del self._home[key]
        self._replicas = replicas

    def _expire(self, now: float) -> None:
        while self._where:
            key, (_, seen) = next(iter(self._where.items()))
            if now - seen < self.idle_s:
                break
            self._home[key] = self._release(key)
            if len(self._home) > REMEMBERED:
                self._home.popitem(last=False)
