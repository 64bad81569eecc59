"""Interventions as exact weight edits, restored bit for bit on exit.

Scaling neuron ``i`` of layer ``l`` (``blocks.l.mlp.hook_post[..., i]``, the down projection's input)
by ``s`` at every position equals scaling column ``i`` of that layer's ``down_proj`` weight::

    W_down · (h ⊙ m) = (W_down · diag(m)) · h,     m_i = s for the selected neurons, 1 elsewhere
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .neurons import NeuronSet


@contextmanager
def edit_weights(model: Any, neurons: NeuronSet, scale: float = 0.0) -> Iterator[Any]:
    """Multiply the ``down_proj`` columns of ``neurons`` by ``scale`` in place (the HF weights of a
    TransformerLens bridge, shared with :func:`cna_lens.engine.hf_model`, or of a plain HF model);
    the saved columns are written back on exit, also on an exception."""
    if not isinstance(neurons, NeuronSet):
        raise TypeError(f"neurons must be a NeuronSet, got {type(neurons).__name__}")
    hf = getattr(model, "original_model", model)
    layers = hf.get_decoder().layers
    if len(layers) != neurons.n_layers:
        raise ValueError(f"neuron set is for {neurons.n_layers} layers, the model has {len(layers)}")
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, idx in neurons.by_layer().items():
                w = layers[layer].mlp.down_proj.weight
                i = idx.to(w.device)
                saved.append((w, i, w[:, i].clone()))
                w[:, i] = w[:, i] * float(scale)
        yield model
    finally:
        with torch.no_grad():
            for w, i, cols in reversed(saved):
                w[:, i] = cols
