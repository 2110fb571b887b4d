"""The parafill language server: pygls 2.x, lsprotocol types end to end.

Handlers are a few lines each: read the params, ask `ParafillServer` for a
`Placed` suggestion (computed by `lsp_server.suggest` on the model thread), map
it to lsprotocol types. Features: incremental sync, `textDocument/inlineCompletion`
(debounced when automatic), `textDocument/completion` as the fallback,
settings from `initializationOptions` and `workspace/didChangeConfiguration`,
background model loading with `$/progress`, and `parafill/status`.

The server never edits a document, opens no socket but the one to a team engine
the user configured (`lsp_server.engine_client`), and never runs torch
on the event loop (see `lsp_server.worker`). Bad input gives an empty result;
malformed params get a JSON-RPC InvalidParams error.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from typing import Any
from urllib.parse import unquote

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import JsonRPCRequestMessage
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument, Workspace

from fim import resolve_language
from fim.languages import code_file_glob
from fim.snippets import cache_stats as snippet_cache_stats
from lsp_server.logs import UNPARSABLE, set_verbose
from lsp_server.settings import Settings, latency_budget_ms, named_settings, parse_settings, to_wire
from lsp_server.status import ServerStats, status_report
from lsp_server.suggest import Placed, place_suggestion
from lsp_server.workspace_drafts import WorkspaceDrafts
from lsp_server.worker import ModelChoice, ModelWorker, Superseded, Supersession

log = logging.getLogger(__name__)

VERSION = "0.1.0"
STATUS = "parafill/status"
MAX_OTHER_DOCUMENTS = 16  # open documents offered to the snippet search
# An explicit request that arrives while the model loads waits this long for it at most
# (PARAFILL_LOAD_WAIT_S overrides it); an automatic one no longer than its debounce and budget.
DEFAULT_LOAD_WAIT_S = 10.0


def load_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get("PARAFILL_LOAD_WAIT_S", DEFAULT_LOAD_WAIT_S)))
    except ValueError:
        return DEFAULT_LOAD_WAIT_S


LOAD_WAIT_S = load_wait_s()


class _Rejected:
    """Stands in for a request whose params could not be read; it was answered already."""

    jsonrpc = "rejected"

    def __repr__(self) -> str:
        return "<rejected request>"


MAX_POSITION = 2**31 - 1  # LSP's uinteger


def _strict_position(value: Any, _type: Any) -> types.Position:
    # lsprotocol's converter turns "3" into 3, 1.5 into 1 and True into 1; a
    # position the client got that wrong is InvalidParams, not a guess.
    if not isinstance(value, dict):
        raise TypeError("a position must be an object with line and character")
    for name in ("line", "character"):
        number = value.get(name)
        if type(number) is not int or not 0 <= number <= MAX_POSITION:
            raise ValueError(f"position.{name} must be a whole number from 0 to {MAX_POSITION}")
    return types.Position(line=value["line"], character=value["character"])


def _strict_document_id(value: Any, _type: Any) -> types.TextDocumentIdentifier:
    if not isinstance(value, dict) or not isinstance(value.get("uri"), str):
        raise TypeError("textDocument.uri must be a string")  # not 42 read as "42"
    return types.TextDocumentIdentifier(uri=value["uri"])


_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


class LspLinesDocument(TextDocument):
    """pygls splits lines with `str.splitlines`, which also breaks at form feed,
    U+2028, \\x1c-\\x1e and \\x85; LSP lines end at \\r\\n, \\r and \\n only, so an
    incremental edit after such a character landed on the wrong line and the
    server's copy drifted from the editor's (found by `parafill bench --soak`)."""

    @property
    def lines(self):
        return tuple(_LSP_LINE.findall(self.source))


class LspLinesWorkspace(Workspace):
    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None):
        return LspLinesDocument(doc_uri, source=source, version=version, language_id=language_id,
                                sync_kind=self._sync_kind, position_codec=self._position_codec)


class ParafillProtocol(LanguageServerProtocol):
    """pygls's protocol with the fixes this server relies on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._converter.register_structure_hook(types.Position, _strict_position)
        self._converter.register_structure_hook(types.TextDocumentIdentifier, _strict_document_id)

    def structure_message(self, data: dict[str, Any]):
        # pygls 2.1.1 raises inside the JSON reader when a request's params do not
        # match their type (a negative line, a string for a number), and the
        # request is never answered; answer it with InvalidParams instead.
        if "jsonrpc" in data and "method" in data and not isinstance(data["method"], str):
            log.warning("dropped a message whose method is not a string")
            if "id" in data:
                error = JsonRpcInvalidRequest("the method of a JSON-RPC request must be a string")
                self._send_response(data["id"], error=error.to_response_error())
            return _Rejected()
        if "jsonrpc" in data and "id" in data and "method" in data and "error" not in data:
            if "params" not in data:  # JSON-RPC lets a request omit params
                data = {**data, "params": None}
            message_type = self.get_message_type(data["method"]) or JsonRPCRequestMessage
            try:
                return self._converter.structure(data, message_type)
            except Exception as exc:
                details = _validation_details(exc)
                log.warning("invalid params for %s: %s", data["method"], details)
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {details}")
                self._send_response(data["id"], error=error.to_response_error())
                return _Rejected()
        if "jsonrpc" in data and "method" in data and "id" not in data:
            # A malformed notification has nobody to answer; pygls would log a
            # multi-page traceback for each one, so say it in one line instead.
            message_type = self.get_message_type(data["method"])
            if message_type is not None:
                try:
                    return self._converter.structure(data, message_type)
                except Exception as exc:
                    log.warning("dropped malformed %s notification: %s", data["method"], _validation_details(exc))
                    return _Rejected()
        return super().structure_message(data)

    def handle_message(self, message):
        if isinstance(message, _Rejected):
            return
        if not hasattr(message, "jsonrpc"):
            # Valid JSON but no JSON-RPC message (a number, a list, {}): JSON-RPC 2.0 asks
            # for InvalidRequest with a null id, since no id could be read.
            log.warning("answered InvalidRequest to a message that is not JSON-RPC 2.0")
            error = JsonRpcInvalidRequest("not a JSON-RPC 2.0 message")
            self._send_response(None, error=error.to_response_error())
            return
        super().handle_message(message)

    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        # pygls 2.1.1 files the future of every handler that is not a plain function in
        # `_request_futures` and takes it out again only when it answers a request: the
        # future of each notification (didOpen, didChange, didClose run through pygls's
        # own generator handlers) stayed there for good, and one that failed (an edit to a
        # closed document) kept its traceback, frames and edit text with it.
        def done(future):
            if self._request_futures.get(msg_id) is future:
                self._request_futures.pop(msg_id, None)
            callback(future)
            # Answered or reported: the error's traceback (frames holding the message's
            # params) would otherwise stay in a reference cycle until a full collection.
            error = None if future.cancelled() else future.exception()
            while error is not None:
                error.__traceback__ = None
                error = error.__cause__ or error.__context__

        return super()._execute_handler(msg_id, handler, done, args, kwargs)

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        # fim counts positions in UTF-16 code units, the encoding every client
        # must support; without this pygls would pick the client's first choice
        # (Neovim offers UTF-8 first).
        general = params.capabilities.general
        if general is not None and general.position_encodings is not None:
            general.position_encodings = [types.PositionEncodingKind.Utf16]
        result = yield from super().lsp_initialize(params)
        self._workspace.__class__ = LspLinesWorkspace  # pygls has no hook for its document class
        return result


