"""`parafill model pull`: download a model into the Hugging Face cache, every file checked.

This is the only code in parafill that opens a network connection, and the only
module that imports huggingface_hub (lazily, inside `pull`). What it does, in order:

1. asks the hub for the repository's files at the revision, with the sha256 the
   hub recorded for each large (LFS) file and the git object id of each small one;
2. picks the safetensors weights and the small JSON/text files that describe them,
   never pickles (.bin/.pt/...: loading a pickle can run code) nor code files, and
   refuses before downloading anything when the repository lacks a file the
   loader needs, when the files do not fit the disk, or when config.json names a
   family parafill cannot run;
3. downloads each file with huggingface_hub into the standard cache (so other
   tools reuse it): progress bars, and a connection cut mid-file is resumed where
   it stopped; every file is then hashed and compared with the hub's record;
4. writes `refs/<revision>` last, so a model is visible by name only once all of
   its files are in place and checked.

On failure nothing half-written stays in the cache: the files of this run are
unlinked from the snapshot, partial downloads are deleted, and a file whose
checksum is wrong is removed. Only when the network failed (a rerun can finish
the job) are the complete, checked files kept, so that running the same command
again downloads just the rest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from denoiser.catalogue import PICKLE_SUFFIXES, ModelRef, family_of_config, is_wanted, missing_needed
from denoiser.hub_cache import hub_cache_dir, repo_folder

# Room left on the disk beyond the files themselves (the cache's own bookkeeping, logs, ...).
DISK_MARGIN_BYTES = 256 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


class PullError(Exception):
    """A pull that failed; the message says why and what to do. `resumable`: a rerun can finish it."""

    def __init__(self, message: str, *, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the sha256 of the content, as the hub records it
    git_oid: str | None  # every file: the git blob id (sha1 of "blob <size>\0" + content)


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def file_digests(path: Path) -> tuple[str, str, int]:
    """(sha256, git blob sha1, size) of a file, read once."""
    size = path.stat().st_size
    sha256, git = hashlib.sha256(), hashlib.sha1()
    git.update(b"blob %d\0" % size)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest(), size


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free space on the disk that holds `path` (or would, once created)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


# --- talking to the hub ---------------------------------------------------------------------

_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "ReadError", "WriteError", "NetworkError", "RemoteProtocolError", "ProxyError",
                   "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "Timeout",
                   "LocalEntryNotFoundError", "gaierror"}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _network_failure(exc: BaseException) -> BaseException | None:
    for link in _chain(exc):
        name, package = type(link).__name__, type(link).__module__.split(".")[0]
        if name in _NETWORK_ERRORS or (package in ("httpx", "httpx2", "httpcore") and name != "HTTPStatusError"):
            return link
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no answer"


def _hub_error(exc: Exception, ref: ModelRef, endpoint: str, what: str) -> PullError:
    """Translate what huggingface_hub raised into one sentence the user can act on."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return PullError(f"{ref.repo_id} is gated: accept its terms on {endpoint}/{ref.repo_id} and log in "
                         "with `hf auth login`, then run the pull again")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return PullError(f"{ref.repo_id}: no such model repository on {endpoint} (or it is private: log in with "
                         "`hf auth login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return PullError(f"{ref.repo_id} has no revision {ref.revision!r}")
    if isinstance(exc, errors.EntryNotFoundError):
        return PullError(f"{what}: the hub lists this file but does not serve it (not found); the repository is "
                         "incomplete or changing, try again later")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if isinstance(exc, errors.OfflineModeIsEnabled) or offline:
        return PullError("HF_HUB_OFFLINE is set, which forbids downloads; unset it to pull a model")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status is not None:
        transient = status >= 500 or status in (408, 429)
        return PullError(f"{endpoint} answered {status} for {what}"
                         + ("; the hub is busy or down, try again later" if transient else ""), resumable=transient)
    cause = _network_failure(exc)
    if cause is not None:
        return PullError(f"cannot download {what} from {endpoint}: {type(cause).__name__}: {_first_line(cause)}; "
                         "check your network connection (and HF_ENDPOINT or proxy settings)", resumable=True)
    if isinstance(exc, OSError):
        # huggingface_hub's own consistency check (size differs after its retries) or a disk error.
        return PullError(f"{what}: {_first_line(exc)}", resumable=True)
    return PullError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


def hub_files(info) -> list[HubFile]:
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        files.append(HubFile(sibling.rfilename, int(size or 0), lfs.sha256 if lfs is not None else None,
                             sibling.blob_id))
    return files


def choose_files(files: list[HubFile], ref: ModelRef) -> tuple[list[HubFile], list[str]]:
    """(files to download, skipped pickles), or a PullError when the loader could not use the result."""
    wanted = [f for f in files if is_wanted(f.path)]
    pickles = sorted(f.path for f in files if f.path.lower().endswith(PICKLE_SUFFIXES))
    names = {f.path for f in wanted}
    if not any(name.endswith(".safetensors") for name in names):
        found = ", ".join(pickles[:3]) or "no weights at all"
        raise PullError(f"{ref.repo_id} has no safetensors weights ({found}); parafill loads safetensors only, "
                        "because loading a pickle can run arbitrary code")
    missing = missing_needed(names)
    if missing:
        raise PullError(f"{ref.repo_id} has no {' or '.join(missing)}, which parafill needs to load the model; "
                        "nothing was downloaded")
    for f in wanted:
        if f.git_oid is None and f.sha256 is None:
            raise PullError(f"{f.path}: the hub gave no checksum for this file, so it cannot be checked; "
                            "nothing was downloaded")
    # config.json first: it says whether parafill can run the model at all.
    wanted.sort(key=lambda f: (f.path != "config.json", f.path.endswith(".safetensors"), f.path))
    return wanted, pickles


# --- the cache, and undoing a failed pull --------------------------------------------------

class CacheWrites:
    """What this pull adds to one repository's cache folder, so a failure can take it back."""

    def __init__(self, cache: Path, repo_id: str, commit: str):
        self.folder = repo_folder(repo_id, cache)
        self.locks = cache / ".locks" / self.folder.name
        self.snapshot = self.folder / "snapshots" / commit
        self.no_exist = self.folder / ".no_exist" / commit
        self.folder_existed = self.folder.exists()
        self.locks_existed = self.locks.exists()
        self.no_exist_existed = self.no_exist.exists()
        self.blobs_before = self._names(self.folder / "blobs")
        self.snapshot_before = {p.relative_to(self.snapshot) for p in self.snapshot.rglob("*")} \
            if self.snapshot.exists() else None

    @staticmethod
    def _names(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def blob_of(self, pointer: Path) -> Path:
        return Path(os.path.realpath(pointer))

    def undo(self, *, keep_blobs: bool) -> None:
        """Take back this pull's snapshot entries (and its blobs unless `keep_blobs`); partial files always go."""
        if not self.folder_existed and not keep_blobs:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            if self.snapshot_before is None:
                shutil.rmtree(self.snapshot, ignore_errors=True)
            elif self.snapshot.exists():
                for path in sorted(self.snapshot.rglob("*"), reverse=True):
                    if path.relative_to(self.snapshot) not in self.snapshot_before and not path.is_dir():
                        path.unlink(missing_ok=True)
            if not self.no_exist_existed:
                shutil.rmtree(self.no_exist, ignore_errors=True)
            blobs = self.folder / "blobs"
            for name in self._names(blobs) - self.blobs_before:
                if name.endswith(".incomplete") or not keep_blobs:
                    (blobs / name).unlink(missing_ok=True)
            self._prune(self.folder, keep_root=self.folder_existed)
        if not self.locks_existed:
            shutil.rmtree(self.locks, ignore_errors=True)

    @staticmethod
    def _prune(folder: Path, keep_root: bool) -> None:
        """Remove empty directories under `folder` (and `folder` itself if empty and new)."""
        if not folder.is_dir():
            return
        for path in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass
        if not keep_root:
            try:
                folder.rmdir()
            except OSError:
                pass


def write_ref(folder: Path, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, atomically: the last step, after every file is checked."""
    ref_file = folder / "refs" / revision
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_file.with_name(ref_file.name + ".parafill-tmp")
    tmp.write_text(commit, encoding="utf-8")
    os.replace(tmp, ref_file)


# --- the pull -------------------------------------------------------------------------------

def verify(blob: Path, expected: HubFile) -> None:
    sha256, git_oid, size = file_digests(blob)
    if size != expected.size:
        raise PullError(f"{expected.path}: downloaded {size} bytes but the hub records {expected.size}; "
                        "the file was removed", resumable=True)
    if expected.sha256 is not None and sha256 != expected.sha256:
        raise PullError(f"{expected.path}: checksum mismatch (sha256 {sha256[:16]}…, the hub records "
                        f"{expected.sha256[:16]}…); the file was removed. Try again later; if it repeats, "
                        "something between you and the hub alters downloads")
    if expected.sha256 is None and git_oid != expected.git_oid:
        raise PullError(f"{expected.path}: checksum mismatch (git object {git_oid[:16]}…, the hub records "
                        f"{(expected.git_oid or '')[:16]}…); the file was removed. Try again later; if it repeats, "
                        "something between you and the hub alters downloads")


def pull(ref: ModelRef, *, cache: Path | None = None, endpoint: str | None = None, out: TextIO = sys.stderr) -> Path:
    """Download `ref` into the Hugging Face cache; returns its snapshot directory, or raises PullError."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise PullError("huggingface_hub is not installed; `pip install huggingface_hub` and run the pull "
                        "again") from None

    # huggingface_hub prints its own warnings (a retried download); parafill's log handler would repeat them.
    logging.getLogger("huggingface_hub").propagate = False
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    cache = cache or hub_cache_dir()
    api = huggingface_hub.HfApi(endpoint=endpoint)
    try:
        info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error(exc, ref, endpoint, f"the file list of {ref.repo_id}") from None
    commit = info.sha
    if not commit:
        raise PullError(f"{endpoint} gave no commit for {ref.repo_id}@{ref.revision}; "
                        "is HF_ENDPOINT a Hugging Face hub?")
    files, pickles = choose_files(hub_files(info), ref)

    card = info.card_data.to_dict() if info.card_data is not None else {}
    licence = card.get("license") or (ref.entry.licence if ref.entry else None) or "not stated"
    writes = CacheWrites(cache, ref.repo_id, commit)
    present = writes.blobs_before
    to_fetch = sum(f.size for f in files if (f.sha256 or f.git_oid) not in present)
    total = sum(f.size for f in files)
    free, disk = free_bytes(cache)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    say(f"parafill: pulling {ref.text} ({ref.repo_id} @ {ref.revision}, commit {commit[:12]}) from {endpoint}")
    say(f"  licence: {', '.join(licence) if isinstance(licence, list) else licence}; read it before use: "
        f"{endpoint}/{ref.repo_id}")
    say(f"  {len(files)} files, {human_size(total)}; {human_size(to_fetch)} to download, "
        f"{human_size(free)} free on {disk}")
    if pickles:
        say(f"  skipping {len(pickles)} pickle file(s), which parafill never loads: {', '.join(pickles[:4])}")
    if to_fetch + DISK_MARGIN_BYTES > free:
        raise PullError(f"{ref.text} needs {human_size(to_fetch)} more on {disk} but only {human_size(free)} is "
                        "free; free some space, or set HF_HUB_CACHE to a directory on a bigger disk")

    try:
        for i, f in enumerate(files, 1):
            say(f"  [{i}/{len(files)}] {f.path} ({human_size(f.size)})")
            try:
                pointer = Path(huggingface_hub.hf_hub_download(
                    ref.repo_id, f.path, revision=commit, cache_dir=str(cache), endpoint=endpoint))
            except Exception as exc:
                raise _hub_error(exc, ref, endpoint, f.path) from None
            blob = writes.blob_of(pointer)
            try:
                verify(blob, f)
            except PullError:
                # Wrong for every tool that shares the cache, even if another one put it there.
                pointer.unlink(missing_ok=True)
                if blob.parent == writes.folder / "blobs":
                    blob.unlink(missing_ok=True)
                raise
            if f.path == "config.json":
                check_family(pointer, ref)
        if ref.revision != commit:
            write_ref(writes.folder, ref.revision, commit)
    except BaseException as exc:
        # Interrupted (Ctrl-C) or cut off: the checked files are worth keeping for the next run.
        resumable = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, PullError) and exc.resumable)
        writes.undo(keep_blobs=resumable)
        if isinstance(exc, PullError) and resumable:
            raise PullError(f"{exc} — the files already checked are kept: run `{ref.pull_command}` again to "
                            "continue", resumable=True) from None
        raise
    say(f"parafill: {ref.text} is ready ({human_size(total)} in {writes.snapshot})")
    return writes.snapshot


def check_family(config_path: Path, ref: ModelRef) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PullError(f"{ref.repo_id}: config.json is not valid JSON ({exc}); nothing was kept") from None
    if not isinstance(config, dict) or family_of_config(config) is None:
        described = config.get("model_type") if isinstance(config, dict) else None
        raise PullError(f"{ref.repo_id} is a {described!r} model, which parafill cannot run (it runs Dream, "
                        "Dream-Coder, DiffuCoder, LLaDA and Open-dCoder); nothing was kept")
