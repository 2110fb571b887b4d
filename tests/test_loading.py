"""Every broken model directory is a ModelLoadError that names the file at fault."""
import json
import shutil

import pytest

import denoiser.loading as loading
from denoiser.backend import ModelLoadError
from denoiser.loading import load_backend
from denoiser.native_backend import NativeBackend
from tools.tiny_native import make_tiny_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def model_dir(pristine, tmp_path):
    """A fresh copy each test may break."""
    return shutil.copytree(pristine, tmp_path / "model")


def load_error(model) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_backend(model, "cpu")
    return str(info.value)


def test_a_good_directory_loads_with_progress(model_dir):
    seen = []
    backend = load_backend(str(model_dir), "cpu", progress=lambda message, percent: seen.append((message, percent)))
    assert isinstance(backend, NativeBackend)
    assert backend.name == "model" and str(backend.device) == "cpu" and backend.parameters > 0
    percents = [p for _, p in seen]
    assert percents == sorted(percents) and percents[-1] == 100 and "ready" in seen[-1][0]


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "no such directory" in message


def test_a_file_instead_of_a_directory(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert "not a directory" in load_error(tmp_path / "weights.safetensors")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    message = load_error(model_dir)
    assert "config.json" in message and "missing" in message


def test_config_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json", encoding="utf-8")
    message = load_error(model_dir)
    assert "config.json" in message and "JSON" in message


def test_broken_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = load_error(model_dir)
    assert "model.safetensors" in message and "truncated" in message


def test_missing_safetensors(model_dir):
    (model_dir / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(model_dir)


def test_tokenizer_that_does_not_match_the_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has more tokens than the model can embed
    (model_dir / "config.json").write_text(json.dumps(config))
    message = load_error(model_dir)
    assert "tokenizer.json" in message and "vocab_size" in message


def test_tokenizer_without_the_special_tokens(model_dir):
    from tokenizers import Tokenizer, models

    # A tokenizer of another model: its ids 0.. are not parafill's special tokens.
    vocab = {"<unk>": 0, "<|mask|>": 1, "<|pad|>": 2, "a": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(model_dir / "tokenizer.json"))
    message = load_error(model_dir)
    assert "tokenizer.json" in message and "<|pad|>" in message


def test_missing_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    assert "tokenizer.json" in load_error(model_dir)


def test_weights_of_another_shape(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["d_ff"] = config["d_ff"] * 2
    (model_dir / "config.json").write_text(json.dumps(config))
    message = load_error(model_dir)
    assert "model.safetensors" in message and "shape" in message


def test_pickle_only_directory_is_refused_unopened(model_dir):
    (model_dir / "model.safetensors").unlink()
    # Not even a valid pickle: the point is that it is never opened.
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 this would run code")
    message = load_error(model_dir)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_missing_model_card(model_dir):
    (model_dir / "MODEL_CARD.md").unlink()
    message = load_error(model_dir)
    assert "MODEL_CARD.md" in message


def test_unknown_architecture(model_dir):
    (model_dir / "config.json").write_text(json.dumps({"architecture": "no-such-model", "model_type": "nope"}))
    message = load_error(model_dir)
    assert "no-such-model" in message or "nope" in message


def test_missing_default_model_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "default_model_dir", lambda: tmp_path / "default_model")
    message = load_error(None)
    assert "default model" in message and "--model" in message


def test_default_model_location_is_inside_the_package():
    import denoiser

    assert loading.default_model_dir().parent.name == "denoiser"
    assert loading.default_model_dir().parent.samefile(denoiser.__path__[0])


def test_cuda_without_a_gpu_is_a_clear_error(model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError) as info:
        load_backend(model_dir, "cuda")
    assert str(info.value).startswith("device 'cuda': no CUDA device is available (")
    # The fix is the user's device choice; the CLI and the server each word it in their own terms.
    assert info.value.setting == "device" and "--device" not in str(info.value)
