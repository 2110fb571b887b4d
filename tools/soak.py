"""`parafill bench --soak N`: replay N random editor operations against a real server.

A raw JSON-RPC client (Content-Length framing over the server's stdin/stdout,
no LSP library) starts `python -m lsp_server serve`, opens documents and sends
what editors and careless users send: incremental and whole-document edits,
inline and menu completions at valid and out-of-range positions,
cancellations mid-flight, didClose while a request runs, unknown methods,
malformed JSON and JSON-RPC, invalid params, oversized messages, a 10 MB
document, 1 MB lines, NUL and control characters, lone surrogates; and the
traffic of a working day: files closed and reopened, files visited for a moment,
edits to files just closed, bad settings (sent in didChangeConfiguration, and
answered to the server's workspace/configuration). `--traffic files` opens,
completes in and closes N distinct files instead. The server's RSS is read after every
operation and drawn against operations (`plot_memory`).

It keeps its own copy of every document and checks, through the ranges the
server answers at out-of-range positions (clamped into the server's copy),
that both copies agree. A run fails on: the process dying, a request left
unanswered, a wrong kind of answer (an invalid request must get InvalidParams,
an unknown method MethodNotFound), a traceback reaching the client, the two
copies of a document disagreeing, resident memory still growing in the
second half of the run, or the server still holding anything per document
(`PER_DOCUMENT_CACHES`, open documents) once the client has closed them all. `run_soak` returns the figures as a dict.

This module only drives and observes a server process; it never imports the
server, torch or the model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
REQUEST_CANCELLED = -32800
# Short spans and few steps: the soak measures the server, not the model.
# minConfidence 0: the default tiny random model is never sure; the soak needs its items.
SOAK_SETTINGS = {"spanTokensLine": 8, "spanTokensBlock": 8, "steps": 4, "debounceMs": 0, "contextTokens": 256,
                 "minConfidence": 0}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# --- the client's copy of a document ----------------------------------------------------
def utf16_len(text: str) -> int:
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def line_starts(text: str) -> list[int]:
    """Offsets where LSP lines start (breaks: \\r\\n, \\r, \\n only)."""
    return [0] + [m.end() for m in _LINE_BREAK.finditer(text)]


def line_content_end(text: str, starts: list[int], line: int) -> int:
    if line + 1 < len(starts):
        end = starts[line + 1] - 1
        if end > starts[line] and text[end] == "\n" and text[end - 1] == "\r":
            end -= 1
        return end
    return len(text)


def position_of(text: str, offset: int, starts: list[int] | None = None) -> tuple[int, int]:
    """LSP (line, UTF-16 character) of a string offset that is a valid position."""
    starts = starts or line_starts(text)
    lo, hi = 0, len(starts) - 1
    while lo < hi:  # last start <= offset
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo, utf16_len(text[starts[lo]:offset])


def valid_offset(text: str, offset: int) -> int:
    """Move an offset off the middle of a "\\r\\n" pair (no LSP position points there)."""
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        return offset - 1
    return offset


# --- random text ------------------------------------------------------------------------
CODE = [
    "def f(x):\n", "    return x + 1\n", "import os\n", "class A:\n", "    pass\n", "for i in range(10):\n",
    "if x:\n", "print('hi')\n", "x = [1, 2, 3]\n", "{", "}", "(", ")", "[", "]", ":", " ", "    ", "\t",
    "function g(a) { return a; }\n", "const y = 2;\n", "# comment\n", '"""doc"""\n', "x", "y", "z", "self.",
]
ODD = [
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
    "\r\n", "\r", "\n", "\ud800", "\udfff", "\udc00x", "é", "中文", "😀", "\U0001f600\U0001f680", "\ufeff", "\u200b",
    "𝔘𝔫𝔦", "\U0010ffff",
]


def random_text(rng: random.Random, pieces: int | None = None) -> str:
    pieces = rng.randint(0, 12) if pieces is None else pieces
    out = []
    for _ in range(pieces):
        roll = rng.random()
        if roll < 0.7:
            out.append(rng.choice(CODE))
        elif roll < 0.97:
            out.append(rng.choice(ODD))
        else:
            out.append(rng.choice("abc ") * rng.randint(200, 4000))
    return "".join(out)


def code_text(rng: random.Random, chars: int) -> str:
    """About `chars` characters of plain code, as real source files hold."""
    out, size = [], 0
    while size < chars:
        piece = rng.choice(CODE[:9]) if rng.random() < 0.9 else f"value_{rng.randrange(10**6)} = {rng.random()!r}\n"
        out.append(piece)
        size += len(piece)
    return "".join(out)


# Settings a careless user or client sends: each is refused and the previous value kept.
BAD_SETTINGS = [
    {"parafill": {"steps": "many"}}, {"parafill": {"contextTokens": -5}}, {"parafill": {"confidenceThreshold": 2}},
    {"parafill": {"device": "tpu"}}, {"parafill": {"model": 42}}, {"parafill": {"enabledLanguages": "python"}},
    {"parafill": {"noSuchSetting": 1}}, {"parafill": {"debounceMs": 1.5}}, {"parafill": {"maxSnippets": 99}},
    {"parafill": {"verboseLogging": "yes"}}, {"parafill": {"spanTokensLine": 10**9}}, {"parafill": [1, 2]},
    {"parafill": "fast"}, 42, "settings", [], {"parafill": {"minConfidence": float("nan")}},
    {},  # no values: the server asks for them (workspace/configuration)
]


# --- the raw JSON-RPC pipe ----------------------------------------------------------------
@dataclass
class Expect:
    """What an answer to one request must look like."""

    op: str
    kinds: tuple[str, ...]  # "result" and/or error codes as str(int), "error" = any error
    sent: float
    check: Callable[[dict], str | None] | None = None  # extra check on the response; returns a failure


class LspPipe:
    """Frames JSON-RPC over a server process's stdin/stdout; answers the server's own requests."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path, cwd: str | None = None,
                 configuration: Any = None):
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     env=env, cwd=cwd)
        self.configuration = configuration
        # Sent once, in place of `configuration`, to the server's next workspace/configuration.
        self.next_configuration: list[Any] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition()
        self.responses: dict[Any, dict] = {}
        self.notifications: Counter[str] = Counter()
        self.shown: list[str] = []  # window/showMessage and logMessage texts (bounded)
        self.traceback_messages: list[str] = []
        self.bytes_received = 0
        self.read_error: str | None = None
        self._next_id = 0
        self._reader = threading.Thread(target=self._read_loop, name="soak-reader", daemon=True)
        self._reader.start()

    # sending
    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send_body(self, body: bytes, extra_headers: bytes = b"") -> None:
        frame = extra_headers + b"Content-Length: %d\r\n\r\n" % len(body) + body
        with self._lock:
            self.proc.stdin.write(frame)
            self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        # ensure_ascii: lone surrogates travel as \ud800 escapes, as a JS client would send them.
        self.send_body(json.dumps(message, ensure_ascii=True).encode("ascii"))

    def request(self, method: str, params: Any) -> int:
        msg_id = self.next_id()
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    # receiving
    def _read_loop(self) -> None:
        stream = self.proc.stdout
        try:
            while True:
                length = None
                while True:
                    header = stream.readline()
                    if not header:
                        return
                    if header in (b"\r\n", b"\n"):
                        break
                    name, _, value = header.decode("ascii").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                if length is None:
                    self.read_error = "a message without Content-Length"
                    return
                body = stream.read(length)
                self.bytes_received += len(body)
                self._dispatch(json.loads(body))
        except Exception as exc:  # a broken frame from the server is a failure the report shows
            self.read_error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._arrived:
                self._arrived.notify_all()

    def _dispatch(self, message: dict) -> None:
        text = json.dumps(message)
        if TRACEBACK.search(text):
            self.traceback_messages.append(text[:2000])
        if "method" in message and "id" in message:  # the server asks the client something
            method = message["method"]
            result: Any = None
            if method == "workspace/configuration":
                value = self.next_configuration.pop(0) if self.next_configuration else self.configuration
                result = [value for _ in message.get("params", {}).get("items", [])]
            self.send({"jsonrpc": "2.0", "id": message["id"], "result": result})
            self.notifications[method] += 1
        elif "method" in message:
            self.notifications[message["method"]] += 1
            if message["method"] in ("window/showMessage", "window/logMessage") and len(self.shown) < 200:
                self.shown.append(str(message.get("params", {}).get("message", ""))[:300])
        else:
            with self._arrived:
                self.responses[message.get("id")] = message
                self._arrived.notify_all()

    def wait_for(self, msg_id: Any, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while msg_id not in self.responses:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return self.responses.pop(msg_id, None)
                self._arrived.wait(min(left, 0.5))
            return self.responses.pop(msg_id)

    def take(self, msg_id: Any) -> dict | None:
        with self._arrived:
            return self.responses.pop(msg_id, None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def close(self, timeout: float = 20) -> int | None:
        """shutdown + exit; returns the exit code (None if it had to be killed)."""
        code = None
        try:
            if self.alive():
                msg_id = self.request("shutdown", None)
                self.wait_for(msg_id, timeout)
                self.notify("exit", None)
                self.proc.stdin.close()
            code = self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._stderr.close()
        return code


# --- the soak itself ----------------------------------------------------------------------
@dataclass
class SoakState:
    documents: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    pending: dict[int, Expect] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    op_seconds: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    view_checks: int = 0
    view_unverified: int = 0
    items: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, pipe: LspPipe, rng: random.Random, *, answer_timeout_s: float):
        self.pipe = pipe
        self.rng = rng
        self.state = SoakState()
        self.answer_timeout_s = answer_timeout_s
        self._doc_serial = 0

    # bookkeeping
    def fail(self, message: str) -> None:
        if len(self.state.failures) < 200:
            self.state.failures.append(message)

    def expect(self, msg_id: int, op: str, *kinds: str, check=None) -> None:
        self.state.pending[msg_id] = Expect(op, kinds, time.monotonic(), check)

    def judge(self, msg_id: int, expect: Expect, response: dict) -> None:
        self.state.latencies_ms.append((time.monotonic() - expect.sent) * 1000)
        if "error" in response:
            error = response["error"] or {}
            code = error.get("code")
            self.state.answers[f"error {code}"] += 1
            if not ("error" in expect.kinds or str(code) in expect.kinds):
                self.fail(f"{expect.op} (id {msg_id}): error {code} {str(error.get('message'))[:200]!r}, "
                          f"expected {expect.kinds}")
            if not isinstance(error.get("message"), str) or not isinstance(code, int):
                self.fail(f"{expect.op} (id {msg_id}): malformed error object {error!r:.200}")
            return
        if "result" not in response:
            self.fail(f"{expect.op} (id {msg_id}): neither result nor error: {response!r:.200}")
            return
        self.state.answers["result"] += 1
        if "result" not in expect.kinds:
            self.fail(f"{expect.op} (id {msg_id}): a result where an error was due ({expect.kinds})")
            return
        if expect.check is not None:
            problem = expect.check(response["result"])
            if problem:
                self.fail(f"{expect.op} (id {msg_id}): {problem}")

    def collect(self, wait: bool) -> None:
        """Judge every answer that arrived; with wait, every pending request must answer in time."""
        for msg_id in list(self.state.pending):
            expect = self.state.pending[msg_id]
            if wait:
                left = expect.sent + self.answer_timeout_s - time.monotonic()
                response = self.pipe.wait_for(msg_id, max(0.0, left))
            else:
                response = self.pipe.take(msg_id)
            if response is None:
                if wait:
                    del self.state.pending[msg_id]
                    self.fail(f"{expect.op} (id {msg_id}): no answer within {self.answer_timeout_s:.0f} s")
                continue
            del self.state.pending[msg_id]
            self.judge(msg_id, expect, response)

    # documents
    def new_uri(self, suffix: str = ".py") -> str:
        self._doc_serial += 1
        return f"file:///soak/doc{self._doc_serial}{suffix}"

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.state.documents[uri] = text
        self.state.versions[uri] = 1
        self.pipe.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": language, "version": 1, "text": text}})

    def close(self, uri: str) -> None:
        self.state.documents.pop(uri, None)
        self.state.versions.pop(uri, None)
        self.pipe.notify("textDocument/didClose", {"textDocument": {"uri": uri}})

    def change(self, uri: str, changes: list[dict], new_text: str) -> None:
        self.state.versions[uri] += 1
        self.state.documents[uri] = new_text
        self.pipe.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": self.state.versions[uri]}, "contentChanges": changes})

    def any_document(self) -> str:
        if not self.state.documents:
            self.open(self.new_uri(), random_text(self.rng, 20))
        return self.rng.choice(sorted(self.state.documents))

    def random_position(self, text: str, *, out_of_range: bool) -> dict:
        starts = line_starts(text)
        if out_of_range:
            line = self.rng.choice([len(starts), len(starts) + 5, 10**6, 2**31 - 1, self.rng.randrange(len(starts))])
            character = self.rng.choice([0, 10**6, 2**31 - 1, 5])
            return {"line": line, "character": character}
        offset = valid_offset(text, self.rng.randint(0, len(text)))
        line, character = position_of(text, offset, starts)
        return {"line": line, "character": character}

    # requests
    def completion_request(self, uri: str, position: dict, *, inline: bool, check=None) -> int:
        if inline:
            trigger = self.rng.choice([1, 2])  # Invoked, Automatic
            msg_id = self.pipe.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": trigger}})
        else:
            msg_id = self.pipe.request("textDocument/completion", {
                "textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 1}})
        self.expect(msg_id, "inlineCompletion" if inline else "completion", "result",
                    check=check or (lambda result: self.check_items(result)))
        return msg_id

    def check_items(self, result: Any) -> str | None:
        if not isinstance(result, dict) or not isinstance(result.get("items"), list):
            return f"result is not a completion list: {result!r:.200}"
        for item in result["items"]:
            self.state.items += 1
            text = item.get("insertText") if "insertText" in item else (item.get("textEdit") or {}).get("newText")
            if not isinstance(text, str):
                return f"item without text: {item!r:.200}"
        return None

    # --- operations ---------------------------------------------------------------------
    def op_incremental_edit(self) -> None:
        uri = self.any_document()
        text = self.state.documents[uri]
        a = valid_offset(text, self.rng.randint(0, len(text)))
        b = valid_offset(text, min(len(text), a + self.rng.choice([0, 0, 1, 3, 20, 200])))
        new = random_text(self.rng, self.rng.randint(0, 4))
        starts = line_starts(text)
        change = {"range": {"start": dict(zip(("line", "character"), position_of(text, a, starts))),
                            "end": dict(zip(("line", "character"), position_of(text, b, starts)))},
                  "text": new}
        self.change(uri, [change], text[:a] + new + text[b:])

    def op_typing_burst(self) -> None:
        """Several single-character edits in one didChange, as fast typing sends them."""
        uri = self.any_document()
        text = self.state.documents[uri]
        at = valid_offset(text, self.rng.randint(0, len(text)))
        changes = []
        for ch in self.rng.choice(["x", "if x", "ab\n", "def g():\n    ", "é😀"]):
            line, character = position_of(text, at)
            changes.append({"range": {"start": {"line": line, "character": character},
                                      "end": {"line": line, "character": character}}, "text": ch})
            text = text[:at] + ch + text[at:]
            at += 1
        self.change(uri, changes, text)
        self.completion_request(uri, self.random_position(text, out_of_range=False), inline=True)

    def op_full_edit(self) -> None:
        uri = self.any_document()
        new = random_text(self.rng, self.rng.randint(0, 30))
        self.change(uri, [{"text": new}], new)

    def op_open(self) -> None:
        if len(self.state.documents) >= 6:
            self.close(self.rng.choice(sorted(self.state.documents)))
        self.open(self.new_uri(self.rng.choice([".py", ".js", ".txt", ".rs"])), random_text(self.rng, 25),
                  self.rng.choice(["python", "javascript", "plaintext", "rust", "", "no-such-language"]))

    def op_complete(self, inline: bool) -> None:
        uri = self.any_document()
        text = self.state.documents[uri]
        self.completion_request(uri, self.random_position(text, out_of_range=self.rng.random() < 0.3), inline=inline)

    def op_cancel(self) -> None:
        uri = self.any_document()
        msg_id = self.pipe.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": self.random_position(self.state.documents[uri], out_of_range=False),
            "context": {"triggerKind": 1}})
        self.expect(msg_id, "cancelled inlineCompletion", "result", str(REQUEST_CANCELLED), check=self.check_items)
        time.sleep(self.rng.choice([0, 0, 0.001, 0.005, 0.02]))
        self.pipe.notify("$/cancelRequest", {"id": msg_id})

    def op_close_in_flight(self) -> None:
        uri = self.any_document()
        text = self.state.documents[uri]
        self.completion_request(uri, self.random_position(text, out_of_range=False), inline=self.rng.random() < 0.7)
        self.close(uri)
        if self.rng.random() < 0.5:  # reopened at once, as an editor does on reload
            self.open(uri, random_text(self.rng, 10))

    def op_unknown(self) -> None:
        if self.rng.random() < 0.5:
            msg_id = self.pipe.request(self.rng.choice(["parafill/noSuchThing", "textDocument/hover2", "$/soak"]),
                                       {"x": random_text(self.rng, 2)})
            self.expect(msg_id, "unknown method", str(METHOD_NOT_FOUND))
        else:
            self.pipe.notify(self.rng.choice(["parafill/unknownNotice", "$/setTrace", "$/soakNotice"]), {"value": 1})

    def op_invalid_params(self) -> None:
        uri = self.any_document()
        bad_positions = [{"line": -1, "character": 0}, {"line": 0, "character": -5}, {"line": "ten", "character": 0},
                         {"line": 0, "character": "3"}, {"line": 1.5, "character": 0}, {"line": None, "character": 0},
                         {"character": 0}, "here", None, {"line": 2**40, "character": 0}]
        method = self.rng.choice(["textDocument/inlineCompletion", "textDocument/completion"])
        params: Any = {"textDocument": {"uri": uri}, "position": self.rng.choice(bad_positions),
                       "context": {"triggerKind": 1}}
        roll = self.rng.random()
        if roll < 0.15:
            params = self.rng.choice([None, [], "params", 7])
        elif roll < 0.3:
            params = {"textDocument": {"uri": 42}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 1}}
        elif roll < 0.4:
            params["context"] = {"triggerKind": 99}
        msg_id = self.pipe.request(method, params)
        self.expect(msg_id, f"invalid params {method} {json.dumps(params)[:160]}", str(INVALID_PARAMS))

    def op_malformed(self) -> None:
        """Bytes no JSON-RPC peer should send; the server must shrug them off."""
        roll = self.rng.randrange(9)
        if roll == 0:
            self.pipe.send_body(b'{"jsonrpc": "2.0", "id": 1, "method": ')
        elif roll == 1:
            self.pipe.send_body(self.rng.choice([b"[]", b"null", b"42", b'"text"', b"[1, 2]", b"{}", b"true"]))
        elif roll == 2:
            self.pipe.send_body(b"\xff\xfe\x00garbage\x80")
        elif roll == 3:
            self.pipe.send_body(b'{"jsonrpc": "2.0", "method": "textDocument/didChange", "params": 5}')
        elif roll == 4:  # a request with a method that is not a string: some error, never silence
            msg_id = self.pipe.next_id()
            self.pipe.send_body(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": 5, "params": {}}).encode())
            self.expect(msg_id, "non-string method", "error")
        elif roll == 5:  # extra headers, as some clients send
            msg_id = self.pipe.next_id()
            self.pipe.send_body(json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "parafill/status"}).encode(),
                                extra_headers=b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n")
            self.expect(msg_id, "status with extra headers", "result", check=self.check_status)
        elif roll == 6:  # a change to a document that was never opened
            self.pipe.notify("textDocument/didChange", {"textDocument": {"uri": self.new_uri(), "version": 3},
                                                        "contentChanges": [{"text": "x"}]})
        elif roll == 7:  # invalid params in a notification: nothing to answer, nothing may change
            uri = self.any_document()
            self.pipe.notify("textDocument/didChange", {
                "textDocument": {"uri": uri, "version": 10**6},
                "contentChanges": [{"range": {"start": {"line": -1, "character": 0},
                                              "end": {"line": 0, "character": 0}}, "text": "never applied"}]})
        else:  # a response to a request the server never sent
            self.pipe.send({"jsonrpc": "2.0", "id": "no-such-request", "result": {"x": 1}})
        self.status_request()  # the server must still answer

    def op_oversized(self) -> None:
        """A 4 MB request to an unknown method, then a 4 MB whole-document edit."""
        msg_id = self.pipe.request("parafill/noSuchThing", {"blob": "x" * (4 << 20)})
        self.expect(msg_id, "oversized unknown method", str(METHOD_NOT_FOUND))
        uri = self.any_document()
        new = ("y = 1  # " + "z" * 90 + "\n") * (4 << 20 >> 7)
        self.change(uri, [{"text": new}], new)
        self.completion_request(uri, self.random_position(new, out_of_range=False), inline=True)
        self.change(uri, [{"text": "small again\n"}], "small again\n")

    def op_huge_document(self) -> None:
        """A 10 MB document: open, edit, ask, check, close."""
        line = "value = compute(alpha, beta)  # " + "é" * 10 + "\n"
        text = line * ((10 << 20) // len(line.encode("utf-8")))
        uri = self.new_uri()
        self.open(uri, text)
        self.op_edit_in(uri)
        self.completion_request(uri, self.random_position(self.state.documents[uri], out_of_range=False), inline=True)
        self.check_view(uri)
        self.collect(wait=True)
        self.close(uri)

    def op_long_lines(self) -> None:
        """1 MB lines, with NULs and control characters inside."""
        text = "s = '" + ("ab\x00c\x01" * (1 << 18)) + "'\n" + "t = " + "q" * (1 << 20)
        uri = self.new_uri()
        self.open(uri, text)
        for _ in range(2):
            self.op_edit_in(uri)
            self.completion_request(uri, self.random_position(self.state.documents[uri], out_of_range=False),
                                    inline=self.rng.random() < 0.5)
        self.check_view(uri)
        self.collect(wait=True)
        self.close(uri)

    # --- a working day: files come and go, edits land between requests ------------------
    def op_reopen(self) -> None:
        """Close a document and open it again under the same name with new text (an editor
        reloading a file changed on disk), then edit it and ask for a completion."""
        uri = self.any_document()
        self.close(uri)
        if self.rng.random() < 0.3:
            self.late_edit(uri)
        self.open(uri, random_text(self.rng, 25), self.rng.choice(["python", "javascript", "plaintext"]))
        self.op_edit_in(uri)
        text = self.state.documents[uri]
        self.completion_request(uri, self.random_position(text, out_of_range=self.rng.random() < 0.2),
                                inline=self.rng.random() < 0.7)

    def op_visit(self) -> None:
        """A file opened for a moment: a completion, an edit, another completion, closed at once
        (the second answer may still be running: the close supersedes it)."""
        uri = self.new_uri(self.rng.choice([".py", ".js", ".txt", ".rs"]))
        self.open(uri, random_text(self.rng, 25), self.rng.choice(["python", "javascript", "plaintext", "rust"]))
        self.completion_request(uri, self.random_position(self.state.documents[uri], out_of_range=False), inline=True)
        self.op_edit_in(uri)
        self.completion_request(uri, self.random_position(self.state.documents[uri], out_of_range=False),
                                inline=self.rng.random() < 0.5)
        self.close(uri)
        if self.rng.random() < 0.2:
            self.late_edit(uri)

    def late_edit(self, uri: str, text: str | None = None) -> None:
        """A whole-document edit to a document the client has just closed (a client racing its own
        close): bad input the server must drop, keeping nothing of it."""
        text = random_text(self.rng, 25) if text is None else text
        self.pipe.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 10**6},
                                                    "contentChanges": [{"text": text}]})

    def op_configuration(self) -> None:
        """Settings the server must refuse (each one keeps what it had), or an empty change
        that makes it ask for its settings, answered now and then with bad values too."""
        settings = self.rng.choice(BAD_SETTINGS)
        if settings == {} and self.rng.random() < 0.5:
            bad = self.rng.choice(BAD_SETTINGS)
            self.pipe.next_configuration.append(bad.get("parafill", bad) if isinstance(bad, dict) else bad)
        self.pipe.notify("workspace/didChangeConfiguration", {"settings": settings})

    def visit_files(self, n: int, *, file_chars: int = 0, late_edits: bool = False,
                    on_step: Callable[[int], None] = lambda i: None) -> None:
        """N distinct files, one after another: opened, completed in (the answer awaited),
        edited, completed in again, closed. `file_chars` pads each file with code to about that
        size; `late_edits` follows every close with a whole-document edit to the closed file."""
        self.status_request()
        self.collect(wait=True)
        for i in range(n):
            uri = self.new_uri(self.rng.choice([".py", ".js", ".rs"]))
            text = random_text(self.rng, 25)
            if file_chars > len(text):
                text = code_text(self.rng, file_chars - len(text)) + text
            self.state.ops["visit_file"] += 1
            self.open(uri, text, self.rng.choice(["python", "javascript", "rust"]))
            self.completion_request(uri, self.random_position(text, out_of_range=False), inline=True)
            self.collect(wait=True)
            self.op_edit_in(uri)
            self.completion_request(uri, self.random_position(self.state.documents[uri], out_of_range=False),
                                    inline=self.rng.random() < 0.5)
            self.collect(wait=True)
            self.close(uri)
            if late_edits:
                self.late_edit(uri, text)
            if i % 50 == 49:
                self.status_request()
            if not self.pipe.alive():
                self.fail(f"the server exited (code {self.pipe.proc.returncode}) at file {i}")
                return
            on_step(i)
        self.status_request()
        self.collect(wait=True)

    def close_all(self, timeout: float) -> dict[str, int]:
        """Close every document the client has open; returns what the server still holds per
        document once its closes have run (its status polled up to `timeout`), and fails the run
        if that is anything."""
        for uri in sorted(self.state.documents):
            self.close(uri)
        deadline = time.monotonic() + timeout
        while True:
            answer = self.pipe.wait_for(self.pipe.request("parafill/status", {}), timeout) or {}
            left = per_document_leftovers(answer.get("result") or {})
            if not left or time.monotonic() > deadline or not self.pipe.alive():
                break
            time.sleep(0.2)
        if left:
            self.fail(f"with every document closed, the server still holds per-document state: {left}")
        return left

    def op_edit_in(self, uri: str) -> None:
        text = self.state.documents[uri]
        a = valid_offset(text, self.rng.randint(0, len(text)))
        new = random_text(self.rng, 3)
        line, character = position_of(text, a)
        self.change(uri, [{"range": {"start": {"line": line, "character": character},
                                     "end": {"line": line, "character": character}}, "text": new}],
                    text[:a] + new + text[a:])

    def status_request(self) -> None:
        msg_id = self.pipe.request("parafill/status", {})
        self.expect(msg_id, "status", "result", check=self.check_status)

    @staticmethod
    def check_status(result: Any) -> str | None:
        if not isinstance(result, dict) or result.get("state") not in ("ready", "loading", "error"):
            return f"status is not a status report: {result!r:.200}"
        if result.get("state") != "ready":
            return f"model not ready: {result.get('message')}"
        return None

    def check_view(self, uri: str | None = None) -> None:
        """Compare the server's copy of a document with ours via clamped out-of-range positions.

        A completion range starts at the cursor the server clamped into its own copy:
        past the end of a line → that line's end; past the last line → the document's end.
        The answer only tells when the model offers an item; otherwise it counts as unverified.
        """
        self.collect(wait=True)  # nothing else in flight: the copies must agree now
        uri = uri or self.any_document()
        text = self.state.documents[uri]
        starts = line_starts(text)
        probes = [(len(starts) + 3, 0), (self.rng.randrange(len(starts)), 10**7)]
        for line, character in probes:
            if line >= len(starts):
                expected = (len(starts) - 1, utf16_len(text[starts[-1]:]))
            else:
                expected = (line, utf16_len(text[starts[line]:line_content_end(text, starts, line)]))
            inline = self.rng.random() < 0.5
            shown = repr(text[starts[expected[0]]:line_content_end(text, starts, expected[0])][-60:])
            msg_id = self.completion_request(
                uri, {"line": line, "character": character}, inline=inline,
                check=lambda result, e=expected, i=inline, s=shown: self.check_range(result, e, i, s))
            self.collect(wait=True) if msg_id in self.state.pending else None

    def check_range(self, result: Any, expected: tuple[int, int], inline: bool, shown: str = "") -> str | None:
        problem = self.check_items(result)
        if problem:
            return problem
        if not result["items"]:
            self.state.view_unverified += 1
            return None
        item = result["items"][0]
        rng = item["range"] if inline else item["textEdit"]["range"]
        got = (rng["start"]["line"], rng["start"]["character"])
        self.state.view_checks += 1
        if inline and "range" not in item:
            return "inline item without a range"
        if got != expected:
            return (f"the server's copy of the document differs from the client's: cursor clamped to {got}, "
                    f"expected {expected} (line {expected[0]} is {shown})")
        return None

    def op_view_check(self) -> None:
        self.check_view()

    def run(self, n: int, *, big_rounds: int = 1, on_step: Callable[[int], None] = lambda i: None) -> None:
        """N operations; the big ones (10 MB document, 1 MB lines, 4 MB messages) open each of
        `big_rounds` equal stretches of the run, the first round being the warm-up."""
        self.status_request()
        self.collect(wait=True)
        for _ in range(3):
            self.op_open()
        weights = {
            self.op_incremental_edit: 20, self.op_typing_burst: 8, self.op_full_edit: 4, self.op_open: 3,
            self.op_inline: 18, self.op_completion: 8, self.op_cancel: 8,
            self.op_close_in_flight: 4, self.op_unknown: 4, self.op_invalid_params: 6, self.op_malformed: 5,
            self.op_view_check: 6, self.op_status: 2,
            # A working day: files reopened and visited briefly, refused settings.
            self.op_reopen: 4, self.op_visit: 4, self.op_configuration: 2,
        }
        ops, cumulative = list(weights), list(weights.values())
        big: dict[int, Callable[[], None]] = {}
        for round_no in range(max(0, big_rounds)):
            start = round_no * n // max(1, big_rounds)
            for offset, op in enumerate((self.op_huge_document, self.op_long_lines, self.op_oversized)):
                big[start + offset] = op
        for i in range(n):
            op = big.get(i) or self.rng.choices(ops, cumulative)[0]
            name = op.__name__.removeprefix("op_")
            self.state.ops[name] += 1
            began = time.monotonic()
            op()
            self.state.op_seconds[name] += time.monotonic() - began
            self.collect(wait=len(self.state.pending) > 16)
            if not self.pipe.alive():
                self.fail(f"the server exited (code {self.pipe.proc.returncode}) during operation {i} ({name})")
                return
            on_step(i)
        self.collect(wait=True)
        for uri in sorted(self.state.documents):
            self.check_view(uri)
        self.status_request()
        self.collect(wait=True)

    def op_inline(self) -> None:
        self.op_complete(inline=True)

    def op_completion(self) -> None:
        self.op_complete(inline=False)

    def op_status(self) -> None:
        self.status_request()


