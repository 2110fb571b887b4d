"""Training examples as a stream of batches, built in the loop's process or ahead of it.

`ExampleStream` cuts FIM examples out of corpus files (training/examples.py) and
tokenizes them, for the longest span the loop uses; `fit_span` then shapes an
example for the span its step draws, exactly as tokenizing for that span
would. So the examples do not depend on the span and can be built ahead:
`PrefetchStream` runs one `ExampleStream` per worker process and hands out
their batches in a fixed round-robin order, deterministic for a given number
of workers. A GPU step of the default model takes milliseconds while one core
tokenizes a few hundred examples a second, so on a GPU machine the workers
are what keeps it busy. This module knows nothing of models or devices.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import queue
import random
from pathlib import Path

from denoiser.config import EOS_ID
from denoiser.tokenizer import CodeTokenizer
from training.examples import TokenExample, split_text, tokenize_splits

SPAN_CHOICES = (16, 32, 32, 64)
MAX_SPAN = max(SPAN_CHOICES)
# Batches each worker builds ahead of the loop.
PREFETCH_DEPTH = 4


def read_corpus(path: Path) -> list[tuple[str, str, str]]:
    """(path, language, text) records of a corpus split (jsonl or jsonl.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [(r["path"], r.get("language", "python"), r["text"]) for r in map(json.loads, handle)]


def fit_span(example: TokenExample, span: int) -> TokenExample:
    """The example as if tokenized for `span` (a middle of span-1 tokens or fewer, then <eos>).

    Built for a longer span, a middle that fits keeps its <eos>; a longer one is
    cut to span-1 tokens with no <eos> (the span is full and would grow).
    """
    if example.middle[-1] == EOS_ID and len(example.middle) <= span - 1:
        return example
    return TokenExample(example.context, example.middle[: span - 1], example.kind)


def fixed_batches(stream: "ExampleStream", batch_size: int, spans) -> list[tuple[list[TokenExample], int]]:
    """(examples, span) batches cut once, one per span in `spans`: the same examples at every check."""
    return [([fit_span(e, span) for e in stream.batch(batch_size)], span) for span in spans]


class ExampleStream:
    """Endless deterministic stream of tokenized examples from a corpus, for spans up to MAX_SPAN."""

    def __init__(self, files, tokenizer: CodeTokenizer, context_tokens: int, seed: int):
        self.files, self.tokenizer, self.context_tokens = files, tokenizer, context_tokens
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[TokenExample]:
        out: list[TokenExample] = []
        while len(out) < size:
            splits = []
            while len(splits) < size - len(out):
                path, language, text = self.files[self.rng.randrange(len(self.files))]
                split = split_text(text, path, language, self.rng)
                if split is not None:
                    splits.append(split)
            out.extend(tokenize_splits(self.tokenizer, splits, self.context_tokens, MAX_SPAN - 1))
        return out[:size]


def _worker(paths: list[str], tokenizer_path: str, context_tokens: int, seed: int, size: int,
            results: multiprocessing.Queue, stop) -> None:
    # Batches still buffered when told to stop are dropped: without this the process
    # would wait at exit until the loop, which no longer reads, took them.
    results.cancel_join_thread()
    files = [record for path in paths for record in read_corpus(Path(path))]
    stream = ExampleStream(files, CodeTokenizer.load(Path(tokenizer_path)), context_tokens, seed)
    while not stop.is_set():
        batch = stream.batch(size)
        while not stop.is_set():
            try:
                results.put(batch, timeout=0.5)
                break
            except queue.Full:
                continue


class PrefetchStream:
    """Batches from `workers` processes, each its own `ExampleStream` (seeded `seed`, w)."""

    def __init__(self, paths: list[Path], tokenizer_path: Path, context_tokens: int, seed: int,
                 workers: int, size: int):
        if workers < 1:
            raise ValueError("PrefetchStream needs at least one worker (use ExampleStream in-process)")
        # spawn: the loop's process may hold CUDA, which a forked child must not inherit.
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._queues = [context.Queue(maxsize=PREFETCH_DEPTH) for _ in range(workers)]
        self._processes = [
            context.Process(target=_worker, daemon=True, name=f"parafill-data-{w}",
                            args=([str(p) for p in paths], str(tokenizer_path), context_tokens,
                                  worker_seed(seed, w), size, self._queues[w], self._stop))
            for w in range(workers)
        ]
        for process in self._processes:
            process.start()
        self._next = 0

    def batch(self) -> list[TokenExample]:
        source = self._queues[self._next % len(self._queues)]
        process = self._processes[self._next % len(self._processes)]
        self._next += 1
        while True:
            try:
                return source.get(timeout=5)
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"data worker {process.name} died (exit code {process.exitcode})")

    def close(self) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def worker_seed(seed: int, worker: int) -> int:
    return hash((seed, worker)) & 0xFFFFFFFF
