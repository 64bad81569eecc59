"""Greedy generation on the model's own weights, on Hugging Face modules.

Every intervention that evaluation generates under is a weight edit (:func:`cna_lens.edit.edit_weights`)
or a plain torch hook on HF modules (:func:`cna_lens.engine.steer_mlp_out`), so the engine needs
no hooks of its own. Prompts are chat-formatted (:func:`cna_lens.prompts.encode`) and decoded
greedily on :func:`cna_lens.engine.stock_model`, the plain HF model (SDPA attention) that shares the
bridge's tensors, by one of three engines:

* ``"shrink"`` (the default): static batches (sorted by length, left-padded) whose common prompt
  prefix is prefilled once, decoded by a greedy loop from which each row leaves as it finishes
  (:mod:`cna_lens.speed`, public transformers APIs only); each completion is reported as it finishes.
* ``"cb"``: HF continuous batching (``continuous_batching_context_manager``): a paged KV cache, up to
  ``batch_size`` requests decoded together, a finished request leaves at once and the next one joins.
* ``"hf"``: ``generate`` on static batches (HF's preallocated ``StaticCache``): rows that emit
  end-of-sequence stay in the batch until every row has finished or reached ``max_new_tokens``.

On the 1.5B (bf16, 2 CPU cores, 48 JBB prompts × 150 tokens × 2 conditions, one process) ``"cb"``
took 1.75× the wall time of ``"shrink"`` and the former patched TransformerLens engine 1.24×
(``benchmarks/generation_ab.py``, docs/performance.md).

Arbitrary TransformerLens hooks still work: with ``fwd_hooks=...``, or whenever a hook point holds
a forward hook (e.g. inside :func:`cna_lens.ablate`), or for hooked models that are not a bridge,
batches go through TransformerLens' own public ``model.generate`` instead (``"tl"``: the same greedy
tokens up to float rounding; slower, since TL's attention runs in eager mode with hook points).

A *job* is ``(intervention, prompts)``: ``intervention`` is ``None`` or a factory of a context
manager (``lambda: edit_weights(model, neurons, 0.0)``) entered around that job's prompts.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .engine import stock_model, stock_runs
from .hooks import FwdHook
from .models import HookedModel
from .prompts import encode, left_pad, pad_id
from .speed import shrink_generate

log = logging.getLogger(__name__)

#: a job: the factory of the context manager its prompts are generated under (None: as is), its prompts
Job = tuple[Callable[[], contextlib.AbstractContextManager] | None, Sequence[str]]
#: ``on_first(indices, logprobs)``: log p(first new token) of a batch's rows, ``[len(indices), vocab]``
FirstLogprobs = Callable[[list[int], Float[Tensor, "rows vocab"]], None]


def eos_token_ids(model: HookedModel) -> list[int]:
    """End-of-sequence ids: the tokenizer's plus the generation config's (e.g. ``<|im_end|>``), sorted."""
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
    return sorted(ids)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first) cut into the fewest batches of at most ``batch_size``,
    as even as possible: every batch decodes until its longest answer ends, so fewer batches means
    fewer decoding steps, and similar lengths together means less padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = math.ceil(len(order) / batch_size) if order else 0
    cuts = [round(k * len(order) / n) for k in range(n + 1)] if n else [0]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def _cut(row: list[int], eos: Sequence[int]) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    stop = set(eos)
    return next((row[:k] for k, t in enumerate(row) if t in stop), row)


#: the ``GenerationConfig`` fields that could change greedy decoding, other than the lengths and ids;
#: HF fills every field left None from the model's own generation config, so each one is set
_GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "use_cache": True}
#: nothing but the tokens comes back
_TOKENS_ONLY = dict.fromkeys(
    ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states"), False
)


def _greedy_config(max_new_tokens: int, eos: Sequence[int], pad: int, **extra: Any) -> Any:
    """A greedy ``GenerationConfig`` (an empty ``eos`` list: never stop early)."""
    from transformers import GenerationConfig

    ids = {"eos_token_id": list(eos), "pad_token_id": pad}
    return GenerationConfig(max_new_tokens=max_new_tokens, **ids, **_GREEDY, **_TOKENS_ONLY, **extra)


@torch.no_grad()
def _hf_batch(model: HookedModel, seqs: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int]) -> list:
    """HF ``generate`` on one static, left-padded batch (a preallocated ``StaticCache``: a growing
    ``DynamicCache`` reallocates every layer's K/V at every step, measured 3x slower per step here)."""
    plain = stock_model(model)
    pad = pad_id(model.tokenizer)
    ids, mask = left_pad(seqs, pad, plain.device)
    config = _greedy_config(max_new_tokens, eos, pad, cache_implementation="static")
    out = plain.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [_cut(row, eos) for row in out[:, ids.shape[1] :].tolist()]


#: tokens per page of the continuous-batching KV cache
PAGE = 64


@torch.no_grad()
def _cb_rows(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: Sequence[int],
    batch_size: int,
    on_row: Callable[[int, list[int]], None],
) -> None:
    """HF continuous batching over all of ``seqs``; ``on_row(i, tokens)`` as each request finishes.
    The paged cache is sized for ``batch_size`` requests of the longest prompt (HF's default sizing
    assumes a GPU's free memory)."""
    from transformers import ContinuousBatchingConfig

    plain = stock_model(model)
    per_request = math.ceil((max(map(len, seqs)) + max_new_tokens) / PAGE)
    cb = ContinuousBatchingConfig(
        page_size=PAGE,
        num_blocks=min(batch_size, len(seqs)) * per_request + 1,
        max_batch_tokens=max(256, 4 * max(map(len, seqs))),  # per forward: decoding rows + a prefill chunk
        max_requests_per_batch=batch_size,
        allow_block_sharing=False,
    )
    config = _greedy_config(max_new_tokens, list(eos) or [-1], pad_id(model.tokenizer))
    with plain.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=cb, warmup=False
    ) as manager:
        ids = manager.add_requests([list(s) for s in seqs], max_new_tokens=max_new_tokens)
        where, left = {r: i for i, r in enumerate(ids)}, len(ids)
        while left:
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError(f"HF continuous batching stopped with {left} of {len(ids)} requests unfinished")
                continue
            if res.error is not None:
                raise RuntimeError(f"HF continuous batching failed on a request: {res.error}")
            if res.is_finished():
                on_row(where[res.request_id], _cut(list(res.generated_tokens), eos))
                left -= 1


