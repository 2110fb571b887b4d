"""`parafill bench --engine`'s own parts, without Ray: its cursors, its hop's turns and its plot.

The whole benchmark starts a Ray cluster and deploys twice, too long for CI;
bench/README.md gives the command. Here: every request is a new cursor (so none
is answered from the server's caches), the hop takes each request in this
process and through the engine in turns, and the report draws.
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


def test_the_hop_takes_each_request_here_and_there_in_turns(parafill_tiny_model):
    """Both sides see the same cursors, in alternating order, so a change of load mid-run hits both."""
    from denoiser.engine import Engine
    from lsp_server.settings import Settings

    settings = Settings(min_confidence=0, steps=2, span_tokens_line=8, span_tokens_block=8, context_tokens=128,
                        latency_budget_ms=0)
    here, there = Engine.load(str(parafill_tiny_model), device="cpu"), Engine.load(str(parafill_tiny_model), device="cpu")
    calls: list[str] = []
    for name, engine in (("here", here), ("there", there)):
        complete = engine.complete

        def spy(*args, _name=name, _complete=complete, **kwargs):
            calls.append(_name)
            return _complete(*args, **kwargs)

        engine.complete = spy
    requests = engine_bench.cursors(4, "turns")
    local_ms, remote_ms = engine_bench.paired_fills(here, there, settings, requests)
    assert len(local_ms) == len(remote_ms) == 4 and min(local_ms + remote_ms) > 0
    assert calls == ["here", "there", "there", "here", "here", "there", "there", "here"]


def test_requests_per_replica_add_up_over_the_clients():
    statuses = [{"replicas": {"a": {"requests": 5, "contextKvReuse": 0.9}}},
                {"replicas": {"b": {"requests": 3, "contextKvReuse": 0.8}, "a": {"requests": 1, "contextKvReuse": 0}}},
                {"replicas": {}}]
    assert engine_bench.requests_per_replica(statuses) == {"a": 6, "b": 3}


def test_the_machine_ceiling_runs_plain_processes_that_fill_in_themselves(parafill_tiny_model):
    from lsp_server.settings import Settings

    settings = Settings(min_confidence=0, steps=2, span_tokens_line=8, span_tokens_block=8, context_tokens=128,
                        latency_budget_ms=0)
    rows = engine_bench.machine_ceiling(str(parafill_tiny_model), 1, settings, [1, 2], requests=2)
    assert [row["processes"] for row in rows] == [1, 2]
    assert all(row["fills_per_s"] > 0 for row in rows)
