"""`parafill model pull | info | rm` against a stand-in hub on 127.0.0.1 (tools/stand_in_hub.py).

The real huggingface_hub client downloads (HF_ENDPOINT points at the stand-in)
tiny checkpoints from tools/tiny_open.py laid out as the hub serves them: an
API listing with LFS sha256s, small files direct, large files through a 302 to a
second origin (the "CDN"), byte ranges for resuming. Each failure is a clear
one-line error, a non-zero exit, and leaves nothing half-written in the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools.stand_in_hub import Faults, StandInHub

REPO = Path(__file__).resolve().parents[1]
OPEN_DCODER_REPO = "fredzzp/open-dcoder-0.5B"  # the catalogue's id for open-dcoder-0.5b
DREAM_REPO = "tiny-org/tiny-dream"
SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from tools.tiny_open import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    make_tiny_checkpoint(root / "open-dcoder", "open-dcoder")
    make_tiny_checkpoint(root / "dream", "dream", shards=2)
    llama = root / "llama"
    llama.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        (llama / name).write_bytes((root / "open-dcoder" / name).read_bytes())
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return {"open-dcoder": root / "open-dcoder", "dream": root / "dream", "llama": llama}


@pytest.fixture()
def hub(checkpoints):
    hub = StandInHub()
    # A pickle next to the safetensors, as many repositories have: it must never be fetched.
    hub.add_repo(OPEN_DCODER_REPO, checkpoints["open-dcoder"], files={"pytorch_model.bin": b"\x80\x04PICKLE"})
    hub.add_repo(DREAM_REPO, checkpoints["dream"], licence="mit")
    hub.add_repo("tiny-org/plain-llama", checkpoints["llama"])
    hub.add_repo("tiny-org/pickles-only", files={
        "config.json": (checkpoints["dream"] / "config.json").read_bytes(),
        "tokenizer.json": (checkpoints["dream"] / "tokenizer.json").read_bytes(),
        "pytorch_model.bin": b"\x80\x04PICKLE"})
    with hub:
        yield hub


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "hf-home" / "hub"


def parafill(*args: str, endpoint: str, cache: Path, timeout: float = 120, python: list[str] | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HOME": str(cache.parent),
           "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    command = python or [sys.executable, "-m", "lsp_server"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def error_line(run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith("parafill: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    return lines[0]


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if not p.is_dir()) if cache.exists() else []


def assert_nothing_half_written(cache: Path, repo_id: str, *, kept_blobs: bool = False) -> None:
    files = cache_files(cache)
    assert not [f for f in files if f.endswith(".incomplete") or ".no_exist" in f], files
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not kept_blobs:
        assert not folder.exists(), files
        return
    assert not (folder / "snapshots").exists() and not (folder / "refs").exists(), files
    for blob in (folder / "blobs").iterdir():  # what is kept is complete and checked
        data = blob.read_bytes()
        assert blob.name in (hashlib.sha256(data).hexdigest(),
                             hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()), blob


def test_pull_by_name_then_complete_info_and_rm(hub, cache, tmp_path):
    run = parafill("model", "pull", "open-dcoder-0.5b", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 0, run.stderr
    assert "licence: apache-2.0" in run.stderr and "[4/4] model.safetensors" in run.stderr
    assert "skipping 1 pickle file(s), which parafill never loads: pytorch_model.bin" in run.stderr
    assert not [r for r in hub.requests if "pytorch_model.bin" in r["path"] or r["file"] == "pytorch_model.bin"]
    assert any(r["role"] == "cdn" and r["file"] == "model.safetensors" for r in hub.requests)  # LFS via the 302

    repo = hub.repos[OPEN_DCODER_REPO.lower()]
    folder = cache / "models--fredzzp--open-dcoder-0.5B"
    assert (folder / "refs" / "main").read_text() == repo.commit
    snapshot = folder / "snapshots" / repo.commit
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json"]
    weights = snapshot / "model.safetensors"
    assert weights.is_symlink() and Path(os.path.realpath(weights)).name == hashlib.sha256(
        repo.files["model.safetensors"]).hexdigest()

    source = tmp_path / "demo.py"
    source.write_text("def add(a, b):\n    return \n")
    run = parafill("complete", f"{source}:2:12", "--model", "open-dcoder-0.5b", "--device", "cpu", "--steps", "2",
                   "--min-confidence", "0", "--json", endpoint="http://127.0.0.1:9", cache=cache)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"] == "open-dcoder:open-dcoder-0.5b"

    info = parafill("model", "info", "open-dcoder-0.5b", endpoint=hub.endpoint, cache=cache)
    assert info.returncode == 0 and f"in cache    yes: {snapshot}" in info.stdout, info.stdout
    listed = parafill("model", "list", endpoint=hub.endpoint, cache=cache)
    assert listed.returncode == 0 and any(line.startswith("open-dcoder-0.5b ") and line.endswith(" yes")
                                          for line in listed.stdout.splitlines()), listed.stdout
    removed = parafill("model", "rm", "open-dcoder-0.5b", endpoint=hub.endpoint, cache=cache)
    assert removed.returncode == 0 and not folder.exists(), removed.stderr
    assert not (cache / ".locks" / folder.name).exists()
    info = parafill("model", "info", "open-dcoder-0.5b", endpoint=hub.endpoint, cache=cache)
    assert "in cache    no" in info.stdout and "`parafill model pull open-dcoder-0.5b`" in info.stdout
    again = parafill("model", "rm", "open-dcoder-0.5b", endpoint=hub.endpoint, cache=cache)
    assert again.returncode == 1 and "not in the cache" in again.stderr


def test_pull_an_hf_id_of_a_sharded_model_then_the_loader_finds_it(hub, cache, checkpoints, monkeypatch):
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 0, run.stderr
    assert "licence: mit" in run.stderr and "[6/6]" in run.stderr  # config, index, 2 shards, 2 tokenizer files
    from denoiser.loading import load_backend

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    backend = load_backend(f"hf:{DREAM_REPO}", "cpu")
    direct = load_backend(checkpoints["dream"], "cpu")
    assert backend.name == f"dream:hf:{DREAM_REPO}" and backend.parameters == direct.parameters


def test_wrong_checksum_is_refused_and_removed(hub, cache):
    hub.faults.corrupt.add((DREAM_REPO, SHARD))
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1
    line = error_line(run)
    assert f"{SHARD}: checksum mismatch" in line and "the file was removed" in line, line
    assert_nothing_half_written(cache, DREAM_REPO)


def test_a_download_cut_off_is_resumed_where_it_stopped(hub, cache, checkpoints):
    # huggingface_hub writes what it receives in 10 MiB chunks, so resuming shows on a file past that.
    big = os.urandom(24 * 1024 * 1024)
    hub.add_repo("tiny-org/big", files={"model.safetensors": big, **{
        name: (checkpoints["open-dcoder"] / name).read_bytes() for name in ("config.json", "tokenizer.json")}})
    hub.faults.cut[("tiny-org/big", "model.safetensors")] = [15 * 1024 * 1024, 1]  # the connection drops once
    run = parafill("model", "pull", "hf:tiny-org/big", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 0, run.stderr
    fetches = [r["range"] for r in hub.downloads("model.safetensors")]
    assert fetches == [None, f"bytes={10 * 1024 * 1024}-"], fetches  # the second asks only for the rest
    snapshot = cache / "models--tiny-org--big" / "snapshots" / hub.repos["tiny-org/big"].commit
    assert (snapshot / "model.safetensors").read_bytes() == big


def test_an_interrupted_pull_keeps_only_checked_files_and_a_rerun_finishes(hub, cache):
    size = len(hub.repos[DREAM_REPO].files[SHARD])
    hub.faults.cut[(DREAM_REPO, SHARD)] = [size // 2, 1]
    hub.faults.down_after_cut = True  # the network stays down: the client's retries fail too
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1
    line = error_line(run)
    assert SHARD in line and f"run `parafill model pull hf:{DREAM_REPO}` again to continue" in line, line
    assert_nothing_half_written(cache, DREAM_REPO, kept_blobs=True)

    hub.faults = Faults()
    first_run = len(hub.requests)
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 0, run.stderr
    fetched_again = {r["file"] for r in hub.requests[first_run:] if r["method"] == "GET" and r["file"]}
    assert fetched_again == {SHARD}, fetched_again  # the files checked in the first run were kept


def test_a_file_the_hub_lists_but_does_not_serve(hub, cache):
    hub.faults.missing.add((DREAM_REPO, "tokenizer.json"))
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1
    line = error_line(run)
    assert "tokenizer.json: the hub lists this file but does not serve it" in line, line
    assert_nothing_half_written(cache, DREAM_REPO)


def test_no_network_at_all(cache):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = parafill("model", "pull", "dream-coder-7b", endpoint=f"http://127.0.0.1:{port}", cache=cache)
    assert run.returncode == 1
    line = error_line(run)
    assert f"cannot download the file list of Dream-org/Dream-Coder-v0-Base-7B from http://127.0.0.1:{port}" in line
    assert "check your network connection" in line, line
    assert not [f for f in cache_files(cache) if f.startswith("models--")], cache_files(cache)


def test_refused_before_downloading_weights(hub, cache):
    run = parafill("model", "pull", "hf:tiny-org/plain-llama", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1 and "is a 'llama' model, which parafill cannot run" in error_line(run)
    assert not hub.downloads("model.safetensors")  # config.json came first and said no
    assert_nothing_half_written(cache, "tiny-org/plain-llama")

    before = len(hub.requests)
    run = parafill("model", "pull", "hf:tiny-org/pickles-only", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1 and "has no safetensors weights (pytorch_model.bin)" in error_line(run)
    assert not [r for r in hub.requests[before:] if r["method"] == "GET" and r["file"]]

    run = parafill("model", "pull", "hf:tiny-org/no-such-model", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 1 and "no such model repository" in error_line(run)
    run = parafill("model", "pull", "hf:bad", endpoint=hub.endpoint, cache=cache)
    assert run.returncode == 2 and "hf:ORG/NAME" in error_line(run)
    assert not [f for f in cache_files(cache) if f.startswith("models--")], cache_files(cache)


FULL_DISK = """
import collections, shutil, sys
shutil.disk_usage = lambda path: collections.namedtuple("usage", "total used free")(10**9, 10**9 - 4096, 4096)
from lsp_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_model_that_does_not_fit_the_disk_is_refused_up_front(hub, cache):
    run = parafill("model", "pull", f"hf:{DREAM_REPO}", endpoint=hub.endpoint, cache=cache,
                   python=[sys.executable, "-c", FULL_DISK])
    assert run.returncode == 1
    line = error_line(run)
    assert "needs" in line and "only 4.1 kB is free" in line and "HF_HUB_CACHE" in line, line
    assert not [r for r in hub.requests if r["method"] == "GET" and r["file"]]
    assert not [f for f in cache_files(cache) if f.startswith("models--")]
