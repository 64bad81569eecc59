"""Faster attention for TL 4 bridges, with the same outputs and hook values: copy-free GQA, a mask built once.

TransformerLens reimplements attention (so that ``hook_attn_scores`` and ``hook_pattern`` fire).
Two of its per-layer costs grow with the KV length and are removed here; both are on by default
(``load_model(..., fast_attention=True)``, :func:`fast_attention`).

**Grouped-query attention.** TL expands K and V with ``repeat_kv``: a copy of ``n_heads / n_kv_heads``
times the whole KV cache in every layer at every decoding step. At 150 new tokens and batch 100
that copy and the ``[1 × d_head] @ [d_head × kv_len]`` products per head cost more than the MLPs.
:func:`grouped_attention` hands TL a stand-in for the expanded tensor instead; both of TL's
``matmul`` calls then run once per KV head on the stacked query heads::

    scores[b, kv·G + g, s, :] = q[b, kv·G + g, s, :] @ K[b, kv]ᵀ      (G = n_heads / n_kv_heads)

the same products as before, so the hooks see the same ``[batch, head, q_pos, k_pos]`` tensors.

**The mask, once per pass.** With the bridge's 4-D mask, TL turns it into an additive mask in every
layer and guards the softmax against rows with no visible key (``isneginf(scores).all(-1)``, two
``masked_fill`` and a NaN scrub, each over the whole ``[batch, head, q, kv]`` tensor). :func:`lean_mask`
builds the additive mask, and finds its empty rows, once per forward pass for all layers; layers then
add it and skip the guards where no row is empty (a decoding step's query always sees itself)::

    scores ← scores + M;   pattern = softmax(scores)               (no empty row in M)
    pattern = softmax(scores.masked_fill(E, 0)).masked_fill(E, 0)  (E: the empty rows of M)

the same bits as TL's path for finite scores. A layer whose ``hook_attn_scores`` holds a hook (which
could mask whole rows itself; ``run_with_cache`` caching the scores counts too) takes TL's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .kvcache import buffer_of
from .models import HookedModel

_ATTENTION = "PositionEmbeddingsAttentionBridge"


class _GroupedKV:
    """Stands in for ``repeat_kv(x, groups)`` ([batch, kv·G, pos, d_head]) without building it."""

    def __init__(self, x: Tensor, groups: int, transposed: bool = False) -> None:
        self.x, self.groups, self.transposed = x, groups, transposed

    @property
    def shape(self) -> torch.Size:
        b, kv, pos, d = self.x.shape
        return torch.Size((b, kv * self.groups, d, pos) if self.transposed else (b, kv * self.groups, pos, d))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def transpose(self, a: int, b: int) -> _GroupedKV:
        if sorted((a % 4, b % 4)) != [2, 3]:
            raise NotImplementedError(f"grouped K/V only transposes its last two dims, not ({a}, {b})")
        return _GroupedKV(self.x, self.groups, not self.transposed)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__) and not kwargs and len(args) == 2:
            a, b = args
            if isinstance(a, Tensor) and isinstance(b, _GroupedKV) and a.ndim == 4:
                return b._left_matmul(a)
        raise NotImplementedError(f"grouped K/V supports only `tensor @ kv`, not {getattr(func, '__name__', func)}")

    def _left_matmul(self, a: Tensor) -> Tensor:
        """``a @ repeat_kv(x)`` (or its transpose) as one product per KV head over its G query heads.

        Where ``x`` is a column slice of a :mod:`cna_lens.kvcache` buffer, the product runs over the
        whole (contiguous) buffer: scores drop the spare columns, weights get zeros there."""
        batch, heads, q_len, _ = a.shape
        kv, n = self.x.shape[1], self.x.shape[2]
        x = buffer_of(self.x)
        x = self.x if x is None else x
        if not self.transposed and x.shape[2] != n:
            a = torch.nn.functional.pad(a, (0, x.shape[2] - n))
        other = x.transpose(-2, -1) if self.transposed else x
        out = a.reshape(batch, kv, self.groups * q_len, a.shape[-1]) @ other
        out = out.view(batch, heads, q_len, out.shape[-1])
        return out[..., :n] if self.transposed and out.shape[-1] != n else out


def _repeat_kv(x: Tensor, groups: int) -> Tensor | _GroupedKV:
    return x if groups == 1 else _GroupedKV(x, groups)


@contextlib.contextmanager
def _patched_repeat_kv() -> Iterator[None]:
    """TL's attention imports ``repeat_kv`` from the llama module on every call: swap it meanwhile."""
    import transformers.models.llama.modeling_llama as llama

    original = llama.repeat_kv
    llama.repeat_kv = _repeat_kv
    try:
        yield
    finally:
        llama.repeat_kv = original


def _grouped_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _patched_repeat_kv():
            return forward(*args, **kwargs)

    wrapped.cna_lens_grouped = forward  # type: ignore[attr-defined]
    return wrapped


