"""Start a deeper model from a trained shallower one (`parafill train --init` with more layers).

The trained blocks keep their order and are spread over the deeper stack; each new block
starts as the identity (its attention and MLP output projections are zero, so it adds
nothing to the residual stream). The deeper model therefore computes exactly what the
trained one did on its first step, and training only has to learn what the new blocks add.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from denoiser.config import ModelConfig
from denoiser.model import SpanDenoiser


def trained_positions(old_layers: int, new_layers: int) -> list[int]:
    """Where each trained block goes in the deeper stack: spread evenly, first and last kept."""
    if old_layers == 1:
        return [0]
    return [round(i * (new_layers - 1) / (old_layers - 1)) for i in range(old_layers)]


def check_growable(init: ModelConfig, target: ModelConfig) -> None:
    """Raise ValueError unless `target` is `init` with the same or more layers (the trained
    context may grow too: RoPE positions reach max_positions)."""
    same = replace(init, context_tokens=target.context_tokens, n_layers=target.n_layers)
    if same != target or target.n_layers < init.n_layers:
        raise ValueError(f"its shape differs from the requested one beyond more layers "
                         f"({init.to_json()} against {target.to_json()})")


@torch.no_grad()
def load_grown(model: SpanDenoiser, init: SpanDenoiser) -> list[int]:
    """Copy `init`'s weights into `model` (same shape, or more layers); returns the positions
    of the new, identity blocks."""
    check_growable(init.config, model.config)
    positions = trained_positions(init.config.n_layers, model.config.n_layers)
    model.embed.load_state_dict(init.embed.state_dict())
    model.final_norm.load_state_dict(init.final_norm.state_dict())
    for old, new in enumerate(positions):
        model.blocks[new].load_state_dict(init.blocks[old].state_dict())
    added = [i for i in range(model.config.n_layers) if i not in positions]
    for i in added:
        model.blocks[i].out.weight.zero_()
        model.blocks[i].down.weight.zero_()
    return added
