"""Find a named model in the local Hugging Face cache, without the network.

The cache is the one huggingface_hub and transformers use, so a model pulled by
`parafill model pull` is shared with other tools and the other way round:

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--ORG--NAME/
        refs/main                 the commit a branch or tag points at
        snapshots/<commit>/...    the files of that commit (links into blobs/)
        blobs/<sha256 or git sha1>

This module only reads the cache: it never writes, deletes or downloads
(`parafill model pull` / `rm` in tools/ do that), and imports neither torch nor
huggingface_hub, so a name is resolved before anything heavy loads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from denoiser.catalogue import ModelRef

_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelNotDownloaded(Exception):
    """A named model that is not in the local cache; the message carries the command that fetches it."""


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(path)))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by the same environment variables huggingface_hub reads."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expand(os.environ[variable])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return _expand(home) / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def commit_of(ref: ModelRef, cache: Path | None = None) -> str | None:
    """The commit `ref.revision` names in the cache (a commit itself, or what refs/<revision> holds)."""
    if _COMMIT.fullmatch(ref.revision):
        return ref.revision
    ref_file = repo_folder(ref.repo_id, cache) / "refs" / ref.revision
    try:
        commit = ref_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def snapshot_of(ref: ModelRef, cache: Path | None = None) -> Path | None:
    """The snapshot directory of `ref`, if the cache holds one with a config.json."""
    commit = commit_of(ref, cache)
    if commit is None:
        return None
    snapshot = repo_folder(ref.repo_id, cache) / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def locate(ref: ModelRef, cache: Path | None = None) -> Path:
    """The local directory of a named model, or `ModelNotDownloaded` with the command that fetches it."""
    snapshot = snapshot_of(ref, cache)
    if snapshot is not None:
        return snapshot
    size = f" (about {ref.entry.disk_gb:g} GB)" if ref.entry is not None else ""
    where = cache or hub_cache_dir()
    raise ModelNotDownloaded(
        f"model {ref.text!r} is not downloaded (looked in {where}): run `{ref.pull_command}` in a "
        f"terminal{size} and start parafill again, or choose another model")


def folder_bytes(folder: Path) -> int:
    """Bytes a cached repository takes (its blobs; snapshots only link to them)."""
    blobs = folder / "blobs"
    if not blobs.is_dir():
        return 0
    return sum(p.stat().st_size for p in blobs.iterdir() if p.is_file() and not p.is_symlink())
