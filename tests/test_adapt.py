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


@pytest.mark.parametrize("losses, exact, kept, after", [
    ([3.0, 2.8, 2.9, 2.9, 2.9], [0.10, 0.20], "adapted", 0.20),  # the loss fell, and more cuts came right
    ([3.0, 2.8, 2.7, 2.9, 2.9, 2.9], [0.30, 0.30], "base", 0.30),  # the loss fell, the misses did not
    ([3.0, 3.1, 3.2, 3.3], [0.30], "base", 0.30),  # the loss never fell: no candidate to complete with
])
def test_adapt_keeps_the_lowest_loss_and_the_base_when_it_completes_no_more(repo, tmp_path, monkeypatch, capsys,
                                                                            parafill_tiny_model, losses, exact,
                                                                            kept, after):
    from training.adapt import Adapter

    monkeypatch.setenv("PARAFILL_CACHE", str(tmp_path / "cache"))
    told_loss, told_exact = iter(losses), iter(exact)
    monkeypatch.setattr(Adapter, "held_out_loss", lambda self, batches: next(told_loss))
    monkeypatch.setattr(adapt, "exact_line", lambda model, tokenizer, cuts: next(told_exact))
    assert adapt.main([str(repo), "--model", str(parafill_tiny_model), "--minutes", "5", "--check-every", "0.001",
                       "--patience", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert next(told_loss, None) is None and next(told_exact, None) is None  # stopped after 3 checks without a fall
    assert (report["kept"], report["after"], report["before"]) == (kept, after, exact[0])
    assert report["loss_after"] == min(losses)
    assert report["candidate"] == (exact[1] if len(exact) > 1 else None)
    assert (adapted_for(repo) is not None) == (kept == "adapted")
    if kept == "adapted":
        card = (adapted_dir(repo) / "MODEL_CARD.md").read_text()
        assert "10.0% before, 20.0% after" in card and "3.000 before, 2.800 after" in card


def test_held_out_loss_is_repeatable_and_falls_as_the_adapter_learns_those_files(repo, parafill_tiny_model):
    import torch

    from denoiser.checkpoint import TOKENIZER, load_native_model
    from denoiser.tokenizer import CodeTokenizer
    from training.adapt import Adapter, held_out_batches

    model, _, config = load_native_model(parafill_tiny_model, torch.device("cpu"))
    tokenizer = CodeTokenizer.load(parafill_tiny_model / TOKENIZER)
    files = [(p.name, "python", p.read_text()) for p in sorted((repo / "shop").glob("*.py"))]
    batches = held_out_batches(files, tokenizer, config.context_tokens, batches=4, batch_size=4)
    adapter = Adapter(model, tokenizer, files, lr=3e-3, warmup_steps=1)
    first = adapter.held_out_loss(batches)
    assert adapter.held_out_loss(batches) == pytest.approx(first, rel=1e-6)  # same batches, same noise
    assert not model.training
    adapter.train_for(3.0)
    assert adapter.held_out_loss(batches) < first