def grouped_attention(model: HookedModel, enabled: bool = True) -> int:
    """Turn copy-free GQA on (or off) in every TL position-embedding attention of ``model``.

    Returns the number of attention modules changed. Outputs and hook values are those of TL's own
    path up to float rounding (the tests compare both); models with one KV head per query head, and
    hooked models that are not TL 4 bridges, are left as they are.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ != _ATTENTION:
            continue
        original = module.__dict__.get("forward")
        active = original is not None and hasattr(original, "cna_lens_grouped")
        # object.__setattr__: TL components forward unknown attribute writes to the HF module
        if enabled and not active:
            object.__setattr__(module, "forward", _grouped_forward(module.forward))
            changed += 1
        elif not enabled and active:
            del module.__dict__["forward"]  # back to the class's forward
            changed += 1
    return changed


def grouped_everywhere(model: HookedModel) -> bool:
    """Whether every attention of ``model`` multiplies K and V through :class:`_GroupedKV` (copy-free GQA
    on, more query than KV heads): then a :mod:`cna_lens.kvcache` buffer's views cost no extra copy."""
    modules = [m for m in model.modules() if type(m).__name__ == _ATTENTION]
    return bool(modules) and all(
        hasattr(m.__dict__.get("forward"), "cna_lens_grouped")
        and getattr(m.original_component, "num_key_value_groups", 1) > 1
        for m in modules
    )


# ----------------------------------------------------------------------------- the mask, once per pass
_METHODS = ("_apply_reconstruct_attention_mask", "_masked_softmax", "_scrub_compatibility_pattern_nans")


class _MaskCache:
    """The additive form ``M`` of the bridge's last 4-D mask and its empty rows ``E``, shared by a model's layers.

    Keyed by the mask tensor itself (kept alive, so its identity is not reused), its version counter
    and what TL slices and casts it to; one forward pass passes the same mask to every layer.
    """

    def __init__(self) -> None:
        self.src: Tensor | None = None
        self.key: tuple = ()
        self.add = self.empty = torch.empty(0)
        self.any_empty = True

    def get(self, attn: Any, mask: Tensor, scores: Tensor, kv_len: int, q_len: int) -> _MaskCache:
        dtype = scores.dtype
        key = (mask._version, dtype, scores.device, kv_len, q_len)
        if self.src is not mask or self.key != key:
            m = mask[..., :kv_len] if mask.shape[-1] != kv_len else mask
            m = m[..., -q_len:, :] if m.shape[-2] != q_len else m
            if m.dtype == torch.bool:  # TL's own conversions, in its order (compatibility mode: -inf)
                zero = torch.zeros((), dtype=dtype, device=scores.device)
                add = torch.where(m, zero, torch.full((), -torch.inf, dtype=dtype, device=scores.device))
            else:
                add = attn._normalize_compatibility_mask_sentinel(m).to(dtype=dtype)
            self.src, self.key, self.add = mask, key, add
            self.empty = torch.isneginf(add).all(dim=-1, keepdim=True)
            self.any_empty = bool(self.empty.any())
        return self


def _lean_methods(attn: Any, cache: _MaskCache) -> dict[str, Callable[..., Tensor]]:
    """Replacements of TL's mask, softmax and NaN scrub for one attention module (see the module docstring)."""
    tl = {name: getattr(type(attn), name).__get__(attn) for name in _METHODS}
    state: dict[str, _MaskCache | None] = {"mask": None}  # set by the mask step for this layer's softmax

    def apply_mask(
        attn_scores: Tensor, attention_mask: Tensor | None, seq_len: int, q_seq_len: int | None = None
    ) -> Tensor:  # TL's signature (it passes keywords)
        hooked = attn.hook_attn_scores._forward_hooks or attn.hook_attn_scores._forward_pre_hooks
        direct = attention_mask is not None and attention_mask.ndim >= 4
        if not direct or hooked or not attn.compatibility_mode or attn_scores.ndim != 4:
            state["mask"] = None
            return tl["_apply_reconstruct_attention_mask"](attn_scores, attention_mask, seq_len, q_seq_len)
        q = seq_len if q_seq_len is None else q_seq_len
        state["mask"] = cache.get(attn, attention_mask, attn_scores, seq_len, q)
        return attn_scores + state["mask"].add

    def softmax(attn_scores: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        m, f = state["mask"], torch.nn.functional.softmax
        if m is None:
            return tl["_masked_softmax"](attn_scores, dtype)
        if not m.any_empty:
            return f(attn_scores, dim=-1, dtype=dtype)
        return f(attn_scores.masked_fill(m.empty, 0.0), dim=-1, dtype=dtype).masked_fill(m.empty, 0.0)

    def scrub(pattern: Tensor) -> Tensor:
        return tl["_scrub_compatibility_pattern_nans"](pattern) if state["mask"] is None else pattern

    return {
        "_apply_reconstruct_attention_mask": apply_mask,
        "_masked_softmax": softmax,
        "_scrub_compatibility_pattern_nans": scrub,
    }


def lean_mask(model: HookedModel, enabled: bool = True) -> int:
    """Build the attention mask once per forward pass (on), or in every layer as TL does (off).

    Returns the number of attention modules changed; same outputs and hook values as TL's path.
    """
    cache, changed = _MaskCache(), 0
    for module in model.modules():
        if type(module).__name__ != _ATTENTION or not all(hasattr(type(module), n) for n in _METHODS):
            continue
        active = "_masked_softmax" in module.__dict__
        if enabled and not active:
            for name, fn in _lean_methods(module, cache).items():
                object.__setattr__(module, name, fn)  # TL components forward attribute writes to the HF module
            changed += 1
        elif not enabled and active:
            for name in _METHODS:
                del module.__dict__[name]
            changed += 1
    return changed


def fast_attention(model: HookedModel, enabled: bool = True) -> int:
    """Both speed-ups (:func:`grouped_attention`, :func:`lean_mask`) on or off; modules changed."""
    return max(grouped_attention(model, enabled), lean_mask(model, enabled))
