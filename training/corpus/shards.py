"""Split a built corpus into compressed shards, to copy it to another machine in pieces.

The corpus's train split is one large file. `write_shards` cuts train.jsonl.gz into
`train-NNN.jsonl.gz` files of at most `max_bytes` each, record by record in
the corpus's own order, and copies valid.jsonl.gz and stats.json beside them;
`train_files` lists whichever form a corpus folder holds. Concatenating the
shards' records gives back the train split exactly.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

SHARD_PATTERN = "train-*.jsonl.gz"
# Compressed bytes the writer may run past a shard's budget before it notices
# (it checks the file size after each record; gzip buffers up to this much).
SLACK = 1 << 20


def train_files(corpus: Path) -> list[Path]:
    """train.jsonl.gz, or the train-NNN.jsonl.gz shards in order; a clear error if neither."""
    whole = corpus / "train.jsonl.gz"
    shards = sorted(corpus.glob(SHARD_PATTERN))
    if whole.exists() and shards:
        raise FileNotFoundError(f"{corpus} holds both train.jsonl.gz and shards: keep one form")
    if whole.exists():
        return [whole]
    if shards:
        return shards
    raise FileNotFoundError(f"{corpus} has no train.jsonl.gz and no {SHARD_PATTERN} shards")


def write_shards(corpus: Path, out: Path, max_bytes: int) -> list[Path]:
    """Shard corpus/train.jsonl.gz into out/; returns the shard paths."""
    if max_bytes < 2 * SLACK:
        raise ValueError(f"a shard budget of {max_bytes} bytes is too small (at least {2 * SLACK})")
    source = corpus / "train.jsonl.gz"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (build the corpus first)")
    if out.resolve() == corpus.resolve():
        raise ValueError("--out must be another folder than the corpus (a folder holds one form of the split)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(SHARD_PATTERN):
        stale.unlink()
    shards: list[Path] = []
    raw = gz = None
    try:
        with gzip.open(source, "rb") as records:
            for line in records:
                if gz is None or raw.tell() > max_bytes - SLACK:
                    if gz is not None:
                        gz.close()
                        raw.close()
                    shards.append(out / f"train-{len(shards):03d}.jsonl.gz")
                    raw = open(shards[-1], "wb")
                    # filename="" and mtime=0: the same corpus gives the same shard bytes.
                    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9)
                gz.write(line)
    except BaseException:
        for path in shards:  # half a split must not pass for a whole one
            path.unlink(missing_ok=True)
        raise
    finally:
        if gz is not None:
            gz.close()
            raw.close()
    if not shards:
        raise ValueError(f"{source} holds no records")
    for name in ("valid.jsonl.gz", "stats.json"):
        if (corpus / name).exists():
            shutil.copyfile(corpus / name, out / name)
    return shards