@dataclass
class Session:
    """A started, initialized server with a model loaded (or failed to load), and its files."""

    pipe: LspPipe
    soak: Soak
    scratch: Path
    options: dict
    status: dict = field(default_factory=dict)
    exit_code: int | None = None
    alive_at_end: bool = False
    log_text: str = ""

    def server_output(self) -> str:
        """Everything the server wrote to stderr and its log file (after the session ends)."""
        parts = [p.read_text(errors="replace") for p in (self.scratch / "stderr.txt", self.scratch / "server.log")
                 if p.exists()]
        return "\n".join(parts)


def initialize_params(options: dict, root_uri: str | None = None) -> dict:
    return {
        "processId": os.getpid(), "rootUri": root_uri, "initializationOptions": options,
        "capabilities": {"window": {"workDoneProgress": True},
                         "workspace": {"configuration": True},
                         "textDocument": {"inlineCompletion": {}, "completion": {},
                                          "synchronization": {"didSave": False}},
                         "general": {"positionEncodings": ["utf-16"]}},
    }


@contextmanager
def session(
    model_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    settings: dict | None = None,
    answer_timeout_s: float = 60.0,
    server_argv: list[str] | None = None,
    extra_args: list[str] = (),
    env: dict[str, str] | None = None,
    work_dir: str | Path | None = None,
    root_uri: str | None = None,
    wait_states: tuple[str, ...] = ("ready",),
    scratch: str | Path | None = None,
):
    """Start `python -m lsp_server serve`, initialize it, wait for the model; yields a `Session`.

    Shuts the server down on exit; `Session.exit_code` and `alive_at_end` tell how it went.
    The server's stderr and its --log-file (info level) land in the scratch directory.
    """
    with tempfile.TemporaryDirectory(prefix="parafill-soak-") as own_scratch:
        scratch_path = Path(scratch or own_scratch)
        scratch_path.mkdir(parents=True, exist_ok=True)
        options = {"parafill": {**SOAK_SETTINGS, **(settings or {}), "model": str(model_dir)}}
        argv = server_argv or [sys.executable, "-m", "lsp_server", "serve", "--device", device,
                               "--log-level", "info", "--log-file", str(scratch_path / "server.log"), *extra_args]
        run_env = dict(env or os.environ)
        run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH")]))
        pipe = LspPipe(argv, run_env, scratch_path / "stderr.txt", cwd=str(work_dir or scratch_path),
                       configuration=options["parafill"])
        soak = Soak(pipe, random.Random(seed), answer_timeout_s=answer_timeout_s)
        current = Session(pipe, soak, scratch_path, options)
        try:
            answer = pipe.wait_for(pipe.request("initialize", initialize_params(options, root_uri)), answer_timeout_s)
            if answer is None or "result" not in answer:
                soak.fail(f"initialize failed: {answer!r:.300}")
            else:
                pipe.notify("initialized", {})
                current.status = _wait_ready(pipe, answer_timeout_s * 2, soak, wait_states)
            yield current
        finally:
            current.alive_at_end = pipe.alive()
            current.exit_code = pipe.close()
            if not current.alive_at_end:
                soak.fail(f"the server was not running at the end (exit code {pipe.proc.returncode})")
            elif current.exit_code != 0:
                soak.fail(f"shutdown/exit did not end the server cleanly (exit code {current.exit_code})")
            if pipe.read_error:
                soak.fail(f"the server's output could not be read: {pipe.read_error}")
            for text in pipe.traceback_messages[:5]:
                soak.fail(f"a traceback reached the client: {text[:300]}")
            current.log_text = current.server_output()


