"""`parafill train`: train a native model on a corpus, in resumable stretches.

This module is the command line only, so `parafill train --help` answers at
once; the loop (and torch) is `training/loop.py`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import denoiser

PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_TOKENIZER = Path(denoiser.__file__).resolve().parent / "default_model" / "tokenizer.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parafill train",
                                description="Train a native parafill model on a corpus, in resumable stretches.")
    p.add_argument("--corpus", default="data/corpus",
                   help="folder with valid.jsonl.gz and train.jsonl.gz or its shards (python -m training.corpus shard)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer.json (default: the shipped model's)")
    p.add_argument("--out", default="runs/default", help="run folder: checkpoint/ and log.jsonl")
    p.add_argument("--init", help="start from the weights of this model directory (the same shape, or more "
                                  "--n-layers: the new blocks start as the identity)")
    p.add_argument("--export", help="write a model directory here at the end")
    p.add_argument("--card", help="MODEL_CARD.md to put in the exported directory")
    p.add_argument("--int8", action="store_true", help="export int8 weights with per-channel scales")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (default: torch's choice)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast with fp32 master weights, or fp32 (auto: bf16 where the device runs it natively)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the loss with torch.compile (one graph per span length; --no-compile for short runs)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes that build batches ahead of the loop (a GPU needs several; 0: in-process)")
    p.add_argument("--minutes", type=float, default=9.0, help="stop (and save) after this long")
    p.add_argument("--total-steps", type=int, default=20000)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--cooldown-from", type=int, default=None, metavar="STEP",
                   help="from this step the learning rate falls linearly to 0 over --cooldown-steps, then training ends")
    p.add_argument("--cooldown-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--context-tokens", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad-weight", type=float, default=0.1, help="span-loss weight of <pad> targets (middle and <eos> weigh 1)")
    p.add_argument("--ar-positions", type=int, default=64, help="random context positions per example in the next-token loss")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--valid-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from training.loop import run

    run(args)


if __name__ == "__main__":
    main()
