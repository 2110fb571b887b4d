"""`parafill train` on a tiny corpus: examples, masks, losses, checkpoint and resume, export."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from denoiser.checkpoint import load_native_model
from denoiser.config import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, ModelConfig
from denoiser.model import SpanDenoiser
from denoiser.tokenizer import CodeTokenizer
from tools.tiny_native import make_tiny_model
from training.examples import TokenExample, split_text, tokenize_splits
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
              "--context-tokens", "64", "--valid-every", "3", "--save-every", "3", "--device", "cpu",
              "--no-compile"]  # the compiled loss has its own test below
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
                "--context-tokens", "64", "--total-steps", "2", "--device", "cpu", "--data-workers", "1",
                "--no-compile", "--precision", "fp32"])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    (corpus / "train-000.jsonl.gz").unlink()
    (corpus / "train-001.jsonl.gz").unlink()
    with pytest.raises(SystemExit, match="no train.jsonl.gz"):
        train_main(["--corpus", str(corpus), "--tokenizer", str(model_dir / "tokenizer.json"), "--out", str(run)])


def test_default_tokenizer_is_the_shipped_models():
    from training.train import build_parser

    default = Path(build_parser().get_default("tokenizer"))
    assert default.is_file() and default.parent.name == "default_model"


def tiny_batch(span=16, context=48, seed=0):
    from training.loop import TrainSettings, collate

    rng = random.Random(seed)
    examples = [TokenExample([FIM_SUFFIX_ID] + [rng.randrange(10, 300) for _ in range(context - 2)] + [FIM_MIDDLE_ID],
                             [rng.randrange(10, 300) for _ in range(rng.randint(1, span - 2))] + [EOS_ID], "line")
                for _ in range(4)]
    settings = TrainSettings(context_tokens=context, ar_positions=8)
    return collate(examples, span, torch.Generator().manual_seed(seed), "cpu", region=context + span), settings


def tiny_model(vocab=384):
    config = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_positions=512)
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_compiled_bf16_loss_matches_eager_fp32():
    from training.loop import losses
    from training.step import autocast, compiled

    model = tiny_model()
    batch, settings = tiny_batch()
    eager = losses(model, batch, settings, torch.Generator().manual_seed(1))
    with autocast(torch.device("cpu"), "bf16"):
        fast = compiled(losses, True)(model, batch, settings, torch.Generator().manual_seed(1))
    for a, b in zip(eager, fast):
        assert b.dtype == torch.float32 and abs(a.item() - b.item()) < 0.03 * a.item()


def test_step_flops_matches_what_torch_counts():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from training.loop import losses
    from training.step import step_flops

    model = tiny_model()
    span, context = 16, 48
    batch, settings = tiny_batch(span, context)
    # The math attention backend runs attention as matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        mdlm, ar = losses(model, batch, settings, torch.Generator().manual_seed(1))
        (mdlm + ar).backward()
    expected = step_flops(model.config, 4, context + 2 * span, span + settings.ar_positions + span)
    assert abs(counter.get_total_flops() - expected) / expected < 0.02


def test_train_help_loads_no_torch():
    # `parafill train --help` answers at once: the command line imports nothing heavy.
    import subprocess
    import sys

    code = "import sys; from lsp_server.cli import main; main(['train', '--help'])"
    probe = f"import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); {code}"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert "--precision" in done.stdout and done.stderr.strip().endswith("False")


def test_quality_plot_reads_eval_results(tmp_path):
    from training.curves import headline, main

    def evaluation(pass1, shown, of_shown):
        gate = {"0.3": {"shown": shown, "exact_match_of_shown": of_shown, "pass@1_of_shown": of_shown}}
        suite = {"count": 10, "exact_match": pass1, "pass@1": pass1, "latency_ms": {"p50": 50.0},
                 "min_confidence": gate}
        return {"settings": [{"metrics": {"single": suite, "heldout": suite}}]}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(evaluation(0.1, 0.5, 0.4)))
    second.write_text(json.dumps(evaluation(0.2, 0.5, 0.6)))
    numbers = headline(evaluation(0.2, 0.5, 0.6))
    assert numbers["single"]["pass@1 gated"] == 0.3 and numbers["heldout"]["precision"] == 0.6
    main(["--quality", f"1e6={first}", "--quality", f"2e6={second}", "--out", str(tmp_path / "q.png")])
    assert (tmp_path / "q.png").stat().st_size > 0


def test_cooldown_falls_linearly_to_zero_from_the_schedule_and_ends_training():
    from training.loop import TrainSettings, lr_at

    plain = TrainSettings(lr=1e-3, warmup_steps=100, total_steps=8000)
    cooled = TrainSettings(lr=1e-3, warmup_steps=100, total_steps=8000, cooldown_from=4000, cooldown_steps=500)
    assert plain.last_step == 8000 and cooled.last_step == 4500
    for step in (0, 50, 100, 2000, 3999):
        assert lr_at(step, cooled) == lr_at(step, plain)
    start = lr_at(4000, plain)
    assert 0 < start < 1e-3
    assert lr_at(4000, cooled) == start
    assert abs(lr_at(4250, cooled) - start / 2) < 1e-12
    assert lr_at(4500, cooled) == 0.0 and lr_at(4600, cooled) == 0.0
    # A cool-down past the end of the schedule still ends with it.
    assert TrainSettings(total_steps=1000, cooldown_from=900, cooldown_steps=500).last_step == 1000
