"""Continue training a native model on one repository's files, a slice of time at a time.

The same examples and losses as training from scratch (FIM cuts at character
positions, MDLM span loss beside the next-token loss), with a small constant
learning rate after a short warm-up, so a few minutes move the model toward the
repository's names and idioms without forgetting the rest. `held_out_loss`
scores fixed batches of files it never trains on (`held_out_batches`): over
thousands of tokens it moves smoothly where an exact-match rate over a few dozen
cuts is mostly noise. The caller decides when to stop and which weights to keep;
this module never reads or writes files.
"""
from __future__ import annotations

import random
import time

import torch

from training.loop import TrainSettings, collate, optimizer_step, validate
from training.step import resolve_precision
from training.train_data import SPAN_CHOICES, ExampleStream, fit_span, fixed_batches


def held_out_batches(files: list[tuple[str, str, str]], tokenizer, context_tokens: int, *, batches: int = 24,
                     batch_size: int = 8, seed: int = 999) -> list[tuple[list, int]]:
    """Fixed (examples, span) batches cut from `files` as training cuts them: the same ones at every check."""
    spans = random.Random(seed)
    return fixed_batches(ExampleStream(files, tokenizer, context_tokens, seed), batch_size,
                         [spans.choice(SPAN_CHOICES) for _ in range(batches)])


class Adapter:
    def __init__(self, model, tokenizer, files: list[tuple[str, str, str]], *, lr: float = 3e-4,
                 batch_size: int = 8, warmup_steps: int = 20, precision: str = "auto", seed: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.settings = TrainSettings(context_tokens=model.config.context_tokens, batch_size=batch_size, lr=lr,
                                      warmup_steps=warmup_steps, seed=seed)
        self.precision = resolve_precision(precision, self.device)
        self.stream = ExampleStream(files, tokenizer, self.settings.context_tokens, seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.noise = torch.Generator().manual_seed(seed)
        self.spans = random.Random(seed)
        self.steps = 0
        self.tokens = 0

    def train_for(self, seconds: float) -> float:
        """Train for about `seconds` (at least one step); returns the mean loss of the slice."""
        self.model.train()
        deadline = time.monotonic() + seconds
        total, count = 0.0, 0
        while count == 0 or time.monotonic() < deadline:
            span = self.spans.choice(SPAN_CHOICES)
            examples = [fit_span(e, span) for e in self.stream.batch(self.settings.batch_size)]
            # One shape per span, as in training: a new shape each batch grows the CPU kernels'
            # caches without bound (measured: ~10 MB a step, 4 GB resident after ten minutes).
            batch = collate(examples, span, self.noise, self.device, region=self.settings.context_tokens + span)
            warm = min(1.0, (self.steps + 1) / max(1, self.settings.warmup_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr * warm
            mdlm, ar = optimizer_step(self.model, self.optimizer, batch, self.settings, self.noise, self.precision)
            self.steps += 1
            self.tokens += sum(len(e.context) + len(e.middle) for e in examples) + len(examples) * span
            total, count = total + float(mdlm.detach() + self.settings.ar_weight * ar.detach()), count + 1
        self.model.eval()
        return total / count

    def held_out_loss(self, batches: list[tuple[list, int]]) -> float:
        """The training loss (span and next-token, as weighted in training) on `batches`, with fixed noise."""
        totals = validate(self.model, batches, self.settings, self.device, self.precision)
        self.model.eval()
        return totals["mdlm"] + self.settings.ar_weight * totals["ar"]
