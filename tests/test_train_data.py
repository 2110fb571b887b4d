"""Training batches: built for the longest span then fitted, in-process or by worker processes."""
import gzip
import json
import random
import time
from pathlib import Path

import pytest

from denoiser.tokenizer import CodeTokenizer
from tools.tiny_native import make_tiny_model
from training.examples import split_text, tokenize_splits
from training.train_data import (
    MAX_SPAN,
    SPAN_CHOICES,
    ExampleStream,
    PrefetchStream,
    fit_span,
    read_corpus,
    worker_seed,
)

SOURCE = "".join(f"def f{i}(x):\n    y = x * {i} + len('{'ab' * i}')\n    return y\n\n" for i in range(40))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny")) / "tokenizer.json"


def test_fitting_equals_tokenizing_for_the_smaller_span(tokenizer_path):
    tokenizer = CodeTokenizer.load(tokenizer_path)
    rng = random.Random(11)
    splits = [s for s in (split_text(SOURCE, "a.py", "python", rng) for _ in range(300)) if s]
    longest = tokenize_splits(tokenizer, splits, 96, MAX_SPAN - 1)
    for span in sorted(set(SPAN_CHOICES)) + [2, 5]:
        direct = tokenize_splits(tokenizer, splits, 96, span - 1)
        assert [fit_span(e, span) for e in longest] == direct
    # Both kinds occur, or the check above proves little.
    assert any(len(e.middle) > 15 for e in longest) and any(len(e.middle) < 8 for e in longest)


def write_split(path: Path, count: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"path": f"p/m{i}.py", "language": "python", "text": SOURCE[i * 7:]}) + "\n")


def test_workers_give_the_in_process_batches_round_robin(tmp_path, tokenizer_path):
    shards = [tmp_path / "train-000.jsonl.gz", tmp_path / "train-001.jsonl.gz"]
    write_split(shards[0], 5)
    write_split(shards[1], 4)
    files = [record for path in shards for record in read_corpus(path)]
    tokenizer = CodeTokenizer.load(tokenizer_path)
    local = [ExampleStream(files, tokenizer, 64, worker_seed(7, w)) for w in range(2)]
    want = [local[i % 2].batch(6) for i in range(6)]
    stream = PrefetchStream(shards, tokenizer_path, 64, 7, workers=2, size=6)
    try:
        got = [stream.batch() for _ in range(6)]
    finally:
        stream.close()
    assert got == want
    assert all(not p.is_alive() for p in stream._processes)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tokenizer_path):
    stream = PrefetchStream([tmp_path / "missing.jsonl.gz"], tokenizer_path, 64, 1, workers=1, size=2)
    try:
        with pytest.raises(RuntimeError, match="data worker parafill-data-0 died"):
            stream.batch()
    finally:
        stream.close()


def test_closing_stops_workers_that_are_ahead_of_the_loop(tmp_path, tokenizer_path):
    shard = tmp_path / "train-000.jsonl.gz"
    write_split(shard, 5)
    stream = PrefetchStream([shard], tokenizer_path, 256, 3, workers=2, size=256)  # batches > a pipe buffer
    stream.batch()
    time.sleep(1.0)  # the workers fill their queues with batches nobody will read
    stream.close()
    # They left by themselves (exit code 0), not killed by terminate() (-15), and were reaped.
    assert [p.exitcode for p in stream._processes] == [0, 0]
