"""Document placement over the engine's replicas: affinity with bounded loads."""
from __future__ import annotations

from collections import Counter

from team_engine.placement import BoundedLoadPlacement, preference

REPLICAS = ["replica-a", "replica-b"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def documents(n: int) -> list[str]:
    return [f"doc-{i}" for i in range(n)]


def test_preference_is_per_document_and_unchanged_by_another_replica_leaving():
    orders = {tuple(preference(key, REPLICAS)) for key in documents(40)}
    assert len(orders) == 2  # both replicas come first for some documents
    three = ["replica-a", "replica-b", "replica-c"]
    for key in documents(40):
        without_c = [r for r in preference(key, three) if r != "replica-c"]
        assert without_c == preference(key, REPLICAS)


def test_documents_spread_evenly_where_hashing_alone_would_not():
    keys = documents(16)
    assert sorted(Counter(preference(key, REPLICAS)[0] for key in keys).values()) == [7, 9]
    placement = BoundedLoadPlacement()
    placed = Counter(placement.place(key, REPLICAS)[0] for key in keys)
    assert sorted(placed.values()) == [8, 8]
    # A document not yet crowded out goes to its own first choice.
    assert placement.place("doc-0", REPLICAS)[0] == placement.place("doc-0", REPLICAS)[0]


def test_a_document_stays_on_its_replica_request_after_request():
    placement = BoundedLoadPlacement()
    first = {key: placement.place(key, REPLICAS)[0] for key in documents(10)}
    for _ in range(5):
        for key in documents(10):
            ranked = placement.place(key, REPLICAS)
            assert ranked[0] == first[key] and sorted(ranked) == sorted(REPLICAS)
    assert placement.moved == 0


def test_a_replica_that_leaves_releases_its_documents_and_one_that_joins_takes_a_share():
    placement = BoundedLoadPlacement()
    keys = documents(12)
    for key in keys:
        placement.place(key, REPLICAS)
    # replica-b goes away: everything is placed on replica-a, the rest stays put.
    assert {placement.place(key, ["replica-a"])[0] for key in keys} == {"replica-a"}
    assert placement.load() == {"replica-a": 12}
    # Two new replicas join: documents over replica-a's share move there, the others stay.
    three = ["replica-a", "replica-c", "replica-d"]
    moved_before = placement.moved
    for _ in range(3):
        for key in keys:
            placement.place(key, three)
    load = placement.load()
    assert sum(load.values()) == 12 and max(load.values()) <= 5 and min(load.values()) >= 3
    # Only what replica-a held over its share moved, once each: no document went back and forth.
    assert placement.moved - moved_before == 12 - load["replica-a"]


def test_idle_documents_stop_counting():
    clock = Clock()
    placement = BoundedLoadPlacement(idle_s=60, clock=clock)
    for key in documents(6):
        placement.place(key, REPLICAS)
    clock.now = 30
    placement.place("doc-0", REPLICAS)
    clock.now = 70  # all but doc-0 idle for 70 s
    placement.place("doc-9", REPLICAS)
    assert sum(placement.load().values()) == 2


def test_forget_releases_the_document():
    placement = BoundedLoadPlacement()
    placement.place("doc-1", REPLICAS)
    placement.forget("doc-1")
    assert sum(placement.load().values()) == 0
    assert placement.place("any", []) == []


def test_a_document_back_from_idle_returns_to_its_replica():
    clock = Clock()
    placement = BoundedLoadPlacement(idle_s=60, clock=clock)
    first = {key: placement.place(key, REPLICAS)[0] for key in documents(4)}
    clock.now = 100  # all idle: none counts, each is remembered
    for key in reversed(documents(4)):  # back in another order than they came
        assert placement.place(key, REPLICAS)[0] == first[key]
    assert placement.moved == 0
