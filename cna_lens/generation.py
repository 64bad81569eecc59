"""Batched greedy generation through the hooked model (so active hooks, e.g. ``ablate``, apply).

Prompts are chat-formatted (``prompts.format_prompt``), grouped by length, left-padded with an
attention mask, and decoded greedily with the model's KV cache (TL 4 bridge) or by recomputing
the whole sequence (other hooked models). A sequence that emits an end-of-sequence token leaves
the batch at once, so short refusals do not pay for long answers. The result is token-identical
to decoding each prompt on its own (checked by the tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .fast import prefilled
from .models import HookedModel, is_bridge, last_logits_kwargs
from .prompts import encode, left_pad, length_batches, pad_id

log = logging.getLogger(__name__)


def eos_token_ids(model: HookedModel) -> set[int]:
    """End-of-sequence ids: the tokenizer's plus the generation config's (e.g. ``<|im_end|>``)."""
    ids: set[int] = set()
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    config = getattr(getattr(model, "original_model", None), "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(e) for e in extra)
    return ids


@torch.no_grad()
def greedy_tokens(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: set[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of a batch of token id lists, without the end-of-sequence token (with the
    KV cache, the batch's common prefix is run once: :func:`cna_lens.fast.prefilled`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_ids(model) if eos is None else eos
    out: list[list[int]] = [[] for _ in seqs]
    alive = list(range(len(seqs)))  # rows of `out` still decoding, in batch order
    kv = is_bridge(model)
    if kv:
        ids, mask, past = prefilled(model, seqs, pad_id(model.tokenizer))
        logits, cache = model(
            ids,
            attention_mask=mask,
            return_type="logits_and_cache",
            use_cache=True,
            **past,
            **last_logits_kwargs(model),
        )
        if cache is None or cache.get_seq_length() != mask.shape[1]:  # e.g. a TL/transformers mismatch
            log.warning("the model's KV cache was not filled; decoding by recomputing every step (slower)")
            kv = False
    if not kv:
        ids, mask = left_pad(seqs, pad_id(model.tokenizer), model.cfg.device)
        logits = model(ids, attention_mask=mask)
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :].argmax(-1)
        keep = []
        for j, (row, tok) in enumerate(zip(alive, nxt.tolist())):
            if tok not in eos:
                out[row].append(tok)
                keep.append(j)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(alive):  # finished sequences leave the batch
            k = torch.tensor(keep, device=ids.device)
            alive = [alive[j] for j in keep]
            nxt, mask, ids = nxt[k], mask[k], ids[k]
            if kv:
                cache.batch_select_indices(k)
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        if kv:
            logits, cache = model(
                nxt[:, None], attention_mask=mask, past_key_values=cache, return_type="logits_and_cache"
            )
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            logits = model(ids, attention_mask=mask)
    return out


def generate(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool | None = None,
    system: str | None = None,
    progress: bool = True,
    **decode_kwargs: Any,
) -> list[str]:
    """Greedy completions (text, special tokens skipped) of ``prompts``, in their order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = encode(model.tokenizer, prompts, chat=chat, system=system)
    eos = eos_token_ids(model)
    texts: list[str] = [""] * len(seqs)
    with tqdm(total=len(seqs), desc="generate", unit="prompt", disable=not progress) as bar:
        for batch in length_batches([len(s) for s in seqs], batch_size):
            for i, toks in zip(batch, greedy_tokens(model, [seqs[i] for i in batch], max_new_tokens, eos)):
                texts[i] = model.tokenizer.decode(toks, skip_special_tokens=True, **decode_kwargs)
            bar.update(len(batch))
    return texts
