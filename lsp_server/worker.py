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
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
    (inline and menu completions run side by side in some editors)."""

    def __init__(self) -> None:
        self.edits: dict[str, int] = {}
        self.requests: dict[tuple[str, str], int] = {}

    def edited(self, uri: str) -> None:
        self.edits[uri] = self.edits.get(uri, 0) + 1

    def begin(self, uri: str, kind: str) -> Ticket:
        self.requests[(uri, kind)] = self.requests.get((uri, kind), 0) + 1
        return Ticket(self, uri, kind)

    def closed(self, uri: str) -> None:
        self.edited(uri)
        for key in [k for k in self.requests if k[0] == uri]:
            self.requests[key] += 1


@dataclass(frozen=True)
class ModelChoice:
    model: str  # "" = the embedded default model
    device: str


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

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None

    async def load(self, choice: ModelChoice, progress: Callable[[str, int], None]) -> None:
        """Load `choice` on the model thread; `progress` is called on the event loop.

        Never raises: a failure leaves state "error" and its reason in `message`.
        """
        self._loads += 1
        load_id = self._loads
        self.choice = choice
        self.engine = None
        self.state = "loading"
        self.message = f"loading {choice.model or 'the default model'} on {choice.device}"
        loop = asyncio.get_running_loop()
        await self._drain(DRAIN_TIMEOUT_S)

        def report(message: str, percent: int) -> None:
            loop.call_soon_threadsafe(progress, message, percent)

        def job():
            if load_id != self._loads:
                return None  # a newer load was asked for while this one waited: skip the work
            from denoiser.engine import Engine  # imports torch: on this thread, never on the loop

            return Engine.load(choice.model or None, device=choice.device, progress=report)

        try:
            engine = await self._submit(job)
        except Exception as exc:  # ModelLoadError and anything a broken model directory causes
            if load_id == self._loads:
                self.state = "error"
                self.message = _one_line(exc)
            log.error("model failed to load: %s", _one_line(exc))
            return
        if load_id == self._loads and engine is not None:  # a newer load started meanwhile: it wins
            self.engine = engine
            self.state = "ready"
            self.message = f"{engine.backend.name} ready on {engine.backend.device}"

    async def run(self, ticket: Ticket, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(engine, *args, is_cancelled=ticket.is_cancelled, **kwargs)` on the model thread.

        Raises `Superseded` if the ticket is off before or while it runs; if the
        awaiting task is cancelled ($/cancelRequest), the ticket goes off too so
        the denoiser stops at its next step.
        """
        engine = self.engine

        def job():
            if ticket.is_cancelled():
                raise Superseded("superseded before it started")
            from denoiser.backend import Cancelled

            try:
                return fn(engine, *args, is_cancelled=ticket.is_cancelled, **kwargs)
            except Cancelled as exc:
                raise Superseded(str(exc)) from exc

        return await self._submit(job, on_cancel=ticket.cancel, pool="fills", ticket=ticket)

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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first or type(exc).__name__
