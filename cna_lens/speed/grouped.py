"""Several neuron scalings decoded in one batch.

A search measures many selections ``(S_g, s_g)`` on the same prompts. On CPU, decoding is bound by
the matmuls of the batch, which run faster per row at a few times more rows, so the answers of K
selections are decoded together: each batch of b prompts becomes K·b rows, rows ``g·b … g·b+b−1``
under selection g, and a forward pre-hook on every down projection scales its input per row,

    h_{r,i} ← m_{g(r),i} · h_{r,i},   m_{g,i} = s_g if neuron i ∈ S_g else 1,

which is K runs under :func:`cna_lens.edit.edit_weights` (``W_down[:, i] ← s_g · W_down[:, i]``) up
to float rounding (one product rounded to the model's dtype either way, the factor in float32;
exact for s_g ∈ {0, ±1} and powers of two).
The loop is :func:`cna_lens.speed.shrink_generate` with ``groups=K``: the chat prefix is prefilled
once per selection, and a finished row leaves with its scales (``on_rows``).

Public APIs only: ``register_forward_pre_hook`` on the plain HF model's ``down_proj`` modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..edit import check_neurons, down_proj
from ..engine import stock_model, stock_runs
from ..generation import batches_by_length, eos_token_ids
from ..models import HookedModel
from ..neurons import NeuronSet
from ..prompts import encode, left_pad, pad_id
from .shrink import shrink_generate

#: a selection: the neurons and the factor they are scaled by
Scaling = tuple[NeuronSet, float]


def check_scalings(model: HookedModel, scalings: Sequence[Scaling]) -> None:
    """Raise unless every ``(neurons, scale)`` fits the stock engine of ``model`` and ``scale`` is finite."""
    if not stock_runs(model):
        raise ValueError(
            "decoding several neuron scalings together needs the stock engine: a TransformerBridge with its "
            "HF weights (process_weights=False) and no TransformerLens hook active"
        )
    if not scalings:
        raise ValueError("scalings is empty: give at least one (neurons, scale)")
    plain = stock_model(model)
    for neurons, scale in scalings:
        check_neurons(plain, neurons)
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be a finite number, got {scale}")


@contextmanager
def row_scales(model: HookedModel, scalings: Sequence[Scaling]) -> Iterator[Callable[[Int[Tensor, " rows"]], None]]:
    """Forward pre-hooks on the stock model's down projections that scale row r's input by
    ``m_{g(r)}`` (module docstring); yields ``set_groups(g)``, the selection of each row of the next
    forward pass. Removed on exit."""
    check_scalings(model, scalings)
    plain = stock_model(model)
    per_layer = [neurons.by_layer() for neurons, _ in scalings]
    layers = sorted({layer for by_layer in per_layer for layer in by_layer})
    state: dict[str, Tensor] = {}
    handles = []
    try:
        for layer in layers:
            w = down_proj(plain, layer).weight
            m = torch.ones(len(scalings), w.shape[1], device=w.device)  # float32: s_g unrounded, as edit_weights
            for g, ((_, scale), by_layer) in enumerate(zip(scalings, per_layer)):
                idx = by_layer.get(layer)
                if idx is not None:
                    m[g, idx.to(w.device)] = float(scale)

            def scale_rows(mod, args, m=m):  # noqa: ANN001 (torch's hook signature)
                h = args[0]
                return ((h * m[state["groups"]][:, None, :]).to(h.dtype), *args[1:])

            handles.append(down_proj(plain, layer).register_forward_pre_hook(scale_rows))

        def set_groups(groups: Int[Tensor, " rows"]) -> None:
            state["groups"] = groups.to(plain.device)

        yield set_groups
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate_grouped(
    model: HookedModel,
    prompts: Sequence[str],
    scalings: Sequence[Scaling],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    eos: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[list[list[str]], Float[Tensor, "group prompt vocab"]]:
    """Greedy answers to ``prompts`` (chat-formatted) under each scaling, ``texts[g][i]``, and log p(first
    new token) from the same prefill (float32, CPU), decoded together in batches of ``batch_size``
    prompts × ``len(scalings)`` rows (module docstring); ``eos``: the tokens that end an answer (default:
    the model's)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    k = len(scalings)
    eos = eos_token_ids(model) if eos is None else sorted(eos)
    seqs = encode(model.tokenizer, prompts)  # checks the prompts (check_prompts) before any forward pass
    texts = [[""] * len(seqs) for _ in range(k)]
    first: list[list[Tensor | None]] = [[None] * len(seqs) for _ in range(k)]
    with row_scales(model, scalings) as set_groups, tqdm(total=k * len(seqs), disable=not progress) as bar:
        plain = stock_model(model)  # row_scales checked that it runs
        for batch in batches_by_length([len(s) for s in seqs], batch_size):
            ids, mask = left_pad([seqs[i] for i in batch], pad_id(model.tokenizer), plain.device)
            b = len(batch)

            def finished(r: int, toks: list[int], batch: list[int] = batch, b: int = b) -> None:
                g, i = divmod(r, b)
                texts[g][batch[i]] = model.tokenizer.decode(toks, skip_special_tokens=True)
                bar.update()

            def keep(logits: Tensor, batch: list[int] = batch, b: int = b) -> None:
                for r, lp in enumerate(logits.float().log_softmax(-1).cpu()):
                    first[r // b][batch[r % b]] = lp

            shrink_generate(
                plain,
                ids.repeat(k, 1),
                mask.repeat(k, 1),
                max_new_tokens,
                eos,
                finished,
                on_first=keep,
                groups=k,
                on_rows=lambda rows, b=b: set_groups(rows // b),
            )
    return texts, torch.stack([torch.stack(row) for row in first])  # type: ignore[arg-type]
