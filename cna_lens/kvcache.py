"""A KV cache that decoding appends to in place, instead of copying it at every step.

HF's ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every decoding step copies
the whole cache of every layer (Qwen2.5-1.5B, bf16, 200 rows × 190 columns, this CPU: 155 ms of a
2.0 s step by the profiler; avoiding it made the step 1.4–2.0 % faster in an A/B, and the
JBB stage of ``cna-lens reproduce`` 4 %).
:class:`SpareLayer` keeps each layer's K and V in buffers with :data:`SPARE` spare columns::

    buf[:, :, n : n + m] ← new;   keys = buf[:, :, : n + m]      (a copy only when the room runs out)

``keys`` / ``values`` stay views of the buffers, so HF's cache API (length, crop, row selection)
works unchanged; an operation that replaces them (row selection, merging pools) gets fresh room at
the next update. oneDNN multiplies a column slice of a buffer 2–4× slower than a contiguous tensor
(measured), so :mod:`cna_lens.attention` multiplies by the whole buffer and drops the spare columns::

    scores = (q @ Kbufᵀ)[..., :n]          out = [p, 0] @ Vbuf        (Vbuf's spare columns are 0)

In bfloat16 that gave the same bits as the contiguous product in every shape tested (the tests
check it on whole models); in float32 the GEMM blocks its sums differently, so outputs differ by float
rounding. A buffer is written past a view's end only if no later view was handed out (so two
continuations of one cache state never overwrite each other's columns).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.cache_utils import DynamicLayer

#: spare columns added whenever a layer's buffer is (re)allocated
SPARE = 16


def buffer_of(x: Tensor) -> Tensor | None:
    """The spare-column buffer ``x`` is the leading column slice of (``x == buf[:, :, :n]``), if any."""
    buf = getattr(x, "cna_lens_buffer", None)
    if buf is None or buf.data_ptr() != x.data_ptr() or buf.shape[:-2] != x.shape[:-2]:
        return None
    return buf if buf.shape[-1] == x.shape[-1] and buf.shape[-2] >= x.shape[-2] else None


def _room(x: Tensor, m: int) -> Tensor | None:
    """``x``'s buffer if ``m`` more columns fit and ``x`` is its latest view (nothing written past it)."""
    buf = buffer_of(x) if x.ndim > 2 else None
    ok = buf is not None and buf.shape[-2] >= x.shape[-2] + m and buf.cna_lens_filled == x.shape[-2]
    return buf if ok else None


def _fresh(like: Tensor, rows: int, n: int) -> Tensor:
    """An empty buffer for ``n`` columns of ``rows`` rows shaped like ``like``, plus zeroed spare columns
    (zero: spare value columns meet zero attention weight, and 0 · 0 = 0)."""
    buf = like.new_empty(rows, *like.shape[1:-2], n + SPARE, like.shape[-1])
    buf[..., n:, :].zero_()
    return buf


def _view(buf: Tensor, n: int) -> Tensor:
    """``buf[..., :n, :]``, marked as the latest view of ``buf``."""
    out = buf[..., :n, :]
    out.cna_lens_buffer, buf.cna_lens_filled = buf, n  # type: ignore[attr-defined]
    return out


def _append(old: Tensor, new: Float[Tensor, "batch head m d"]) -> Tensor:
    """``cat([old, new], -2)`` written into ``old``'s buffer when it has room, else into a fresh one."""
    n, m = (old.shape[-2] if old.numel() else 0), new.shape[-2]  # a fresh layer holds an empty 1-D tensor
    buf = _room(old, m)
    if buf is None:
        buf = _fresh(new, new.shape[0], n + m)
        if n:
            buf[..., :n, :] = old
    buf[..., n : n + m, :] = new
    return _view(buf, n + m)


def take_rows(x: Float[Tensor, "batch head col d"], rows: Tensor, first: int = 0) -> Tensor:
    """``x[rows, :, first:]`` copied straight into a buffer with spare columns (one copy; the next
    append then needs none)."""
    n = x.shape[-2] - first
    buf = _fresh(x, len(rows), n)
    torch.index_select(x[..., first:, :], 0, rows, out=buf[..., :n, :])
    return _view(buf, n)


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` whose updates write into spare columns (see the module docstring)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = _append(self.keys, key_states), _append(self.values, value_states)
        return self.keys, self.values


def with_spare_columns(cache: Any) -> bool:
    """Make every plain ``DynamicLayer`` of an HF cache a :class:`SpareLayer` (in place, free: the
    first update allocates the room). False if the cache has other layers, which are left as they are."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(x) in (DynamicLayer, SpareLayer) for x in layers):
        return False
    for layer in layers:
        layer.__class__ = SpareLayer  # adds behaviour only, no state
    return True
