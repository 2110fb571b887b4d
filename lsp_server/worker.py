"""The threads that run the model, and how work on them is superseded or cancelled.

All torch work runs off the event loop, so it never blocks on the model.
Loading and chores (forgetting a document) run in order on one thread;
completions run on a small pool, so requests from several documents or
editors reach the engine together and a batching backend (the native
denoiser) runs their spans in shared steps; the engine serialises a backend
that does not batch. A `Ticket` tells a job whether it is still wanted:
a newer edit or request on the same document, or `$/cancelRequest`, turns it
off, and the denoiser checks it between steps. A job whose ticket is off when
the thread picks it up never touches the model. This module knows nothing of
LSP messages or tensors.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

State = Literal["idle", "loading", "ready", "error"]


class Superseded(Exception):
    """The work was superseded or cancelled before or while it ran."""


class WorkerCrashed(Exception):
    """A job on the model thread died of a BaseException (SystemExit, KeyboardInterrupt, ...)
    that no model code should raise; the thread has been replaced by a fresh one."""


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with any BaseException turned into `WorkerCrashed`, so it can neither slip past
    the server's handlers (which catch Exception) nor leave a request unanswered."""

    def job(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            raise
        except BaseException as exc:
            raise WorkerCrashed(f"the model thread died: {type(exc).__name__}: {exc}") from exc

    return job


class Ticket:
    """One piece of work on one document; `is_cancelled` is safe from any thread."""

    def __init__(self, board: "Supersession", uri: str, kind: str):
        self._board = board
        self.uri = uri
        self.kind = kind
        self._edit = board.edits.get(uri, 0)
        self._request = board.requests.get((uri, kind), 0)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        # Plain dict reads: atomic under the GIL, and only the event loop writes.
        return (
            self._cancelled.is_set()
            or self._board.edits.get(self.uri, 0) != self._edit
            or self._board.requests.get((self.uri, self.kind), 0) != self._request
        )


class Supersession:
    """Generation counters: an edit to a document supersedes all its work; a new
    request of one kind supersedes older requests of that kind on that document
    (inline and menu completions run side by side in some editors).

    Every mark is a fresh number from one counter, so closing a document can drop
    its entries (a ticket then sees 0, which no mark ever is) and a document
    reopened under the same URI never repeats a number an old ticket holds.
    """

    def __init__(self) -> None:
        self.edits: dict[str, int] = {}
        self.requests: dict[tuple[str, str], int] = {}
        self._marks = itertools.count(1)

    def edited(self, uri: str) -> None:
        self.edits[uri] = next(self._marks)

    def begin(self, uri: str, kind: str) -> Ticket:
        self.requests[(uri, kind)] = next(self._marks)
        return Ticket(self, uri, kind)

    def closed(self, uri: str) -> None:
        """Supersede the document's work and forget it (nothing is kept per closed document)."""
        self.edits.pop(uri, None)
        for key in [k for k in self.requests if k[0] == uri]:
            del self.requests[key]


@dataclass(frozen=True)
class ModelChoice:
    model: str  # "" = the embedded default model
    device: str
    engine: str = ""  # a team engine's URL: it fills instead of a model loaded here
    engine_token_file: str = ""
    engine_fallback: str = "none"  # "local": `model` on `device` answers while the engine is unreachable
    open_model_weights: str = "auto"  # how an open model's weights are held (denoiser.loading)


# Completions in flight at once: enough to fill a batch from a few editors; more
# requests wait in the pool's queue (and are usually superseded there).
FILL_THREADS = 8
# A reload waits at most this long for cancelled completions to reach their next step.
DRAIN_TIMEOUT_S = 10.0


def _ordered_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="parafill-model")


def _fill_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=FILL_THREADS, thread_name_prefix="parafill-fill")


