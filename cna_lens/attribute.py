"""Contrastive neuron attribution: streaming final-token statistics of ``blocks.L.mlp.hook_post``.

For a positive set P (e.g. harmful prompts) and a negative set N (harmless), with
``a_l(x) ∈ R^{d_mlp}`` the hook activation of layer ``l`` at the final real prompt token::

    mean_pos = 1/|P| Σ_{x∈P} a(x)      mean_neg = 1/|N| Σ_{x∈N} a(x)      diff = mean_pos − mean_neg
    std      = sqrt(((|P|−1) var_P + (|N|−1) var_N) / (|P| + |N| − 2))     (pooled, per neuron)
    effect   = diff / std                                               (Cohen's d)

Only running sums Σa and Σa² (float64) are kept, never per-prompt activations, so memory is flat
in the number of prompts and partial results over shards merge exactly (``Attribution.merge``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .hooks import HookedModel, check_hook, hook_name
from .models import model_name
from .neurons import NeuronSet, best_neurons
from .prompts import encode, left_pad, length_batches, pad_id
from .runs import atomic_write, atomic_write_json, read_json

FORMAT_VERSION = 1
RANKINGS = ("abs", "diff", "effect", "abs_effect")
_STATS = ("sum_pos", "sum_neg", "sumsq_pos", "sumsq_neg")
__all__ = ["Attribution", "attribute", "check_hook", "hook_name"]  # hook names live in .hooks


class _StopForward(Exception):
    """Raised by the last needed hook: nothing after it (later blocks, unembedding) is computed."""


def final_token_activations(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    hook: str = "mlp.hook_post",
    bar: tqdm | None = None,
) -> Iterator[tuple[list[int], Float[Tensor, "batch layer neuron"]]]:
    """Yield ``(indices, acts)`` per batch: ``hook`` in every layer at each prompt's final token.

    Batches are left-padded with an attention mask, so position -1 is every row's final real token.
    The forward stops after the last layer's hook.
    """
    for batch, acts in final_token_activations_multi(model, seqs, (hook,), batch_size=batch_size, bar=bar):
        yield batch, acts[hook]


def final_token_activations_multi(
    model: HookedModel,
    seqs: Sequence[Sequence[int]],
    hooks: Sequence[str],
    *,
    batch_size: int = 16,
    bar: tqdm | None = None,
) -> Iterator[tuple[list[int], dict[str, Float[Tensor, "batch layer width"]]]]:
    """:func:`final_token_activations` of several hooks from one forward pass per batch."""
    hooks = tuple(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("give at least one hook")
    for h in hooks:
        check_hook(model, h)
    n_layers = model.cfg.n_layers
    pad = pad_id(model.tokenizer)
    for batch in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = left_pad([seqs[i] for i in batch], pad, model.cfg.device)
        store: dict[str, list[Tensor | None]] = {h: [None] * n_layers for h in hooks}
        left = [n_layers * len(hooks)]  # hooks still to fire; the forward stops when none are
        fwd = [
            (hook_name(layer, h), partial(_capture, store=store[h], left=left, layer=layer, name=hook_name(layer, h)))
            for h in hooks
            for layer in range(n_layers)
        ]
        with torch.no_grad(), model.hooks(fwd_hooks=fwd):
            try:
                model(ids, attention_mask=mask)
            except _StopForward:
                pass
        missing = [h for h in hooks if any(t is None for t in store[h])]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire in every layer")
        if bar is not None:
            bar.update(len(batch))
        yield batch, {h: torch.stack(store[h], dim=1) for h in hooks}  # type: ignore[arg-type]


def _capture(act: Tensor, hook: object, *, store: list[Tensor | None], left: list[int], layer: int, name: str) -> None:
    """Keep the final position of ``act`` (float64, CPU); stop the forward once every hook has fired."""
    last = act[:, -1, :].detach()
    if not torch.isfinite(last).all():
        raise FloatingPointError(f"non-finite activations at {name}; try dtype=torch.float32")
    if store[layer] is None:
        left[0] -= 1
    store[layer] = last.to("cpu", torch.float64)
    if left[0] == 0:
        raise _StopForward


def _width(model: HookedModel, hook: str) -> int:
    """Size of ``hook``'s last dimension: d_mlp for the MLP's hidden hooks, else d_model."""
    return model.cfg.d_mlp if hook in ("mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear") else model.cfg.d_model


def _sums(model: HookedModel, seqs, batch_size: int, hooks: tuple[str, ...], bar) -> dict[str, tuple[Tensor, Tensor]]:
    """Per hook: Σa and Σa² (float64, [layer, width]) over the final tokens of ``seqs``."""
    out = {}
    for h in hooks:
        s = torch.zeros(model.cfg.n_layers, _width(model, h), dtype=torch.float64)
        out[h] = (s, torch.zeros_like(s))
    for _, acts in final_token_activations_multi(model, seqs, hooks, batch_size=batch_size, bar=bar):
        for h, a in acts.items():
            out[h][0].add_(a.sum(0))
            out[h][1].add_(a.square().sum(0))
    return out


@dataclass(frozen=True)
class Attribution:
    """Final-token activation statistics of two prompt sets; see the module docstring for the math."""

    model_name: str
    hook: str
    n_pos: int
    n_neg: int
    sum_pos: Float[Tensor, "layer neuron"]  # float64
    sum_neg: Float[Tensor, "layer neuron"]
    sumsq_pos: Float[Tensor, "layer neuron"]
    sumsq_neg: Float[Tensor, "layer neuron"]

    def __post_init__(self) -> None:
        shapes = {tuple(getattr(self, k).shape) for k in _STATS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"statistics must share one [layer, neuron] shape, got {shapes}")
        if self.n_pos < 0 or self.n_neg < 0:
            raise ValueError("counts must be >= 0")

    @property
    def n_layers(self) -> int:
        return self.sum_pos.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.sum_pos.shape[1]

    @property
    def mean_pos(self) -> Float[Tensor, "layer neuron"]:
        return (self.sum_pos / max(self.n_pos, 1)).float()

    @property
    def mean_neg(self) -> Float[Tensor, "layer neuron"]:
        return (self.sum_neg / max(self.n_neg, 1)).float()

    @property
    def diff(self) -> Float[Tensor, "layer neuron"]:
        """mean_pos − mean_neg (computed in float64, returned as float32)."""
        return (self.sum_pos / max(self.n_pos, 1) - self.sum_neg / max(self.n_neg, 1)).float()

    @property
    def std(self) -> Float[Tensor, "layer neuron"]:
        """Pooled within-set standard deviation per neuron."""
        dof = self.n_pos + self.n_neg - 2
        if dof < 1:
            raise ValueError("pooled std needs at least 3 prompts in total")
        ss = lambda s, s2, n: (s2 - s.square() / n).clamp_min(0) if n else torch.zeros_like(s)  # noqa: E731
        pooled = ss(self.sum_pos, self.sumsq_pos, self.n_pos) + ss(self.sum_neg, self.sumsq_neg, self.n_neg)
        return (pooled / dof).sqrt().float()

    @property
    def effect(self) -> Float[Tensor, "layer neuron"]:
        """diff / pooled std (0 where the std is 0)."""
        std = self.std.double()
        d = self.sum_pos / max(self.n_pos, 1) - self.sum_neg / max(self.n_neg, 1)
        return torch.where(std > 0, d / std.clamp_min(1e-30), torch.zeros_like(d)).float()

    @property
    def welch_t(self) -> Float[Tensor, "layer neuron"]:
        """Welch's t = diff / sqrt(var_P/|P| + var_N/|N|), unbiased variances (0 where that is 0)."""
        if self.n_pos < 2 or self.n_neg < 2:
            raise ValueError("Welch's t needs at least 2 prompts in each set")
        var = lambda s, s2, n: (s2 - s.square() / n).clamp_min(0) / (n - 1)  # noqa: E731
        se2 = var(self.sum_pos, self.sumsq_pos, self.n_pos) / self.n_pos
        se2 = se2 + var(self.sum_neg, self.sumsq_neg, self.n_neg) / self.n_neg
        d = self.sum_pos / self.n_pos - self.sum_neg / self.n_neg
        return torch.where(se2 > 0, d / se2.clamp_min(1e-300).sqrt(), torch.zeros_like(d)).float()

    @property
    def rms_neg(self) -> Float[Tensor, "layer neuron"]:
        """Root-mean-square activation on the negative set, sqrt(Σa²/|N|): how much a neuron is used there."""
        return (self.sumsq_neg / max(self.n_neg, 1)).sqrt().float()

    def scores(self, by: str = "abs") -> Float[Tensor, "layer neuron"]:
        """Ranking score: |diff| (``abs``), diff, effect, or |effect| (``abs_effect``)."""
        if by == "abs":
            return self.diff.abs()
        if by == "diff":
            return self.diff
        if by == "effect":
            return self.effect
        if by == "abs_effect":
            return self.effect.abs()
        raise ValueError(f"by={by!r}: choose one of {RANKINGS}")

    def top_neurons(
        self,
        k: int | None = None,
        fraction: float = 0.001,
        exclude_layers: Sequence[int] = (0, 1),
        by: str = "abs",
    ) -> NeuronSet:
        """The ``k`` best neurons across all layers (``k = round(fraction · n_layers · d_mlp)`` if None)."""
        meta = {"model": self.model_name, "by": by, "n_pos": self.n_pos, "n_neg": self.n_neg}
        return best_neurons(self.scores(by), k, fraction, exclude_layers, self.hook, meta)

    @classmethod
    def merge(cls, parts: Sequence[Attribution]) -> Attribution:
        """Sum statistics of shards of the same model and hook (equal to one pass over all prompts)."""
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        for p in parts[1:]:
            for f in ("model_name", "hook", "n_layers", "d_mlp"):
                if getattr(p, f) != getattr(first, f):
                    raise ValueError(
                        f"cannot merge attributions with different {f}: {getattr(first, f)!r} vs {getattr(p, f)!r}"
                    )
        total = {k: sum((getattr(p, k) for p in parts[1:]), getattr(first, k).clone()) for k in _STATS}
        return cls(first.model_name, first.hook, sum(p.n_pos for p in parts), sum(p.n_neg for p in parts), **total)

    def save(self, directory: str | os.PathLike) -> Path:
        """``attribution.safetensors`` (float64 sums) + ``attribution.json``, each written atomically."""
        d = Path(directory)
        tensors = {k: getattr(self, k).contiguous() for k in _STATS}
        atomic_write(d / "attribution.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write_json(
            d / "attribution.json",
            {
                "kind": "cna_lens.Attribution",
                "format_version": FORMAT_VERSION,
                "model_name": self.model_name,
                "hook": self.hook,
                "n_pos": self.n_pos,
                "n_neg": self.n_neg,
                "n_layers": self.n_layers,
                "d_mlp": self.d_mlp,
            },
        )
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Attribution:
        d = Path(directory)
        meta = read_json(d / "attribution.json", "cna_lens.Attribution", FORMAT_VERSION)
        try:
            tensors = load_file(str(d / "attribution.safetensors"))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{d / 'attribution.safetensors'} is missing or corrupt: {e}") from e
        shape = (meta["n_layers"], meta["d_mlp"])
        for k in _STATS:
            t = tensors.get(k)
            if t is None or tuple(t.shape) != shape or t.dtype != torch.float64:
                raise ValueError(f"{d}: tensor {k!r} missing or not float64 {shape}")
        return cls(
            meta["model_name"], meta["hook"], int(meta["n_pos"]), int(meta["n_neg"]), **{k: tensors[k] for k in _STATS}
        )


