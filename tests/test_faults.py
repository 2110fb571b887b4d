"""Fault injection: broken model files, device faults, a dying model thread.

Each fault is injected into a real server process (a broken model directory,
or a small launcher that wraps one function of the real engine before
serving), and the test checks what an editor sees: the process stays up,
requests get answers (empty when there is nothing to offer, never silence or
a traceback), and `parafill/status` says what went wrong. The CPU fallback
needs a CUDA device to fail, so it is driven in-process with the real
native backend behind a wrapper that fails as a GPU would.
"""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tools.soak import REPO, session

DOC = "file:///faults/app.py"
TEXT = "import os\n\n\ndef read(path):\n    with open(path) as handle:\n        return handle.\n"


def _status(pipe) -> dict:
    answer = pipe.wait_for(pipe.request("parafill/status", {}), 60)
    assert answer is not None and "result" in answer, answer
    return answer["result"]


def _inline(pipe, line=5, character=21) -> dict:
    answer = pipe.wait_for(pipe.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": DOC}, "position": {"line": line, "character": character},
        "context": {"triggerKind": 1}}), 60)
    assert answer is not None, "an inline completion request was never answered"
    assert "error" not in answer, answer
    assert isinstance(answer["result"]["items"], list), answer
    return answer["result"]


def _wait_for_message(pipe, needle: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(pipe)
        if status["state"] in ("error", "ready") and needle in status["message"]:
            return status
        assert time.monotonic() < deadline, f"status never said {needle!r}: {status['state']} {status['message']}"
        time.sleep(0.2)


def _broken_copies(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model directory, text the status message must contain)."""
    cases = {}
    missing = root / "missing-weights"
    shutil.copytree(good, missing)
    (missing / "model.safetensors").unlink()
    cases["missing weights"] = (missing, "model.safetensors")

    truncated = root / "truncated-weights"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated weights"] = (truncated, "truncated")

    mismatched = root / "mismatched-config"
    shutil.copytree(good, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    size_key = next(k for k in ("hidden_size", "d_model", "dim", "n_embd") if k in config)
    config[size_key] *= 2
    (mismatched / "config.json").write_text(json.dumps(config))
    cases["mismatched config"] = (mismatched, "model.safetensors")

    no_tokenizer = root / "missing-tokenizer"
    shutil.copytree(good, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    cases["missing tokenizer"] = (no_tokenizer, "tokenizer.json")

    bad_json = root / "bad-config"
    shutil.copytree(good, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    cases["bad config"] = (bad_json, "config.json")
    cases["no directory"] = (root / "does-not-exist", "does-not-exist")
    return cases


def test_broken_model_files_keep_the_server_up(parafill_tiny_model, tmp_path):
    cases = _broken_copies(parafill_tiny_model, tmp_path)
    first_dir, first_needle = cases.pop("missing weights")
    with session(first_dir, wait_states=("error", "ready")) as current:
        pipe, soak = current.pipe, current.soak
        soak.open(DOC, TEXT)
        status = _wait_for_message(pipe, first_needle)
        assert status["state"] == "error", status
        assert _inline(pipe)["items"] == []
        assert soak.state.failures == []  # the load failure above is the expected one
        for name, (model_dir, needle) in cases.items():
            pipe.notify("workspace/didChangeConfiguration",
                        {"settings": {"parafill": {**current.options["parafill"], "model": str(model_dir)}}})
            status = _wait_for_message(pipe, needle)
            assert status["state"] == "error", (name, status)
            assert "Traceback" not in status["message"], status["message"]
            assert _inline(pipe)["items"] == [], name
            menu = pipe.wait_for(pipe.request("textDocument/completion", {
                "textDocument": {"uri": DOC}, "position": {"line": 5, "character": 21}}), 60)
            assert menu["result"]["items"] == [], (name, menu)
        # The user fixes the setting: the same server loads the good model and answers.
        pipe.notify("workspace/didChangeConfiguration",
                    {"settings": {"parafill": {**current.options["parafill"], "model": str(parafill_tiny_model)}}})
        status = _wait_for_message(pipe, "ready on")
        assert status["state"] == "ready", status
        _inline(pipe)
        assert pipe.alive()
    assert pipe.traceback_messages == []
    assert current.exit_code == 0


LAUNCHER = '''
"""Serve parafill with one function of the real engine wrapped to fail as {mode!r} says."""
import sys
sys.path.insert(0, {repo!r})
import torch
from denoiser.engine import Engine
from denoiser.native_backend import NativeBackend

MODE = {mode!r}
calls = {{"fill": 0, "complete": 0}}


class ThreadDeath(BaseException):
    """Stands for whatever kills a thread from inside a library."""


if MODE == "device":
    original_fill = NativeBackend.fill

    def fill(self, request, decode, **kwargs):
        # A span longer than 16 tokens does not fit "on the GPU"; the halved one does.
        if request.span.max_tokens > 16:
            calls["fill"] += 1
            if calls["fill"] % 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return original_fill(self, request, decode, **kwargs)

    NativeBackend.fill = fill

if MODE == "worker":
    original_complete = Engine.complete

    def complete(self, *args, **kwargs):
        calls["complete"] += 1
        if calls["complete"] == 1:
            raise ThreadDeath("injected: the model thread dies")
        if calls["complete"] == 2:
            raise SystemExit(3)
        return original_complete(self, *args, **kwargs)

    Engine.complete = complete

from lsp_server.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _launcher(tmp_path: Path, mode: str, log_file: Path) -> list[str]:
    script = tmp_path / f"serve_{mode}.py"
    script.write_text(LAUNCHER.format(repo=str(REPO), mode=mode))
    return [sys.executable, str(script), "serve", "--device", "cpu", "--log-level", "info", "--log-file", str(log_file)]


def test_device_faults_fall_back_and_are_reported(parafill_tiny_model, tmp_path):
    argv = _launcher(tmp_path, "device", tmp_path / "device.log")
    spans = {"spanTokensLine": 32, "spanTokensBlock": 32}
    with session(parafill_tiny_model, server_argv=argv, settings=spans) as current:
        pipe, soak = current.pipe, current.soak
        soak.open(DOC, TEXT)
        _inline(pipe)
        status = _status(pipe)
        engine = status["engine"]
        assert engine["fallbacks"] >= 1, engine
        assert "OutOfMemoryError" in engine["lastError"], engine
        assert status["state"] == "ready"
        soak.change(DOC, [{"text": TEXT + "x = 1\n"}], TEXT + "x = 1\n")  # a new context: no cache hit
        _inline(pipe, 6, 5)
        engine = _status(pipe)["engine"]
        assert engine["fallbacks"] >= 2 and "CUDA error" in engine["lastError"], engine
        assert engine["answered"]["model"] >= 2, "the smaller span must have answered"
    assert soak.state.failures == [], soak.state.failures
    assert current.exit_code == 0


def test_a_dying_model_thread_is_restarted(parafill_tiny_model, tmp_path):
    argv = _launcher(tmp_path, "worker", tmp_path / "worker.log")
    with session(parafill_tiny_model, server_argv=argv) as current:
        pipe, soak = current.pipe, current.soak
        soak.open(DOC, TEXT)
        assert _inline(pipe)["items"] == []  # the thread died under this one: empty, but answered
        assert pipe.alive()
        assert _inline(pipe)["items"] == []  # SystemExit on the model thread must not end the server
        assert pipe.alive()
        status = _status(pipe)
        assert status["state"] == "ready", status
        assert "restarted 2x" in status["message"], status["message"]
        assert status["requests"]["errors"] == 2, status["requests"]
        before = status["engine"]["requests"]
        _inline(pipe, 3, 0)
        _inline(pipe, 4, 10)
        assert _status(pipe)["engine"]["requests"] == before + 2, "later requests must reach the engine again"
    assert soak.state.failures == [], soak.state.failures
    assert current.exit_code == 0


class _GpuThatRunsOutOfMemory:
    """A real native backend that pretends to sit on a GPU which is always out of memory."""

    def __init__(self, real):
        self.real = real
        self.name = real.name
        self.parameters = real.parameters
        self.device = torch.device("cuda")
        self.context_cache = real.context_cache
        self.fills = 0

    def fill(self, request, decode, **kwargs):
        self.fills += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    def moved_to(self, device):
        assert str(device) == "cpu"
        return self.real

    def forget(self, document):
        self.real.forget(document)


def test_out_of_memory_falls_back_to_the_cpu(parafill_tiny_model):
    from denoiser.backend import DecodeSettings
    from denoiser.engine import Engine
    from denoiser.native_backend import NativeBackend
    from fim import ContextOptions, build_request

    gpu = _GpuThatRunsOutOfMemory(NativeBackend(parafill_tiny_model, "cpu"))
    engine = Engine(gpu)
    request = build_request(TEXT, 5, 21, path="app.py", language_id="python",
                            options=ContextOptions(context_tokens=256, max_span_tokens_line=32,
                                                   max_span_tokens_block=32))
    completion = engine.complete(request, DecodeSettings(steps=4), document=DOC)
    assert completion.source == "model" and completion.tokens > 0
    status = engine.status()
    assert status["device"] == "cpu", "after the fallback the model runs on the CPU, and status says so"
    assert status["fallbacks"] >= 1 and "OutOfMemoryError" in status["last_error"], status
    assert gpu.fills >= 1 and engine.backend is gpu.real