def tl_kv_cache_works() -> bool:
    """Whether TransformerLens' cached ``generate`` sees the prompt: TransformerLens 4.3 passes the HF
    layers ``past_key_values``, which transformers 5.24 renamed to ``cache`` (the cache then stays
    empty and generation ignores the prompt). From 5.24 on, TL's generate recomputes every step
    instead (correct, slower); the stock engine is not affected."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("5.24")


@torch.no_grad()
def _tl_batch(model: HookedModel, seqs: Sequence[Sequence[int]], max_new_tokens: int, eos: Sequence[int]) -> list:
    """TransformerLens' own ``generate`` (its hooks fire at every step)."""
    ids, mask = left_pad(seqs, pad_id(model.tokenizer), model.cfg.device)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        stop_at_eos=bool(eos),
        eos_token_id=list(eos) or None,
        return_type="tokens",
        verbose=False,
        use_past_kv_cache=tl_kv_cache_works(),
    )
    return [_cut(row, eos) for row in out[:, ids.shape[1] :].tolist()]


ENGINES = ("auto", "cb", "shrink", "hf", "tl")


def engine_for(model: HookedModel, engine: str = "auto") -> str:
    """The engine that runs now: ``"tl"`` (TransformerLens' generate) where TL hooks are active, the
    hooked model is not a bridge, or its weights were processed into TL's coordinates; otherwise
    ``engine`` (``"auto"``: ``"shrink"``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose among {', '.join(ENGINES)}")
    return "tl" if engine == "tl" or not stock_runs(model) else ("shrink" if engine == "auto" else engine)


def greedy_tokens(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int | None = None,
    eos: Sequence[int] | None = None,
    on_batch: Callable[[list[int], list[list[int]]], None] | None = None,
    engine: str = "auto",
    on_first: FirstLogprobs | None = None,
) -> list[list[int]]:
    """Greedy continuations (without the end-of-sequence token) of token id lists, in their order,
    under whatever weights and hooks are active; ``on_batch(indices, tokens)`` as rows finish
    (each row as it finishes with ``"cb"`` / ``"shrink"``, each batch with ``"hf"`` / ``"tl"``).
    ``on_first(indices, logprobs)``: log p(first new token) per row (float32, on CPU), from the same
    prefill the decoding starts from (``"shrink"`` only: no extra forward pass)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_ids(model) if eos is None else sorted(eos)
    out: list[list[int]] = [[] for _ in seqs]
    batch_size = batch_size or max(1, len(seqs))
    used = engine_for(model, engine)
    if on_first is not None and used != "shrink":
        raise ValueError(f"on_first needs the 'shrink' engine; the {used!r} engine runs now")

    def done(batch: list[int], toks: list[list[int]]) -> None:
        for i, t in zip(batch, toks):
            out[i] = t
        if on_batch is not None:
            on_batch(batch, toks)

    if used == "cb" and seqs:
        _cb_rows(model, seqs, max_new_tokens, eos, batch_size, lambda i, t: done([i], [t]))
        return out
    if used == "shrink":
        plain = stock_model(model)
        for batch in batches_by_length([len(s) for s in seqs], batch_size):
            ids, mask = left_pad([seqs[i] for i in batch], pad_id(model.tokenizer), plain.device)
            first = None if on_first is None else lambda x, b=batch: on_first(b, x.float().log_softmax(-1).cpu())
            shrink_generate(
                plain, ids, mask, max_new_tokens, eos, lambda r, t, b=batch: done([b[r]], [list(t)]), on_first=first
            )
        return out
    run = _hf_batch if used == "hf" else _tl_batch
    for batch in batches_by_length([len(s) for s in seqs], batch_size):
        done(batch, run(model, [seqs[i] for i in batch], max_new_tokens, eos))
    return out


