"""The stock inference engine: a plain Hugging Face model that computes with the bridge's own weights.

A TransformerLens 4 bridge wraps its HF model in place (its submodules become bridge components
with hook points and TL's attention), so ``bridge.original_model.generate`` still runs through TL.
:func:`stock_model` builds the plain HF model of the same architecture (SDPA attention) once, with
empty parameters (``accelerate.init_empty_weights``), and loads the bridge's parameter tensors into
it with ``load_state_dict(assign=True)``: both models hold the very same tensors, so a weight edit
made through either one (:func:`cna_lens.edit.edit_weights`) is seen by both, and no memory is
copied. Its logits equal the bridge's up to float rounding (eager vs SDPA attention; tested).

Public APIs only: ``get_submodule`` / attribute reads on the bridge's HF model, ``from_config``,
``load_state_dict``, ``HookPoint.has_hooks``. Prefer this to a home-made engine: HF ``generate``
keeps up with new architectures and cache formats.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .edit import decoder_layers
from .models import HookedModel, is_bridge, weights_processed

log = logging.getLogger(__name__)

#: bridge → its plain HF model (built once per bridge; rebuilt when the bridge's tensors were replaced)
_ENGINES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def tl_hooks_active(model: HookedModel) -> bool:
    """Whether any TransformerLens hook point of ``model`` holds a forward hook now (e.g. inside ``ablate``)."""
    return any(hp.has_hooks("fwd") for hp in model.hook_dict.values())


def stock_runs(model: HookedModel) -> bool:
    """Whether :func:`stock_model` may run in place of ``model`` now: a bridge with its HF weights and no
    TransformerLens hook active (TL hooks act on the bridge only; weight edits act on both; the HF module
    hooks of :func:`steer_mlp_out` act on the stock model, where they are meant to run)."""
    return is_bridge(model) and not weights_processed(model) and not tl_hooks_active(model)


def _source_tensors(model: HookedModel, names: list[str]) -> dict[str, Tensor]:
    """The bridge's tensor for each plain-model state-dict name (``a.b.weight`` → ``get_submodule("a.b").weight``)."""
    hf = model.original_model
    out = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        out[name] = getattr(hf.get_submodule(parent) if parent else hf, leaf)
    return out


def stock_model(model: HookedModel) -> Any:
    """The plain HF causal LM (SDPA attention) that shares ``model``'s weight tensors (see module docstring)."""
    if not is_bridge(model):
        raise TypeError(
            f"a stock engine needs a TransformerLens 4 TransformerBridge (cna_lens.load_model), got "
            f"{type(model).__name__}; use TransformerLens' own generate for other hooked models"
        )
    if weights_processed(model):
        raise ValueError(
            "this model was loaded with process_weights=True: its folded weights are in TransformerLens' "
            "coordinates, not the HF model's; load it with process_weights=False for HF generation"
        )
    plain = _ENGINES.get(model)
    if plain is not None and _same_tensors(model, plain):
        return plain
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    src = model.original_model
    dtype = next(src.parameters()).dtype
    # a new config from the bridge's, without the outputs TransformerLens turns on for its hooks
    plain_outputs = {"output_attentions": False, "output_hidden_states": False, "return_dict": True, "use_cache": True}
    config = type(src.config).from_dict(src.config.to_dict() | plain_outputs)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed for real
        plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    names = list(plain.state_dict())
    plain.load_state_dict(_source_tensors(model, names), assign=True, strict=True)
    plain.eval()
    device = next(src.parameters()).device
    moved = [n for n, b in plain.named_buffers() if b.device != device]
    if moved:
        plain.to(device)  # buffers only: parameters already live where the bridge's do
    if not _same_tensors(model, plain):
        raise RuntimeError("the plain HF model does not share the bridge's tensors; report this with your versions")
    _ENGINES[model] = plain
    log.info("built a plain HF model (SDPA) over the bridge's %d tensors", len(names))
    return plain


def _same_tensors(model: HookedModel, plain: Any) -> bool:
    """Every parameter of ``plain`` is still the bridge's tensor (same storage, dtype and device)."""
    names = [n for n, _ in plain.named_parameters()]
    src = _source_tensors(model, names)
    return all(
        p.data_ptr() == src[n].data_ptr() and p.dtype == src[n].dtype and p.shape == src[n].shape
        for n, p in plain.named_parameters()
    )


#: one steering vector per layer
Vectors = Float[Tensor, "layer d_model"]


@contextmanager
def steer_mlp_out(
    model: HookedModel, vectors: Vectors, alpha: float, layers: Sequence[int] | None = None
) -> Iterator[Any]:
    """CAA on the stock engine: ``mlp_out_l ← mlp_out_l − alpha · v_l`` in every layer (or in
    ``layers``), at every position, as plain torch forward hooks on the plain HF model's MLP modules
    (removed on exit). The same sum as :func:`cna_lens.intervene.steer` at ``blocks.l.hook_mlp_out``
    (the HF MLP's output); yields the HF model."""
    from .edit import steering_biases

    plain = stock_model(model)
    blocks = decoder_layers(plain)
    handles = []
    try:
        for layer, add in steering_biases(model, vectors, alpha, layers).items():
            w = blocks[layer].mlp.down_proj.weight
            v = add.to(w.device, w.dtype)
            handles.append(blocks[layer].mlp.register_forward_hook(lambda mod, args, out, v=v: out + v))
        yield plain
    finally:
        for h in handles:
            h.remove()
