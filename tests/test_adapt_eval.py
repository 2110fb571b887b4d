"""`parafill eval --adapt`: the command's split, one run snapshotted per budget, scored through the server's path."""
from __future__ import annotations

import json
import random

import pytest

from fim.positions import position_at
from fim.repo_files import iter_repo_files
from lsp_server.settings import Settings
from lsp_server.suggest import suggest
from tools import adapt_eval, evaluate
from tools.adapt import split_files

MODULE = '''"""Inventory helpers."""


def stock_level(store, item):
    return store.inventory.count(item)


def restock(store, item, amount):
    store.inventory.extend([item] * amount)
    return stock_level(store, item)
'''


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "shop"
    (root / "shop").mkdir(parents=True)
    for i in range(8):
        (root / "shop" / f"part{i}.py").write_text(MODULE.replace("store", f"store{i}"), encoding="utf-8")
    return root


def test_whole_line_cuts_leave_the_indentation_and_expect_the_line_s_code():
    text = "def f(x):\n    y = x + 1\n    return y\n"
    for seed in range(20):
        cursor, end = adapt_eval.whole_line_cut(text, random.Random(seed))
        assert adapt_eval.whole_line_cut(text, random.Random(seed)) == (cursor, end)
        line_start = text.rfind("\n", 0, cursor) + 1
        assert text[line_start:cursor].strip() == "" and text[cursor] != " "
        assert text[cursor:end] == text[line_start:end].strip() and text[end] == "\n"
    assert adapt_eval.whole_line_cut("a\n\n  )\n", random.Random(0)) is None  # no line with 3 characters of code


def test_tasks_come_from_the_held_out_files_only_and_are_distinct(repo):
    _, held = split_files(list(iter_repo_files(repo)))
    tasks = adapt_eval.held_out_tasks(held, 10, seed=3)
    assert tasks == adapt_eval.held_out_tasks(held, 10, seed=3)
    assert {t.kind for t in tasks} == set(adapt_eval.KINDS)
    assert {t.path for t in tasks} <= {f.path for f in held}
    assert len({(t.path, t.document, t.line, t.character) for t in tasks}) == len(tasks)
    originals = {f.path: f.text for f in held}
    for t in tasks:
        lines = t.document.split("\n")
        cursor = sum(len(line) + 1 for line in lines[:t.line]) + t.character
        assert t.document[:cursor] + t.expected + t.document[cursor:] == originals[t.path]
        assert position_at(t.document, cursor) == (t.line, t.character)


def test_the_default_gate_is_the_server_s_rule(repo, parafill_tiny_model):
    from denoiser.engine import Engine
    from denoiser.native_backend import NativeBackend

    _, held = split_files(list(iter_repo_files(repo)))
    backend = NativeBackend(parafill_tiny_model, device="cpu")
    fast = {"span_tokens_line": 8, "span_tokens_block": 8, "latency_budget_ms": 0}

    def ask(task, gate):
        return suggest(Engine(backend), task.document, task.line, task.character, document="d", path=task.path,
                       language_id=task.language, settings=Settings(min_confidence=gate, **fast))

    shown = 0
    for task in adapt_eval.held_out_tasks(held, 3, seed=0):
        found = ask(task, 0.0)
        shown += found.text is not None
        gates = (0.5,) if found.confidence is None else (found.confidence * 0.5, found.confidence * 1.5 + 1e-3)
        for gate in gates:
            assert adapt_eval.shown_at(found, gate) == (ask(task, gate).text is not None)
    assert shown  # the rule was checked on suggestions the server would show


