"""The same native weights decoded one token at a time: the honest baseline.

Training gives the causal context a next-token loss on `[context, middle,
<eos>]`, so the span denoiser's weights can also write the middle
autoregressively, greedy, with the causal K/V cache. Benchmarks compare the
denoiser against this with the same weights, prompt and context cache. Not a
product path: the server never uses it.
"""
from __future__ import annotations

from typing import Callable

import torch

from denoiser.backend import Cancelled, DecodeSettings, FillResult
from denoiser.config import EOS_ID, PAD_ID
from denoiser.kv_cache import ContextKVCache
from denoiser.sampler import NEVER_WRITTEN
from fim.request import FimRequest


@torch.no_grad()
def generate_autoregressive(
    model,
    cache: ContextKVCache,
    document: str,
    context_ids: list[int],
    max_new_tokens: int,
    is_cancelled: Callable[[], bool] = lambda: False,
    *,
    vocab_limit: int | None = None,
) -> tuple[list[int], int, int]:
    """Greedy tokens after context_ids until <eos>/<pad> or max_new_tokens.

    Returns (tokens, reused context tokens, forward passes).
    """
    slot = cache.prepare(document, context_ids, need_last_hidden=True)
    hidden = slot.last_hidden
    out: list[int] = []
    passes = 0
    limit = min(max_new_tokens, model.config.max_positions - slot.length)
    while len(out) < limit:
        if is_cancelled():
            raise Cancelled("autoregressive decoding cancelled")
        logits = model.logits(hidden).float()[0]
        logits[list(NEVER_WRITTEN)] = float("-inf")
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[vocab_limit:] = float("-inf")
        passes += 1
        token = int(torch.argmax(logits))
        if token in (EOS_ID, PAD_ID):
            break
        out.append(token)
        if len(out) == limit:
            break
        hidden = cache.extend(document, [token]).last_hidden
    return out, slot.reused, passes


class AutoregressiveBackend:
    """A `Backend` over a NativeBackend's model, tokenizer and prompt, decoding token by token."""

    def __init__(self, native):
        self.native = native
        self.name = f"{native.name} (autoregressive)"
        self.device = native.device
        self.parameters = native.parameters
        self.context_cache = ContextKVCache(
            native.model,
            max_documents=native.context_cache.max_documents,
            device=native.device,
            dtype=native.dtype,
        )

    def fill(
        self,
        request: FimRequest,
        decode: DecodeSettings,
        *,
        document: str = "",
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> FillResult:
        from denoiser.native_backend import span_bucket

        ids = self.native.context_ids(request)
        tokens, reused, passes = generate_autoregressive(
            self.native.model,
            self.context_cache,
            document,
            ids,
            span_bucket(request.span.max_tokens),
            is_cancelled,
            vocab_limit=self.native.tokenizer.vocab_size,
        )
        return FillResult(
            text=self.native.tokenizer.decode(tokens),
            tokens=len(tokens),
            steps=passes,
            context_tokens=len(ids),
            reused_context_tokens=reused,
        )

    def forget(self, document: str) -> None:
        self.context_cache.forget(document)
