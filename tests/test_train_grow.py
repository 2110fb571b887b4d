"""Growing a trained model deeper (`parafill train --init` with more layers)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from denoiser.config import ModelConfig
from denoiser.model import SpanDenoiser
from training.grow import load_grown, trained_positions


def model_of(config: ModelConfig, seed: int) -> SpanDenoiser:
    model = SpanDenoiser(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


CONFIG = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=2, d_ff=128, max_positions=256)


def hidden(model: SpanDenoiser, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    positions = torch.arange(t).unsqueeze(0)
    mask = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
    return model.forward_hidden(ids, positions, mask)


def test_trained_blocks_spread_with_first_and_last_kept():
    assert trained_positions(4, 6) == [0, 2, 3, 5]
    assert trained_positions(2, 3) == [0, 2]
    assert trained_positions(4, 4) == [0, 1, 2, 3]


def test_grown_model_computes_what_the_trained_one_did():
    trained = model_of(CONFIG, 1)
    deeper = model_of(replace(CONFIG, n_layers=3), 2)
    ids = torch.randint(10, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(hidden(trained, ids), hidden(deeper, ids), atol=1e-3)
    assert load_grown(deeper, trained) == [1]
    torch.testing.assert_close(hidden(deeper, ids), hidden(trained, ids), atol=1e-5, rtol=1e-5)
    # The identity block still learns: its output projections get gradients.
    deeper.logits(hidden(deeper, ids)).logsumexp(-1).mean().backward()
    assert deeper.blocks[1].down.weight.grad.abs().sum() > 0
    assert deeper.blocks[1].out.weight.grad.abs().sum() > 0


def test_same_shape_loads_every_weight():
    trained, copy = model_of(CONFIG, 1), model_of(CONFIG, 2)
    assert load_grown(copy, trained) == []
    for (name, a), (_, b) in zip(trained.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("target", [replace(CONFIG, d_model=128), replace(CONFIG, n_layers=1),
                                    replace(CONFIG, d_ff=256, n_layers=3)])
def test_other_shapes_are_refused(target):
    with pytest.raises(ValueError, match="differs"):
        load_grown(model_of(target, 2), model_of(CONFIG, 1))