def _validation_details(exc: Exception) -> str:
    try:
        details = "; ".join(cattrs.transform_error(exc))
    except Exception:
        details = str(exc)
    return details[:500] or type(exc).__name__


class ParafillServer(LanguageServer):
    def __init__(self, model: str | None = None, device: str = "auto", engine: str | None = None,
                 engine_token_file: str | None = None):
        super().__init__("parafill", VERSION, protocol_cls=ParafillProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.cli_model = model or ""
        self.cli_device = device
        self.cli_engine = engine or ""  # `serve --engine URL`: a team engine fills (the `engine` setting wins)
        self.cli_engine_token_file = engine_token_file or ""
        self.initial_settings = Settings(device=device)
        # The settings the editor gave a value (the rest come from the command line or defaults).
        self.editor_settings: frozenset[str] = frozenset()
        self._initial_editor_settings: frozenset[str] = frozenset()
        # Settings problems shown and still present in what the editor sends: not shown again.
        self._shown_problems: set[str] = set()
        self.settings = self.initial_settings
        self.worker = ModelWorker()
        self.tickets = Supersession()
        self.stats = ServerStats()
        self._tasks: set[asyncio.Task] = set()
        self._progress_tokens = 0
        self.pending_problems: list[str] = []  # settings problems found in initialize, shown after it
        self.drafts = WorkspaceDrafts()  # your code, for drafts (read in the background)
        self._watching_code_files = False  # the editor was asked to report code files changed on disk

    # --- settings and model -------------------------------------------------------
    def report_server_error(self, error: Exception, source: Any) -> None:
        if isinstance(error, UNPARSABLE) and source is JsonRpcException:  # the reader's error, not a handler's
            # The frame's body is not JSON: JSON-RPC 2.0 asks for ParseError with a null id.
            log.warning("answered ParseError to a frame that is not JSON: %s", type(error).__name__)
            self.protocol._send_response(None, error=JsonRpcParseError(str(error)).to_response_error())
            return
        super().report_server_error(error, source)

    def model_choice(self) -> ModelChoice:
        return ModelChoice(model=self.settings.model or self.cli_model, device=self.settings.device,
                           engine=self.settings.engine or self.cli_engine,
                           engine_token_file=self.settings.engine_token_file or self.cli_engine_token_file,
                           engine_fallback=self.settings.engine_fallback,
                           open_model_weights=self.settings.open_model_weights)

    def apply_settings(self, raw: Any, *, initial: bool = False) -> list[str]:
        """Take new settings (layered over the initialization options); returns the problems."""
        base = Settings(device=self.initial_settings.device) if initial else self.initial_settings
        settings, problems = parse_settings(raw, base)
        named = named_settings(raw)
        if initial:
            self.initial_settings = settings
            self._initial_editor_settings = named
        self.editor_settings = self._initial_editor_settings | named
        self.settings = settings
        set_verbose(settings.verbose_logging)
        self.drafts.set_enabled(settings.repo_drafts)
        self.worker.threads = settings.threads  # for the next load; a loaded model: `change_settings`
        self.worker.keystroke_cache = settings.open_model_keystroke_cache
        return problems

    def change_settings(self, raw: Any) -> None:
        before, threads = self.model_choice(), self.settings.threads
        keystroke_cache = self.settings.open_model_keystroke_cache
        self.warn(self.apply_settings(raw))
        if self.settings.repo_drafts and not self._watching_code_files:
            self.spawn(self.watch_code_files())
        if self.model_choice() != before and self.worker.state != "idle":
            self.spawn(self.load_model())
            return
        if self.settings.threads != threads:
            self.spawn(self.worker.set_threads(self.settings.threads))
        if self.settings.open_model_keystroke_cache != keystroke_cache:
            self.spawn(self.worker.set_keystroke_cache(self.settings.open_model_keystroke_cache))

    async def watch_code_files(self) -> None:
        """With drafts on, ask the editor to report code files changed on disk (the index re-reads them),
        if it lets a server register the watch."""
        workspace = self.client_capabilities.workspace if self.client_capabilities else None
        watched = workspace.did_change_watched_files if workspace else None
        if not (watched and watched.dynamic_registration) or self._watching_code_files or not self.settings.repo_drafts:
            return
        self._watching_code_files = True
        watcher = types.FileSystemWatcher(glob_pattern=code_file_glob())
        registration = types.Registration(
            id="parafill-code-files", method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES,
            register_options=types.DidChangeWatchedFilesRegistrationOptions(watchers=[watcher]))
        try:
            await asyncio.wait_for(self.client_register_capability_async(
                types.RegistrationParams(registrations=[registration])), timeout=5)
        except Exception as exc:  # the index still follows saves and open documents
            self._watching_code_files = False
            log.info("the editor did not watch code files for changes: %s", exc)

    async def pull_configuration(self) -> None:
        """`workspace/configuration` for clients that send a change without the values."""
        workspace = self.client_capabilities.workspace if self.client_capabilities else None
        if not (workspace and workspace.configuration):
            return
        try:
            items = [types.ConfigurationItem(section="parafill")]
            reply = await asyncio.wait_for(
                self.workspace_configuration_async(types.ConfigurationParams(items=items)), timeout=5)
        except Exception as exc:
            log.info("workspace/configuration failed: %s", exc)
            return
        self.change_settings(reply[0] if reply else None)

    def warn(self, problems: list[str]) -> None:
        """Show the settings problems the user has not seen yet. Clients send the same settings
        more than once (Neovim sends its settings again in didChangeConfiguration right after
        initialize), and a problem repeated is reported once; one that went away and came back is new."""
        fresh = [problem for problem in problems if problem not in self._shown_problems]
        self._shown_problems = set(problems)
        for problem in fresh:
            log.warning("%s", problem)
        if fresh:
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message="\n".join(fresh)))

    def explain_load_error(self, exc: Exception) -> str:
        """Why the model did not load, and the fix in the editor's terms (an editor setting, not a flag)."""
        lines = str(exc).strip().splitlines()
        reason = (lines[0] if lines else "") or type(exc).__name__
        if getattr(exc, "setting", None) == "device":
            came_from = "" if "device" in self.editor_settings else \
                f" (it overrides the --device {self.cli_device} the server was started with)"
            reason += f'; set parafill\'s `device` setting to "cpu" or "auto"{came_from}'
        return reason

    def spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def load_model(self) -> None:
        choice = self.model_choice()
        title = f"connecting to {choice.engine}" if choice.engine else f"loading {choice.model or 'the default model'}"
        report = await self._progress_begin(f"parafill: {title}")
        await self.worker.load(choice, report, explain=self.explain_load_error, notify=self.engine_event)
        if self.worker.state == "error":
            what = "cannot use the team engine" if choice.engine else "the model did not load"
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Error, message=f"parafill: {what}: {self.worker.message}"))
        log.info("model: %s (%s)", self.worker.state, self.worker.message)
        report(self.worker.message, None, end=True)

    async def _progress_begin(self, title: str):
        """Start a `$/progress` sequence if the client supports it; returns `report`."""
        window = self.client_capabilities.window if self.client_capabilities else None
        if not (window and window.work_done_progress):
            return lambda message, percent=None, end=False: None
        self._progress_tokens += 1
        token = f"parafill/load/{self._progress_tokens}"
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), timeout=5)
        except Exception as exc:  # the client refused or never answered: no progress, still load
            log.info("no progress reporting: %s", exc)
            return lambda message, percent=None, end=False: None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, percentage=0, cancellable=False))

        def report(message: str, percent: int | None = None, end: bool = False) -> None:
            if end:
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
            else:
                self.work_done_progress.report(token, types.WorkDoneProgressReport(message=message, percentage=percent))

        return report

    # --- suggestions ----------------------------------------------------------------
    def open_document(self, uri: str):
        try:
            return self.workspace.text_documents.get(unquote(uri))
        except RuntimeError:  # not initialized
            return None

    def language_enabled(self, document) -> bool:
        enabled = self.settings.enabled_languages
        if not enabled:
            return True
        language_id = (document.language_id or "").lower()
        return language_id in enabled or resolve_language(language_id, document.uri) in enabled

    def latency_budget_ms(self) -> int:
        """The latency budget of a completion on the model's device (0 = none)."""
        engine = self.worker.engine
        device = str(engine.backend.device) if engine is not None else self.model_choice().device
        return latency_budget_ms(self.settings, device)

    async def suggest_at(self, uri: str, position: types.Position, *, kind: str, debounce_ms: int,
                         selected: tuple | None = None, invoked: bool = False) -> Placed | None:
        arrived = time.monotonic()
        self.stats.count(kind)
        document = self.open_document(uri)
        # Supersedes older work of this kind here; a document that is not open has none, and
        # gets no entry (one per URI ever asked about would pile up).
        ticket = self.tickets.begin(uri, kind) if document is not None else None
        if not self.worker.ready and document is not None:
            # A model still loading (its $/progress is on screen): an explicit request waits
            # for it, an automatic one only within the time its debounce and budget allow.
            bound = LOAD_WAIT_S if invoked else (debounce_ms + self.latency_budget_ms()) / 1000
            if await self.worker.wait_ready(bound):
                self.stats.count("waitedForModel")
        if not self.worker.ready:
            self.stats.count("notReady")
            return None
        if document is None or not self.language_enabled(document):
            self.stats.count("empty")
            return None
        # An automatic request's budget starts when its debounce ends, whatever it waited for.
        budget_started = None if invoked else arrived + debounce_ms / 1000
        try:
            if debounce_ms and budget_started > time.monotonic():
                await asyncio.sleep(budget_started - time.monotonic())
            started = time.perf_counter()
            if ticket.is_cancelled():
                raise Superseded("superseded while debouncing")
            others = [(d.uri, d.source) for d in self.workspace.text_documents.values() if d.uri != document.uri]
            placed = await self.worker.run(
                ticket, place_suggestion, document.source, position.line, position.character,
                selected=selected, document=uri, path=uri, language_id=document.language_id or "",
                settings=self.settings, other_documents=others[:MAX_OTHER_DOCUMENTS],
                drafts=self.drafts.index if self.settings.repo_drafts else None,
                budget_started=budget_started, adapted_for=self.adapted_candidate(uri),
            )
        except Superseded:
            self.stats.count("superseded")
            return None
        except asyncio.CancelledError:
            self.stats.count("cancelled")
            raise
        except Exception as exc:
            if getattr(exc, "reported", False):  # the team engine is away: said once already, answer empty
                self.stats.count("engineUnavailable")
                log.debug("%s at %s:%d: %s", kind, uri, position.line, exc)
                return None
            self.stats.count("errors")
            log.error("%s at %s:%d failed: %s: %s", kind, uri, position.line, type(exc).__name__, exc)
            return None
        self._log_suggestion(kind, uri, position, placed, (time.perf_counter() - started) * 1000)
        if placed.insert_text is None:
            self.stats.count("empty")
            return None
        self.stats.answered((time.perf_counter() - started) * 1000)
        return placed

    def adapted_candidate(self, uri: str) -> str | None:
        """The document's file path when a model adapted to its repository may answer: only
        when neither the command line nor the settings named a model (a named model wins),
        and no team engine fills instead."""
        choice = self.model_choice()
        if choice.model or choice.engine or not uri.startswith("file:"):
            return None
        return to_fs_path(uri)

    def _log_suggestion(self, kind: str, uri: str, position: types.Position, placed: Placed, ms: float) -> None:
        found = placed.suggestion
        confidence = "-" if found.confidence is None else f"{found.confidence:.2f}"
        log.info("%s %s:%d:%d %s, %d tokens, %d steps, confidence %s, model %.1f ms, total %.1f ms, %s",
                 kind, uri, position.line, position.character, found.source, found.tokens, found.steps,
                 confidence, found.model_ms, ms, "item" if placed.insert_text is not None else "no item")
        if self.settings.verbose_logging:
            log.info("raw fill %r -> insert %r", found.raw, placed.insert_text)

    def status(self) -> dict:
        engine = self.worker.engine
        choice = self.worker.choice or self.model_choice()
        report = status_report(
            state=self.worker.state if self.worker.state != "idle" else "loading",
            message=self.worker.message,
            model=choice.model,
            device=choice.device,
            stats=self.stats,
            engine_status=engine.status() if engine is not None else None,
            settings=to_wire(self.settings),
            drafts_index=self.drafts.stats(),
            caches={**snippet_cache_stats(), "drafts_index": {
                "entries": len(self.drafts.index), "bytes": self.drafts.index.bytes,
                "max_bytes": self.drafts.index.max_bytes}},
            open_documents=self.open_documents_size(),
        )
        # Which model answered last (a repository's adapted copy, or the loaded model), and
        # the adapted copies loaded so far (`parafill adapt`).
        report["answeredBy"] = self.worker.last_model
        report["adaptedModels"] = self.worker.adapted_models()
        remote = getattr(getattr(engine, "backend", None), "remote_status", None)
        if remote is not None:  # a team engine fills: its state, replicas and the context reuse through it
            report["teamEngine"] = remote()
        return report

    def engine_event(self, kind: str, message: str) -> None:
        """The team engine went away or came back: said once to the editor, each time."""
        kind_of = types.MessageType.Info if kind == "back" else types.MessageType.Warning
        self.window_show_message(types.ShowMessageParams(type=kind_of, message=message))

    def open_documents_size(self) -> dict[str, int]:
        try:
            documents = list(self.workspace.text_documents.values())
        except RuntimeError:  # not initialized
            documents = []
        return {"count": len(documents), "bytes": sum(sys.getsizeof(d.source) for d in documents)}


