"""Security promises (SECURITY.md lists them), each checked on the real thing.

1. Weights load only from safetensors: pickle checkpoints are refused and never
   unpickled (a pickle that would create a marker file must not create it).
2. No network: a full session under an audit hook that records (and refuses)
   every socket that is not the AF_UNIX pair asyncio uses to wake its own loop,
   and every connect, bind or name lookup.
3. Reads only what the client sent plus what the user configured: every file the
   server opens must be the model directory, its log file, Python's own files,
   /proc, /dev or /sys; never a file of the workspace it runs in.
4. Never writes to user files: the workspace is byte-for-byte unchanged and no
   file under it is opened for writing.
5. Logs hold no source text unless `verboseLogging` is on.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from denoiser.cpu_compile import unavailable_reason
from tools.soak import REPO, session

# --- 1. safetensors only -------------------------------------------------------------------


class _Trap:
    """Unpickling this creates `path`: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickles(model_dir: Path, marker: Path, names=("pytorch_model.bin", "model.pt", "weights.ckpt", "model.pth")):
    for name in names:
        (model_dir / name).write_bytes(pickle.dumps({"weight": _Trap(marker)}))


def test_pickle_checkpoints_are_refused_and_never_unpickled(parafill_tiny_model, tmp_path):
    from denoiser.backend import ModelLoadError
    from denoiser.loading import load_backend
    from denoiser.weights import load_weights

    marker = tmp_path / "UNPICKLED"
    # The trap works: unpickling it does create the marker.
    pickle.loads(pickle.dumps(_Trap(tmp_path / "trap-check")))
    assert (tmp_path / "trap-check").exists()

    only_pickles = tmp_path / "only-pickles"
    shutil.copytree(parafill_tiny_model, only_pickles)
    (only_pickles / "model.safetensors").unlink()
    _plant_pickles(only_pickles, marker)
    with pytest.raises(ModelLoadError) as refused:
        load_backend(only_pickles, "cpu")
    message = str(refused.value)
    assert "safetensors" in message and "pickle" in message and "arbitrary code" in message, message

    for name in ("pytorch_model.bin", "model.pt"):
        with pytest.raises(ModelLoadError, match="pickle"):
            load_weights(only_pickles / name)

    # Pickles next to safetensors: the safetensors load, the pickles stay shut.
    both = tmp_path / "both"
    shutil.copytree(parafill_tiny_model, both)
    _plant_pickles(both, marker)
    backend = load_backend(both, "cpu")
    assert backend.parameters > 0

    # An open-weight (Hugging Face style) directory with only a pickle is refused too.
    hf = tmp_path / "hf-pickle"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["DreamModel"], "model_type": "Dream"}))
    shutil.copy(parafill_tiny_model / "tokenizer.json", hf / "tokenizer.json")
    _plant_pickles(hf, marker, names=("pytorch_model.bin",))
    with pytest.raises(ModelLoadError):
        load_backend(hf, "cpu")
    assert not marker.exists(), "a pickle was unpickled"


# --- 2-5. a full session under audit --------------------------------------------------------

