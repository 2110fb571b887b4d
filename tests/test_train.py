"""`parafill train` on a tiny corpus: examples, masks, losses, checkpoint and resume, export."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from denoiser.checkpoint import load_native_model
from denoiser.config import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID
from denoiser.tokenizer import CodeTokenizer
from tools.tiny_native import make_tiny_model
from training.examples import split_text, tokenize_splits
from training.train import main as train_main

SOURCE = '''import os


def area(width, height):
    """Area of a rectangle."""
    return width * height


class Box:
    def __init__(self, size):
        self.size = size

    def volume(self):
        return self.size ** 3
'''


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    for split, count in (("train", 6), ("valid", 2)):
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for i in range(count):
                handle.write(json.dumps({"path": f"pkg/m{i}.py", "language": "python", "text": SOURCE}) + "\n")
    return folder


def test_examples_keep_the_layout_and_rebuild_the_file(tmp_path):
    tokenizer = CodeTokenizer.load(make_tiny_model(tmp_path / "m") / "tokenizer.json")
    rng = random.Random(3)
    splits = [s for s in (split_text(SOURCE, "a.py", "python", rng) for _ in range(50)) if s]
    assert {s.kind for s in splits} == {"line", "block", "random"}
    for split in splits:
        assert split.prefix + split.middle + split.suffix in SOURCE and split.middle
    for example in tokenize_splits(tokenizer, splits, context_tokens=64, span_tokens=31):
        assert example.context[0] == FIM_SUFFIX_ID and example.context[-1] == FIM_MIDDLE_ID
        assert FIM_PREFIX_ID in example.context and len(example.context) <= 64
        assert len(example.middle) <= 31 and (example.middle[-1] == EOS_ID or len(example.middle) == 31)


def test_training_resumes_from_its_checkpoint_and_exports_a_loadable_model(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    common = ["--corpus", str(corpus), "--tokenizer", str(model_dir / "tokenizer.json"), "--out", str(run),
              "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "4",
              "--context-tokens", "64", "--valid-every", "3", "--save-every", "3", "--device", "cpu"]
    train_main([*common, "--total-steps", "3"])
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["tokens"] > 0
    train_main([*common, "--total-steps", "5", "--export", str(tmp_path / "out"), "--card", str(model_dir / "MODEL_CARD.md")])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 5
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "valid" in r] == [3]
    model, _, config = load_native_model(tmp_path / "out", torch.device("cpu"))
    assert config.context_tokens == 64 and config.d_model == 32


def test_training_reads_a_sharded_corpus_with_a_data_worker(tmp_path):
    model_dir = make_tiny_model(tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "corpus")
    # Two shards in place of train.jsonl.gz, as `python -m training.corpus shard` writes them.
    with gzip.open(corpus / "train.jsonl.gz", "rb") as handle:
        lines = handle.readlines()
    (corpus / "train.jsonl.gz").unlink()
    for i, part in enumerate((lines[:3], lines[3:])):
        with gzip.open(corpus / f"train-{i:03d}.jsonl.gz", "wb") as handle:
            handle.writelines(part)
    run = tmp_path / "run"
    train_main(["--corpus", str(corpus), "--tokenizer", str(model_dir / "tokenizer.json"), "--out", str(run),
                "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "4",
                "--context-tokens", "64", "--total-steps", "2", "--device", "cpu", "--data-workers", "1"])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    (corpus / "train-000.jsonl.gz").unlink()
    (corpus / "train-001.jsonl.gz").unlink()
    with pytest.raises(SystemExit, match="no train.jsonl.gz"):
        train_main(["--corpus", str(corpus), "--tokenizer", str(model_dir / "tokenizer.json"), "--out", str(run)])


def test_default_tokenizer_is_the_shipped_models():
    from training.train import build_parser

    default = Path(build_parser().get_default("tokenizer"))
    assert default.is_file() and default.parent.name == "default_model"