def attribute(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    batch_size: int = 16,
    hook: str = "mlp.hook_post",
    chat: bool | None = None,
    system: str | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Attribution:
    """Contrast final-token ``hook`` activations of ``positive`` vs ``negative`` prompts.
    ``shard=(i, n)``: every prompt is checked and formatted, the sums cover prompts ``i::n`` of each set."""
    options = {"batch_size": batch_size, "chat": chat, "system": system, "progress": progress, "shard": shard}
    return attribute_multi(model, positive, negative, (hook,), **options)[hook]


def attribute_multi(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: Sequence[str],
    *,
    batch_size: int = 16,
    chat: bool | None = None,
    system: str | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Attribution]:
    """:func:`attribute` for several hooks at once (e.g. ``mlp.hook_post`` for CNA and ``hook_mlp_out``
    for CAA vectors) from one forward pass per prompt; equal to separate calls."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    pos, neg = encode_sets(model, positive, negative, hooks=hooks, chat=chat, system=system)
    return attribute_tokens_multi(model, pos[i::n], neg[i::n], hooks, batch_size=batch_size, progress=progress)


def encode_sets(
    model: HookedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    hooks: Sequence[str] = ("mlp.hook_post",),
    chat: bool | None = None,
    system: str | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Check the hooks, then format both prompt sets (errors name ``positive`` / ``negative``)."""
    for h in hooks:
        check_hook(model, h)
    pos = encode(model.tokenizer, positive, chat=chat, system=system, name="positive")
    neg = encode(model.tokenizer, negative, chat=chat, system=system, name="negative")
    return pos, neg


def attribute_tokens(
    model: HookedModel,
    pos: Sequence[Sequence[int]],
    neg: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    hook: str = "mlp.hook_post",
    progress: bool = True,
) -> Attribution:
    """:func:`attribute` on already formatted token ids (either list may be empty, e.g. a shard)."""
    return attribute_tokens_multi(model, pos, neg, (hook,), batch_size=batch_size, progress=progress)[hook]


def attribute_tokens_multi(
    model: HookedModel,
    pos: Sequence[Sequence[int]],
    neg: Sequence[Sequence[int]],
    hooks: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Attribution]:
    """:func:`attribute_multi` on already formatted token ids."""
    hooks = tuple(dict.fromkeys(hooks))
    with tqdm(total=len(pos) + len(neg), desc="attribute", unit="prompt", disable=not progress) as bar:
        p = _sums(model, pos, batch_size, hooks, bar)
        n = _sums(model, neg, batch_size, hooks, bar)
    name = model_name(model)
    return {h: Attribution(name, h, len(pos), len(neg), p[h][0], n[h][0], p[h][1], n[h][1]) for h in hooks}
