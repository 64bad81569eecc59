"""Prompt formatting, tokenization and batching (no model forward passes here).

A prompt becomes token ids exactly once, here, so that discovery, generation and evaluation all
see the same tokens:

* chat models: ``apply_chat_template([{"role": "user", ...}], add_generation_prompt=True,
  tokenize=False)`` then ``tokenizer(text, add_special_tokens=False)`` (the template already holds
  any BOS, so none is added twice);
* models without a chat template (base models): the raw prompt with the tokenizer's own BOS
  convention (``add_special_tokens=True``).

Batches are **left**-padded so that position ``-1`` is every row's final real token, and always
travel with their ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


def check_prompts(prompts: Sequence[str], name: str = "prompts") -> list[str]:
    """Return ``prompts`` as a list, or raise a ValueError that names the argument."""
    if isinstance(prompts, str):
        raise TypeError(f"`{name}` must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"`{name}` is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"`{name}[{i}]` is {type(p).__name__}, expected str")
        if not p.strip():
            raise ValueError(f"`{name}[{i}]` is an empty prompt")
    return prompts


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer: Any, prompt: str, *, chat: bool | None = None, system: str | None = None, response_prefix: str = ""
) -> list[int]:
    """Token ids of one prompt, ready for the model (ending at the assistant turn for chat, followed by
    ``response_prefix``: the start of the answer the model is made to continue, e.g. "The answer is")."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("chat=True but this tokenizer has no chat template; pass chat=False")
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text + response_prefix, add_special_tokens=False)["input_ids"])
    if system is not None:
        raise ValueError("a system prompt needs chat formatting (chat=True)")
    return list(tokenizer(prompt + response_prefix, add_special_tokens=True)["input_ids"])


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat: bool | None = None,
    system: str | None = None,
    name: str = "prompts",
    response_prefix: str | Sequence[str] = "",
) -> list[list[int]]:
    """Token ids of every prompt (see :func:`format_prompt`); ``response_prefix``: one answer opening
    for all prompts (a string) or one per prompt (a list as long as ``prompts``)."""
    prompts = check_prompts(prompts, name)
    if isinstance(response_prefix, str):
        prefixes = [response_prefix] * len(prompts)
    else:
        prefixes = list(response_prefix)
        if len(prefixes) != len(prompts) or not all(isinstance(r, str) for r in prefixes):
            raise ValueError(
                f"response_prefix: one string for every prompt ({len(prompts)}), got {len(prefixes)} items"
            )
    return [format_prompt(tokenizer, p, chat=chat, system=system, response_prefix=r) for p, r in zip(prompts, prefixes)]


def pad_id(tokenizer: Any) -> int:
    """The id used for padding (pad, else eos, else 0); padded positions are masked anyway."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def left_pad(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``; position -1 is real in every row."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


#: fixed cost of one forward pass, in token positions (≈ 0.5 s on a 1.5B model on this CPU: the
#: batch's shared-prefix pass plus per-call overhead, against ≈ 8 ms per token in a large batch)
PASS_OVERHEAD = 64


def length_batches(lengths: Sequence[int], batch_size: int, overhead: int = PASS_OVERHEAD) -> list[list[int]]:
    """Chunks of at most ``batch_size`` indices, longest first, cut where padding costs more than a pass.

    The prompts are sorted by length and split into contiguous chunks minimizing (dynamic programme)
    ``Σ_chunks (rows × longest + overhead)``: the token positions computed with left padding plus a
    per-pass cost. Results are put back in the original order by the caller, so batching never changes
    what is computed beyond float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]  # non-increasing: a chunk [s, e) costs (e - s) · longest[s]
    cost, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for e in range(1, len(order) + 1):
        for s in range(max(0, e - batch_size), e):
            c = cost[s] + (e - s) * longest[s] + overhead
            if c < cost[e]:
                cost[e], cut[e] = c, s
    chunks, e = [], len(order)
    while e:
        chunks.append(order[cut[e] : e])
        e = cut[e]
    return chunks[::-1]
