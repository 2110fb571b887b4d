"""Models by name: the catalogue, `hf:` ids, and finding them in the local Hugging Face cache.

Nothing here touches a network: names resolve in the cache only. The server
tests run `parafill serve` under an audit hook that refuses (and records) every
network socket, connect and name lookup, with a named model that is in the cache
and with one that is not (the editor gets one message naming the pull command,
and the server stays up).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from denoiser.catalogue import CATALOGUE, ModelNameError, family_of_config, is_wanted, lookup, parse_model_name
from denoiser.hub_cache import ModelNotDownloaded, hub_cache_dir, locate, repo_folder, snapshot_of

REPO = Path(__file__).resolve().parents[1]


def place_in_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = "c" * 40, ref: str = "main") -> Path:
    """Lay `model_dir` out as huggingface_hub does: blobs by checksum, snapshot links, refs/<ref>."""
    folder = repo_folder(repo_id, cache)
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        data = path.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_open_dir(tmp_path_factory) -> Path:
    from tools.tiny_open import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-open-dcoder")
    make_tiny_checkpoint(path, "open-dcoder")
    return path


# --- the catalogue and names -----------------------------------------------------------------

def test_catalogue_entries_are_complete_and_distinct():
    assert len({e.name for e in CATALOGUE}) == len(CATALOGUE)
    assert len({e.repo_id.lower() for e in CATALOGUE}) == len(CATALOGUE)
    expected = {"open-dcoder-0.5b", "dream-7b", "dream-coder-7b", "diffucoder-7b-base", "diffucoder-7b-instruct",
                "llada-8b-base", "llada-8b-instruct"}
    assert expected <= {e.name for e in CATALOGUE}
    for entry in CATALOGUE:
        assert entry.name == entry.name.lower() and "/" not in entry.name and not entry.name.startswith("hf:")
        assert entry.repo_id.count("/") == 1 and entry.licence and entry.disk_gb > 0 and entry.layout
    published = {e.name: e.humaneval_infill for e in CATALOGUE if e.humaneval_infill is not None}
    assert published == {"open-dcoder-0.5b": 32.5, "dream-7b": 39.4, "llada-8b-base": 48.3,
                         "diffucoder-7b-base": 54.8, "dream-coder-7b": 55.3}


def test_names_ids_and_directories_are_told_apart():
    ref = parse_model_name("Dream-Coder-7B")
    assert ref.repo_id == "Dream-org/Dream-Coder-v0-Base-7B" and ref.revision == "main" and ref.text == "dream-coder-7b"
    ref = parse_model_name("hf:apple/DiffuCoder-7B-Base")
    assert (ref.repo_id, ref.revision, ref.entry.name) == ("apple/DiffuCoder-7B-Base", "main", "diffucoder-7b-base")
    assert parse_model_name("hf:APPLE/diffucoder-7b-base").repo_id == "apple/DiffuCoder-7B-Base"  # one cache folder
    ref = parse_model_name("hf:some-org/some.model@v1.0")
    assert (ref.repo_id, ref.revision, ref.entry) == ("some-org/some.model", "v1.0", None)
    assert ref.pull_command == "parafill model pull hf:some-org/some.model@v1.0"
    for directory in ("./dream-7b", "/models/dream", "models/tiny", "~/m", "dream"):
        assert parse_model_name(directory) is None
    for bad in ("hf:", "hf:noslash", "hf:a/b/c", "hf:a/../b", "hf:a--b/c", "hf:a/b@"):
        with pytest.raises(ModelNameError, match="hf:ORG/NAME"):
            parse_model_name(bad)
    assert lookup("LLADA-8B-BASE").repo_id == "GSAI-ML/LLaDA-8B-Base"


def test_pull_takes_safetensors_and_small_files_never_pickles_or_code():
    for name in ("model.safetensors", "model-00001-of-00004.safetensors", "model.safetensors.index.json",
                 "config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt", "LICENSE"):
        assert is_wanted(name), name
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt", "x.pth", "a.pkl", "modeling_dream.py",
                 "model.gguf", "onnx/model.onnx", "sub/model.safetensors", "model.safetensors.bin"):
        assert not is_wanted(name), name


def test_family_of_config_agrees_with_the_loader():
    from denoiser.config import ARCHITECTURE
    from denoiser.open_models.families import DREAM, LLADA, OPEN_DCODER, detect_family
    from tools.tiny_open import tiny_config, tiny_tokenizer

    for family in (DREAM, LLADA, OPEN_DCODER):
        config = tiny_config(family, *tiny_tokenizer(family))
        assert family_of_config(config) == detect_family(config) == family
    assert family_of_config({"architecture": ARCHITECTURE}) == "parafill"
    assert family_of_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None


# --- the cache -------------------------------------------------------------------------------

def test_cache_location_follows_huggingface_hub(monkeypatch, tmp_path):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert hub_cache_dir() == tmp_path / "hub-cache"
    try:  # the same answer as huggingface_hub's own constants, read in a fresh process
        import huggingface_hub  # noqa: F401
    except ImportError:
        return
    for env in ({"HF_HUB_CACHE": str(tmp_path / "hub-cache")}, {"HF_HOME": str(tmp_path / "hf")}):
        child_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME")} | env
        code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
        theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env,
                                check=True).stdout.strip()
        assert Path(theirs) == (tmp_path / "hub-cache" if "HF_HUB_CACHE" in env else tmp_path / "hf" / "hub")


def test_a_named_model_is_found_by_ref_or_commit_and_a_missing_one_names_the_pull(tmp_path, tiny_open_dir):
    cache = tmp_path / "hub"
    ref = parse_model_name("open-dcoder-0.5b")
    with pytest.raises(ModelNotDownloaded) as missing:
        locate(ref, cache)
    message = str(missing.value)
    assert "`parafill model pull open-dcoder-0.5b`" in message and str(cache) in message and "\n" not in message
    snapshot = place_in_cache(cache, ref.repo_id, tiny_open_dir, commit="a" * 40)
    assert locate(ref, cache) == snapshot
    pinned = parse_model_name(f"hf:{ref.repo_id}@{'a' * 40}")
    assert locate(pinned, cache) == snapshot
    assert snapshot_of(parse_model_name(f"hf:{ref.repo_id}@v2"), cache) is None  # no such ref
    (snapshot / "config.json").unlink()  # a snapshot without config.json is not a model
    assert snapshot_of(ref, cache) is None


def test_loader_resolves_names_in_the_cache_only(monkeypatch, tmp_path, tiny_open_dir):
    from denoiser.backend import ModelLoadError
    from denoiser.loading import load_backend

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"run `parafill model pull hf:tiny-org/tiny-open`"):
        load_backend("hf:tiny-org/tiny-open", "cpu")
    with pytest.raises(ModelLoadError, match="hf:ORG/NAME"):
        load_backend("hf:not-an-id", "cpu")
    place_in_cache(tmp_path / "hub", "tiny-org/tiny-open", tiny_open_dir)
    backend = load_backend("hf:tiny-org/tiny-open", "cpu")
    assert backend.name == "open-dcoder:hf:tiny-org/tiny-open"


def test_cli_says_how_to_pull_a_missing_model_before_loading_anything(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "lsp_server", "complete", f"{source}:1:1",
                          "--model", "dream-7b"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("parafill:")]
    assert errors == [f"parafill: error: model 'dream-7b' is not downloaded (looked in {tmp_path / 'empty-cache'}): "
                      "run `parafill model pull dream-7b` in a terminal (about 15.2 GB) and start parafill again, "
                      "or choose another model"], run.stderr[-2000:]
    assert "| torch" not in run.stderr, "torch was imported before the name was checked"


def test_model_list_info_rm_import_neither_torch_nor_the_hub_client(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub")}
    for args in (["list"], ["info", "dream-7b"], ["info", "hf:org/name@v1"], ["rm", "dream-7b"]):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "lsp_server", "model", *args],
                             capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == (1 if args[0] == "rm" else 0), run.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not {"torch", "huggingface_hub"} & imported, args
    listed = subprocess.run([sys.executable, "-m", "lsp_server", "model", "list"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert "dream-coder-7b" in listed.stdout


# --- the server: names in the cache, never the network ---------------------------------------

NETWORK_MODULES = ("socket", "ssl", "http", "urllib.request", "requests", "httpx", "httpx2", "httpcore", "urllib3",
                   "aiohttp", "huggingface_hub", "ftplib", "smtplib", "xmlrpc")


# The one module where the server may open a connection: to the team engine the user configured
# (tests/test_security.py::test_with_a_team_engine_the_only_connections_go_to_its_address).
ENGINE_CLIENT = REPO / "lsp_server" / "engine_client.py"


def test_no_networking_code_where_the_server_runs():
    import ast

    found = []
    for room in ("lsp_server", "fim", "denoiser", "kernels"):
        for path in sorted((REPO / room).rglob("*.py")):
            if path == ENGINE_CLIENT:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                found += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}" for name in names
                          if any(name == m or name.startswith(m + ".") for m in NETWORK_MODULES)]
    assert found == [], "network code where the server runs (downloads belong in tools/hub_download.py):\n" + \
        "\n".join(found)


AUDITED_SERVE = '''
import json, socket, sys
RECORD = {record!r}
NETWORK = {{"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}}
_out = open(RECORD, "a", buffering=1)

def hook(event, args):
    if event == "socket.__new__" and args[1] != socket.AF_UNIX:
        _out.write(json.dumps([event, str(args[1])]) + "\\n")
        raise PermissionError("network sockets are forbidden in this test")
    if event in NETWORK:
        _out.write(json.dumps([event, repr(args)[:200]]) + "\\n")
        raise PermissionError(event + " is forbidden in this test")

sys.addaudithook(hook)
sys.path.insert(0, {repo!r})
from lsp_server.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _audited(tmp_path: Path, model: str, cache: Path, wait_states: tuple[str, ...]):
    from tools.soak import session

    record = tmp_path / "network.jsonl"
    script = tmp_path / "audited_serve.py"
    script.write_text(AUDITED_SERVE.format(record=str(record), repo=str(REPO)))
    argv = [sys.executable, str(script), "serve", "--device", "cpu", "--log-level", "info",
            "--log-file", str(tmp_path / "server.log")]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_ENDPOINT": "http://192.0.2.1:9"}  # an address that must never be dialled
    return record, session(model, server_argv=argv, env=env, wait_states=wait_states, answer_timeout_s=60)


def _network_events(record: Path) -> list:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _inline(pipe, uri: str) -> dict:
    msg_id = pipe.request("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                                            "position": {"line": 1, "character": 4},
                                                            "context": {"triggerKind": 1}})
    return pipe.wait_for(msg_id, 60)


def test_server_loads_a_named_model_from_the_cache_without_network(tmp_path, tiny_open_dir):
    cache = tmp_path / "hub"
    place_in_cache(cache, "tiny-org/tiny-open", tiny_open_dir)
    record, running = _audited(tmp_path, "hf:tiny-org/tiny-open", cache, ("ready",))
    with running as current:
        assert current.status.get("state") == "ready", current.status
        assert current.status.get("model") == "open-dcoder:hf:tiny-org/tiny-open", current.status
        current.soak.open("file:///w/a.py", "def f(x):\n    \n")
        answer = _inline(current.pipe, "file:///w/a.py")
        assert answer is not None and "result" in answer, answer
    assert current.soak.state.failures == [], current.soak.state.failures
    assert _network_events(record) == []


def test_server_with_a_missing_named_model_says_how_to_pull_it_once_and_stays_up(tmp_path):
    record, running = _audited(tmp_path, "dream-coder-7b", tmp_path / "empty-hub", ("error",))
    with running as current:
        pipe = current.pipe
        assert current.status.get("state") == "error", current.status
        assert "parafill model pull dream-coder-7b" in current.status.get("message", "")
        current.soak.open("file:///w/a.py", "def f(x):\n    \n")
        answer = _inline(pipe, "file:///w/a.py")
        assert answer is not None and answer.get("result") == {"items": []}, answer
        status = pipe.wait_for(pipe.request("parafill/status", {}), 30)["result"]
        assert status["state"] == "error"
        assert pipe.alive()
    shown = [text for text in pipe.shown if "parafill model pull" in text]
    assert pipe.notifications["window/showMessage"] == 1 and len(shown) == 1, pipe.shown
    assert "`parafill model pull dream-coder-7b`" in shown[0] and "15.2 GB" in shown[0], shown[0]
    assert current.exit_code == 0 and current.alive_at_end
    assert _network_events(record) == []