def run_soak(
    n: int,
    seed: int = 0,
    model_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    settings: dict | None = None,
    answer_timeout_s: float = 60.0,
    rss_growth_limit_mb: float = 64.0,
    big_rounds: int = 1,
    traffic: str = "mixed",
    file_chars: int = 0,
    late_edits: bool = False,
    checkpoints: tuple[int, ...] = (),
    rss_target: tuple[int, float] | None = None,
    progress: Callable[[str], None] | None = None,
    **session_options: Any,
) -> dict:
    """Run N random operations against a fresh `python -m lsp_server serve`; returns the report.

    traffic "mixed": N operations of every kind (`Soak.run`); "files": N distinct files
    opened, completed in and closed (`Soak.visit_files`, with `file_chars` and `late_edits`).
    The server's RSS is read after every operation: `memory.rss_mb_by_ops` draws it,
    `memory.checkpoints_mb` holds it after each of `checkpoints` operations and at the
    end, and `rss_target` (ops, MB) fails the run if the end passes the reading after
    `ops` operations by more than MB. model_dir None builds a tiny random model in a
    temporary directory (the soak tests the server, not the model). `report["failures"]`
    is empty on success.
    """
    if traffic not in TRAFFIC:
        raise ValueError(f"traffic must be one of {', '.join(TRAFFIC)}, got {traffic!r}")
    marks = sorted({k for k in (*checkpoints, *(rss_target[:1] if rss_target else ())) if 0 < k <= n})
    with tempfile.TemporaryDirectory(prefix="parafill-soak-model-") as model_scratch:
        if model_dir is None:
            from tools.tiny_native import make_tiny_model  # only here: the soak itself needs no torch

            model_dir = make_tiny_model(Path(model_scratch) / "tiny-model")
        elif Path(model_dir).exists():  # the server runs in a scratch directory: no relative paths
            model_dir = Path(model_dir).resolve()
        rss: list[tuple[int, int]] = []
        marked: dict[str, float] = {}
        left_after_close: dict[str, int] | None = None
        end_status: dict = {}
        started = time.monotonic()
        duration = 0.0
        with session(model_dir, seed=seed, device=device, settings=settings, answer_timeout_s=answer_timeout_s,
                     **session_options) as current:
            pipe, soak = current.pipe, current.soak
            ready_at = time.monotonic()
            warm_up = 3 if big_rounds and traffic == "mixed" else 0  # the first round of big operations
            unit = "operations" if traffic == "mixed" else "files"

            reported = [0]  # failures already shown: a long run tells each one as it happens

            def on_step(i: int) -> None:
                if progress and len(soak.state.failures) > reported[0]:
                    for message in soak.state.failures[reported[0]:]:
                        progress(f"failure after {i + 1} {unit}: {message[:600]}")
                    reported[0] = len(soak.state.failures)
                kb = pipe.rss_kb()
                if kb is not None and i >= warm_up:
                    rss.append((i + 1, kb))
                if kb is not None and i + 1 in marks:
                    marked[str(i + 1)] = round(kb / 1024, 1)
                if progress and (i + 1) % max(1, n // 20) == 0:
                    progress(f"{i + 1}/{n} {unit}, {len(soak.state.failures)} failures, "
                             f"RSS {kb / 1024 if kb else 0:.0f} MB")

            if not soak.state.failures:
                if traffic == "mixed":
                    soak.run(n, big_rounds=big_rounds, on_step=on_step)
                else:
                    soak.visit_files(n, file_chars=file_chars, late_edits=late_edits, on_step=on_step)
                answer = pipe.wait_for(pipe.request("parafill/status", {}), answer_timeout_s) or {}
                end_status = answer.get("result") or {}
                kb = pipe.rss_kb()
                if kb is not None:
                    marked["end"] = round(kb / 1024, 1)
                left_after_close = soak.close_all(answer_timeout_s)
            duration = time.monotonic() - ready_at
        total = time.monotonic() - started

    state = soak.state
    memory = _memory_figures(rss, rss_growth_limit_mb)
    if memory.get("growing"):
        soak.fail(f"resident memory still grows: first half max {memory['first_half_max_mb']} MB, "
                  f"second half max {memory['second_half_max_mb']} MB")
    memory["checkpoints_mb"] = marked
    memory["rss_mb_by_ops"] = _thinned(rss)
    if rss_target is not None:
        memory["target"] = _check_target(marked, rss_target, soak)
    latencies = sorted(state.latencies_ms)

    def pct(p: int) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))], 1) if latencies else None

    return {
        "operations": n,
        "traffic": traffic,
        **({"file_chars": file_chars, "late_edits": late_edits} if traffic == "files" else {}),
        "seed": seed,
        "machine": machine(),
        "duration_s": round(duration, 2),
        "total_s": round(total, 2),
        "failures": state.failures,
        "ops": dict(state.ops),
        "op_seconds": {k: round(v, 2) for k, v in state.op_seconds.most_common()},
        "answers": dict(state.answers),
        "latency_ms": {"p50": pct(50), "p99": pct(99), "max": pct(100)},
        "items": state.items,
        "view_checks": state.view_checks,
        "view_unverified": state.view_unverified,
        "notifications": dict(pipe.notifications),
        "memory": memory,
        # What the server held at the end, by its own account (parafill/status).
        "server_caches": end_status.get("caches"),
        "server_open_documents": end_status.get("openDocuments"),
        # What it still held per document once the client had closed every document (nothing, or a failure).
        "server_left_after_closing_all": left_after_close,
        "exit_code": current.exit_code,
        "server_log_tracebacks": len(TRACEBACK.findall(current.log_text)),
        "bytes_received": pipe.bytes_received,
    }


