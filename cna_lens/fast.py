"""Speed-ups of repeated forward passes that keep their results: shared prefixes, lower blocks.

(The attention itself is sped up in :mod:`cna_lens.attention`.)

**Shared prefix.** Chat-formatted prompts share their template's head (Qwen's default system
prompt is 24 of a JBB prompt's ~44 tokens). :func:`prefilled` runs that common prefix once
(batch 1, under whatever hooks are active, so interventions still act on it), repeats its KV cache
over the batch, and returns the left-padded suffixes with a mask over prefix + suffix. The bridge
derives positions from the mask, so every real token keeps the position it has without sharing.
The split is the template's head in every batch of two or more. Results differ from unshared
batches, and between batchings, by float rounding only (the padding sits between prefix and suffix, which
reorders sums: ~1e-7 relative in a layer's output, see the tests). ``shared_prefix(False)`` turns
it off, e.g. for bit-for-bit comparisons across batch sizes.

**Lower blocks.** Passes over the same prompts under different interventions compute the same
residual stream below the lowest hooked block. :class:`LowerBlocks` records it once and starts
later passes there (the sweep's CNA sets at 0.1 % start at block 14 of 28), with the same bits.
Prefills that fill a KV cache also take the skipped blocks' K/V from the recording pass (the
generation pool does this where jobs over the same prompts prefill the same batch).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .attention import grouped_attention  # noqa: F401  (moved to .attention; still importable from here)
from .models import HookedModel, is_bridge
from .prompts import encode, has_chat_template, left_pad, length_batches

log = logging.getLogger(__name__)

#: prefixes shorter than this are not worth a separate forward pass
MIN_PREFIX = 4
_SHARE = contextvars.ContextVar("cna_lens_shared_prefix", default=True)


@contextlib.contextmanager
def shared_prefix(enabled: bool = True) -> Iterator[None]:
    """Turn prefix sharing on (the default) or off for the forward passes inside the block."""
    token = _SHARE.set(bool(enabled))
    try:
        yield
    finally:
        _SHARE.reset(token)


# ----------------------------------------------------------------------------- shared prefix
def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs``, leaving every sequence at least one token."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def template_head(tokenizer: Any) -> int:
    """Tokens every default chat-formatted prompt starts with (system turn, user tag); 0 without a
    chat template. Cached on the tokenizer."""
    head = getattr(tokenizer, "_cna_lens_head", None)
    if head is None:
        head = common_prefix(encode(tokenizer, ["A", "B"])) if has_chat_template(tokenizer) else 0
        tokenizer._cna_lens_head = head
    return head


def shared_len(model: HookedModel, seqs: Sequence[Sequence[int]]) -> int:
    """Where :func:`prefilled` splits ``seqs``: their common prefix, but never past the chat template's
    head, so that every batch splits at the same place. 0 for a lone prompt (nothing to share)."""
    if not _SHARE.get() or len(seqs) < 2 or not is_bridge(model):  # a bridge returns an HF cache
        return 0
    p = min(common_prefix(seqs), template_head(model.tokenizer))
    return p if p >= MIN_PREFIX else 0


def computed_tokens(model: HookedModel, seqs: Sequence[Sequence[int]], batch_size: int) -> int:
    """Token positions the forward passes actually run over ``seqs`` batched as our pipelines batch them
    (longest first, see ``length_batches``): each batch's shared prefix counts once."""
    total = 0
    for batch in length_batches([len(s) for s in seqs], batch_size):
        rows = [seqs[i] for i in batch]
        total += sum(map(len, rows)) - (len(rows) - 1) * shared_len(model, rows)
    return total


@torch.no_grad()
def prefilled(
    model: HookedModel, seqs: Sequence[Sequence[int]], pad: int, reuse: dict[Any, Any] | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch past_and_pos"], dict[str, Any]]:
    """``(input_ids, attention_mask, forward_kwargs)`` for ``seqs``: the common prefix already run.

    Without a usable prefix (or inside ``shared_prefix(False)``) this is the plain left-padded batch and ``{}``.
    The mask covers prefix + suffix; ``forward_kwargs`` holds the prefix's ``past_key_values``.
    ``reuse``: a dict the caller keeps across batches run under the same hooks; each distinct prefix
    is then run once and its KV cache copied (the same bits: same tokens, same hooks, same shapes).
    """
    device = model.cfg.device
    p = shared_len(model, seqs)
    if p:
        key = tuple(seqs[0][:p])
        cache = copy.deepcopy(reuse[key]) if reuse is not None and key in reuse else None
        if cache is None:
            head = torch.tensor([list(key)], device=device)
            _, cache = model(head, return_type="logits_and_cache", use_cache=True, logits_to_keep=1)
        if cache is not None and hasattr(cache, "batch_repeat_interleave") and cache.get_seq_length() == p:
            if reuse is not None and key not in reuse:
                reuse[key] = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(seqs))
            ids, mask = left_pad([s[p:] for s in seqs], pad, device)
            mask = torch.cat([mask.new_ones(len(seqs), p), mask], dim=1)
            return ids, mask, {"past_key_values": cache}
        log.warning("the model returned no repeatable KV cache; running prompts without a shared prefix")
    ids, mask = left_pad(seqs, pad, device)
    return ids, mask, {}


