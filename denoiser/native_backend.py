"""The native span denoiser as a `Backend`: prompt layout, context cache, sampler.

`native_context_ids` is THE token layout of a native prompt; training
(`denoiser/train.py`) imports it so the model sees at inference exactly the
layout it learnt. This module turns a `FimRequest` into tokens, keeps each
document's context K/V (`ContextKVCache`), runs the sampler and decodes the
span. It does not cache completions, time requests or handle faults (the
engine does).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from denoiser.backend import DecodeSettings, FillResult, ModelLoadError
from denoiser.checkpoint import load_native_model
from denoiser.examples import context_ids
from denoiser.kv_cache import ContextKVCache
from denoiser.sampler import denoise_span
from fim.request import FimRequest

SPAN_BUCKETS = (16, 32, 64, 128)
# A span that ends full of content may grow once; never past this many tokens.
MAX_TOTAL_SPAN_TOKENS = 256


def span_bucket(max_tokens: int) -> int:
    """Span length L for a request: max_tokens rounded up to a bucket (few shapes, graph friendly)."""
    for bucket in SPAN_BUCKETS:
        if max_tokens <= bucket:
            return bucket
    return SPAN_BUCKETS[-1]


def native_context_ids(tokenizer, request: FimRequest, max_context_tokens: int) -> list[int]:
    """`<fim_suffix> suffix <fim_prefix> preamble prefix <fim_middle>` as token ids.

    Each piece is encoded on its own and the ids concatenated, never the joined
    text, so the cursor is always a token boundary. The budget is shared out by
    `denoiser.examples.context_ids`, the very function that lays out training
    examples: the suffix keeps its START (at most a quarter), the preamble its
    start, the prefix its END (the text at the cursor).
    """
    if max_context_tokens < 4:
        raise ValueError(f"max_context_tokens {max_context_tokens} leaves no room for text")
    return context_ids(
        tokenizer.encode(request.preamble),
        tokenizer.encode(request.prefix),
        tokenizer.encode(request.suffix),
        max_context_tokens,
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: no CUDA device is available; use --device cpu or auto")
    return resolved


def configure_cpu_threads() -> None:
    """Leave one core for the server's event loop, unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(cores - 1, 8)))


def needs_more_span(text: str, mode: str) -> bool:
    """A span that filled up with no <eos>: grow it for a block, or for a line still open."""
    return mode == "block" or "\n" not in text


class NativeBackend:
    """A native parafill model directory, on one device, with a per-document context cache."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "auto",
        *,
        dtype: torch.dtype | None = None,
        max_documents: int = 8,
        max_total_span_tokens: int = MAX_TOTAL_SPAN_TOKENS,
        max_context_tokens: int | None = None,
        progress: Callable[[str, int], None] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            configure_cpu_threads()
        # bf16 halves the bytes each step reads on a GPU; CPUs stay in fp32 (exact, and fast enough).
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if progress:
            progress(f"loading {self.model_dir.name} on {self.device}", 20)
        self.model, self.tokenizer, self.config = load_native_model(self.model_dir, self.device, self.dtype)
        self.name = self.model_dir.name
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.max_total_span_tokens = max_total_span_tokens
        # Context and the longest span (grown once) must both fit the model's positions.
        room = min(self.config.max_positions - max_total_span_tokens, self.config.context_tokens)
        self.max_context_tokens = min(max_context_tokens or room, room)
        self.context_cache = ContextKVCache(self.model, max_documents=max_documents, device=self.device, dtype=self.dtype)

    def moved_to(self, device: str | torch.device) -> "NativeBackend":
        """The same model directory on another device (the engine's fallback after a CUDA fault)."""
        return NativeBackend(
            self.model_dir,
            device,
            max_documents=self.context_cache.max_documents,
            max_total_span_tokens=self.max_total_span_tokens,
            max_context_tokens=self.max_context_tokens,
        )

    def context_ids(self, request: FimRequest) -> list[int]:
        return native_context_ids(self.tokenizer, request, self.max_context_tokens)

    def fill(
        self,
        request: FimRequest,
        decode: DecodeSettings,
        *,
        document: str = "",
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> FillResult:
        ids = self.context_ids(request)
        slot = self.context_cache.prepare(document, ids)
        span_len = span_bucket(request.span.max_tokens)
        # Tokens the tokenizer cannot decode (the config may pad the vocabulary) are never written.
        vocab_limit = self.tokenizer.vocab_size
        result = denoise_span(self.model, slot.kv, slot.length, span_len, decode, is_cancelled, vocab_limit=vocab_limit)
        middle, steps = list(result.tokens), result.steps
        if not result.ended and span_len * 2 <= self.max_total_span_tokens:
            if needs_more_span(self.tokenizer.decode(middle), request.span.mode):
                # Simplest exact way to write on: the committed span becomes context
                # (the model also learnt middle tokens causally), then a fresh span follows.
                grown = self.context_cache.extend(document, middle)
                more = denoise_span(
                    self.model, grown.kv, grown.length, span_len, decode, is_cancelled, vocab_limit=vocab_limit
                )
                middle += more.tokens
                steps += more.steps
        return FillResult(
            text=self.tokenizer.decode(middle),
            tokens=len(middle),
            steps=steps,
            context_tokens=len(ids),
            reused_context_tokens=slot.reused,
        )

    def forget(self, document: str) -> None:
        self.context_cache.forget(document)
