"""The index of the user's code that drafts come from, kept up to date off the event loop.

Holds a `fim.drafts.DraftIndex` of the open documents (their text always wins
over the file on disk) and of the code files under each workspace folder the
editor names (read with `fim.repo_files`: `.gitignore` honoured; vendored,
generated, minified, binary and huge files skipped; bounded). All reading and
indexing runs on one background thread: handlers only queue work, so a big
folder never delays a keystroke or a completion. Read-only: it never writes,
never follows a link out of a folder, never opens a network connection.
This module knows no LSP types and no tensors.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlparse

from fim.drafts import DraftIndex
from fim.repo_files import iter_repo_files, read_repo_file

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20  # what the index may hold in memory, open documents included


def file_uri(path: Path) -> str:
    return Path(path).absolute().as_uri()


def uri_path(uri: str) -> Path | None:
    """The local path of a file: URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


class WorkspaceDrafts:
    """The draft index of open documents and workspace folders, with its background reader."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, max_files: int = 20_000):
        self.index = DraftIndex(max_bytes=max_bytes)
        self.max_files = max_files
        self.folders: list[Path] = []
        self.enabled = True
        self._lock = threading.Condition()
        self._jobs: OrderedDict[tuple, tuple] = OrderedDict()  # coalesced: the latest job per key wins
        self._thread: threading.Thread | None = None
        self._closed = False
        self.indexing = False
        self.files_read = 0

    # --- what handlers call (cheap: they only queue work) -------------------------
    def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        self.enabled = enabled
        if enabled:
            for folder in self.folders:
                self._queue(("folder", str(folder)), ("walk", folder))
        else:
            self._queue(("clear",), ("clear",))

    def add_folder(self, uri: str) -> None:
        folder = uri_path(uri)
        if folder is None or folder in self.folders:
            return
        self.folders.append(folder)
        if self.enabled:
            self._queue(("folder", str(folder)), ("walk", folder))

    def remove_folder(self, uri: str) -> None:
        folder = uri_path(uri)
        if folder is None or folder not in self.folders:
            return
        self.folders.remove(folder)
        self._queue(("folder", str(folder)), ("drop", folder))

    def opened(self, uri: str, text: str) -> None:
        if self.enabled:
            self._queue(("doc", uri), ("open", uri, text))

    def closed(self, uri: str) -> None:
        """The editor's text no longer wins: the file on disk (if a workspace file) takes over."""
        if self.enabled:  # off: the index is empty, and nothing is read from disk
            self._queue(("doc", uri), ("close", uri))

    def file_changed(self, uri: str, deleted: bool = False) -> None:
        """Saved, created, changed or deleted on disk (didSave, didChangeWatchedFiles)."""
        if self.enabled:
            self._queue(("doc", uri), ("delete", uri) if deleted else ("read", uri))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued job has run (for tests and evaluation)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._jobs and not self.indexing, timeout)

    def stats(self) -> dict:
        return {"enabled": self.enabled, "folders": len(self.folders), "documents": len(self.index),
                "bytes": self.index.bytes, "indexing": self.indexing or bool(self._jobs)}

    # --- the background reader ------------------------------------------------------
    def _queue(self, key: tuple, job: tuple) -> None:
        with self._lock:
            self._jobs.pop(key, None)
            self._jobs[key] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="parafill-drafts-index", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self.indexing = False
                    self._lock.notify_all()
                    self._lock.wait()
                if self._closed:
                    return
                _, job = self._jobs.popitem(last=False)
                self.indexing = True
            try:
                self._do(job)
            except Exception as exc:  # one unreadable folder must not stop the index
                log.warning("indexing your code for drafts: %s: %s", type(exc).__name__, exc)

    def _do(self, job: tuple) -> None:
        kind = job[0]
        if kind == "walk":
            folder = job[1]
            for found in iter_repo_files(folder, max_files=self.max_files, max_total_bytes=self.index.max_bytes):
                if not self.enabled or folder not in self.folders:
                    return
                self.index.update(file_uri(folder / found.path), found.text)
                self.files_read += 1
        elif kind == "drop":
            self.index.remove_under(file_uri(job[1]) + "/")
        elif kind == "clear":
            for name in self.index.names():
                self.index.remove(name)
        elif kind == "open":
            self.index.update(job[1], job[2], pinned=True)
        elif kind == "close":
            self.index.unpin(job[1])
            self._read(job[1])
        elif kind == "read":
            self._read(job[1])
        elif kind == "delete":
            self.index.remove(job[1])

    def _read(self, uri: str) -> None:
        """Re-read one file from disk, by the folder walk's rules, if it lies in a workspace folder."""
        path = uri_path(uri)
        folder = None if path is None else next((f for f in self.folders if path.is_relative_to(f)), None)
        if folder is None:  # no workspace file: a closed document leaves the index with its text
            if not self.index.is_pinned(uri):
                self.index.remove(uri)
            return
        found = read_repo_file(folder, path.relative_to(folder).as_posix())
        if found is None:
            if not self.index.is_pinned(uri):
                self.index.remove(uri)
            return
        self.index.update(uri, found.text)