class ModelWorker:
    """Owns the engine and the threads it runs on."""

    def __init__(self) -> None:
        self._executor = _ordered_thread()
        self._fills = _fill_pool()
        self.engine: Any = None
        self.state: State = "idle"
        self.message = "the model loads after the client sends `initialized`"
        self.choice: ModelChoice | None = None
        self._loads = 0
        self.restarts = 0
        self._closing = False
        # Completions on their threads (event loop only): a reload cancels and awaits
        # them, so the old model is freed before the new one loads (two 7B models rarely
        # fit). Keyed by the thread's own future: it outlives a request the client cancelled.
        self._running: dict[Future, Ticket] = {}
        # Models adapted to a repository (`parafill adapt`), loaded on first use for a
        # document under that repository; dropped on every reload.
        self._adapted: dict[str, Any] = {}
        self._adapted_lock = threading.Lock()
        self.last_model = ""  # which model answered the last completion
        # Set (and replaced) whenever a load ends, ready or not: requests waiting for the model wake.
        self._load_ended = asyncio.Event()
        self.threads = 0  # the `threads` setting the engine runs with (0 = automatic)
        self.keystroke_cache = False  # the `openModelKeystrokeCache` setting (open models only)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None

    def load_asked(self) -> None:
        """A load is on its way (the client is initialized): requests may wait for it."""
        if self.state == "idle":
            self.state = "loading"
            self.message = "the model is loading"

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a load in progress; True if the model is ready.

        Returns at once when no load is in progress (before the client is
        initialized, or after a load failed).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.ready and self.state == "loading":
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._load_ended.wait(), left)
            except asyncio.TimeoutError:
                break
        return self.ready

    def _end_load(self) -> None:
        ended, self._load_ended = self._load_ended, asyncio.Event()
        ended.set()

    async def set_threads(self, threads: int) -> None:
        """The `threads` setting (0 = automatic), applied now and kept for later loads."""
        self.threads = threads
        engine = self.engine
        if engine is not None:
            await self.call(engine.set_threads, threads)

    async def set_keystroke_cache(self, enabled: bool) -> None:
        """The `openModelKeystrokeCache` setting, applied now and kept for later loads."""
        self.keystroke_cache = enabled
        engine = self.engine
        if engine is not None:
            await self.call(_apply_keystroke_cache, engine, enabled)

    async def load(self, choice: ModelChoice, progress: Callable[[str, int], None],
                   explain: Callable[[Exception], str] | None = None,
                   notify: Callable[[str, str], None] | None = None) -> None:
        """Load `choice` on the model thread; `progress` is called on the event loop.

        Never raises: a failure leaves state "error" and its reason in `message`,
        as `explain` words it (default: the exception's first line). With a team
        engine, `notify(kind, message)` hears on the event loop when it goes away or comes back.
        """
        self._loads += 1
        load_id = self._loads
        self.choice = choice
        close = getattr(getattr(self.engine, "backend", None), "close", None)
        if close is not None:  # a team engine's client: stop its reconnecting and its connections
            close()
        self.engine = None
        with self._adapted_lock:
            self._adapted.clear()
        self.state = "loading"
        self.message = (f"connecting to the team engine at {choice.engine}" if choice.engine else
                        f"loading {choice.model or 'the default model'} on {choice.device}")
        loop = asyncio.get_running_loop()
        await self._drain(DRAIN_TIMEOUT_S)

        def report(message: str, percent: int) -> None:
            loop.call_soon_threadsafe(progress, message, percent)

        def engine_event(kind: str, message: str) -> None:  # from the engine client's threads
            if notify is not None and load_id == self._loads:
                loop.call_soon_threadsafe(notify, kind, message)

        def job():
            if load_id != self._loads:
                return None  # a newer load was asked for while this one waited: skip the work
            from denoiser.engine import Engine  # imports torch: on this thread, never on the loop

            if choice.engine:
                from denoiser.loading import load_backend
                from lsp_server.engine_client import connect_engine

                fallback = None
                if choice.engine_fallback == "local":
                    def fallback():
                        backend = load_backend(choice.model or None, choice.device,
                                               open_model_weights=choice.open_model_weights)
                        _apply_keystroke_cache(backend, self.keystroke_cache)
                        return backend
                return connect_engine(choice.engine, choice.engine_token_file, notify=engine_event,
                                      fallback=fallback, threads=self.threads)
            engine = Engine.load(choice.model or None, device=choice.device, progress=report,
                                 open_model_weights=choice.open_model_weights)
            engine.set_threads(self.threads)
            _apply_keystroke_cache(engine, self.keystroke_cache)
            return engine

        try:
            engine = await self._submit(job)
        except Exception as exc:  # ModelLoadError and anything a broken model directory causes
            reason = (explain or _one_line)(exc)
            if load_id == self._loads:
                self.state = "error"
                self.message = reason
                self._end_load()
            log.error("model failed to load: %s", reason)
            return
        if load_id == self._loads and engine is not None:  # a newer load started meanwhile: it wins
            self.engine = engine
            self.state = "ready"
            weights = getattr(engine.backend, "weights", None)
            self.message = (f"{engine.backend.name} ready on {engine.backend.device}"
                            + (f" ({weights} weights)" if weights else ""))
            self._end_load()

    async def run(self, ticket: Ticket, fn: Callable[..., Any], *args: Any, adapted_for: str | None = None,
                  **kwargs: Any) -> Any:
        """`fn(engine, *args, is_cancelled=ticket.is_cancelled, **kwargs)` on the model thread.

        `adapted_for`: the file path of the document, when a model adapted to its
        repository may answer instead of the loaded one. Raises `Superseded` if the
        ticket is off before or while it runs; if the awaiting task is cancelled
        ($/cancelRequest), the ticket goes off too so the denoiser stops at its next step.
        """
        engine = self.engine

        def job():
            if ticket.is_cancelled():
                raise Superseded("superseded before it started")
            from denoiser.backend import Cancelled

            chosen = (self._adapted_engine(adapted_for) if adapted_for else None) or engine
            self.last_model = getattr(chosen.backend, "name", "") if chosen is not None else ""
            try:
                return fn(chosen, *args, is_cancelled=ticket.is_cancelled, **kwargs)
            except Cancelled as exc:
                raise Superseded(str(exc)) from exc

        return await self._submit(job, on_cancel=ticket.cancel, pool="fills", ticket=ticket)

    def _adapted_engine(self, path: str) -> Any:
        """The engine of the model adapted to `path`'s repository, loaded on first use; None if there is none.

        Runs on a completion thread. A model that fails to load is not tried again
        until the next reload; the loaded model answers meanwhile.
        """
        from denoiser.adapted import adapted_for

        found = adapted_for(Path(path))
        if found is None or self.choice is None:
            return None
        key = str(found[1])
        with self._adapted_lock:
            if key not in self._adapted:
                from denoiser.engine import Engine

                try:
                    self._adapted[key] = Engine.load(key, device=self.choice.device)
                except Exception as exc:  # a broken or half-removed copy: the base model answers
                    log.warning("the model adapted to %s did not load: %s", found[0], _one_line(exc))
                    self._adapted[key] = None
            return self._adapted[key]

    def adapted_models(self) -> list[dict[str, str]]:
        """Adapted models loaded so far: their directory and name (None: it failed to load)."""
        with self._adapted_lock:
            return [{"directory": key, "name": engine.backend.name if engine is not None else None}
                    for key, engine in self._adapted.items()]

    def _forget_running(self, loop: asyncio.AbstractEventLoop, future: Future) -> None:
        try:  # any thread: the bookkeeping itself belongs to the event loop
            loop.call_soon_threadsafe(self._running.pop, future, None)
        except RuntimeError:  # the loop has closed (the server is exiting): nothing left to track
            pass

    async def _drain(self, timeout_s: float) -> None:
        """Cancel the completions in flight (they stop at their next step) and wait for their threads."""
        if not self._running:
            return
        for ticket in list(self._running.values()):
            ticket.cancel()
        waiting = [asyncio.wrap_future(future) for future in self._running]
        done, pending = await asyncio.wait(waiting, timeout=timeout_s)
        if pending:
            log.warning("%d completions still running after %.0f s; loading the new model beside them",
                        len(pending), timeout_s)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a short model-side chore (e.g. forgetting a document) in order with the rest."""
        return await self._submit(lambda: fn(*args))

    async def _submit(self, job: Callable[[], Any], on_cancel: Callable[[], None] | None = None,
                      pool: Literal["ordered", "fills"] = "ordered", ticket: Ticket | None = None) -> Any:
        def executor() -> ThreadPoolExecutor:
            return self._fills if pool == "fills" else self._executor

        try:
            future = executor().submit(_guarded(job))
        except RuntimeError:  # the executor is gone (shut down): fresh threads, unless we are closing
            if self._closing:
                raise
            self._restart("its executor was shut down", pool)
            future = executor().submit(_guarded(job))
        if ticket is not None:
            loop = asyncio.get_running_loop()
            self._running[future] = ticket
            future.add_done_callback(lambda done: self._forget_running(loop, done))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if on_cancel:
                on_cancel()
            future.cancel()
            raise
        except WorkerCrashed as exc:
            self._restart(str(exc), pool)
            raise
        finally:
            # A job's exception (a superseded completion's, say) carries a traceback through
            # this frame, and `future` holds that exception: a cycle that only a full garbage
            # collection would break, keeping the job's frames, tensors and text until then.
            future = None

    def _restart(self, reason: str, pool: Literal["ordered", "fills"]) -> None:
        """Replace the threads of `pool`; the engine (plain objects and tensors) survives."""
        if pool == "fills":
            old, self._fills = self._fills, _fill_pool()
        else:
            old, self._executor = self._executor, _ordered_thread()
        old.shutdown(wait=False, cancel_futures=False)  # queued jobs still run there, in order
        self.restarts += 1
        log.error("model thread restarted (%d so far): %s", self.restarts, reason)
        if self.state == "ready" and self.engine is not None:
            self.message = (f"{self.engine.backend.name} ready on {self.engine.backend.device} "
                            f"(model thread restarted {self.restarts}x, last: {reason})")

    def shutdown(self) -> None:
        self._closing = True
        for executor in (self._executor, self._fills):
            executor.shutdown(wait=False, cancel_futures=True)


def _apply_keystroke_cache(target: Any, enabled: bool) -> None:
    """Turn an open model's keystroke cache on or off (`target`: an Engine or a backend); other models have none."""
    setter = getattr(getattr(target, "backend", target), "set_keystroke_cache", None)
    if setter is not None:
        setter(enabled)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first or type(exc).__name__