def test_adapt_eval_writes_snapshots_per_budget_that_moved_the_weights(repo, tmp_path, monkeypatch, capsys,
                                                                      parafill_tiny_model):
    monkeypatch.setattr(adapt_eval, "git_commit", lambda: "abc")
    before = sorted((p, p.stat().st_mtime_ns) for p in repo.rglob("*"))
    out = tmp_path / "results" / "adapt.json"
    assert evaluate.main(["--adapt", str(repo), "--model", str(parafill_tiny_model), "--adapt-minutes", "0.02,0.01",
                          "--adapt-tasks", "4", "--adapt-threads", "1", "--adapt-lr", "3e-3", "--out", str(out)]) == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in repo.rglob("*")) == before
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["command"].startswith("parafill eval --adapt ")
    assert report["torch"]["train_threads"] == 1 and report["torch"]["eval_threads"] == 1
    assert report["machine"]["cores_visible"] >= 1 and report["options"]["minutes"] == [0.01, 0.02]
    package = report["packages"]["shop"]
    _, held = split_files(list(iter_repo_files(repo)))
    assert package["held_out_files"] == sorted(f.path for f in held)
    assert package["train_files"] + len(held) == package["files"] == 8
    points = package["points"]
    assert [p["minutes"] for p in points] == [0, 0.01, 0.02]
    assert points[0]["steps"] == 0 and 1 <= points[1]["steps"] <= points[2]["steps"]
    assert 0 < points[1]["tokens"] <= points[2]["tokens"]
    assert points[1]["training_s"] >= 0.6 and points[2]["training_s"] >= 1.2
    assert all(p["cpu_s"] > 0 and p["cpu_share"] > 0 for p in points[1:])
    assert all(p["weight_change"] > 0 for p in points[1:])  # each snapshot is trained weights, not the base
    for point in points:
        for kind in ("all",) + adapt_eval.KINDS:
            summary = point[kind]
            assert summary["tasks"] == (sum(package["tasks"].values()) if kind == "all" else package["tasks"][kind])
            assert 0 <= summary["exact_line_default"] <= summary["shown_default"] <= summary["shown"] <= 1
            assert summary["latency_ms_p50"] > 0
    assert set(package["gain"]) == {"0.01", "0.02"}
    gained = package["gain"]["0.02"]["all"]["exact_line"]
    assert gained == pytest.approx(100 * (points[2]["all"]["exact_line"] - points[0]["all"]["exact_line"]), abs=0.01)
    assert "mean gain" in capsys.readouterr().out


def test_adapt_eval_with_workspace_drafts_scores_each_point_twice(repo, tmp_path, monkeypatch, capsys,
                                                                   parafill_tiny_model):
    monkeypatch.setattr(adapt_eval, "git_commit", lambda: "abc")
    out = tmp_path / "adapt.json"
    assert evaluate.main(["--adapt", str(repo), "--model", str(parafill_tiny_model), "--adapt-minutes", "0.01",
                          "--adapt-tasks", "4", "--adapt-threads", "1", "--adapt-drafts", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["workspace_drafts"] is True
    points = report["packages"]["shop"]["points"]
    for point in points:
        assert point["workspace"]["all"]["tasks"] == point["all"]["tasks"] == 8
    gained = report["packages"]["shop"]["gain"]["0.01"]["workspace"]["all"]["exact_line"]
    assert gained == pytest.approx(100 * (points[1]["workspace"]["all"]["exact_line"]
                                          - points[0]["workspace"]["all"]["exact_line"]), abs=0.01)
    assert "workspace" in report["mean_gain"]["0.01"]
    assert "with the workspace's drafts" in capsys.readouterr().out


def test_workspace_drafts_ride_along_only_with_the_workspace(repo, parafill_tiny_model):
    """Held-out files repeat the kept files' shapes: with the workspace indexed, requests carry drafts."""
    train, held = split_files(list(iter_repo_files(repo)))
    tasks = [t for t in adapt_eval.held_out_tasks(held, 6, seed=0) if t.kind == "rest-of-line"]
    plain = adapt_eval.complete_tasks(parafill_tiny_model, tasks, "shop", "plain")
    drafted = adapt_eval.complete_tasks(parafill_tiny_model, tasks, "shop", "ws", workspace=train)
    assert all(r["draft"] is None for r in plain)
    assert sum(r["draft"] is not None for r in drafted) >= len(tasks) // 2


def test_adapt_eval_refuses_a_missing_folder(tmp_path, capsys):
    assert evaluate.main(["--adapt", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_snapshots_keep_the_base_model_s_draft_calibration(repo, tmp_path, parafill_tiny_model):
    """As `parafill adapt` does: an adapted model decides drafts as its base does."""
    import argparse
    import shutil

    from denoiser.drafts import DraftCalibration

    base = tmp_path / "base"
    shutil.copytree(parafill_tiny_model, base)
    DraftCalibration({name: 0.5 for name in DraftCalibration.FEATURES}, -1.0).save(base)
    train, _ = split_files(list(iter_repo_files(repo)))
    args = argparse.Namespace(adapt_threads=1, adapt_lr=3e-3, seed=0)
    snapshots = adapt_eval.adapt_snapshots(base, train, [0.01], tmp_path / "snaps", args, lambda _: None)
    kept = DraftCalibration.load(snapshots[0]["model_dir"])
    assert kept is not None and kept.bias == -1.0 and kept.weights["next_line"] == 0.5
