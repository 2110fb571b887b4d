"""Corpus shards: each at most the size asked for, and together exactly the train split."""
import gzip
import json
import random
from pathlib import Path

import pytest

from training.corpus.__main__ import main as corpus_main
from training.corpus.shards import SLACK, train_files, write_shards


def make_corpus(folder: Path, records: int = 3000) -> list[bytes]:
    """A train split of incompressible-ish records (random identifiers), a valid split, stats."""
    folder.mkdir(parents=True)
    rng = random.Random(5)
    lines = []
    for i in range(records):
        text = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(8)) for _ in range(200))
        lines.append((json.dumps({"path": f"p/m{i}.py", "language": "python", "text": text}) + "\n").encode())
    with gzip.open(folder / "train.jsonl.gz", "wb") as fh:
        fh.writelines(lines)
    with gzip.open(folder / "valid.jsonl.gz", "wb") as fh:
        fh.write(lines[0])
    (folder / "stats.json").write_text('{"corpus_sha256": "x"}')
    return lines


def read_lines(paths) -> list[bytes]:
    out = []
    for path in paths:
        with gzip.open(path, "rb") as fh:
            out.extend(fh)
    return out


def test_shards_respect_the_budget_and_rebuild_the_split(tmp_path):
    lines = make_corpus(tmp_path / "corpus")
    budget = 2 * SLACK + (1 << 19)
    shards = write_shards(tmp_path / "corpus", tmp_path / "shards", budget)
    assert len(shards) >= 2
    assert all(path.stat().st_size <= budget for path in shards)
    assert read_lines(shards) == lines
    assert train_files(tmp_path / "shards") == shards
    assert (tmp_path / "shards" / "valid.jsonl.gz").read_bytes() == (tmp_path / "corpus" / "valid.jsonl.gz").read_bytes()
    # The same corpus gives the same bytes (a reproducible transfer), and stale shards go.
    first = [path.read_bytes() for path in shards]
    again = write_shards(tmp_path / "corpus", tmp_path / "shards", budget)
    assert [path.read_bytes() for path in again] == first


def test_train_files_takes_one_form_and_names_the_folder(tmp_path):
    make_corpus(tmp_path / "corpus", records=10)
    assert train_files(tmp_path / "corpus") == [tmp_path / "corpus" / "train.jsonl.gz"]
    (tmp_path / "corpus" / "train-000.jsonl.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="both"):
        train_files(tmp_path / "corpus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        train_files(tmp_path / "empty")


def test_shard_command_and_its_errors(tmp_path, capsys):
    make_corpus(tmp_path / "corpus", records=50)
    assert corpus_main(["shard", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "s"), "--max-mb", "4"]) == 0
    assert [p.name for p in train_files(tmp_path / "s")] == ["train-000.jsonl.gz"]
    with pytest.raises(SystemExit) as stop:
        corpus_main(["shard", "--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")])
    assert stop.value.code == 2 and "build the corpus first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        corpus_main(["shard", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "u"), "--max-mb", "0.5"])
    assert "too small" in capsys.readouterr().err


def test_shards_refuse_the_corpus_folder_and_an_empty_split(tmp_path):
    make_corpus(tmp_path / "corpus", records=3)
    with pytest.raises(ValueError, match="another folder"):
        write_shards(tmp_path / "corpus", tmp_path / "corpus", 4 << 20)
    (tmp_path / "empty").mkdir()
    with gzip.open(tmp_path / "empty" / "train.jsonl.gz", "wb"):
        pass
    with pytest.raises(ValueError, match="no records"):
        write_shards(tmp_path / "empty", tmp_path / "out", 4 << 20)
