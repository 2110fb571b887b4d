"""Turn a manifest into train/valid JSON-lines files with stats and a hash.

For each package (validation packages first, then training packages, each in
name order, files in path order) the builder applies the path and content
filters, HumanEval decontamination and exact/near-duplicate removal.  The
first copy of a duplicated file wins, so a file shared by a validation and a
training package stays in validation and leaves training: no leak.

Records are ``{"package","version","licence","path","language","text"}``,
written in a fixed pseudo-random order (keyed by a hash of package and path)
so readers see a shuffled stream, with gzip timestamps zeroed: the same
manifest gives byte-identical files and the same corpus hash.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .decontaminate import Decontaminator
from .dedup import Deduplicator
from fim.code_files import compiled_twins, content_drop_reason, language_of, normalise_newlines, path_drop_reason
from .manifest import Manifest, PackageEntry

FileSource = Callable[[PackageEntry], Iterable[tuple[str, bytes]]]


@dataclass
class BuildResult:
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    per_package: dict = field(default_factory=dict)
    contaminated: list[dict] = field(default_factory=list)
    failed_packages: dict = field(default_factory=dict)


def ordered_packages(manifest: Manifest) -> list[PackageEntry]:
    return sorted(manifest.packages, key=lambda e: (not manifest.is_validation(e), e.key))


def select_records(
    manifest: Manifest,
    files_for: FileSource,
    decontaminator: Decontaminator | None,
    *,
    near_threshold: float = 0.85,
    log: Callable[[str], None] = lambda msg: None,
    skip_failed: bool = False,
) -> BuildResult:
    """Run every filter over every package; keep the records that pass."""
    result = BuildResult()
    dedup = Deduplicator(near_threshold)
    for entry in ordered_packages(manifest):
        t0 = time.monotonic()
        split = "valid" if manifest.is_validation(entry) else "train"
        reasons: Counter = Counter()
        kept = kept_bytes = 0
        try:
            files = list(files_for(entry))
        except Exception as exc:  # a broken download must not hide which package failed
            if not skip_failed:
                raise
            result.failed_packages[entry.key] = str(exc)
            log(f"  {entry.key}: FAILED {exc}")
            continue
        is_npm = entry.source == "npm"
        twins = compiled_twins([p for p, _ in files]) if is_npm else set()
        for path, data in files:
            reason = "compiled_twin" if path in twins else path_drop_reason(path, drop_build_output=is_npm)
            if reason is None:
                reason = content_drop_reason(data)
            if reason is not None:
                reasons[reason] += 1
                continue
            text = normalise_newlines(data.decode("utf-8"))
            if decontaminator is not None:
                task = decontaminator.match(text)
                if task is not None:
                    reasons["humaneval"] += 1
                    result.contaminated.append({"package": entry.key, "path": path, "task": task})
                    continue
            dup = dedup.check(text)
            if dup is not None:
                reasons[dup] += 1
                continue
            record = {
                "package": entry.name,
                "version": entry.version,
                "licence": entry.licence,
                "path": path,
                "language": language_of(path),
                "text": text,
            }
            (result.valid if split == "valid" else result.train).append(record)
            kept += 1
            kept_bytes += len(text.encode("utf-8"))
        result.dropped.update(reasons)
        result.per_package[entry.key] = {
            "version": entry.version, "licence": entry.licence, "split": split,
            "files": kept, "bytes": kept_bytes, "dropped": dict(sorted(reasons.items())),
        }
        log(f"  {entry.key} {entry.version} [{split}]: kept {kept} files, {kept_bytes / 1e6:.2f} MB, "
            f"dropped {sum(reasons.values())} ({time.monotonic() - t0:.1f}s)")
    return result


def _order_key(record: dict) -> str:
    return hashlib.blake2b(f"{record['package']}\0{record['path']}".encode(), digest_size=8).hexdigest()


def serialise(records: list[dict]) -> Iterator[bytes]:
    """JSON lines in the fixed shuffled order, canonical key order."""
    for rec in sorted(records, key=lambda r: (_order_key(r), r["package"], r["path"])):
        yield (json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def write_jsonl_gz(path: Path, lines: Iterable[bytes], hasher) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            buf = io.BufferedWriter(gz, buffer_size=1 << 20)
            for line in lines:
                hasher.update(line)
                buf.write(line)
            buf.flush()
    tmp.replace(path)


def summarise(records: list[dict]) -> dict:
    by_lang: dict = defaultdict(lambda: {"files": 0, "bytes": 0})
    for r in records:
        by_lang[r["language"]]["files"] += 1
        by_lang[r["language"]]["bytes"] += len(r["text"].encode("utf-8"))
    return {
        "files": len(records),
        "bytes": sum(v["bytes"] for v in by_lang.values()),
        "packages": len({r["package"] for r in records}),
        "by_language": dict(sorted(by_lang.items())),
    }


def write_corpus(out_dir: Path, result: BuildResult, manifest_sha256: str) -> dict:
    """Write train/valid files and stats.json; return the stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_hash = hashlib.sha256()
    # The hash covers valid then train, each in file order.
    write_jsonl_gz(out_dir / "valid.jsonl.gz", serialise(result.valid), corpus_hash)
    write_jsonl_gz(out_dir / "train.jsonl.gz", serialise(result.train), corpus_hash)
    stats = {
        "corpus_sha256": corpus_hash.hexdigest(),
        "manifest_sha256": manifest_sha256,
        "train": summarise(result.train),
        "valid": summarise(result.valid),
        "dropped": dict(sorted(result.dropped.items())),
        "humaneval_contaminated": result.contaminated,
        "failed_packages": result.failed_packages,
        "packages": dict(sorted(result.per_package.items())),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return stats


def corpus_hash_of(result: BuildResult) -> str:
    """The corpus hash without writing files (same value write_corpus records)."""
    h = hashlib.sha256()
    for line in serialise(result.valid):
        h.update(line)
    for line in serialise(result.train):
        h.update(line)
    return h.hexdigest()
