"""Greedy decoding whose batch shrinks as rows finish.

HF ``generate`` keeps a finished row in its static batch until the batch's longest answer ends; HF
continuous batching drops it but schedules in Python between forward passes, and on a 2-core CPU it
kept the cores busy only 82 % of the time (``benchmarks/generation_ab.py``). Here one left-padded
batch is prefilled, then decoded one token per step for the rows still running:

    x_{t+1} = argmax_v logits(x_{≤t})[v],   position ids = cumsum(attention mask) − 1,

so left padding moves no position and is masked out of attention (tested against one prompt at a
time). Chat prompts share a prefix (template and system prompt): its P tokens are prefilled once
at batch 1, the cache is repeated to the batch (``batch_repeat_interleave``), and each row goes on
as ``prefix · padding · rest``; the mask and positions make that the same computation as
``padding · prefix · rest``. After each step the rows that emitted an end-of-sequence token leave: their keys and values
go (``DynamicCache.batch_select_indices``), and the attention mask, positions and next tokens are
sliced the same way. Compute per step is proportional to the rows still running.

Rows may run under different per-row interventions (``groups`` equal consecutive blocks, see
:mod:`cna_lens.speed.grouped`): then the prefix is prefilled once per block, at batch ``groups``, and
``on_rows(rows)`` tells the intervention, before every forward pass, which rows of ``ids`` it computes.

Public APIs only: the model's ``forward(input_ids, attention_mask, position_ids, cache,
use_cache, logits_to_keep)`` (the cache argument is ``past_key_values`` before transformers 5.24),
``DynamicCache(config=...)``, ``DynamicCache.batch_repeat_interleave`` and
``DynamicCache.batch_select_indices``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: the forward keyword arguments the loop passes, besides the cache
_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")
#: the cache argument's names: transformers >= 5.24, then older
_CACHE_ARGS = ("cache", "past_key_values")


def check_supported(model: Any) -> str:
    """The name of ``model.forward``'s cache argument; ``RuntimeError`` unless the installed
    transformers and ``model`` offer everything the loop uses."""
    import transformers
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    missing = [a for a in _FORWARD_ARGS if a not in params]
    cache_arg = next((a for a in _CACHE_ARGS if a in params), None)
    if cache_arg is None:
        missing.append(" or ".join(_CACHE_ARGS))
    for method in ("batch_repeat_interleave", "batch_select_indices"):
        if not callable(getattr(DynamicCache, method, None)):
            missing.append(f"DynamicCache.{method}")
    if missing:
        raise RuntimeError(
            f"the shrinking-batch engine needs {', '.join(missing)}, which transformers "
            f"{transformers.__version__} / {type(model).__name__} lacks; use engine='cb' or 'hf'"
        )
    return cache_arg


@torch.no_grad()
def shrink_generate(
    model: Any,
    ids: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    eos: Sequence[int],
    on_row: Callable[[int, list[int]], None] | None = None,
    share_prefix: bool = True,
    on_first: Callable[[Float[Tensor, "batch vocab"]], None] | None = None,
    groups: int = 1,
    on_rows: Callable[[Int[Tensor, " rows"]], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations (without the end-of-sequence token) of the left-padded rows of ``ids``;
    ``on_row(row, tokens)`` as each row finishes. ``model``: a plain HF causal LM; ``eos`` empty: never
    stop; ``share_prefix``: prefill the rows' common prefix once; ``on_first(logits)``: the prefill's
    logits at each row's final prompt position (the first new token's), rows in ``ids``' order;
    ``groups``: the rows form that many equal consecutive blocks whose computations differ (the shared
    prefix is prefilled once per block); ``on_rows(rows)``: before each forward pass, the indices into
    ``ids`` of the rows it computes."""
    from transformers import DynamicCache

    cache_arg = check_supported(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if groups < 1 or ids.shape[0] % groups:
        raise ValueError(f"groups must be >= 1 and divide the batch of {ids.shape[0]} rows, got {groups}")
    tell = on_rows or (lambda rows: None)
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    rows = torch.arange(ids.shape[0], device=ids.device)
    stop = torch.tensor(sorted(eos), dtype=ids.dtype, device=ids.device)
    cache = DynamicCache(config=model.config)
    n_prefix = shared_prefix(ids, mask) if share_prefix else 0
    if n_prefix:
        ids, mask = prefix_first(ids, mask, n_prefix)
        first_rows = rows[:: ids.shape[0] // groups]  # one row per block
        tell(first_rows)
        model(
            input_ids=ids[first_rows, :n_prefix],
            attention_mask=mask[first_rows, :n_prefix],
            position_ids=torch.arange(n_prefix, device=ids.device)[None].expand(groups, -1),
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        cache.batch_repeat_interleave(ids.shape[0] // groups)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_in, step_pos = ids[:, n_prefix:], pos[:, n_prefix:]
    for step in range(max_new_tokens):
        tell(rows)
        logits = model(
            input_ids=step_in,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        ).logits[:, -1]
        if step == 0 and on_first is not None:
            on_first(logits)
        tok = logits.argmax(-1)
        ended = torch.isin(tok, stop)
        last = step == max_new_tokens - 1
        for r, t, e in zip(rows.tolist(), tok.tolist(), ended.tolist()):
            if not e:
                out[r].append(t)
            if (e or last) and on_row is not None:
                on_row(r, out[r])
        if last or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tok, mask, step_pos = rows[keep], tok[keep], mask[keep], step_pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_in = tok[:, None]
    return out


def shared_prefix(ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]) -> int:
    """Length of the token prefix that every left-padded row starts with, leaving each row at least
    one token after it (0 for a single row)."""
    lengths = mask.sum(-1)
    if ids.shape[0] < 2 or int(lengths.min()) < 2:
        return 0
    width = int(lengths.min()) - 1
    real = torch.stack([row[ids.shape[1] - n :][:width] for row, n in zip(ids, lengths.tolist())])
    same = (real == real[:1]).all(0)
    return width if bool(same.all()) else int(same.long().argmin())


def prefix_first(
    ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], n_prefix: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-padded rows ``padding · prefix · rest`` rearranged as ``prefix · padding · rest``."""
    width = ids.shape[1]
    pads = (width - mask.sum(-1)).tolist()
    order = torch.stack(
        [torch.cat([torch.arange(p, p + n_prefix), torch.arange(p), torch.arange(p + n_prefix, width)]) for p in pads]
    ).to(ids.device)
    return ids.gather(1, order), mask.gather(1, order)
