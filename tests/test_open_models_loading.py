"""Loading open-model directories: every bad input is a clear ModelLoadError before heavy work.

Covers: unknown architecture, missing config, missing shard, pickle-only
checkpoints (refused, never opened), tokenizer that does not match the weights,
weights that do not match config.json, a model too large for the device; and the
good paths: sharded vs single file give identical weights, progress is reported.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from denoiser.backend import ModelLoadError
from denoiser.open_models import detect_family, load_open_model
from denoiser.open_models.checkpoint import estimate_bytes, inspect_directory
from tools.tiny_open import make_tiny_checkpoint, random_state, tiny_config, tiny_tokenizer, write_checkpoint


@pytest.fixture()
def dream(tmp_path):
    d = tmp_path / "dream"
    make_tiny_checkpoint(d, "dream", seed=31)
    return d


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ModelLoadError, match="unsupported architecture.*Dream.*LLaDA.*Open-dCoder"):
        detect_family({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_unknown_architecture_directory_is_refused(dream):
    config = json.loads((dream / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (dream / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_open_model(dream, "cpu")


def test_missing_config_and_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_open_model(tmp_path / "nowhere", "cpu")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_open_model(tmp_path, "cpu")


def test_missing_shard_is_named(tmp_path):
    make_tiny_checkpoint(tmp_path, "llada", shards=3, seed=32)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00003.safetensors.*missing"):
        load_open_model(tmp_path, "cpu")


def test_pickle_only_checkpoint_is_refused_with_the_reason_and_never_opened(dream):
    (dream / "model.safetensors").unlink()
    # Not even a valid pickle: opening it would fail differently, so the refusal proves it was not read.
    (dream / "pytorch_model.bin").write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*safetensors only.*arbitrary code"):
        load_open_model(dream, "cpu")


def test_pickle_next_to_safetensors_is_ignored(dream):
    (dream / "pytorch_model.bin").write_bytes(b"garbage")
    backend = load_open_model(dream, "cpu")
    assert backend.parameters > 0


def test_tokenizer_with_other_vocabulary_is_refused(dream):
    # A tokenizer larger than the embedding table belongs to another model.
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(500)}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")).save(str(dream / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match="does not belong to these weights"):
        load_open_model(dream, "cpu")


def test_tokenizer_whose_mask_disagrees_with_config_is_refused(dream):
    config = json.loads((dream / "config.json").read_text())
    config["mask_token_id"] = config["mask_token_id"] + 5
    (dream / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="mask_token_id.*different models"):
        load_open_model(dream, "cpu")


def test_missing_tokenizer_is_refused(dream):
    (dream / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_open_model(dream, "cpu")


def test_weights_that_do_not_match_config_are_refused(dream):
    config = json.loads((dream / "config.json").read_text())
    config["intermediate_size"] = 96
    (dream / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="shape.*config.json implies"):
        load_open_model(dream, "cpu")
    config["intermediate_size"] = 128
    config["num_hidden_layers"] = 3
    (dream / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="lacks .* tensor"):
        load_open_model(dream, "cpu")


def test_unsupported_llada_variant_is_refused(tmp_path):
    make_tiny_checkpoint(tmp_path, "llada", seed=33)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_type"] = "sequential"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="block_type"):
        load_open_model(tmp_path, "cpu")


def test_model_too_large_for_the_device_is_refused_before_loading(dream):
    plan = inspect_directory(dream)
    need = estimate_bytes(plan.spec, torch.float32)
    messages = []
    with pytest.raises(ModelLoadError, match="GiB.*only.*free"):
        load_open_model(dream, "cpu", lambda m, p: messages.append((m, p)), available_memory=need // 2)
    assert all(p < 1.0 for _, p in messages)  # no weight was streamed
    assert load_open_model(dream, "cpu", available_memory=need * 2).parameters > 0


def test_sharded_and_single_file_give_identical_weights_and_report_progress(tmp_path):
    tokenizer, specials = tiny_tokenizer("open-dcoder")
    config = tiny_config("open-dcoder", tokenizer, specials)
    state = random_state(config, seed=34)
    write_checkpoint(tmp_path / "one", config, state, tokenizer, specials)
    write_checkpoint(tmp_path / "four", config, state, tokenizer, specials, shards=4)
    assert (tmp_path / "four" / "model.safetensors.index.json").exists()
    progress = []
    one = load_open_model(tmp_path / "one", "cpu")
    four = load_open_model(tmp_path / "four", "cpu", lambda m, p: progress.append(p))
    ids = torch.arange(40) % 100
    assert torch.equal(one.model.full(ids), four.model.full(ids))
    assert progress == sorted(progress) and progress[-1] == 100.0 and len(progress) >= 3


def test_bf16_checkpoint_loads_in_bf16(tmp_path):
    make_tiny_checkpoint(tmp_path, "dream", dtype=torch.bfloat16, seed=35)
    backend = load_open_model(tmp_path, "cpu", dtype=torch.bfloat16)
    assert backend.model.embed.dtype == torch.bfloat16
    assert torch.isfinite(backend.model.full(torch.arange(10))).all()


def test_index_pointing_at_foreign_shards_is_refused(tmp_path):
    make_tiny_checkpoint(tmp_path / "a", "dream", shards=2, seed=36)
    shutil.copy(tmp_path / "a" / "model-00001-of-00002.safetensors", tmp_path / "a" / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_open_model(tmp_path / "a", "cpu")


def test_weight_format_of_the_setting(monkeypatch):
    import denoiser.model
    from denoiser.backend import ModelLoadError
    from denoiser.loading import open_model_weight_format

    monkeypatch.setattr(denoiser.model, "cpu_has_native_bf16", lambda: True)
    assert open_model_weight_format("auto", "cpu") == ("bfloat16", False)
    monkeypatch.setattr(denoiser.model, "cpu_has_native_bf16", lambda: False)
    assert open_model_weight_format("auto", "cpu") == ("float32", False)
    assert open_model_weight_format("int8", "cpu") == ("float32", True)
    assert open_model_weight_format("bf16", "cuda:0") == ("bfloat16", False)
    with pytest.raises(ModelLoadError, match="int8 weights run on the CPU only"):
        open_model_weight_format("int8", "cuda:0")
    with pytest.raises(ModelLoadError, match="expected one of auto, bf16, int8, fp32"):
        open_model_weight_format("int4", "cpu")


def test_load_backend_holds_open_model_weights_as_asked(tmp_path):
    from denoiser.loading import load_backend
    from denoiser.open_models.network import Int8Linear
    from tools.tiny_open import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, "dream")
    int8 = load_backend(tmp_path, "cpu", open_model_weights="int8")
    fp32 = load_backend(tmp_path, "cpu", open_model_weights="fp32")
    assert (int8.weights, fp32.weights) == ("int8", "fp32")
    assert isinstance(int8.model.layers[0].q_proj, Int8Linear)
    assert fp32.model.layers[0].q_proj.dtype == torch.float32
