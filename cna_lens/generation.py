"""Batched greedy generation through the hooked model (so active hooks, e.g. ``ablate``, apply).

**Continuous batching over conditions.** :func:`greedy_many` decodes several *jobs* (each a list of
forward hooks, i.e. a condition such as ``ablate`` or ``steer``, and its prompts) in one pool of
at most ``batch_size`` rows. Each job's hooks act only on that job's rows (:class:`RowHooks`).
A sequence that emits an end-of-sequence token leaves the pool at once, and when enough rows have
left, the next prompts are prefilled (under their own job's hooks) and their KV cache is
left-padded into the pool's. Short refusals then neither pay for long answers nor leave the
batch small: decoding costs ≈ 240 ms per step at batch 1-8 and ≈ 10 ms per row at batch 100
(Qwen2.5-1.5B, bf16, this CPU), so a pool that stays full is what reaches the matmul limit.
Decoding steps append K/V in place (:mod:`cna_lens.kvcache`), and a job whose prompts another job
already prefilled in the same batch starts its prefill at the lowest block its hooks reach.

Prompts are chat-formatted (``prompts.format_prompt``), left-padded with an attention mask (the
bridge derives positions from it, so padding columns never move a token), and decoded with the
model's KV cache (TL 4 bridge) or by recomputing the whole sequence (other hooked models). Every
row's tokens equal those of decoding its prompt alone under its job's hooks, up to float rounding
of differently shaped batches (checked token for token by the tests).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from .attention import grouped_everywhere
from .fast import LowerBlocks, first_changed, prefilled
from .intervene import FwdHook
from .kvcache import SpareLayer, take_rows, with_spare_columns
from .models import HookedModel, is_bridge, last_logits_kwargs
from .prompts import encode, left_pad, length_batches, pad_id

log = logging.getLogger(__name__)

#: one job: the forward hooks of its condition (``[]`` = as is) and its prompts as token id lists
Job = tuple[Sequence[FwdHook], Sequence[Sequence[int]]]


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


class RowHooks:
    """Forward hooks that apply job ``j``'s hooks to the batch rows of job ``j`` only::

        act[rows_j] ← hook_j(act[rows_j])      for every job j with a hook at that point

    ``set_rows`` tells which job each row of the next forward pass belongs to; while ``enabled`` is
    False the hooks pass activations through untouched (e.g. while a job prefills under its own hooks).
    """

    def __init__(self, jobs_hooks: Sequence[Sequence[FwdHook]]) -> None:
        self.by_name: dict[str, list[tuple[int, Callable]]] = {}
        for j, hooks in enumerate(jobs_hooks):
            for name, fn in hooks:
                self.by_name.setdefault(name, []).append((j, fn))
        self.rows: dict[int, Tensor | None] = {}  # None: every row is that job's
        self.enabled = False

    def set_rows(self, jobs: Sequence[int], device: torch.device | str = "cpu") -> None:
        job_of = torch.tensor(list(jobs), device=device)
        self.rows = {}
        for j in set(jobs):
            rows = (job_of == j).nonzero().flatten()
            self.rows[j] = None if len(rows) == len(jobs) else rows

    def hooks(self) -> list[FwdHook]:
        return [(name, self._dispatch(fns)) for name, fns in self.by_name.items()]

    def _dispatch(self, fns: list[tuple[int, Callable]]) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if not self.enabled:
                return act
            for j, fn in fns:
                if j not in self.rows:
                    continue
                rows = self.rows[j]
                if rows is None:
                    out = fn(act, hook)
                    act = act if out is None else out  # TL hooks may edit in place and return None
                else:
                    act = act.clone() if act.requires_grad else act
                    sub = act[rows]
                    out = fn(sub, hook)
                    act[rows] = sub if out is None else out
            return act

        return hook


@dataclass(frozen=True)
class _Pool:
    """The rows being decoded: ``(job, index)`` per row, the next token of each (not yet emitted),
    the mask over all columns, and the KV cache (bridge) or the whole sequences (recompute)."""

    rows: list[tuple[int, int]]
    nxt: Int[Tensor, " batch"]
    mask: Int[Tensor, "batch col"]
    cache: Any = None
    ids: Tensor | None = None


def _growable(cache: Any) -> bool:
    """Plain per-layer ``[batch, head, col, d]`` K/V that rows can join and leave (HF ``DynamicLayer``;
    sliding-window layers keep other lengths)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x) in (DynamicLayer, SpareLayer) for x in layers)


