"""Repositories without tokenizer.json: the tokenizer rebuilt from vocab.json + merges.txt.

Some Dream-family repositories (Dream-Coder, DiffuCoder) ship only the slow
tokenizer's files. The oracle is `transformers.Qwen2Tokenizer` reading the same
files; parafill itself rebuilds the fast tokenizer with `tokenizers` alone.
"""
from __future__ import annotations

import json

import pytest

from denoiser.backend import DecodeSettings, ModelLoadError
from denoiser.catalogue import is_wanted, missing_needed
from denoiser.open_models import load_open_model
from fim.request import FimRequest, SpanPlan
from tools.tiny_open import SLOW_LAYOUT, make_tiny_checkpoint

TEXTS = [
    "def f(self):\n    return self.x  # héllo ünïcode 数字 123\n",
    "<|mask|>x<|endoftext|> in in\r\n\tdef",
    "  \n\n  x's 'll DEF  \t  <|im_start|>user\n",
    "",
]


@pytest.fixture()
def slow_dream(tmp_path):
    d = tmp_path / "dream-slow"
    make_tiny_checkpoint(d, "dream", seed=41, tokenizer_files=SLOW_LAYOUT)
    return d


def _edit_json(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_the_directory_has_no_tokenizer_json(slow_dream):
    names = {p.name for p in slow_dream.iterdir()}
    assert "tokenizer.json" not in names and {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names


def test_rebuilt_tokenizer_matches_transformers_qwen2_tokenizer(slow_dream):
    transformers = pytest.importorskip("transformers")
    backend = load_open_model(slow_dream, "cpu")
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(slow_dream))
    for text in TEXTS:
        ours = backend.tokenizer.encode(text)
        theirs = reference.encode(text, add_special_tokens=False)
        assert ours == theirs, text
        assert backend.tokenizer.decode(ours) == reference.decode(theirs, skip_special_tokens=True)
    # The merges are used: "    return" is a handful of tokens, not one a byte.
    assert len(backend.tokenizer.encode("    return")) < len("    return") // 2


def test_special_tokens_come_from_added_tokens_decoder(slow_dream):
    config = json.loads((slow_dream / "config.json").read_text())
    special = load_open_model(slow_dream, "cpu").tokenizer.special
    assert special.mask == config["mask_token_id"]
    assert special.bos == config["bos_token_id"] and special.eos == config["eos_token_id"]
    assert special.eos in special.stops


def test_added_tokens_json_is_read_when_tokenizer_config_has_no_decoder(slow_dream):
    config = json.loads((slow_dream / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = config.pop("added_tokens_decoder")
    (slow_dream / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (slow_dream / "added_tokens.json").write_text(json.dumps({v["content"]: int(k) for k, v in decoder.items()}))
    backend = load_open_model(slow_dream, "cpu")
    assert backend.tokenizer.special.mask == json.loads((slow_dream / "config.json").read_text())["mask_token_id"]


def test_added_token_ids_after_a_gap_are_kept(slow_dream):
    # Real Dream vocabularies leave ids unused between tokens; the ids the files give must survive.
    moved = {}

    def move_mask(data):
        decoder = data["added_tokens_decoder"]
        key = next(k for k, v in decoder.items() if v["content"] == "<|mask|>")
        moved["id"] = int(key) + 5
        decoder[str(moved["id"])] = decoder.pop(key)
    _edit_json(slow_dream / "tokenizer_config.json", move_mask)
    _edit_json(slow_dream / "config.json", lambda c: c.update(mask_token_id=moved["id"]))
    backend = load_open_model(slow_dream, "cpu")
    assert backend.tokenizer.special.mask == moved["id"]
    assert backend.tokenizer.encode("<|mask|>") == [moved["id"]]


def test_a_fill_completes_through_the_rebuilt_tokenizer(slow_dream):
    backend = load_open_model(slow_dream, "cpu")
    request = FimRequest(preamble="", prefix="def f(self):\n    return ", suffix="\n\nx = 1\n", span=SpanPlan("line", 8))
    result = backend.fill(request, DecodeSettings(steps=4), document="a.py", is_cancelled=lambda: False)
    assert result.steps >= 1 and isinstance(result.text, str)


def test_added_token_that_contradicts_vocab_json_is_refused(slow_dream):
    _edit_json(slow_dream / "tokenizer_config.json",
               lambda d: d["added_tokens_decoder"].update({"5": {"content": "<|im_end|>", "special": True}}))
    with pytest.raises(ModelLoadError, match="vocab.json gives to.*disagree"):
        load_open_model(slow_dream, "cpu")


def test_merges_that_do_not_belong_to_the_vocabulary_are_refused(slow_dream):
    (slow_dream / "merges.txt").write_text("#version: 0.2\nqq zz\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="merges.txt.*do not belong together"):
        load_open_model(slow_dream, "cpu")


def test_a_slow_tokenizer_parafill_cannot_rebuild_is_refused(slow_dream):
    _edit_json(slow_dream / "tokenizer_config.json", lambda d: d.update(tokenizer_class="LlamaTokenizer"))
    with pytest.raises(ModelLoadError, match="LlamaTokenizer.*cannot rebuild.*tokenizer.json"):
        load_open_model(slow_dream, "cpu")


def test_no_tokenizer_files_at_all_names_both_layouts(slow_dream):
    (slow_dream / "merges.txt").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json.*vocab.json and merges.txt"):
        load_open_model(slow_dream, "cpu")


def test_pull_accepts_either_tokenizer_layout():
    assert missing_needed({"config.json", "tokenizer.json"}) == []
    assert missing_needed({"config.json", "vocab.json", "merges.txt"}) == []
    assert missing_needed({"config.json", "vocab.json"}) == ["tokenizer.json or vocab.json + merges.txt"]
    assert all(is_wanted(name) for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"))
