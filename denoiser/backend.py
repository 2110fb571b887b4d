"""What every model family provides to the engine: fill one FIM request.

A backend owns its model, tokenizer and per-document context caches. It does
not cache completions, time requests or talk to the editor (the engine does).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from fim.request import FimRequest

# torch is imported where a model runs: a server that only talks to an engine never loads it.
if TYPE_CHECKING:
    import torch


class Cancelled(Exception):
    """The request was superseded or cancelled; its work stopped between steps."""


class ModelLoadError(Exception):
    """A model directory cannot be used; the message names the file and the fix.

    `setting` names the user's choice to change when that is the fix ("model": the
    directory; "device"); the front end says how, in its own terms (a command-line
    flag, an editor setting), so the message itself names neither.
    """

    def __init__(self, message: str, *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class DecodeSettings:
    """How the span is denoised.

    steps: most denoising steps per span (0 = as many as the span needs);
    confidence_threshold: commit every masked position whose top probability
    passes it (at least one per step); deadline: the `time.monotonic()` instant
    after which no further step starts (the latency budget; None = none). A span
    stopped by it keeps what was decoded before its first still-masked position.
    """

    steps: int = 0
    confidence_threshold: float = 0.9
    deadline: float | None = None

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0 (0 means: as many as the span needs)")
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError("confidence_threshold must be in (0, 1]")


@dataclass(frozen=True)
class FillResult:
    text: str
    tokens: int
    steps: int
    context_tokens: int
    reused_context_tokens: int
    shortened: bool = False  # a device-fault fallback cut the span: not worth caching
    # How sure the model was of this text: the geometric mean of the probabilities
    # it gave each written token (and the end) when committing it; None: not known.
    confidence: float | None = None
    # How the model judged the request's draft: "accepted" (whole), "repaired", "rejected"; None: no draft.
    draft: str | None = None
    # The latency budget ran out: the text is what was decoded before the first still-masked
    # position (never a hole), shorter than a full answer; not cached, never grown.
    budget_cut: bool = False


class Backend(Protocol):
    name: str
    device: torch.device
    parameters: int

    def fill(
        self,
        request: FimRequest,
        decode: DecodeSettings,
        *,
        document: str,
        is_cancelled: Callable[[], bool],
    ) -> FillResult: ...

    def forget(self, document: str) -> None: ...


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else as torch reads it."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch finds no CUDA GPU"
        raise ModelLoadError(f"device {device!r}: no CUDA device is available ({why})", setting="device")
    return resolved


def setting_choice(value: str | None, variable: str, choices: tuple[str, ...], what: str) -> str:
    """`value`, else the environment's `variable`, else choices[0]: one of `choices`, lower case;
    anything else is an error naming the variable to check."""
    raw = value if value is not None else os.environ.get(variable, choices[0])
    chosen = raw.strip().lower()
    if chosen not in choices:
        raise ValueError(f"{what} {raw!r} is not one of {', '.join(choices)} (check {variable})")
    return chosen