def _prefill(
    model: HookedModel,
    rows: list[tuple[int, int]],
    seqs: Sequence[Sequence[int]],
    kv: bool,
    prefix_kv: dict,
    lower: tuple[LowerBlocks | None, int] = (None, 0),
) -> _Pool:
    """The pool of ``seqs`` after their prompt; ``lower``: the job's shared :class:`LowerBlocks` and the
    first residual its hooks change (with a prefix cache, the blocks below are taken from a recording)."""
    pad = pad_id(model.tokenizer)
    if kv:
        ids, mask, past = prefilled(model, seqs, pad, prefix_kv)
        blocks, first = lower
        reuse = blocks is not None and "past_key_values" in past
        with blocks.reuse(seqs, mask, past["past_key_values"], first) if reuse else contextlib.nullcontext():
            logits, cache = model(
                ids,
                attention_mask=mask,
                return_type="logits_and_cache",
                use_cache=True,
                **past,
                **last_logits_kwargs(model),
            )
        if cache is not None and cache.get_seq_length() == mask.shape[1]:
            return _Pool(rows, _argmax(logits), mask, cache=cache)
        log.warning("the model's KV cache was not filled; decoding by recomputing every step (slower)")
    ids, mask = left_pad(seqs, pad, model.cfg.device)
    return _Pool(rows, _argmax(model(ids, attention_mask=mask)), mask, ids=ids)


def _argmax(logits: Tensor) -> Tensor:
    """Greedy next tokens (``max`` returns the first maximal index like ``argmax``, 4× faster on CPU)."""
    return logits[:, -1, :].max(-1).indices


def _left(t: Tensor, width: int, dim: int, value: int = 0) -> Tensor:
    """Left-pad ``t`` along ``dim`` (counted from the end) to ``width`` columns."""
    n = width - t.shape[dim]
    return t if n == 0 else F.pad(t, (0, 0) * (-dim - 1) + (n, 0), value=value)


def _merge(a: _Pool, b: _Pool, pad: int) -> _Pool:
    """One pool of both: the narrower one is left-padded with masked columns."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    mask = torch.cat([_left(a.mask, width, -1), _left(b.mask, width, -1)])
    ids = None if a.ids is None else torch.cat([_left(a.ids, width, -1, pad), _left(b.ids, width, -1, pad)])
    if a.cache is not None:
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = torch.cat([_left(la.keys, width, -2), _left(lb.keys, width, -2)])
            la.values = torch.cat([_left(la.values, width, -2), _left(lb.values, width, -2)])
    return _Pool(a.rows + b.rows, torch.cat([a.nxt, b.nxt]), mask, a.cache, ids)


def _select(p: _Pool, keep: list[int]) -> _Pool:
    """Keep rows ``keep``; drop the leading columns that are padding in every remaining row."""
    k = torch.tensor(keep, device=p.mask.device)
    mask, ids = p.mask[k], None if p.ids is None else p.ids[k]
    first = int(mask.any(0).int().argmax())
    if p.cache is not None and _growable(p.cache):
        for layer in p.cache.layers:
            if type(layer) is SpareLayer:  # into buffers with spare columns (see cna_lens.kvcache)
                layer.keys, layer.values = take_rows(layer.keys, k, first), take_rows(layer.values, k, first)
            else:
                layer.keys, layer.values = layer.keys[k, :, first:], layer.values[k, :, first:]
    elif p.cache is not None:
        p.cache.batch_select_indices(k)
        first = 0
    return _Pool([p.rows[i] for i in keep], p.nxt[k], mask[:, first:], p.cache, None if ids is None else ids[:, first:])


def _step(model: HookedModel, p: _Pool) -> _Pool:
    mask = torch.cat([p.mask, p.mask.new_ones(len(p.rows), 1)], dim=1)
    if p.cache is not None:
        logits, cache = model(
            p.nxt[:, None], attention_mask=mask, past_key_values=p.cache, return_type="logits_and_cache"
        )
        return replace(p, nxt=_argmax(logits), mask=mask, cache=cache)
    ids = torch.cat([p.ids, p.nxt[:, None]], dim=1)
    return replace(p, nxt=_argmax(model(ids, attention_mask=mask)), mask=mask, ids=ids)


def _shared_lower(model: HookedModel, jobs: Sequence[Job]) -> list[tuple[LowerBlocks | None, int]]:
    """Per job, a :class:`LowerBlocks` shared with the other jobs over the same prompts (None without
    any to share with) and the first residual the job's hooks can change."""
    n = model.cfg.n_layers
    names = [[name for name, _ in hooks] for hooks, _ in jobs]
    firsts = [first_changed(x, n) if all(isinstance(k, str) for k in x) else 0 for x in names]
    groups: dict[tuple, list[int]] = {}
    for j, (_, seqs) in enumerate(jobs):
        groups.setdefault(tuple(map(tuple, seqs)), []).append(j)
    out: list[tuple[LowerBlocks | None, int]] = [(None, f) for f in firsts]
    for members in groups.values():
        starts = {firsts[j] - 1 for j in members if names[j]} - {-1, 0}  # jobs without hooks only record
        if len(members) > 1 and starts:
            blocks = LowerBlocks(model, starts)
            for j in members:
                out[j] = (blocks, firsts[j])
    return out


