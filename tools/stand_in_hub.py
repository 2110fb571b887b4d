"""A stand-in for the Hugging Face Hub on 127.0.0.1, for testing `parafill model pull` offline.

It serves model repositories (any directory, e.g. a tiny checkpoint from
tools/tiny_open.py) in the hub's URL and header layout, enough for
huggingface_hub's real download code with HF_ENDPOINT pointing here:

- `GET /api/models/ORG/NAME[/revision/REV]?blobs=true`: the commit and each
  file's size, git blob id and, for large files, the LFS sha256;
- `HEAD|GET /ORG/NAME/resolve/REV/FILE`: small files directly (ETag = git blob
  id, X-Repo-Commit, Content-Length); LFS files as the hub does, a 302 to a
  second origin standing in for the CDN, with X-Linked-Etag (sha256) and
  X-Linked-Size; byte ranges are honoured (206) so downloads can resume;
- errors with the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).

Faults for tests: serve a file corrupted (same size, one byte flipped), cut a
download off at a byte offset (once, or with the server answering 503 from then
on), or list a file but answer 404 for it. Every request is recorded.

    python -m tools.stand_in_hub ORG/NAME=DIR ...   # serve until Ctrl-C; prints HF_ENDPOINT
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Which files the hub stores with LFS (its default .gitattributes covers these and more).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".model", ".gguf")
LFS_NAMES = ("tokenizer.json",)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    licence: str | None = None
    commit: str = ""

    def __post_init__(self) -> None:
        listing = "".join(f"{path}\0{git_blob_id(data)}\n" for path, data in sorted(self.files.items()))
        self.commit = hashlib.sha1(f"{self.repo_id}\n{listing}".encode()).hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or path in LFS_NAMES

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        entry = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry


@dataclass
class Faults:
    corrupt: set[tuple[str, str]] = field(default_factory=set)  # (repo_id, path): one byte flipped
    missing: set[tuple[str, str]] = field(default_factory=set)  # listed, but 404 when asked for
    # (repo_id, path) -> [absolute byte offset, times left]: the body stops there and the connection drops
    cut: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    down_after_cut: bool = False  # after a cut, answer 503 to everything until `down` is cleared
    down: bool = False


class StandInHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # --- setting up ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, directory: Path | None = None, *, files: dict[str, bytes] | None = None,
                 licence: str | None = "apache-2.0") -> Repo:
        content = dict(files or {})
        if directory is not None:
            for path in sorted(Path(directory).rglob("*")):
                if path.is_file():
                    content.setdefault(path.relative_to(directory).as_posix(), path.read_bytes())
        repo = Repo(repo_id, content, licence)
        self.repos[repo_id.lower()] = repo
        return repo

    def start(self) -> str:
        """Serve on two ports of 127.0.0.1 (the hub, and its CDN); returns the endpoint for HF_ENDPOINT."""
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"stand-in-{role}", daemon=True).start()
            self._servers.append(server)
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "StandInHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def record(self, **request) -> dict:
        with self._lock:
            self.requests.append(request)
        return request

    def downloads(self, path: str) -> list[dict]:
        """The GET requests that fetched the bytes of `path` (any repo)."""
        return [r for r in self.requests if r["method"] == "GET" and r.get("file") == path]

    # --- answering ------------------------------------------------------------------------------
    def content(self, repo: Repo, path: str) -> bytes:
        data = repo.files[path]
        if (repo.repo_id, path) in self.faults.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        return data


def _handler(hub: StandInHub, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # quiet: the tests read `hub.requests`
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        # --- plumbing
        def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, commit: str | None = None, body: bool = True) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), body)

        def _answer(self, body: bool) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            self.entry = hub.record(method=self.command, role=role, path=url.path, range=self.headers.get("Range"),
                                    file=None)
            if hub.faults.down:
                return self._error(503, "ServiceUnavailable", "the stand-in hub is down", body=body)
            if role == "cdn":
                return self._cdn(parts, body)
            if parts[:2] == ["api", "models"]:
                return self._api(parts[2:], body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts, body)
            return self._error(404, "NotFound", f"no route for {url.path}", body=body)

        def _repo(self, repo_id: str, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id.lower())
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body=body)
            return repo

        def _revision_ok(self, repo: Repo, revision: str, body: bool) -> bool:
            if revision in ("main", repo.commit):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
            return False

        def _api(self, parts: list[str], body: bool) -> None:
            repo = self._repo("/".join(parts[:2]), body)
            if repo is None:
                return
            revision = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
            if not self._revision_ok(repo, revision, body):
                return
            info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                    "siblings": [repo.sibling(path) for path in sorted(repo.files)],
                    "cardData": {"license": repo.licence} if repo.licence else None, "tags": []}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

        def _resolve(self, parts: list[str], body: bool) -> None:
            repo = self._repo("/".join(parts[:2]), body)
            if repo is None:
                return
            revision, path = parts[3], "/".join(parts[4:])
            if not self._revision_ok(repo, revision, body):
                return
            if path not in repo.files or (repo.repo_id, path) in hub.faults.missing:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", repo.commit, body)
            data = repo.files[path]
            common = {"X-Repo-Commit": repo.commit}
            if Repo.is_lfs(path):
                sha256 = hashlib.sha256(data).hexdigest()
                location = f"{hub.cdn}/{repo.repo_id}/{sha256}"
                return self._send(302, {**common, "Location": location, "X-Linked-Etag": f'"{sha256}"',
                                        "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_id(data)}"'},
                                  b"", body)
            self._bytes(repo, path, {**common, "ETag": f'"{git_blob_id(data)}"'}, body)

        def _cdn(self, parts: list[str], body: bool) -> None:
            repo = hub.repos.get("/".join(parts[:2]).lower())
            path = next((p for p in (repo.files if repo else {}) if Repo.is_lfs(p)
                         and hashlib.sha256(repo.files[p]).hexdigest() == parts[-1]), None)
            if repo is None or path is None:
                return self._error(404, "NotFound", "no such object", body=body)
            self._bytes(repo, path, {"ETag": f'"{parts[-1]}"'}, body)

        def _bytes(self, repo: Repo, path: str, headers: dict[str, str], body: bool) -> None:
            """The file's bytes (with its faults), honouring `Range: bytes=N-` / `bytes=N-M`."""
            data = hub.content(repo, path)
            if body:
                self.entry["file"] = path
            start, end, status = 0, len(data), 200
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes="):
                first, _, last = requested[len("bytes="):].partition("-")
                start = int(first or 0)
                end = int(last) + 1 if last else len(data)
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            chunk = data[start:end]
            self.send_response(status)
            for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(len(chunk))}.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            cut = hub.faults.cut.get((repo.repo_id, path))
            if cut and cut[1] > 0 and start <= cut[0] < end:
                cut[1] -= 1
                self.wfile.write(chunk[:cut[0] - start])
                self.wfile.flush()
                if hub.faults.down_after_cut:
                    hub.faults.down = True
                self.close_connection = True
                self.connection.shutdown(2)  # the peer sees the body end early: a dropped connection
                return
            self.wfile.write(chunk)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve directories as repositories: `python -m tools.stand_in_hub ORG/NAME=DIR ...`."""
    hub = StandInHub()
    for spec in argv if argv is not None else sys.argv[1:]:
        repo_id, _, directory = spec.partition("=")
        hub.add_repo(repo_id, Path(directory))
    with hub:
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