AUDITED_SERVE = '''
"""Run `parafill serve` with an audit hook that records what the process opens and connects to."""
import json, os, socket, sys

RECORD = {record!r}
ALLOWED_READ = tuple({allowed!r})
NETWORK_EVENTS = {{"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                   "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}}
_out = open(RECORD, "a", buffering=1)  # opened before the hook: not itself recorded


def _note(kind, detail):
    _out.write(json.dumps({{"kind": kind, "detail": detail}}) + "\\n")


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        path = os.path.abspath(os.fsdecode(path))
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writing:
            _note("write", path)
        elif not path.startswith(ALLOWED_READ):
            _note("read", path)
    elif event == "subprocess.Popen":
        _note("process", json.dumps([os.fsdecode(a) for a in args[1]])[:400])
    elif event == "socket.__new__":
        family = args[1]
        if family != socket.AF_UNIX:
            _note("socket", str(family))
            raise PermissionError("network sockets are forbidden in this test")
    elif event in NETWORK_EVENTS:
        _note("network", event + " " + repr(args)[:200])
        raise PermissionError(event + " is forbidden in this test")


sys.addaudithook(hook)
sys.path.insert(0, {repo!r})
from lsp_server.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _allowed_reads(model_dir: Path, log_file: Path) -> list[str]:
    import site
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], str(REPO / "lsp_server"),
             str(REPO / "fim"), str(REPO / "denoiser"), str(REPO / "kernels"), str(model_dir.resolve()),
             *(str(p) for p in REPO.glob("*.egg-info")),  # parafill's own package metadata
             str(log_file), "/proc/", "/dev/", "/sys/"}
    return sorted(str(Path(r).resolve()) + ("/" if r.endswith("/") else "") for r in roots)


def _audited_session(tmp_path: Path, model_dir: Path, *, verbose: bool, drafts: bool = False,
                     env: dict | None = None):
    workspace = tmp_path / "workspace"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "app.py").write_text("def on_disk():\n    return 'the disk copy'\n")
    (workspace / "secret.env").write_text("API_TOKEN=do-not-read\n")
    (workspace / "src" / "util.py").write_text("VALUE = 1\n")
    log_file = tmp_path / "logs" / "parafill.log"
    log_file.parent.mkdir()
    record = tmp_path / "audit.jsonl"
    script = tmp_path / "audited_serve.py"
    script.write_text(AUDITED_SERVE.format(record=str(record), allowed=_allowed_reads(model_dir, log_file),
                                           repo=str(REPO)))
    argv = [sys.executable, str(script), "serve", "--device", "cpu", "--log-level", "debug",
            "--log-file", str(log_file)]
    # Drafts off: this session proves that nothing of the workspace is read unless drafts are on.
    settings = {"verboseLogging": verbose, "repoDrafts": drafts}
    return workspace, log_file, record, session(model_dir, server_argv=argv, settings=settings, work_dir=workspace,
                                                root_uri=workspace.as_uri(), env=env)


def _drive(current, workspace: Path, marker: str) -> None:
    """An editor session over the workspace: open, type, ask, close; plus the odd bad message."""
    pipe, soak = current.pipe, current.soak
    app = (workspace / "src" / "app.py").as_uri()
    text = f"import os\n\n# {marker}\ndef handler(event):\n    token = '{marker}'\n    return \n"
    soak.open(app, text)
    for _ in range(4):
        soak.op_edit_in(app)
    soak.op_typing_burst()
    for line, character in ((5, 11), (2, 3), (10**6, 0)):
        for method in ("textDocument/inlineCompletion", "textDocument/completion"):
            msg_id = pipe.request(method, {"textDocument": {"uri": app}, "position": {"line": line, "character": character},
                                           "context": {"triggerKind": 1}})
            soak.expect(msg_id, method, "result")
    # Requests and edits for workspace files the client never opened: nothing may be read from disk.
    never_opened = (workspace / "src" / "util.py").as_uri()
    msg_id = pipe.request("textDocument/inlineCompletion", {"textDocument": {"uri": never_opened},
                                                            "position": {"line": 0, "character": 3},
                                                            "context": {"triggerKind": 1}})
    soak.expect(msg_id, "unopened document", "result")
    pipe.notify("textDocument/didChange", {"textDocument": {"uri": (workspace / "secret.env").as_uri(), "version": 2},
                                           "contentChanges": [{"range": {"start": {"line": 0, "character": 0},
                                                                         "end": {"line": 0, "character": 0}},
                                                               "text": marker}]})
    msg_id = pipe.request("textDocument/inlineCompletion", {"textDocument": {"uri": app},
                                                            "position": {"line": marker, "character": 0},
                                                            "context": {"triggerKind": 1}})
    soak.expect(msg_id, "invalid params carrying source text", "-32602")
    pipe.send_body(("{" + marker).encode())
    soak.status_request()
    soak.collect(wait=True)
    soak.close(app)
    soak.status_request()
    soak.collect(wait=True)


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_with_compiled_steps_the_server_writes_only_into_its_cache(parafill_tiny_model, tmp_path):
    """Where CPU steps compile, the server also writes into your cache's `compiled` folder and
    starts one kind of process there: `python -m denoiser.cpu_compile`; still no network."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PARAFILL_CPU_COMPILE": "auto", "PARAFILL_CACHE": str(cache)}
    workspace, log_file, record, running = _audited_session(tmp_path, parafill_tiny_model, verbose=False, env=env)
    before = _snapshot(workspace)
    with running as current:
        assert current.status.get("state") == "ready", current.status
        _drive(current, workspace, f"PARAFILL_MARKER_{uuid.uuid4().hex}")
    assert current.soak.state.failures == [], current.soak.state.failures
    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert [e for e in events if e["kind"] in ("socket", "network")] == []
    writes = {e["detail"] for e in events if e["kind"] == "write"}
    compiled = str((cache / "compiled").resolve())
    # os.devnull: the child's standard input.
    assert {w for w in writes - {str(log_file), os.devnull} if not w.startswith(compiled + os.sep)} == set(), writes
    assert any(w.endswith("spec.json") for w in writes), "the first completion did not queue a compile"
    for event in (e for e in events if e["kind"] == "process"):
        argv = json.loads(event["detail"])
        assert argv[1:3] == ["-m", "denoiser.cpu_compile"] and argv[3].startswith(compiled), argv
    assert _snapshot(workspace) == before, "a workspace file changed"


def test_full_session_no_network_reads_only_what_it_was_given_writes_nothing(parafill_tiny_model, tmp_path):
    marker = f"PARAFILL_MARKER_{uuid.uuid4().hex}"
    workspace, log_file, record, running = _audited_session(tmp_path, parafill_tiny_model, verbose=False)
    before = _snapshot(workspace)
    with running as current:
        assert current.status.get("state") == "ready", current.status
        _drive(current, workspace, marker)
    assert current.soak.state.failures == [], current.soak.state.failures
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    network = [e for e in events if e["kind"] in ("socket", "network")]
    assert network == [], f"the server tried to use the network: {network}"
    workspace_root = str(workspace.resolve())
    # The import system "opens" pseudo paths such as an editable install's
    # `__editable__...__path_hook__` relative to the working directory; only real files count.
    touched = [e for e in events if e["detail"].startswith(workspace_root)
               and (e["kind"] == "write" or Path(e["detail"]).exists())]
    assert touched == [], f"the server opened workspace files the client never asked it to: {touched}"
    reads = [e["detail"] for e in events if e["kind"] == "read" and Path(e["detail"]).exists()]
    assert reads == [], f"the server read files outside the model, its log and Python itself: {reads[:20]}"
    writes = sorted({e["detail"] for e in events if e["kind"] == "write"})
    assert set(writes) <= {str(log_file)}, f"the server wrote files other than its log: {writes}"
    assert [e for e in events if e["kind"] == "process"] == [], "the server started a process"
    assert _snapshot(workspace) == before, "a workspace file changed"
    # 5. Logs: the source text (and the marker inside it) never reaches the log.
    log_text = log_file.read_text(errors="replace")
    assert "completion" in log_text, "the log is empty: nothing was checked"
    assert marker not in log_text, "source text reached the log without verboseLogging"
    assert "raw fill" not in log_text and "Sending data" not in log_text, "message bodies logged without verboseLogging"
    assert marker not in current.log_text


def test_with_drafts_on_only_the_workspace_code_files_are_read_and_nothing_is_written(parafill_tiny_model, tmp_path):
    marker = f"PARAFILL_MARKER_{uuid.uuid4().hex}"
    workspace, log_file, record, running = _audited_session(tmp_path, parafill_tiny_model, verbose=False, drafts=True)
    # What the walk must skip: ignored, vendored, hidden, not code; and a file outside the folder.
    (workspace / ".gitignore").write_text("ignored.py\n")
    (workspace / "src" / "ignored.py").write_text("LEAK = 'ignored'\n")
    (workspace / "node_modules" / "lib").mkdir(parents=True)
    (workspace / "node_modules" / "lib" / "index.js").write_text("module.exports = 1;\n")
    (workspace / ".hidden").mkdir()
    (workspace / ".hidden" / "notes.py").write_text("X = 1\n")
    outside = tmp_path / "outside.py"
    outside.write_text("OUTSIDE = 1\n")
    before = _snapshot(workspace)
    with running as current:
        assert current.status.get("state") == "ready", current.status
        _drive(current, workspace, marker)
        # Files changed on disk, as the editor's watcher reports them: only code files of the folder are read.
        changes = [{"uri": p.as_uri(), "type": 2} for p in (workspace / "secret.env", workspace / "src" / "ignored.py",
                                                           workspace / ".hidden" / "notes.py", outside,
                                                           workspace / "src" / "util.py")]
        current.pipe.notify("workspace/didChangeWatchedFiles", {"changes": changes})
        index = {}
        for _ in range(100):
            answer = current.pipe.wait_for(current.pipe.request("parafill/status", {}), 30)
            index = answer["result"]["drafts"]["index"]
            if not index.get("indexing"):
                break
        assert index.get("enabled") and index.get("folders") == 1 and not index.get("indexing"), index
    assert current.soak.state.failures == [], current.soak.state.failures
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    network = [e for e in events if e["kind"] in ("socket", "network")]
    assert network == [], f"the server tried to use the network: {network}"
    root = workspace.resolve()
    writes = sorted({e["detail"] for e in events if e["kind"] == "write"})
    assert set(writes) <= {str(log_file)}, f"the server wrote files other than its log: {writes}"
    reads = {e["detail"] for e in events if e["kind"] == "read" and Path(e["detail"]).exists()}
    in_workspace = {str(Path(r).relative_to(root)) for r in reads if Path(r).is_relative_to(root)}
    assert in_workspace == {".gitignore", "src/app.py", "src/util.py"}, in_workspace
    assert reads - {str(root / r) for r in in_workspace} == set(), "the server read files outside the workspace, " \
        f"the model, its log and Python itself: {sorted(reads)[:20]}"
    assert _snapshot(workspace) == before, "a workspace file changed"
    log_text = log_file.read_text(errors="replace")
    assert marker not in log_text and "the disk copy" not in log_text, "source text reached the log"


def test_verbose_logging_is_the_only_way_source_reaches_the_log(parafill_tiny_model, tmp_path):
    marker = f"PARAFILL_MARKER_{uuid.uuid4().hex}"
    workspace, log_file, _, running = _audited_session(tmp_path, parafill_tiny_model, verbose=True)
    with running as current:
        _drive(current, workspace, marker)
    assert current.soak.state.failures == [], current.soak.state.failures
    log_text = log_file.read_text(errors="replace")
    # Verbose logs show what the model wrote and pygls's messages in full; the switch works,
    # so the quiet log in the test above is quiet because of it.
    assert "raw fill" in log_text and "Sending data" in log_text, log_text[-2000:]


# --- 2'. with a team engine: connections to its address only -----------------------------------

AUDITED_ENGINE_CLIENT = '''
"""`parafill serve --engine URL` under an audit hook: every connect, bind and name lookup is recorded,
and any that is not the configured engine's address is refused."""
import json, os, socket, sys

