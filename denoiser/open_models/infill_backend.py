"""`OpenModelBackend`: an open diffusion LLM behind the engine's `Backend` protocol.

Turns a `FimRequest` into the family's documented infilling layout
(Dream family: `<bos> prefix <mask>*n suffix <eos>`; LLaDA: `<bos> prefix
<mask>*n suffix`; Open-dCoder: `prefix <mask>*n suffix`), trims the context
to the model's window, runs `SpanDecoder` (with the request's draft, if any,
checked first) and decodes the span to text.

Bidirectional models have no exact context cache across keystrokes (every
context key depends on the span and the suffix). By default nothing is kept
per document and `reused_context_tokens` is 0. With the keystroke cache on
(`keystroke_cache=`, or `set_keystroke_cache(True)`: the
`openModelKeystrokeCache` setting) each document's last keys/values are kept
and reused approximately by the next request (`keystroke_cache`), and a
request makes at most one full pass over the context (`refresh_every=0`: a
grown span reuses it too). `forget` drops a closed document's. Completion
caching and timing belong to the engine, not here.
"""
from __future__ import annotations

from typing import Callable

import torch

from denoiser.backend import DecodeSettings, FillResult
from denoiser.open_models.families import FamilySpec
from denoiser.open_models.hf_tokenizer import OpenModelTokenizer
from denoiser.open_models.keystroke_cache import ContextSnapshot, KeystrokeCache, KeystrokeCachePolicy
from denoiser.open_models.network import BidirectionalTransformer
from denoiser.open_models.span_decoder import SpanDecoder, SpanDecodeSettings
from fim.request import FimRequest


class OpenModelBackend:
    def __init__(self, model: BidirectionalTransformer, tokenizer: OpenModelTokenizer, spec: FamilySpec, *,
                 name: str, cache_mode: str = "dual", refresh_every: int = 4,
                 initial_span: int = 32, max_context_tokens: int = 2048,
                 keystroke_cache: bool | KeystrokeCachePolicy | None = None, weights: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name
        self.device: torch.device = model.device
        self.parameters: int = model.parameters()
        self.cache_mode = cache_mode
        self.refresh_every = refresh_every
        self.initial_span = initial_span
        self.max_context_tokens = min(max_context_tokens, spec.shape.max_positions)
        special = tokenizer.special
        never = {t for t in (special.bos,) if t is not None}
        self.decoder = SpanDecoder(model, mask_id=special.mask, stop_ids=special.stops,
                                   shift_logits=spec.shift_logits, never_emit=frozenset(never),
                                   end_id=special.eos if special.eos in special.stops else None)
        self.weights = weights  # how the weights are held: "bf16", "int8", ... ("" = not said)
        self.keystroke_cache: KeystrokeCache | None = None
        self.set_keystroke_cache(keystroke_cache)

    def set_keystroke_cache(self, enabled: bool | KeystrokeCachePolicy | None) -> None:
        """Turn approximate context reuse across keystrokes on (True, or a policy) or off (False/None).

        Off drops whatever is held; turning it on again starts empty."""
        policy = KeystrokeCachePolicy() if enabled is True else (enabled or None)
        if policy is not None and self.keystroke_cache is not None and self.keystroke_cache.policy == policy:
            return
        self.keystroke_cache = KeystrokeCache(policy) if policy is not None else None

    def layout(self, request: FimRequest, span_tokens: int) -> tuple[list[int], list[int]]:
        """(head, tail) token ids around the span, trimmed so the whole prompt fits the window."""
        special = self.tokenizer.special
        before = self.tokenizer.encode(request.preamble + request.prefix)
        after = self.tokenizer.encode(request.suffix)
        lead = [special.bos] if self.spec.bos_before_prefix and special.bos is not None else []
        trail = [special.eos] if self.spec.eos_after_suffix and special.eos is not None else []
        budget = self.max_context_tokens - span_tokens - len(lead) - len(trail)
        if budget < 0:
            raise ValueError(f"span of {span_tokens} tokens does not fit the model's {self.max_context_tokens}-token window")
        # Keep the text nearest the cursor: drop the prefix's start and the suffix's end, suffix first
        # down to a quarter of the budget (the prefix usually says more about the middle).
        if len(before) + len(after) > budget:
            keep_after = min(len(after), max(budget // 4, budget - len(before)))
            after = after[:keep_after]
            before = before[len(before) - (budget - len(after)):] if budget - len(after) > 0 else []
        return lead + before, after + trail

    def fill(self, request: FimRequest, decode: DecodeSettings, *, document: str,
             is_cancelled: Callable[[], bool]) -> FillResult:
        maximum = max(1, min(request.span.max_tokens, self.max_context_tokens // 2))
        cache = self.keystroke_cache
        reuse = cache is not None and self.cache_mode == "dual"
        settings = SpanDecodeSettings(
            initial=min(self.initial_span, maximum), maximum=maximum, grow_by=min(self.initial_span, maximum),
            threshold=decode.confidence_threshold, steps=decode.steps,
            cache_mode=self.cache_mode, refresh_every=0 if reuse else self.refresh_every,
        )
        head, tail = self.layout(request, maximum)
        draft = self.tokenizer.encode(request.draft) if request.draft else None
        if reuse:
            def keep(snapshot: ContextSnapshot) -> None:
                cache.put(document, snapshot)

            result = self.decoder.decode(head, tail, settings, is_cancelled, draft=draft,
                                         carry=cache.get(document), policy=cache.policy, keep=keep)
        else:
            result = self.decoder.decode(head, tail, settings, is_cancelled, draft=draft)
        return FillResult(
            text=self.tokenizer.decode(result.tokens),
            tokens=len(result.tokens),
            steps=result.steps,
            context_tokens=len(head) + len(tail),
            reused_context_tokens=result.reused_context_tokens,
            draft=result.draft,
        )

    def forget(self, document: str) -> None:
        if self.keystroke_cache is not None:
            self.keystroke_cache.forget(document)

    def release_device_memory(self) -> None:
        """After a device fault: drop every document's cached keys/values."""
        if self.keystroke_cache is not None:
            self.keystroke_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Entries, bytes and byte bound of the keystroke cache (all zero while it is off)."""
        cache = self.keystroke_cache
        return {"keystroke_kv": cache.stats() if cache is not None else {"entries": 0, "bytes": 0, "max_bytes": 0}}
