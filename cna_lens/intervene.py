"""Interventions on MLP neurons, as TransformerLens forward hooks and context managers.

``ablate(model, neurons, scale)`` multiplies the selected neurons of ``blocks.L.mlp.hook_post``
(the input of the down projection) by ``scale`` at every position, prompt and generated tokens
alike::

    h'_l[..., i] = scale · h_l[..., i]    for (l, i) in neurons;   scale = 0 ablates, > 1 amplifies

``steer(model, vectors, alpha)`` is the residual-stream baseline (CAA): ``x_l ← x_l − alpha · v_l``.
``ablate_direction(model, r)`` removes a direction from every write to the residual stream.
The same interventions as weight edits: :mod:`cna_lens.edit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from .edit import check_steering, check_strength, unit_directions
from .hooks import FwdHook, HookedModel, check_hook, hook_name
from .neurons import NeuronSet


def _scale_hook(idx: Tensor, scale: float) -> Callable[[Tensor, object], Tensor]:
    cache: dict[torch.device, Tensor] = {}

    def hook(act: Tensor, hook: object) -> Tensor:
        i = cache.get(act.device)
        if i is None:
            i = cache[act.device] = idx.to(act.device)
        if act.requires_grad:  # keep autograd intact for users who differentiate through it
            act = act.clone()
        act[..., i] = act[..., i] * scale
        return act

    return hook


def neuron_hooks(neurons: NeuronSet, scale: float = 0.0) -> list[FwdHook]:
    """``fwd_hooks`` for ``model.run_with_hooks`` / ``model.hooks`` equal to :func:`ablate`."""
    if not isinstance(neurons, NeuronSet):
        raise TypeError(f"neurons must be a NeuronSet, got {type(neurons).__name__}")
    scale = float(scale)
    return [(hook_name(layer, neurons.hook), _scale_hook(idx, scale)) for layer, idx in neurons.by_layer().items()]


def check_compatible(model: HookedModel, neurons: NeuronSet) -> None:
    """Raise if ``neurons`` was selected on a model of another shape."""
    check_hook(model, neurons.hook)
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    if (neurons.n_layers, neurons.d_mlp) != shape:
        raise ValueError(
            f"neuron set is for {neurons.n_layers} layers × {neurons.d_mlp} neurons, "
            f"but the model has {shape[0]} × {shape[1]}"
        )


@contextmanager
def ablate(model: HookedModel, neurons: NeuronSet, scale: float = 0.0) -> Iterator[HookedModel]:
    """Scale ``neurons`` by ``scale`` in every forward pass inside the block (hooks removed on exit).

    Composable: nested ``ablate`` blocks stack their hooks, and each block removes only its own.
    """
    check_compatible(model, neurons)
    with model.hooks(fwd_hooks=neuron_hooks(neurons, scale)):
        yield model


def _add_hook(vector: Tensor, coef: float) -> Callable[[Tensor, object], Tensor]:
    cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def hook(act: Tensor, hook: object) -> Tensor:
        key = (act.device, act.dtype)
        v = cache.get(key)
        if v is None:
            v = cache[key] = coef * vector.to(act.device, act.dtype)
        return act + v

    return hook


def steering_hooks(
    vectors: Float[Tensor, "layer d_model"],
    alpha: float,
    hook: str = "hook_mlp_out",
    layers: Sequence[int] | None = None,
) -> list[FwdHook]:
    """``fwd_hooks`` that add ``−alpha · vectors[l]`` to ``blocks.l.{hook}`` at every position (CAA)."""
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [layer, d_model], got shape {tuple(vectors.shape)}")
    chosen = range(vectors.shape[0]) if layers is None else layers
    return [(hook_name(layer, hook), _add_hook(vectors[layer].float(), -float(alpha))) for layer in chosen]


@contextmanager
def steer(
    model: HookedModel,
    vectors: Float[Tensor, "layer d_model"],
    alpha: float,
    hook: str = "hook_mlp_out",
    layers: Sequence[int] | None = None,
) -> Iterator[HookedModel]:
    """Contrastive activation addition: ``x_l ← x_l − alpha · v_l`` at ``blocks.l.{hook}``, all positions.

    ``vectors`` is usually ``attribute(model, harmful, harmless, hook="hook_mlp_out").diff`` (the
    reference code's MLP-output control vectors); ``alpha = 0`` is the identity.
    """
    check_hook(model, hook)
    check_steering(vectors, alpha, layers, model.cfg.n_layers)  # any width: hooks differ in theirs
    with model.hooks(fwd_hooks=steering_hooks(vectors, alpha, hook, layers)):
        yield model


def _project_hook(r: Tensor, s: float = 1.0) -> Callable[[Tensor, object], Tensor]:
    cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def hook(act: Tensor, hook: object) -> Tensor:
        key = (act.device, act.dtype)
        u = cache.get(key)
        if u is None:
            u = cache[key] = r.to(act.device, act.dtype)
        return act - s * ((act @ u).unsqueeze(-1) * u)  # s = 1.0 multiplies exactly

    return hook


def direction_hooks(
    directions: Float[Tensor, "layer d_model"], unembed: bool = False, strength: float = 1.0
) -> list[FwdHook]:
    """``fwd_hooks`` equal to :func:`ablate_direction` for unit ``directions`` (one per layer)."""
    s = check_strength(strength)
    hooks = [("hook_embed", _project_hook(directions[0], s))]
    for layer in range(directions.shape[0]):
        r = directions[layer]
        hooks += [(hook_name(layer, h), _project_hook(r, s)) for h in ("hook_attn_out", "hook_mlp_out")]
    if unembed:
        hooks.append(("unembed.hook_in", _project_hook(directions[0], s)))  # tied: the embedding's r_0
    return hooks


@contextmanager
def ablate_direction(
    model: HookedModel, direction: Float[Tensor, "*layer d_model"], unembed: bool = False, strength: float = 1.0
) -> Iterator[HookedModel]:
    """Directional ablation (Arditi et al.): ``x ← x − s (x·r) r`` on every write to the residual stream.

    ``r = direction / ‖direction‖`` is removed after the embedding (``hook_embed``) and from each
    block's attention and MLP outputs (``hook_attn_out``, ``hook_mlp_out``), so at ``s`` = ``strength``
    = 1 the residual stream never holds it; at other ``s`` in (0, 2] it keeps ``1 − s`` of its part
    along ``r`` (the writes add up). A ``[layer, d_model]`` direction uses ``r_l`` in block ``l``
    (``r_0`` for the embedding). ``unembed=True`` also projects the unembedding's input (what
    :func:`cna_lens.edit_direction` does on a model with tied embeddings).
    """
    r = unit_directions(direction, model.cfg.n_layers, model.cfg.d_model)
    with model.hooks(fwd_hooks=direction_hooks(r, unembed, strength)):
        yield model