def _range(placed: Placed) -> types.Range:
    return types.Range(start=types.Position(*placed.start), end=types.Position(*placed.end))


def _label(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text.strip() or "parafill"
    return first if len(first) <= 60 else first[:57] + "..."


def create_server(model: str | None = None, device: str = "auto", engine: str | None = None,
                  engine_token_file: str | None = None) -> ParafillServer:
    """A server whose model is `model` (a directory; None = the embedded default)
    on `device`, or the team engine at `engine`, unless the client's settings name another."""
    ls = ParafillServer(model, device, engine, engine_token_file)

    @ls.feature(types.INITIALIZE)
    def initialize(ls: ParafillServer, params: types.InitializeParams) -> None:
        ls.pending_problems = ls.apply_settings(params.initialization_options, initial=True)
        folders = [f.uri for f in params.workspace_folders or ()] or ([params.root_uri] if params.root_uri else [])
        for uri in folders:
            ls.drafts.add_folder(uri)  # read in the background

    @ls.feature(types.INITIALIZED)
    def initialized(ls: ParafillServer, params: types.InitializedParams) -> None:
        ls.warn(ls.pending_problems)
        ls.worker.load_asked()  # requests from now on wait for the model instead of getting nothing
        ls.spawn(ls.load_model())
        ls.spawn(ls.watch_code_files())

    @ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: ParafillServer, params: types.DidChangeConfigurationParams) -> None:
        # Synchronous, so the settings hold for the very next request.
        if params.settings is None or params.settings == {}:
            ls.spawn(ls.pull_configuration())
        else:
            ls.change_settings(params.settings)

    @ls.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: ParafillServer, params: types.DidOpenTextDocumentParams) -> None:
        ls.tickets.edited(params.text_document.uri)
        ls.drafts.opened(params.text_document.uri, params.text_document.text)

    @ls.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: ParafillServer, params: types.DidSaveTextDocumentParams) -> None:
        document = ls.open_document(params.text_document.uri)
        if document is not None:
            ls.drafts.opened(params.text_document.uri, document.source)

    @ls.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def did_change_watched_files(ls: ParafillServer, params: types.DidChangeWatchedFilesParams) -> None:
        for change in params.changes:
            ls.drafts.file_changed(change.uri, deleted=change.type == types.FileChangeType.Deleted)

    @ls.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    def did_change_workspace_folders(ls: ParafillServer, params: types.DidChangeWorkspaceFoldersParams) -> None:
        for folder in params.event.removed:
            ls.drafts.remove_folder(folder.uri)
        for folder in params.event.added:
            ls.drafts.add_folder(folder.uri)

    @ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: ParafillServer, params: types.DidChangeTextDocumentParams) -> None:
        ls.tickets.edited(params.text_document.uri)

    @ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: ParafillServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.tickets.closed(uri)
        ls.drafts.closed(uri)
        if ls.worker.ready:
            ls.spawn(ls.worker.call(ls.worker.engine.forget, uri))

    @ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: ParafillServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
        automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        info = params.context.selected_completion_info
        selected = None
        if info is not None:
            selected = ((info.range.start.line, info.range.start.character),
                        (info.range.end.line, info.range.end.character), info.text)
        placed = await ls.suggest_at(params.text_document.uri, params.position, kind="inline",
                                     debounce_ms=ls.settings.debounce_ms if automatic else 0, selected=selected,
                                     invoked=not automatic)
        if placed is None:
            return types.InlineCompletionList(items=[])
        return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=placed.insert_text, range=_range(placed))])

    @ls.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))
    async def completion(ls: ParafillServer, params: types.CompletionParams) -> types.CompletionList:
        invoked = params.context is None or params.context.trigger_kind == types.CompletionTriggerKind.Invoked
        placed = await ls.suggest_at(params.text_document.uri, params.position, kind="completion",
                                     debounce_ms=0 if invoked else ls.settings.debounce_ms, invoked=invoked)
        if placed is None:
            return types.CompletionList(is_incomplete=True, items=[])
        text = placed.insert_text
        item = types.CompletionItem(
            label=_label(text),
            kind=types.CompletionItemKind.Snippet,
            detail="parafill",
            documentation=text,
            text_edit=types.TextEdit(range=_range(placed), new_text=text),
            insert_text_format=types.InsertTextFormat.PlainText,
            sort_text="0",
        )
        # Incomplete: the suggestion depends on every keystroke, so the client asks again.
        return types.CompletionList(is_incomplete=True, items=[item])

    @ls.feature(STATUS)
    def status(ls: ParafillServer, params: Any) -> dict:
        return ls.status()

    @ls.feature(types.SHUTDOWN)
    def shutdown(ls: ParafillServer, params: Any) -> None:
        ls.drafts.close()
        for uri in list(ls.tickets.edits):
            ls.tickets.closed(uri)
        ls.worker.shutdown()

    @ls.feature(types.EXIT)
    def exit_now(ls: ParafillServer, params: Any) -> None:
        # pygls would now wait for its stdin reader thread and the model thread
        # (an editor waits on us meanwhile); nothing is left to save, so go at once.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0 if ls.protocol._shutdown else 1)

    return ls
