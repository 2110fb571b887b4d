"""The server's settings: one typed, fully defaulted model, camelCase on the wire.

Settings arrive from `initializationOptions` and `workspace/didChangeConfiguration`,
either wrapped as `{"parafill": {...}}` or flat. Parsing never raises: an unknown
key or a value of the wrong type or range is reported as a sentence the user can
act on, and the previous value is kept. This module knows nothing of LSP
transport, models or tensors.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

SECTION = "parafill"
DEVICES = ("auto", "cpu", "cuda")
ENGINE_FALLBACKS = ("none", "local")  # what answers while a team engine is unreachable
OPEN_MODEL_WEIGHTS = ("auto", "bf16", "int8", "fp32")  # how an open model's weights are held (denoiser.loading)
# latencyBudgetMs when unset, per kind of device: room for the 8 steps of a 32-token span and
# its context pass with the default model on a laptop CPU, and for a bigger model on a GPU; a
# slower machine gets a shorter suggestion instead of a late one. Others count as "cpu".
DEFAULT_LATENCY_BUDGET_MS = {"cpu": 1000, "cuda": 500}


@dataclass(frozen=True)
class Settings:
    model: str = ""  # a model directory or pulled name; "" = the command line's, else the embedded default
    device: str = "auto"  # auto | cpu | cuda
    context_tokens: int = 1024  # preamble + prefix + suffix the model sees
    span_tokens_line: int = 32  # longest suggestion that finishes the cursor line
    span_tokens_block: int = 64  # longest suggestion of whole lines
    steps: int = 8  # most denoising steps per span (at least span/8 tokens each); 0 = as many as it needs
    confidence_threshold: float = 0.9  # commit every position at least this confident
    min_confidence: float = 0.5  # show only suggestions the model is at least this sure of (0 = all)
    debounce_ms: int = 75  # wait this long after a keystroke before automatic requests run
    # Stop denoising after this many ms and show what is decoded so far (0 = no budget;
    # None = the device's default, DEFAULT_LATENCY_BUDGET_MS).
    latency_budget_ms: int | None = None
    # torch CPU threads for completions; 0 = automatic: half the cores, at most 8, and no more than
    # the cores other running jobs leave idle, chosen again for each completion.
    threads: int = 0
    enabled_languages: tuple[str, ...] = field(default=())  # language ids; empty = all
    max_snippets: int = 2  # regions of other open documents shown to the model
    repo_drafts: bool = True  # offer the model drafts from your own code (open documents and workspace files)
    verbose_logging: bool = False  # log source text and suggestions (off: never)
    # A team engine (`parafill engine`) that fills instead of a model loaded here; "" = none.
    engine: str = ""
    engine_token_file: str = ""  # the engine's token file (PARAFILL_ENGINE_TOKEN wins when set)
    engine_fallback: str = "none"  # "local": the local model answers while the engine is unreachable
    # Open models only: reuse a document's context keys/values approximately from one request to the
    # next, with at most one full pass per request (faster on a CPU; fills can differ from exact ones).
    open_model_keystroke_cache: bool = False
    # Open models only: "auto" (bf16 on a GPU and on a CPU with native bf16, else fp32), "bf16",
    # "int8" (CPU: weight-only int8, about half bf16's memory and faster) or "fp32". Changing it reloads.
    open_model_weights: str = "auto"


def latency_budget_ms(settings: Settings, device: str) -> int:
    """The budget a completion gets on `device` ("cpu", "cuda:0", ...; 0 = none)."""
    if settings.latency_budget_ms is not None:
        return settings.latency_budget_ms
    kind = device.split(":")[0]
    return DEFAULT_LATENCY_BUDGET_MS.get(kind, DEFAULT_LATENCY_BUDGET_MS["cpu"])


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


WIRE_NAMES: dict[str, str] = {camel(f.name): f.name for f in fields(Settings)}


def _whole(low: int, high: int):
    def check(value: Any) -> tuple[Any, str | None]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return None, f"a whole number from {low} to {high}"
        if not low <= int(value) <= high:
            return None, f"a whole number from {low} to {high}"
        return int(value), None

    return check


def _fraction(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, "a number greater than 0 and at most 1"
    if not 0 < value <= 1:
        return None, "a number greater than 0 and at most 1"
    return float(value), None


def _unit(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, "a number from 0 to 1"
    if not 0 <= value <= 1:
        return None, "a number from 0 to 1"
    return float(value), None


def _text(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or "\x00" in value:
        return None, "a string (a model directory or name such as \"dream-coder-7b\", or \"\" for the default)"
    return value, None


def _languages(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None, 'a list of language ids such as ["python", "typescript"] (empty = all)'
    return tuple(v.strip().lower() for v in value if v.strip()), None


def _flag(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, bool):
        return None, "true or false"
    return value, None


def _engine_url(value: Any) -> tuple[Any, str | None]:
    expected = 'a URL such as "http://127.0.0.1:8765" (a `parafill engine`), or "" for none'
    if not isinstance(value, str) or "\x00" in value:
        return None, expected
    if value.strip() and not re.fullmatch(r"https?://[^\s/?#@]+(?::\d+)?(?:/[^\s?#]*)?", value.strip()):
        return None, expected
    return value.strip(), None


def _path_text(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or "\x00" in value:
        return None, 'a file path (or "" for none)'
    return value, None


def _one_of(choices: tuple[str, ...]):
    def check(value: Any) -> tuple[Any, str | None]:
        if value not in choices:
            return None, "one of " + ", ".join(f'"{v}"' for v in choices)
        return value, None
    return check


_CHECKS = {
    "model": _text,
    "device": _one_of(DEVICES),
    "context_tokens": _whole(64, 1 << 20),
    "span_tokens_line": _whole(1, 1024),
    "span_tokens_block": _whole(1, 1024),
    "steps": _whole(0, 1024),
    "confidence_threshold": _fraction,
    "min_confidence": _unit,
    "debounce_ms": _whole(0, 10_000),
    "latency_budget_ms": _whole(0, 60_000),
    "threads": _whole(0, 1024),
    "enabled_languages": _languages,
    "max_snippets": _whole(0, 16),
    "repo_drafts": _flag,
    "verbose_logging": _flag,
    "engine": _engine_url,
    "engine_token_file": _path_text,
    "engine_fallback": _one_of(ENGINE_FALLBACKS),
    "open_model_keystroke_cache": _flag,
    "open_model_weights": _one_of(OPEN_MODEL_WEIGHTS),
}


def unwrap(raw: Any) -> Any:
    """`{"parafill": {...}}` → `{...}`; anything else unchanged."""
    if isinstance(raw, dict) and SECTION in raw:
        return raw[SECTION]
    return raw


def parse_settings(raw: Any, base: Settings = Settings()) -> tuple[Settings, list[str]]:
    """`base` updated with the valid entries of `raw`, and one message per problem.

    `raw` is what the client sent (None, a flat dict, or `{"parafill": {...}}`).
    """
    raw = unwrap(raw)
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"parafill settings must be an object of camelCase keys, got {type(raw).__name__}; using defaults"]
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        name = WIRE_NAMES.get(key)
        if name is None:
            known = ", ".join(sorted(WIRE_NAMES))
            problems.append(f"parafill: unknown setting {key!r} ignored (known settings: {known})")
            continue
        if value is None:  # an explicit null means "the default"
            changes[name] = getattr(Settings(), name)
            continue
        parsed, expected = _CHECKS[name](value)
        if expected is not None:
            kept = getattr(base, name)
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            problems.append(f"parafill: setting {key!r} must be {expected}, got {shown}; keeping {to_wire_value(kept)!r}")
            continue
        changes[name] = parsed
    return replace(base, **changes), problems


def check_setting(key: str, value: Any) -> tuple[Any, str | None]:
    """One value for the camelCase setting `key`: (parsed, None), or (None, what it must be)."""
    return _CHECKS[WIRE_NAMES[key]](value)


def named_settings(raw: Any) -> frozenset[str]:
    """The settings (snake_case) to which `raw` gives a usable value (null: the default)."""
    raw = unwrap(raw)
    if not isinstance(raw, dict):
        return frozenset()
    return frozenset(WIRE_NAMES[key] for key, value in raw.items()
                     if key in WIRE_NAMES and (value is None or check_setting(key, value)[1] is None))


def to_wire_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def to_wire(settings: Settings) -> dict[str, Any]:
    """The settings as the client writes them (camelCase keys)."""
    return {camel(f.name): to_wire_value(getattr(settings, f.name)) for f in fields(settings)}
