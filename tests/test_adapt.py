"""`parafill adapt`: trains a copy on the repository's files, reports held-out exact line, writes only to the cache."""
from __future__ import annotations

import json

import pytest

from denoiser.adapted import adapted_for, adapted_dir
from tools import adapt

MODULE = '''"""Inventory helpers."""


def stock_level(store, item):
    return store.inventory.count(item)


def restock(store, item, amount):
    store.inventory.extend([item] * amount)
    return stock_level(store, item)


def clear(store, item):
    while item in store.inventory:
        store.inventory.remove(item)
    return stock_level(store, item)
'''


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "shop"
    for i in range(6):
        (root / "shop").mkdir(parents=True, exist_ok=True)
        (root / "shop" / f"part{i}.py").write_text(MODULE.replace("store", f"store{i}"), encoding="utf-8")
    (root / ".gitignore").write_text("secret.py\n")
    (root / "secret.py").write_text(MODULE.replace("store", "vault"))
    return root


def snapshot(root):
    return sorted((p, p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def test_adapt_keeps_the_better_model_in_the_cache_and_never_writes_the_repo(repo, tmp_path, monkeypatch, capsys,
                                                                            parafill_tiny_model):
    monkeypatch.setenv("PARAFILL_CACHE", str(tmp_path / "cache"))
    before = snapshot(repo)
    assert adapt.main([str(repo), "--model", str(parafill_tiny_model), "--minutes", "0.05", "--check-every", "0.02",
                       "--checks", "8", "--lr", "3e-3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert snapshot(repo) == before
    assert report["train_files"] + report["held_out_files"] == 6  # the ignored file is not read
    assert report["steps"] >= 1 and report["checks"] > 0
    if report["kept"] == "adapted":
        assert report["after"] > report["before"]
        assert adapted_for(repo / "shop" / "part0.py") == (repo.resolve(), adapted_dir(repo))
    else:
        assert report["after"] == report["before"] and adapted_for(repo) is None


def test_adapt_remove_forgets_it(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAFILL_CACHE", str(tmp_path / "cache"))
    model_dir = adapted_dir(repo)
    model_dir.mkdir(parents=True)
    (model_dir / "adapted.json").write_text(json.dumps({"repository": str(repo.resolve())}))
    assert adapted_for(repo / "shop") == (repo.resolve(), model_dir)
    assert adapt.main([str(repo), "--remove"]) == 0
    assert adapted_for(repo) is None and not model_dir.exists()
    assert "removed" in capsys.readouterr().out


def test_adapt_refuses_a_folder_without_code(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to learn here\n")
    assert adapt.main([str(tmp_path)]) == 2
    assert "at least two" in capsys.readouterr().err


@pytest.mark.parametrize("scores, kept, after", [([0.10, 0.20, 0.15, 0.15, 0.15], "adapted", 0.20),
                                                 ([0.30, 0.20, 0.10, 0.30, 0.30], "base", 0.30)])
def test_adapt_keeps_the_best_check_and_the_base_when_nothing_helped(repo, tmp_path, monkeypatch, capsys,
                                                                     parafill_tiny_model, scores, kept, after):
    monkeypatch.setenv("PARAFILL_CACHE", str(tmp_path / "cache"))
    told = iter(scores)
    monkeypatch.setattr(adapt, "exact_line", lambda model, tokenizer, cuts: next(told))
    assert adapt.main([str(repo), "--model", str(parafill_tiny_model), "--minutes", "5", "--check-every", "0.001",
                       "--patience", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["kept"], report["after"], report["before"]) == (kept, after, scores[0])
    assert (adapted_for(repo) is not None) == (kept == "adapted")
    if kept == "adapted":
        card = (adapted_dir(repo) / "MODEL_CARD.md").read_text()
        assert "10.0% before, 20.0% after" in card
