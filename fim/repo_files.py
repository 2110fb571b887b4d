"""The source files of a user's repository, chosen as the user would expect.

Walks a folder read-only: skips what `.gitignore` files (at any level) and
`.git/info/exclude` ignore, version-control and vendored directories, files
that are not code in a language parafill knows, minified, generated, binary,
non-UTF-8 and oversized files (the rules of `fim.code_files`, shared with the
training corpus). Symbolic links are not followed, so a walk never leaves the
folder. Bounded: at most `max_files` files and `max_total_bytes` bytes.

Never writes anything, never opens a network connection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import pathspec

from fim.code_files import MAX_FILE_BYTES, VENDORED_DIRS, content_drop_reason
from fim.languages import language_from_path

SKIPPED_DIRS = VENDORED_DIRS | {".hg", ".svn", ".venv", "venv", ".tox", ".nox", ".mypy_cache", ".pytest_cache",
                                ".ruff_cache", ".idea", ".vscode", "dist", "build", ".eggs", "target"}


@dataclass(frozen=True)
class RepoFile:
    path: str      # relative to the root, with "/" separators
    language: str
    text: str


def _ignore_rules(folder: Path, relative: str) -> pathspec.PathSpec | None:
    try:
        lines = (folder / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    if relative:  # patterns of a nested .gitignore are relative to its own folder
        lines = [_anchor(line, relative) for line in lines]
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _anchor(line: str, relative: str) -> str:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return line
    negate = stripped.startswith("!")
    body = stripped[1:] if negate else stripped
    # A pattern with no slash but at its end matches at any depth below its folder.
    if "/" not in body.rstrip("/"):
        body = f"{relative}/**/{body}"
    else:
        body = f"{relative}/{body.lstrip('/')}"
    return ("!" if negate else "") + body


def iter_repo_files(root: Path, *, max_files: int = 20_000, max_total_bytes: int = 64 << 20,
                    max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[RepoFile]:
    """The repository's code files, in a stable order (sorted within each folder)."""
    root = Path(root)
    rules: list[pathspec.PathSpec] = []
    exclude = root / ".git" / "info" / "exclude"
    if exclude.is_file():
        rules.append(pathspec.GitIgnoreSpec.from_lines(exclude.read_text(errors="replace").splitlines()))
    files = total = 0
    stack: list[tuple[Path, str, int]] = [(root, "", len(rules))]
    while stack:
        folder, relative, depth = stack.pop()
        del rules[depth:]
        own = _ignore_rules(folder, relative)
        if own is not None:
            rules.append(own)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_symlink():
                continue
            if entry.is_dir():
                if entry.name in SKIPPED_DIRS or entry.name.startswith(".") or _ignored(rules, path + "/"):
                    continue
                subfolders.append((Path(entry.path), path))
                continue
            if not entry.is_file() or _ignored(rules, path):
                continue
            found = _read_code_file(Path(entry.path), path, max_file_bytes)
            if found is None:
                continue
            files += 1
            total += len(found.text)
            if files > max_files or total > max_total_bytes:
                return
            yield found
        # Depth-first in name order: pushed reversed so the first name comes out first.
        stack.extend((p, r, len(rules)) for p, r in reversed(subfolders))


def read_repo_file(root: Path, relative: str, *, max_file_bytes: int = MAX_FILE_BYTES) -> RepoFile | None:
    """One file of the repository by the walk's rules (None: the walk would skip it, or it is gone).

    For a file saved or changed on disk: the `.gitignore` files of every folder
    from the root down to it apply, and so do the skipped folders.
    """
    root = Path(root)
    parts = PurePosixPath(relative).parts
    if not parts or ".." in parts:
        return None
    rules: list[pathspec.PathSpec] = []
    exclude = root / ".git" / "info" / "exclude"
    if exclude.is_file():
        rules.append(pathspec.PathSpec.from_lines("gitwildmatch", exclude.read_text(errors="replace").splitlines()))
    folder, here = root, ""
    for name in parts[:-1]:
        own = _ignore_rules(folder, here)
        if own is not None:
            rules.append(own)
        here = f"{here}/{name}" if here else name
        if name in SKIPPED_DIRS or name.startswith(".") or _ignored(rules, here + "/"):
            return None
        folder = folder / name
        if folder.is_symlink():
            return None
    own = _ignore_rules(folder, here)
    if own is not None:
        rules.append(own)
    file = root / relative
    if file.is_symlink() or not file.is_file() or _ignored(rules, relative):
        return None
    return _read_code_file(file, relative, max_file_bytes)


def _ignored(rules: list[pathspec.PathSpec], path: str) -> bool:
    # Later (deeper) files override earlier ones, as in git: the last rule that matches wins.
    verdict = False
    for spec in rules:
        result = spec.check_file(path)
        if result.include is not None:
            verdict = result.include
    return verdict


def _read_code_file(file: Path, path: str, max_file_bytes: int) -> RepoFile | None:
    language = language_from_path(path)
    if language is None or language == "plaintext":
        return None
    name = PurePosixPath(path).name.lower()
    if ".min." in name or name.endswith("-min.js") or ".bundle." in name:
        return None
    try:
        if file.stat().st_size > max_file_bytes:
            return None
        data = file.read_bytes()
    except OSError:
        return None
    if content_drop_reason(data) is not None:
        return None
    return RepoFile(path, language, data.decode("utf-8").replace("\r\n", "\n"))
