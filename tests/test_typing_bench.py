"""`parafill bench --typing` types a real file through a real server and reports context K/V reuse.

Typing forward must keep the context's cached keys and values: after the cold
open, at least 90% of each request's context tokens come from the cache, as the
server itself counts them (`parafill/status`).
"""
from __future__ import annotations

import json
from pathlib import Path

from tools import bench
from tools.typing_bench import typing_plan

REPO = Path(__file__).resolve().parents[1]
# Small and quick: random weights write junk anyway (tests/conftest.py FAST_SETTINGS).
SETTINGS = ("contextTokens=256", "spanTokensLine=8", "spanTokensBlock=8", "steps=2", "latencyBudgetMs=0",
            "minConfidence=0")


def test_typing_plan_types_the_file_back_from_a_line_start():
    text = "".join(f"line {i} = {i * i}\n" for i in range(40))
    start, pieces = typing_plan(text, 0.5, requests=10, chars=3)
    assert start == text.index("line 20 =") and [len(p) for p in pieces] == [3] * 10
    assert "".join(pieces) == text[start:start + 30]
    start, pieces = typing_plan(text, 0.99, requests=1000, chars=4)  # stops at the end of the file
    assert "".join(pieces) == text[start:] and len(pieces) == -(-len(text[start:]) // 4)


def test_typing_replay_reuses_the_context(tmp_path, parafill_tiny_model):
    out = tmp_path / "typing.json"
    settings = [arg for s in SETTINGS for arg in ("--setting", s)]
    assert bench.main(["--typing", str(REPO / "fim" / "context.py"), "--model", str(parafill_tiny_model),
                       "--requests", "12", *settings, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = results["per_request"]
    assert len(rows) == results["requests"] == 12 and results["chars_per_request"] == 3
    assert results["answered_by"]["model"] == 12  # random junk is never typed ahead, and each context is new
    assert rows[0]["reused_tokens"] == 0 and all(r["context_tokens"] > 0 and r["ms"] > 0 for r in rows)
    # What the server reports is what the rows add up to.
    assert results["context_kv_reuse"] == results["server_context_kv_reuse"]
    assert results["context_kv_reuse_after_first"] >= 0.9, rows
    lat = results["latency_ms"]["all"]
    assert 0 < lat["p50"] <= lat["p99"]
    assert out.with_suffix(".png").stat().st_size > 0