@torch.no_grad()
def greedy_many(
    model: HookedModel,
    jobs: Sequence[Job],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    eos: set[int] | None = None,
    on_done: Callable[[list[tuple[int, int, list[int]]]], None] | None = None,
    reuse_lower: bool = True,
) -> list[list[list[int]]]:
    """Greedy continuations (without the end-of-sequence token) of every job's prompts, decoded in one
    pool of at most ``batch_size`` rows; ``out[job][i]`` belongs to ``jobs[job][1][i]``.

    ``on_done([(job, i, tokens), ...])`` is called as rows finish (e.g. to save them at once).
    ``reuse_lower``: where jobs over the same prompts prefill the very same batch, a later job starts
    at the lowest block its hooks reach (:class:`cna_lens.fast.LowerBlocks`; the same bits).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = eos_token_ids(model) if eos is None else eos
    out: list[list[list[int]]] = [[[] for _ in seqs] for _, seqs in jobs]
    # job by job, longest prompts first (similar lengths are prefilled together)
    queue = [(j, i) for j, (_, s) in enumerate(jobs) for i in sorted(range(len(s)), key=lambda i: (-len(s[i]), i))]
    refill_at = max(1, batch_size // 8)  # free rows that make a refill worth its prefill
    router = RowHooks([hooks for hooks, _ in jobs])
    prefix_kv: list[dict] = [{} for _ in jobs]  # each job's chat prefix runs once (under its hooks)
    kv, pad, head, pool = is_bridge(model), pad_id(model.tokenizer), 0, None
    spare = kv and grouped_everywhere(model)
    lower = _shared_lower(model, jobs) if kv and reuse_lower else [(None, 0)] * len(jobs)
    with model.hooks(fwd_hooks=router.hooks()) if router.by_name else contextlib.nullcontext():
        while True:
            free = batch_size - (len(pool.rows) if pool else 0)
            can_merge = pool is None or pool.cache is None or _growable(pool.cache)
            if head < len(queue) and can_merge and (pool is None or free >= refill_at):
                take, head = queue[head : head + free], head + free
                router.enabled = False  # a job prefills under its own hooks only
                for j in dict.fromkeys(j for j, _ in take):
                    rows = [r for r in take if r[0] == j]
                    seqs = [jobs[j][1][i] for _, i in rows]
                    # prompts of very different lengths prefill in separate passes (less padding)
                    with model.hooks(fwd_hooks=list(jobs[j][0])):
                        for part in length_batches([len(s) for s in seqs], len(seqs)):
                            some = [rows[i] for i in part], [seqs[i] for i in part]
                            new = _prefill(model, *some, kv, prefix_kv[j], lower[j])
                            if pool is not None and (pool.cache is None) != (new.cache is None):
                                raise RuntimeError("the model returned a KV cache for some batches only")
                            kv = new.cache is not None
                            pool = new if pool is None else _merge(pool, new, pad)
                router.enabled = True
            if pool is None:
                break
            keep, done = [], []
            for r, ((j, i), tok) in enumerate(zip(pool.rows, pool.nxt.tolist())):
                if tok not in eos:
                    out[j][i].append(tok)
                    if len(out[j][i]) < max_new_tokens:
                        keep.append(r)
                        continue
                done.append((j, i, out[j][i]))
            if done and on_done is not None:
                on_done(done)
            if not keep:
                pool = None
                continue
            if len(keep) < len(pool.rows):
                pool = _select(pool, keep)
            router.set_rows([j for j, _ in pool.rows], pool.mask.device)
            if spare and pool.cache is not None:  # steps append K/V in place (see cna_lens.kvcache)
                with_spare_columns(pool.cache)
            pool = _step(model, pool)
    return out


def greedy_tokens(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: set[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token id lists, decoded as one batch under the active hooks."""
    return greedy_many(model, [([], seqs)], max_new_tokens, batch_size=max(1, len(seqs)), eos=eos)[0]


def generate_many(
    model: HookedModel,
    jobs: Sequence[tuple[Sequence[FwdHook], Sequence[str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool | None = None,
    system: str | None = None,
    progress: bool = True,
    on_done: Callable[[int, int, str], None] | None = None,
    **decode_kwargs: Any,
) -> list[list[str]]:
    """Greedy completions (text, special tokens skipped) of each job's prompts, all jobs in one
    continuously refilled batch (see :func:`greedy_many`); ``on_done(job, i, text)`` as each finishes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [(hooks, encode(model.tokenizer, prompts, chat=chat, system=system)) for hooks, prompts in jobs]
    texts: list[list[str]] = [[""] * len(s) for _, s in encoded]
    with tqdm(total=sum(map(len, texts)), desc="generate", unit="prompt", disable=not progress) as bar:

        def finished(rows: list[tuple[int, int, list[int]]]) -> None:
            for j, i, toks in rows:
                texts[j][i] = model.tokenizer.decode(toks, skip_special_tokens=True, **decode_kwargs)
                if on_done is not None:
                    on_done(j, i, texts[j][i])
            bar.update(len(rows))

        greedy_many(model, encoded, max_new_tokens, batch_size=batch_size, on_done=finished)
    return texts


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
    return generate_many(
        model,
        [([], prompts)],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=chat,
        system=system,
        progress=progress,
        **decode_kwargs,
    )[0]