TRAFFIC = ("mixed", "files")
# The caches of `parafill/status` that hold entries per open document (the others are keyed by text).
PER_DOCUMENT_CACHES = ("typedAhead", "contextKv", "draftsIndex")


def per_document_leftovers(status: dict) -> dict[str, int]:
    """Entries a server's status shows per document: documents, and per-document cache entries."""
    caches = status.get("caches") or {}
    left = {name: caches[name]["entries"] for name in PER_DOCUMENT_CACHES
            if isinstance(caches.get(name), dict) and caches[name].get("entries")}
    documents = (status.get("openDocuments") or {}).get("count")
    if documents:
        left["openDocuments"] = documents
    return left


def _check_target(marked: dict[str, float], target: tuple[int, float], soak: Soak) -> dict:
    """RSS at the end against RSS after `ops` operations plus `mb`; a miss is a failure."""
    ops, mb = target
    base, end = marked.get(str(ops)), marked.get("end")
    if base is None or end is None:
        soak.fail(f"no RSS reading after {ops} operations and at the end to check the target against")
        return {"after_ops": ops, "max_growth_mb": mb, "met": False}
    growth = round(end - base, 1)
    if growth > mb:
        soak.fail(f"resident memory grew {growth} MB after the first {ops} operations ({base} -> {end} MB); "
                  f"at most {mb} MB is allowed")
    return {"after_ops": ops, "max_growth_mb": mb, "growth_mb": growth, "met": growth <= mb}


