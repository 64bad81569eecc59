"""The interventions of :mod:`cna_lens.intervene` as exact edits of the model's own weights.

Each edit is a linear identity, so a stock inference engine running the edited weights computes
what the hooked model computes (up to float rounding):

- neuron scaling: ``W_down @ (s ⊙_i h) = (W_down with column i scaled by s) @ h``: scaling neuron
  ``i`` of ``blocks.l.mlp.hook_post`` (the input of ``down_proj``) equals scaling column ``i`` of
  ``model.layers[l].mlp.down_proj.weight`` ([d_model, d_mlp]);
- CAA on the MLP output (``x ← x − alpha·v_l`` at ``blocks.l.hook_mlp_out``) equals adding
  ``−alpha·v_l`` to the ``down_proj`` bias;
- directional ablation (Arditi et al.): removing a unit direction ``r`` from every output that is
  written to the residual stream (embedding rows, attention ``o_proj``, MLP ``down_proj``) equals
  ``W ← W − r rᵀ W`` on those writers (``E ← E − E r rᵀ`` for the embedding).

Every context manager edits the parameters in place (``torch.no_grad``, parameter data only: no
module attribute is assigned) and restores them bit for bit on exit, also when the block raises.
It works on a TransformerLens 4 ``TransformerBridge`` (through its public ``original_model``) and
on a plain Hugging Face ``PreTrainedModel`` of a Llama / Qwen2 / Gemma3 / SmolLM2-style
architecture (``model.model.layers[l].mlp.down_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .models import HookedModel, weights_processed
from .neurons import NeuronSet


def hf_model(model: Any) -> Any:
    """The Hugging Face model whose weights the forward pass uses (bridge: ``model.original_model``)."""
    hf = getattr(model, "original_model", None)
    if hf is not None:
        return hf
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    raise TypeError(
        f"weight edits need a TransformerLens TransformerBridge (cna_lens.load_model) or a Hugging Face "
        f"PreTrainedModel, got {type(model).__name__}; for a HookedTransformer use the hook forms "
        "(cna_lens.ablate / cna_lens.steer)"
    )


def decoder_layers(hf: Any) -> Sequence[Any]:
    """``model.model.layers`` (found through the public ``get_decoder()``)."""
    get_decoder = getattr(hf, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(hf, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(
            f"{type(hf).__name__} has no decoder layers at model.model.layers: weight edits support "
            "Llama / Qwen2 / Gemma3 / SmolLM2-style models; use the hook forms (cna_lens.ablate) instead"
        )
    return layers


def _linear(layer: Any, path: str, index: int) -> Any:
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(
            f"layer {index} has no linear {path} (a [out, in] weight): this architecture is not supported by "
            "weight edits; use the hook forms (cna_lens.ablate / cna_lens.steer) instead"
        )
    return mod


def down_proj(hf: Any, layer: int) -> Any:
    """``model.layers[layer].mlp.down_proj``: weight ``[d_model, d_mlp]``, input = ``mlp.hook_post``."""
    return _linear(decoder_layers(hf)[layer], "mlp.down_proj", layer)


def model_shape(hf: Any) -> tuple[int, int, int]:
    """``(n_layers, d_model, d_mlp)`` read from the down projections."""
    layers = decoder_layers(hf)
    d_model, d_mlp = down_proj(hf, 0).weight.shape
    return len(layers), int(d_model), int(d_mlp)


class _Saved:
    """What an edit overwrote: ``(tensor, column indices or None for all of it, saved values)``.

    Restoring copies the saved values back (``copy_`` / ``index_copy_``), in reverse order, so the
    parameters end bit for bit where they started.
    """

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self._seen: set[int] = set()

    def first_time(self, t: Tensor) -> bool:
        """False when ``t``'s storage was already edited (tied embedding / unembedding)."""
        key = t.data_ptr()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def columns(self, w: Tensor, idx: Tensor) -> None:
        self.items.append((w, idx, w.index_select(1, idx)))

    def whole(self, t: Tensor) -> None:
        self.items.append((t, None, t.detach().clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for t, idx, saved in reversed(self.items):
                if idx is None:
                    t.copy_(saved)
                else:
                    t.index_copy_(1, idx, saved)
        self.items.clear()


@contextmanager
def _editing() -> Iterator[_Saved]:
    saved = _Saved()
    try:
        with torch.no_grad():
            yield saved
    finally:
        saved.restore()


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_neurons(hf: Any, neurons: NeuronSet) -> None:
    """Raise unless ``neurons`` indexes ``hook_post`` of a model of this shape."""
    if not isinstance(neurons, NeuronSet):
        raise TypeError(f"neurons must be a NeuronSet, got {type(neurons).__name__}")
    if neurons.hook != "mlp.hook_post":
        raise ValueError(
            f"neurons are on {neurons.hook!r}; only mlp.hook_post (the down projection's input) is a column "
            "of a weight matrix: use cna_lens.ablate for other hooks"
        )
    n_layers, _, d_mlp = model_shape(hf)
    if (neurons.n_layers, neurons.d_mlp) != (n_layers, d_mlp):
        raise ValueError(
            f"neuron set is for {neurons.n_layers} layers × {neurons.d_mlp} neurons, "
            f"but the model has {n_layers} × {d_mlp}"
        )


@contextmanager
def edit_weights(model: HookedModel, neurons: NeuronSet, scale: float = 0.0) -> Iterator[HookedModel]:
    """Scale ``neurons`` by ``scale`` as a weight edit: ``W_down[:, i] ← scale · W_down[:, i]``.

    Equal to ``cna_lens.ablate(model, neurons, scale)`` up to rounding (``scale`` 0 or a power of
    two: exactly). Only the touched columns are saved for the bit-for-bit restore.
    """
    hf = hf_model(model)
    check_neurons(hf, neurons)
    scale = _finite("scale", scale)
    with _editing() as saved:
        for layer, idx in neurons.by_layer().items():
            w = down_proj(hf, layer).weight
            idx = idx.to(w.device)
            saved.columns(w, idx)
            w.index_copy_(1, idx, w.index_select(1, idx) * scale)
        yield model


def check_steering(
    vectors: Tensor, alpha: float, layers: Sequence[int] | None, n_layers: int, width: int | None = None
) -> tuple[float, list[int]]:
    """Raise unless ``vectors`` is a ``[n_layers, width]`` tensor (any width for None), ``alpha`` is finite
    and ``layers`` lie in ``0..n_layers-1``; returns ``(alpha, layers)`` (None: every layer)."""
    shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else None
    if shape is None or len(shape) != 2 or shape[0] != n_layers or width not in (None, shape[1]):
        got = type(vectors).__name__ if shape is None else shape
        raise ValueError(f"vectors must be a [layer, d_model] = [{n_layers}, {width or 'd_model'}] tensor, got {got}")
    chosen = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if any(not 0 <= x < n_layers for x in chosen):
        raise ValueError(f"layers {chosen} must lie in 0..{n_layers - 1}")
    return _finite("alpha", alpha), chosen


def steering_biases(
    model: HookedModel, vectors: Float[Tensor, "layer d_model"], alpha: float, layers: Sequence[int] | None = None
) -> dict[int, Tensor]:
    """``{layer: −alpha · vectors[layer]}``: the ``down_proj`` bias increments equal to CAA at ``hook_mlp_out``."""
    alpha, chosen = check_steering(vectors, alpha, layers, *model_shape(hf_model(model))[:2])
    return {layer: -alpha * vectors[layer].detach().float() for layer in chosen}


@contextmanager
def edit_steering(
    model: HookedModel,
    vectors: Float[Tensor, "layer d_model"],
    alpha: float,
    layers: Sequence[int] | None = None,
    *,
    hook: str = "hook_mlp_out",
) -> Iterator[HookedModel]:
    """CAA as a weight edit: ``b_down ← b_down − alpha · v_l`` (equal to ``cna_lens.steer`` at ``hook_mlp_out``,
    the only ``hook`` a bias can stand for).

    Needs an existing ``down_proj`` bias (e.g. Llama with ``mlp_bias=True``). Llama, Qwen2, Gemma3
    and SmolLM2 checkpoints have none, and adding a parameter would assign a module attribute of
    the library's model: there this raises ``NotImplementedError``; steer with the hook form
    (``cna_lens.steer``), or export the steered model with ``export_model(..., vectors=...)``, which
    writes the bias into a Llama-architecture checkpoint (``mlp_bias``).
    """
    if hook != "hook_mlp_out":
        raise ValueError(f"only hook_mlp_out is a down_proj bias; {hook!r} needs the hook form cna_lens.steer")
    hf = hf_model(model)
    biases = steering_biases(model, vectors, alpha, layers)
    missing = [layer for layer in biases if down_proj(hf, layer).bias is None]
    if missing:
        raise NotImplementedError(
            f"{type(hf).__name__} has no down_proj bias (layers {missing[:4]}{'...' if len(missing) > 4 else ''}): "
            "CAA cannot be written into its weights in place; use cna_lens.steer (hooks), or "
            "export_model(..., vectors=...) for a Llama-architecture checkpoint with mlp_bias"
        )
    with _editing() as saved:
        for layer, add in biases.items():
            b = down_proj(hf, layer).bias
            saved.whole(b)
            b.add_(add.to(b.device, b.dtype))
        yield model


def unit_directions(direction: Tensor, n_layers: int, d_model: int) -> Float[Tensor, "layer d_model"]:
    """``[layer, d_model]`` unit vectors (fp32) from a ``[d_model]`` or ``[layer, d_model]`` direction."""
    if not isinstance(direction, Tensor) or direction.shape[-1:] != (d_model,) or direction.ndim not in (1, 2):
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise ValueError(f"direction must be [d_model] or [layer, d_model] with d_model = {d_model}, got {shape}")
    r = direction.detach().double()
    r = r.expand(n_layers, d_model) if r.ndim == 1 else r
    if r.shape[0] != n_layers:
        raise ValueError(f"direction has {r.shape[0]} layers, the model {n_layers}")
    norms = r.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise ValueError("direction must be finite and non-zero in every layer")
    return (r / norms).float()


def tied_embeddings(hf: Any) -> bool:
    """Whether the unembedding is the embedding matrix itself (editing one edits both)."""
    out = hf.get_output_embeddings()
    w_in, w_out = hf.get_input_embeddings().weight, getattr(out, "weight", None)
    return w_out is not None and w_in.data_ptr() == w_out.data_ptr()


def check_strength(strength: float) -> float:
    """A directional ablation's strength ``s`` in (0, 2]: the writes keep ``1 − s`` of their component
    along ``r`` (1 removes it, 2 reflects it)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < float(strength) <= 2:
        raise ValueError(f"direction strength {strength!r}: a number in (0, 2] (1 ablates, 2 reflects)")
    return float(strength)


@contextmanager
def edit_direction(
    model: HookedModel, direction: Float[Tensor, "*layer d_model"], strength: float = 1.0
) -> Iterator[HookedModel]:
    """Directional ablation as a weight edit: each writer to the residual stream loses s times its part along r.

    ``E ← E − s (E r) rᵀ`` on the embedding rows and ``W ← W − s r (rᵀ W)``, ``b ← b − s r (rᵀ b)`` on
    each block's attention ``o_proj`` and MLP ``down_proj`` (``s`` = ``strength``, 1 by default:
    :func:`check_strength`). A ``[layer, d_model]`` direction uses
    ``r_l`` for block ``l``'s writers and ``r_0`` for the embedding. The equal hook form is
    ``cna_lens.ablate_direction`` (projection after ``hook_embed``, ``hook_attn_out`` and
    ``hook_mlp_out``). On a model with tied embeddings (SmolLM2) the embedding edit also edits the
    unembedding, ``logits = W_U P n(x)``: the equal hook form then also projects ``unembed.hook_in``
    (``ablate_direction(..., unembed=True)``).

    The writers' matrices are saved whole for the restore (about the size of the embedding plus
    ``o_proj`` and ``down_proj``). Architectures that normalise a block's output before the residual
    add (Gemma 2/3 ``post_feedforward_layernorm``) raise ``NotImplementedError``: there the edit is
    not a projection of the residual stream.
    """
    hf = hf_model(model)
    if weights_processed(model):
        raise ValueError("edit_direction needs the model loaded with process_weights=False (the default)")
    layers = decoder_layers(hf)
    n_layers, d_model, _ = model_shape(hf)
    if hasattr(layers[0], "post_feedforward_layernorm"):
        raise NotImplementedError(
            f"{type(hf).__name__} normalises each block's output before adding it to the residual stream: "
            "orthogonalising o_proj / down_proj does not remove the direction there; use cna_lens.ablate_direction"
        )
    r = unit_directions(direction, n_layers, d_model)
    s = check_strength(strength)
    with _editing() as saved:
        emb = hf.get_input_embeddings().weight
        if saved.first_time(emb):
            saved.whole(emb)
            _project_rows(emb, r[0], s)
        for layer in range(n_layers):
            for path in ("self_attn.o_proj", "mlp.down_proj"):
                mod = _linear(layers[layer], path, layer)
                for t in (mod.weight, mod.bias):
                    if t is not None and saved.first_time(t):
                        saved.whole(t)
                        _project_out(t, r[layer], s)
        yield model


def _project_rows(e: Tensor, r: Tensor, s: float = 1.0, chunk: int = 1 << 14) -> None:
    """``E ← E − s (E r) rᵀ`` in place, in fp32, a block of rows at a time."""
    r = r.to(e.device)
    for start in range(0, e.shape[0], chunk):
        rows = e[start : start + chunk]
        f = rows.float()
        rows.copy_(f - torch.outer(f @ r, s * r))


def _project_out(w: Tensor, r: Tensor, s: float = 1.0) -> None:
    """``W ← W − s r (rᵀ W)`` on the output (first) dimension, in fp32."""
    r = r.to(w.device)
    f = w.float()
    sr = s * r  # s = 1.0 leaves r bit for bit
    w.copy_(f - torch.outer(sr, r @ f) if f.ndim == 2 else f - sr * (r @ f))
