"""Where models adapted to one repository live, and which one a document belongs to.

`parafill adapt REPO` writes a copy of the base model, trained further on that
repository's code, into the user's cache (never into the repository):
`$PARAFILL_CACHE` or `$XDG_CACHE_HOME/parafill` or `~/.cache/parafill`, then
`adapted/<hash of the repository's absolute path>/`, with `adapted.json`
naming the repository root and what adaptation measured. The server uses it
for documents under that root. Reads and deletes only inside the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

RECORD = "adapted.json"


def cache_dir() -> Path:
    if os.environ.get("PARAFILL_CACHE"):
        return Path(os.environ["PARAFILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "parafill"


def adapted_dir(repo_root: Path) -> Path:
    key = hashlib.sha256(str(Path(repo_root).resolve()).encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "adapted" / key


def read_record(model_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(model_dir) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("repository"), str) else None


def adapted_for(path: Path) -> tuple[Path, Path] | None:
    """(repository root, model directory) of the adapted model for a file or folder under a root, or None."""
    here = Path(path).resolve()
    for folder in (here, *here.parents):
        model_dir = adapted_dir(folder)
        record = read_record(model_dir)
        if record is not None and Path(record["repository"]) == folder:
            return folder, model_dir
    return None


def remove_adapted(repo_root: Path) -> Path | None:
    """Forget the adapted model of `repo_root`; returns the folder removed, or None if there was none."""
    model_dir = adapted_dir(repo_root)
    if not model_dir.is_dir():
        return None
    shutil.rmtree(model_dir)
    return model_dir
