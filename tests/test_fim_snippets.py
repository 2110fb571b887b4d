"""Snippets from other open documents (fim/snippets.py)."""
from __future__ import annotations

import time

from fim.snippets import (
    MAX_DOCUMENT_CHARS,
    MAX_DOCUMENTS,
    MAX_LINE_CHARS,
    identifiers,
    jaccard,
    select_snippets,
)

QUERY = """\
def fetch_user(session, user_id):
    response = session.get(f"/users/{user_id}")
    response.raise_for_status()
"""

USERS_API = """\
import requests


def fetch_order(session, order_id):
    response = session.get(f"/orders/{order_id}")
    response.raise_for_status()
    return response.json()


def fetch_user(session, user_id):
    response = session.get(f"/users/{user_id}")
    response.raise_for_status()
    return parse_user(response.json())


def unrelated():
    alpha = beta + gamma
    return alpha
"""

FILLER = "\n".join(f"total_{i} = weight_{i} * factor_{i}" for i in range(60)) + "\n"


def test_identifiers_skip_keywords_and_numbers():
    assert identifiers("def f(self, x1): return x1 + 2") == frozenset({"f", "x1"})
    assert identifiers("const названиеПеременной = 1") == frozenset({"названиеПеременной"})
    assert identifiers("") == frozenset()


def test_jaccard():
    a, b = frozenset("abc"), frozenset("bcd")
    assert jaccard(a, b) == 2 / 4
    assert jaccard(a, a) == 1.0
    assert jaccard(a, frozenset()) == 0.0


def test_picks_the_most_similar_region():
    snippets = select_snippets(QUERY, [("noise.py", FILLER), ("api/users.py", USERS_API)], max_snippets=1)
    assert len(snippets) == 1
    assert snippets[0].path == "api/users.py"
    assert "def fetch_user(session, user_id):" in snippets[0].text
    assert "parse_user" in snippets[0].text


def test_unrelated_documents_give_nothing():
    assert select_snippets(QUERY, [("noise.py", FILLER)]) == ()


def test_empty_query_or_documents_give_nothing():
    assert select_snippets("", [("a.py", USERS_API)]) == ()
    assert select_snippets("   \n\n", [("a.py", USERS_API)]) == ()
    assert select_snippets(QUERY, []) == ()
    assert select_snippets(QUERY, [("empty.py", "")]) == ()
    assert select_snippets(QUERY, [("a.py", USERS_API)], max_snippets=0) == ()


def test_max_snippets_and_no_overlap():
    # Every line unique, so shared lines between two snippets would show.
    doc = "\n".join(f"response_{i} = session.get(user_id, fetch_user_{i})" for i in range(80))
    query = "response = session.get(user_id)\nfetch_user(session, user_id)\n"
    snippets = select_snippets(query, [("a.py", doc)], max_snippets=3, min_similarity=0.0)
    assert len(snippets) == 3
    line_sets = [set(s.text.split("\n")) for s in snippets]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not line_sets[i] & line_sets[j]
    assert len(select_snippets(query, [("a.py", doc)], max_snippets=1, min_similarity=0.0)) == 1


def test_identical_regions_are_offered_once():
    snippets = select_snippets(QUERY, [("a.py", USERS_API), ("b.py", USERS_API)], max_snippets=2)
    assert len({s.text for s in snippets}) == len(snippets)


def test_deterministic_and_ties_go_to_the_earlier_document():
    docs = [("first.py", USERS_API), ("second.py", USERS_API)]
    one = select_snippets(QUERY, docs, max_snippets=1)
    assert one == select_snippets(QUERY, list(docs), max_snippets=1)
    assert one[0].path == "first.py"


def test_crlf_documents_give_clean_snippets():
    snippets = select_snippets(QUERY, [("win.py", USERS_API.replace("\n", "\r\n"))], max_snippets=1)
    assert snippets and "\r" not in snippets[0].text


def test_long_lines_are_cut():
    doc = "def fetch_user(session, user_id):\n    response = session.get('" + "x" * 10_000 + "')\n"
    snippets = select_snippets(QUERY, [("min.py", doc)], max_snippets=1)
    assert snippets
    assert max(len(line) for line in snippets[0].text.split("\n")) <= MAX_LINE_CHARS


def test_work_is_bounded():
    # A match past the character cap of a huge document is not looked for...
    huge = FILLER * (MAX_DOCUMENT_CHARS // len(FILLER) + 50) + USERS_API
    assert len(huge) > MAX_DOCUMENT_CHARS
    started = time.perf_counter()
    assert select_snippets(QUERY, [("huge.py", huge * 10)]) == ()
    assert time.perf_counter() - started < 5.0
    # ...and neither is a document past the document cap.
    many = [(f"f{i}.py", FILLER + str(i)) for i in range(MAX_DOCUMENTS)] + [("late.py", USERS_API)]
    assert select_snippets(QUERY, many) == ()
    assert select_snippets(QUERY, many[-1:]) != ()


def test_repeated_calls_are_cached_and_cheap():
    docs = [(f"d{i}.py", USERS_API + FILLER * 200) for i in range(8)]
    first = select_snippets(QUERY, docs)
    started = time.perf_counter()
    for _ in range(100):
        assert select_snippets(QUERY, docs) == first
    assert time.perf_counter() - started < 0.5