# ----------------------------------------------------------------------------- lower blocks
_AFTER_BLOCKS = ("ln_final.", "unembed.", "hook_unembed")
_BLOCK_INPUT = ("hook_resid_pre", "hook_in")


def first_changed(hook_names: Iterable[str], n_layers: int) -> int:
    """The first ``j`` whose ``resid_pre[j]`` (the residual entering block ``j``) hooks at these points
    can change: ``L`` for a hook on block ``L``'s input, ``L + 1`` for one inside block ``L``, 0 for
    one before the blocks or not tied to a block, ``n_layers`` for none (or only after the blocks)."""
    first = n_layers
    for name in hook_names:
        m = re.match(r"blocks\.(\d+)\.(.+)$", name)
        if m:
            first = min(first, int(m[1]) + (m[2] not in _BLOCK_INPUT))
        elif not name.startswith(_AFTER_BLOCKS):
            return 0
    return first


def active_hook_names(model: HookedModel) -> list[str]:
    """Names of the hook points that hold forward hooks now (TransformerLens ``HookPoint.fwd_hooks``)."""
    return [name for name, hp in model.hook_dict.items() if getattr(hp, "fwd_hooks", None)]


class LowerBlocks:
    """Skip the blocks below every hook in repeated passes over the same batches.

    Below the first residual a pass's hooks can change (:func:`first_changed`, ``f``), every pass over
    the same tokens computes the same bits. The first pass over a batch records ``resid_pre[j]`` for
    each ``j`` in ``layers`` with ``j < f``; a later pass over the same batch (same tokens, same mask)
    replaces blocks ``0 … j−1`` with the identity and sets ``resid_pre[j]`` to the record, for the
    largest recorded ``j < f`` — ``(n_layers − j) / n_layers`` of the work, same outputs. Use it
    around the forward pass of each batch: ``with lower.reuse(rows, mask): model(ids, ...)``.
    Hooks are found through TransformerLens hook points; plain PyTorch hooks on modules are not seen.
    """

    def __init__(self, model: HookedModel, layers: Iterable[int]) -> None:
        n = model.cfg.n_layers
        self.model, self.layers = model, sorted({int(j) for j in layers if 0 < int(j) < n})
        #: per batch: its mask, recorded ``resid_pre[j]`` and (passes with a cache) the lower layers' K/V
        self.saved: dict[tuple[tuple[int, ...], ...], tuple[Tensor, dict[int, Tensor], list]] = {}
        self.skipped = 0  # blocks skipped × rows, over all passes

    @contextlib.contextmanager
    def reuse(
        self, rows: Sequence[Sequence[int]], mask: Tensor, cache: Any = None, first: int | None = None
    ) -> Iterator[None]:
        """Around one forward pass over ``rows`` (the batch's full token id lists) with ``mask``.

        ``cache``: the HF cache the pass fills (a prefix's ``past_key_values``): the skipped blocks'
        K/V are then set from the recording pass's afterwards (the same values: same tokens, same
        lower blocks); a pass with a cache skips only where those were recorded. ``first``: the first
        residual this pass's hooks can change (default: from the model's active hooks)."""
        f = first_changed(active_hook_names(self.model), self.model.cfg.n_layers) if first is None else first
        key = tuple(tuple(r) for r in rows)
        old_mask, resid, kv = self.saved.get(key, (mask, {}, []))
        same = old_mask.shape == mask.shape and torch.equal(old_mask, mask)
        ok = [j for j in resid if j < f and (cache is None or j <= len(kv))]
        start = max(ok, default=0) if same else 0
        if start:
            with self._start_at(start, resid[start]):
                yield
            for layer, (k, v) in zip(cache.layers[:start] if cache is not None else [], kv):
                layer.keys, layer.values = k, v  # never written in place: appends make new tensors
            self.skipped += start * len(rows)
            return
        want = [j for j in self.layers if j < f and (not same or j not in resid)]
        store: dict[int, Tensor] = resid if same else {}

        def record(act: Tensor, hook: Any) -> None:
            store[int(hook.name.split(".")[1])] = act.detach().clone()

        hooks = [(f"blocks.{j}.hook_resid_pre", record) for j in want]
        with self.model.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
            yield
        if hooks:
            if cache is not None:  # this pass's K/V where its hooks cannot reach them (a hook_k in block f − 1 could)
                fresh = [(x.keys, x.values) for x in cache.layers[: min(f - 1, max(store))]]
                kv = fresh if not same or len(fresh) > len(kv) else kv
            self.saved[key] = (mask.clone(), store, kv)

    @contextlib.contextmanager
    def _start_at(self, start: int, resid: Tensor) -> Iterator[None]:
        blocks = list(self.model.blocks)[:start]
        before = [b.__dict__.get("forward") for b in blocks]
        for b in blocks:  # object.__setattr__: TL components forward attribute writes to the HF module
            object.__setattr__(b, "forward", _identity)
        try:
            with self.model.hooks(fwd_hooks=[(f"blocks.{start}.hook_resid_pre", lambda act, hook: resid)]):
                yield
        finally:
            for b, fwd in zip(blocks, before):
                if fwd is None:
                    del b.__dict__["forward"]
                else:
                    object.__setattr__(b, "forward", fwd)


def _identity(*args: Any, **kwargs: Any) -> Any:
    """A skipped block: its residual input passes through (HF decoder layers and TL blocks take it first)."""
    return args[0] if args else kwargs["hidden_states"]
