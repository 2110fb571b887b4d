"""lsp_server.settings on its own: camelCase names, types, ranges, and messages."""
from __future__ import annotations

import math

import pytest

from lsp_server.settings import Settings, parse_settings, to_wire


def test_defaults_round_trip_through_the_wire_names():
    wire = to_wire(Settings())
    assert set(wire) == {
        "model", "device", "contextTokens", "spanTokensLine", "spanTokensBlock", "steps",
        "confidenceThreshold", "minConfidence", "debounceMs", "latencyBudgetMs", "threads", "enabledLanguages",
        "maxSnippets", "repoDrafts", "verboseLogging", "engine", "engineTokenFile", "engineFallback",
        "openModelKeystrokeCache", "openModelWeights",
    }
    parsed, problems = parse_settings(wire)
    assert (parsed, problems) == (Settings(), [])


def test_nested_and_flat_are_the_same():
    nested, _ = parse_settings({"parafill": {"steps": 3, "enabledLanguages": ["Python", " rust "]}})
    flat, _ = parse_settings({"steps": 3, "enabledLanguages": ["Python", " rust "]})
    assert nested == flat
    assert nested.steps == 3 and nested.enabled_languages == ("python", "rust")


@pytest.mark.parametrize("key, value", [
    ("steps", True),  # a bool is not a number here
    ("steps", 2.5),
    ("contextTokens", 10),
    ("confidenceThreshold", 0),
    ("confidenceThreshold", math.nan),
    ("confidenceThreshold", "0.5"),
    ("minConfidence", -0.1),
    ("minConfidence", 1.5),
    ("device", "CUDA:0"),
    ("enabledLanguages", [1, 2]),
    ("verboseLogging", "yes"),
    ("engine", "ftp://127.0.0.1:8765"),
    ("engine", "http://user:pw@127.0.0.1:8765"),
    ("engine", 8765),
    ("engineFallback", "sometimes"),
    ("openModelWeights", "int4"),
    ("openModelKeystrokeCache", "on"),
    ("model", 7),
])
def test_a_bad_value_keeps_the_previous_one_and_says_why(key, value):
    base = Settings(steps=6, confidence_threshold=0.5, device="cpu", verbose_logging=True, model="/m")
    parsed, problems = parse_settings({key: value}, base)
    assert parsed == base
    assert len(problems) == 1 and repr(key) in problems[0] and "must be" in problems[0]


def test_null_means_the_default_and_unknown_keys_are_named():
    parsed, problems = parse_settings({"steps": None, "stepz": 3}, Settings(steps=9))
    assert parsed.steps == Settings().steps
    assert len(problems) == 1 and "'stepz'" in problems[0] and "steps" in problems[0]


@pytest.mark.parametrize("raw", [None, {}])
def test_nothing_changes_nothing(raw):
    assert parse_settings(raw, Settings(steps=2)) == (Settings(steps=2), [])


@pytest.mark.parametrize("raw", [[1, 2], "steps=3", {"parafill": 5}])
def test_not_an_object(raw):
    parsed, problems = parse_settings(raw)
    assert parsed == Settings() and "must be an object" in problems[0]


def test_min_confidence_takes_zero_and_one():
    assert parse_settings({"minConfidence": 0})[0].min_confidence == 0.0
    assert parse_settings({"minConfidence": 1})[0].min_confidence == 1.0
