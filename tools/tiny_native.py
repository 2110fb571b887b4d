"""A tiny random native model directory, for tests and demos.

Its weights are random, so its text is junk; everything else (files,
tokenizer, shapes, caches, protocol) is real. Deterministic for a given seed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from denoiser.checkpoint import TOKENIZER
from denoiser.config import SPECIAL_TOKENS, ModelConfig
from denoiser.model import SpanDenoiser
from training.export import save_native_model

_SAMPLE = '''
import os
from pathlib import Path


def read_lines(path: str) -> list[str]:
    """Return the lines of a file."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\\n") for line in handle]


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2);
for (let i = 0; i < items.length; i++) { console.log(items[i]); }
'''


def build_tiny_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_SAMPLE] * 4, trainer=trainer)
    return tok


def make_tiny_model(model_dir: Path, seed: int = 0, **shape) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and a card into model_dir."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(model_dir / TOKENIZER))
    dims = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=4096)
    dims.update(shape)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), **dims)
    generator = torch.Generator().manual_seed(seed)
    model = SpanDenoiser(config)
    model.init_weights(generator)
    card = "# tiny random parafill model\n\nRandom weights for tests; its completions are meaningless.\n"
    save_native_model(model, model_dir / TOKENIZER, model_dir, int8=False, card=card)
    return model_dir
