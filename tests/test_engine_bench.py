"""`parafill bench --engine`'s own parts, without Ray: its cursors and its plot.

The whole benchmark starts a Ray cluster and deploys twice, too long for CI;
bench/README.md gives the command. Here: every request is a new cursor (so none
is answered from the server's caches) and the report draws.
"""
from __future__ import annotations

from tools import engine_bench


def test_each_client_moves_through_one_document_and_never_repeats_a_cursor():
    requests = engine_bench.cursors(60, "client-3")
    assert len({text for text, _, _ in requests}) == 1  # one document per client
    assert len({(line, character) for _, line, character in requests}) == 60
    text = requests[0][0]
    assert text.startswith("# client-3\n")
    lines = text.splitlines()
    assert all(0 < character <= len(lines[line]) for _, line, character in requests)
    assert engine_bench.cursors(5, "client-4")[0][0] != text  # another client, another text


def test_the_report_draws(tmp_path):
    hop = {k: {"p50": 2.0, "p99": 4.0} for k in ("noop_round_trip_ms", "in_process_ms", "through_engine_ms")}
    rows = [{"replicas": r, "clients": c, "requests_per_s": float(r * c)} for r in (1, 2) for c in (1, 4, 16)]
    results = {"hop": hop, "throughput": rows, "model": "tiny", "machine": "cpu", "cores": 2,
               "threads_per_replica": 1}
    engine_bench.plot(results, tmp_path / "engine.png")
    assert (tmp_path / "engine.png").stat().st_size > 0