def _thinned(rss: list[tuple[int, int]], points: int = 400) -> list[list[float]]:
    """[ops, MB] pairs, at most about `points` of them (the last reading always kept)."""
    if not rss:
        return []
    every = max(1, len(rss) // points)
    kept = rss[::every] + ([rss[-1]] if (len(rss) - 1) % every else [])
    return [[i, round(kb / 1024, 1)] for i, kb in kept]


def machine() -> str:
    """The CPU and core count, named beside the absolute figures of a report."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def plot_memory(report: dict, path: str | Path) -> bool:
    """Draw the server's RSS against operations into a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    memory = report["memory"]
    points = memory.get("rss_mb_by_ops") or []
    unit = "files opened, completed in and closed" if report.get("traffic") == "files" else "operations"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label="server RSS")
    for name, mb in memory.get("checkpoints_mb", {}).items():
        if name != "end":
            ax.plot([int(name)], [mb], "o", color="black")
            ax.annotate(f"{mb:.0f} MB", (int(name), mb), textcoords="offset points", xytext=(4, 6), fontsize=8)
    target = memory.get("target")
    base = memory.get("checkpoints_mb", {}).get(str(target["after_ops"])) if target else None
    if target and base is not None:
        ax.axhline(base + target["max_growth_mb"], ls="--", color="red", lw=1,
                   label=f"target: at most {target['max_growth_mb']:.0f} MB above the reading after "
                         f"{target['after_ops']:,}")
    ax.set_xlabel(unit)
    ax.set_ylabel("resident memory (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"parafill server memory, {report.get('traffic', 'mixed')} traffic, {report['operations']:,} "
                 f"{'files' if report.get('traffic') == 'files' else 'operations'}\n{report.get('machine', '')}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _wait_ready(pipe: LspPipe, timeout: float, soak: Soak, states: tuple[str, ...] = ("ready",)) -> dict:
    deadline = time.monotonic() + timeout
    result: dict = {}
    while time.monotonic() < deadline:
        answer = pipe.wait_for(pipe.request("parafill/status", {}), timeout) or {}
        result = answer.get("result") or {}
        state = result.get("state")
        if state in states:
            return result
        if state == "error" or not pipe.alive():
            soak.fail(f"the model did not load: {result.get('message')}")
            return result
        time.sleep(0.2)
    soak.fail(f"the model was not ready after {timeout:.0f} s: {result.get('message')}")
    return result


def _memory_figures(rss: list[tuple[int, int]], limit_mb: float) -> dict:
    """Peak RSS of each half of the run after the warm-up; growing if the second half's peak passes the first's by more
    than limit_mb (or 10%): bounded caches flatten out, leaks keep climbing."""
    if len(rss) < 4:
        return {"samples": len(rss)}
    half = len(rss) // 2
    first = max(kb for _, kb in rss[:half]) / 1024
    second = max(kb for _, kb in rss[half:]) / 1024
    allowed = max(limit_mb, 0.1 * first)
    return {"samples": len(rss), "first_half_max_mb": round(first, 1), "second_half_max_mb": round(second, 1),
            "end_mb": round(rss[-1][1] / 1024, 1), "growth_mb": round(second - first, 1),
            "allowed_growth_mb": round(allowed, 1), "growing": second - first > allowed}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parafill bench --soak",
                                     description="Replay N random editor operations against a real parafill server.")
    parser.add_argument("--soak", "-n", type=int, dest="n", default=None, metavar="N", help="operations (e.g. 10000)")
    parser.add_argument("count", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory (default: a tiny random model, so the run measures the server)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds each request may take (default 60)")
    parser.add_argument("--big-rounds", type=int, default=None,
                        help="rounds of big operations (10 MB document, 1 MB lines, 4 MB messages); "
                             "default: one per 2000 operations, at least one")
    parser.add_argument("--traffic", choices=TRAFFIC, default="mixed",
                        help="mixed: N operations of every kind (default); files: N distinct files, each opened, "
                             "completed in, edited, completed in again and closed")
    parser.add_argument("--file-chars", type=int, default=0, metavar="CHARS",
                        help="--traffic files: pad each file with code to about this many characters")
    parser.add_argument("--late-edits", action="store_true",
                        help="--traffic files: follow each close with a whole-document edit to the closed file")
    parser.add_argument("--checkpoints", default="", metavar="OPS,...",
                        help="also record the server's RSS after these many operations (e.g. 500,5000)")
    parser.add_argument("--rss-target", default=None, metavar="OPS:MB",
                        help="fail the run if the server's RSS at the end passes its RSS after OPS operations "
                             "by more than MB (e.g. 5000:64)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the report here, and the server's RSS against operations beside it (.png)")
    return parser


def command_line(given: list[str]) -> str:
    """The command that made a report, with what else shaped its figures: the environment
    variables the server reads for threads and malloc, and the process's niceness."""
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")
           if name in os.environ]
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    return " ".join([*env, *(["nice", "-n", str(niceness)] if niceness else []), "parafill", "bench", "--soak", *given])


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace(" ", "").split(",") if part)


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    n = args.n if args.n is not None else args.count
    if not n or n < 1:
        print("parafill: error: --soak N needs a positive number of operations, e.g. --soak 10000", file=sys.stderr)
        return 2
    big_rounds = args.big_rounds if args.big_rounds is not None else max(1, n // 2000)
    try:
        checkpoints = _ints(args.checkpoints)
        target = None
        if args.rss_target:
            ops, _, mb = args.rss_target.partition(":")
            target = (int(ops), float(mb))
    except ValueError:
        print("parafill: error: --checkpoints takes whole numbers separated by commas (500,5000) and "
              "--rss-target OPS:MB (5000:64)", file=sys.stderr)
        return 2
    report = run_soak(n, args.seed, args.model, device=args.device, answer_timeout_s=args.timeout, big_rounds=big_rounds,
                      traffic=args.traffic, file_chars=args.file_chars, late_edits=args.late_edits,
                      checkpoints=checkpoints, rss_target=target,
                      progress=lambda line: print(f"soak: {line}", file=sys.stderr, flush=True))
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["--operations"]:  # as `parafill bench --soak N` forwards it
        given = given[1:]
    report["command"] = command_line(given)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        png = Path(args.json).with_suffix(".png")
        if plot_memory(report, png):
            print(f"soak: wrote {args.json} and {png}", file=sys.stderr)
    failures = report["failures"]
    unit = "operations" if args.traffic == "mixed" else "files"
    print(f"soak: {n} {unit} in {report['duration_s']} s, {len(failures)} failures, server RSS "
          f"{report['memory'].get('checkpoints_mb', {})} MB", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