def generate_many(
    model: HookedModel,
    jobs: Sequence[Job],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool | None = None,
    system: str | None = None,
    progress: bool = True,
    on_done: Callable[[int, int, str], None] | None = None,
    fwd_hooks: Sequence[FwdHook] = (),
    engine: str = "auto",
    on_first: Callable[[int, list[int], Float[Tensor, "rows vocab"]], None] | None = None,
    response_prefix: str | Sequence[str] = "",
    **decode_kwargs: Any,
) -> list[list[str]]:
    """Greedy completions (text, special tokens skipped) of each job's prompts, ``out[job][i]`` for
    ``jobs[job][1][i]``; each job's prompts run inside its intervention's context.
    ``on_done(job, i, text)`` is called as soon as a completion is known (e.g. to save it).
    ``on_first(job, indices, logprobs)``: the first new token's log-probabilities, from the prefill
    (``"shrink"`` engine only; see :func:`greedy_tokens`).
    ``fwd_hooks``: TransformerLens hooks active for every job (then TL's generate runs).
    ``engine``: ``"auto"`` / ``"cb"`` / ``"shrink"`` / ``"hf"`` / ``"tl"`` (see the module docstring).
    ``response_prefix``: the start of every answer (a string), or one per prompt of each job (a list
    as long as the job's prompts, e.g. JBB's targets), placed after the assistant turn's opening; the
    returned texts are what follows it (a prefilling attack, or any forced answer opening)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engine_for(model, engine)  # a bad name fails before any work
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for j, job in enumerate(jobs):
        if not (isinstance(job, tuple) and len(job) == 2 and (job[0] is None or callable(job[0]))):
            raise TypeError(f"jobs[{j}] must be (None or a context-manager factory, prompts)")
    encoded = [
        encode(model.tokenizer, prompts, chat=chat, system=system, response_prefix=response_prefix)
        for _, prompts in jobs
    ]
    texts: list[list[str]] = [[""] * len(s) for s in encoded]
    hooks = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()
    with tqdm(total=sum(map(len, texts)), desc="generate", unit="prompt", disable=not progress) as bar, hooks:
        for j, ((make, _), seqs) in enumerate(zip(jobs, encoded)):

            def finished(batch: list[int], toks: list[list[int]], j: int = j) -> None:
                for i, t in zip(batch, toks):
                    texts[j][i] = model.tokenizer.decode(t, skip_special_tokens=True, **decode_kwargs)
                    if on_done is not None:
                        on_done(j, i, texts[j][i])
                bar.update(len(batch))

            with make() if make is not None else contextlib.nullcontext():
                first = None if on_first is None else lambda b, x, j=j: on_first(j, b, x)
                greedy_tokens(
                    model, seqs, max_new_tokens, batch_size=batch_size, on_batch=finished, engine=engine, on_first=first
                )
    return texts


def generate(model: HookedModel, prompts: Sequence[str], **options: Any) -> list[str]:
    """Greedy completions (text, special tokens skipped) of ``prompts``, in their order, under the active
    weight edits; with ``fwd_hooks`` (or TL hooks already active) through TransformerLens' generate.
    ``options``: the keyword arguments of :func:`generate_many` (``max_new_tokens=64``, ``batch_size=8``,
    ``chat``, ``system``, ``response_prefix``, ``progress``, ``fwd_hooks``, ``engine``, decoding
    arguments); ``on_done`` gets job 0."""
    return generate_many(model, [(None, prompts)], **options)[0]


def generate_scored(
    model: HookedModel, prompts: Sequence[str], **options: Any
) -> tuple[list[str], Float[Tensor, "prompt vocab"] | None]:
    """:func:`generate`, and log p(first new token) of each prompt (float32) taken from the same prefill,
    so the prompts pass through the model once; None where the engine that runs is not ``"shrink"``."""
    if not prompts or options.get("fwd_hooks") or engine_for(model, options.get("engine", "auto")) != "shrink":
        return generate(model, prompts, **options), None
    first: dict[int, Tensor] = {}
    texts = generate_many(model, [(None, prompts)], on_first=lambda _, rows, lp: first.update(zip(rows, lp)), **options)
    return texts[0], torch.stack([first[i] for i in range(len(prompts))])