RECORD = {record!r}
ENGINE = ({host!r}, {port!r})
ALLOWED_READ = tuple({allowed!r})
_out = open(RECORD, "a", buffering=1)


def _note(kind, detail):
    _out.write(json.dumps({{"kind": kind, "detail": detail}}) + "\\n")


def hook(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and tuple(address[:2]) == ENGINE:
            _note("engine", repr(address))
            return
        if args[0].family == socket.AF_UNIX:
            return
        _note("network", "connect " + repr(address))
        raise PermissionError("only the engine's address may be reached")
    if event in ("socket.bind", "socket.sendto", "socket.sendmsg", "socket.gethostbyname",
                 "socket.gethostbyaddr") and not (event == "socket.bind" and args[0].family == socket.AF_UNIX):
        _note("network", event + " " + repr(args)[:200])
        raise PermissionError(event + " is forbidden in this test")
    if event == "socket.getaddrinfo" and args[0] != ENGINE[0]:
        _note("network", "getaddrinfo " + repr(args)[:200])
        raise PermissionError("only the engine's host may be looked up")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        path = os.path.abspath(os.fsdecode(path))
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writing:
            _note("write", path)
        elif not path.startswith(ALLOWED_READ):
            _note("read", path)


sys.addaudithook(hook)
sys.path.insert(0, {repo!r})
from lsp_server.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_with_a_team_engine_the_only_connections_go_to_its_address(parafill_tiny_model, tmp_path):
    from tools.stand_in_engine import StandInEngine

    token = "security-test-token-0123456789"
    token_file = tmp_path / "engine.token"
    token_file.write_text(token + "\n")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    log_file = tmp_path / "logs" / "parafill.log"
    log_file.parent.mkdir()
    record = tmp_path / "audit.jsonl"
    with StandInEngine(parafill_tiny_model, token) as engine:
        script = tmp_path / "audited_engine_client.py"
        allowed = [*_allowed_reads(parafill_tiny_model, log_file), str(token_file)]
        script.write_text(AUDITED_ENGINE_CLIENT.format(record=str(record), host="127.0.0.1", port=engine.port,
                                                       allowed=allowed, repo=str(REPO)))
        argv = [sys.executable, str(script), "serve", "--device", "cpu", "--log-level", "debug",
                "--log-file", str(log_file), "--engine", engine.url, "--engine-token-file", str(token_file)]
        env = {k: v for k, v in os.environ.items() if k != "PARAFILL_ENGINE_TOKEN"}
        running = session(parafill_tiny_model, server_argv=argv, settings={"repoDrafts": False}, env=env,
                          work_dir=workspace)
        with running as current:
            assert current.status.get("state") == "ready", current.status
            uri = (workspace / "app.py").as_uri()
            current.soak.open(uri, "import os\n\ndef handler(event):\n    return ev\n")
            for character in (13, 11, 9):
                msg_id = current.pipe.request("textDocument/inlineCompletion", {
                    "textDocument": {"uri": uri}, "position": {"line": 3, "character": character},
                    "context": {"triggerKind": 1}})
                current.soak.expect(msg_id, "inline", "result")
            current.soak.collect(wait=True)
            status = current.pipe.wait_for(current.pipe.request("parafill/status", {}), 30)["result"]
            current.soak.close(uri)
            current.soak.collect(wait=True)
            deadline = time.monotonic() + 30  # closing a document tells the engine to forget it
            while ("POST", "/v1/forget") not in engine.requests and time.monotonic() < deadline:
                time.sleep(0.1)
    assert current.soak.state.failures == [], current.soak.state.failures
    assert status["teamEngine"]["state"] == "connected" and status["teamEngine"]["requests"]["answered"] >= 1
    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert [e for e in events if e["kind"] == "network"] == [], "the server reached beyond its engine"
    assert [e for e in events if e["kind"] == "engine"], "the audit saw no connection to the engine"
    reads = [e["detail"] for e in events if e["kind"] == "read" and Path(e["detail"]).exists()]
    assert reads == [], f"the server read files beyond Python, its log and the token file: {reads[:20]}"
    writes = sorted({e["detail"] for e in events if e["kind"] == "write"})
    assert set(writes) <= {str(log_file)}, f"the server wrote files other than its log: {writes}"
    assert token not in log_file.read_text(errors="replace"), "the engine's token reached the log"
    assert ("POST", "/v1/fill") in engine.requests and ("POST", "/v1/forget") in engine.requests
