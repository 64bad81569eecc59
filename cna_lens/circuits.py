"""Where does the refusal gate live? Ablation maps over layers and single neurons.

All maps use the first-token refusal score ``s(x) = log p(R|x) − log(1 − p(R|x))`` (see
``evaluate.refusal_score``) averaged over evaluation prompts, and report

    Δ(S) = mean_x s_S(x) − mean_x s(x)        (S = the neurons ablated; negative = less refusal)

* per layer: S = the selected neurons of one layer → ``delta[l]``;
* cumulative: S = selected neurons of layers ≥ l (top-down) or ≤ l (bottom-up);
* per neuron: S = one neuron, for the top ``n`` neurons of the set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .evaluate import final_logprobs, refusal_score, refusal_token_ids
from .intervene import ablate
from .models import HookedModel, model_name
from .neurons import NeuronSet
from .runs import atomic_write, atomic_write_json, read_json

FORMAT_VERSION = 1


def mean_refusal_score(model: HookedModel, prompts: Sequence[str], token_ids: Sequence[int], batch_size: int) -> float:
    return float(refusal_score(final_logprobs(model, prompts, batch_size=batch_size), token_ids).mean())


@dataclass(frozen=True)
class LayerMap:
    """Δ mean refusal score when ablating the set's neurons layer by layer (NaN: no neuron there)."""

    model_name: str
    baseline: float
    delta: Float[Tensor, " layer"]
    top_down: Float[Tensor, " layer"]  # ablate layers >= l
    bottom_up: Float[Tensor, " layer"]  # ablate layers <= l
    counts: tuple[int, ...]
    n_prompts: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        tensors = {"delta": self.delta, "top_down": self.top_down, "bottom_up": self.bottom_up}
        atomic_write(
            d / "layer_map.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        )
        atomic_write_json(
            d / "layer_map.json",
            {
                "kind": "cna_lens.LayerMap",
                "format_version": FORMAT_VERSION,
                "model_name": self.model_name,
                "baseline": self.baseline,
                "counts": list(self.counts),
                "n_prompts": self.n_prompts,
                "meta": self.meta,
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LayerMap:
        d = Path(directory)
        meta = read_json(d / "layer_map.json", "cna_lens.LayerMap", FORMAT_VERSION)
        t = load_file(str(d / "layer_map.safetensors"))
        return cls(
            meta["model_name"],
            meta["baseline"],
            t["delta"],
            t["top_down"],
            t["bottom_up"],
            tuple(meta["counts"]),
            meta["n_prompts"],
            meta.get("meta", {}),
        )


def ablation_scores(
    model: HookedModel,
    prompts: Sequence[str],
    sets: Sequence[NeuronSet],
    *,
    scale: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "ablations",
) -> tuple[float, list[float]]:
    """The mean refusal score of ``prompts`` as the model is, and with each of ``sets`` alone scaled by
    ``scale`` (0: ablated)."""
    ids = refusal_token_ids(model.tokenizer)
    base = mean_refusal_score(model, prompts, ids, batch_size)
    scores = []
    for subset in tqdm(sets, desc=desc, disable=not progress):
        with ablate(model, subset, scale):
            scores.append(mean_refusal_score(model, prompts, ids, batch_size))
    return base, scores


def layer_map(
    model: HookedModel,
    neurons: NeuronSet,
    prompts: Sequence[str],
    *,
    cumulative: bool = True,
    scale: float = 0.0,
    **options: Any,
) -> LayerMap:
    """Per-layer (and cumulative) ablation effects of ``neurons`` on the mean refusal score;
    ``options``: ``batch_size``, ``progress`` (:func:`ablation_scores`)."""
    n = neurons.n_layers
    counts = neurons.per_layer_counts()
    layers = [layer for layer in range(n) if counts[layer]]
    jobs = [("delta", layer, [layer]) for layer in layers]
    if cumulative:
        jobs += [("top_down", layer, [m for m in layers if m >= layer]) for layer in layers]
        jobs += [("bottom_up", layer, [m for m in layers if m <= layer]) for layer in layers]
    sets = [neurons.layer_subset(subset) for _, _, subset in jobs]
    base, scores = ablation_scores(model, prompts, sets, scale=scale, desc="layer map", **options)
    out = {kind: torch.full((n,), float("nan")) for kind in ("delta", "top_down", "bottom_up")}
    for (kind, layer, _), score in zip(jobs, scores):
        out[kind][layer] = score - base
    return LayerMap(
        model_name(model),
        base,
        out["delta"],
        out["top_down"],
        out["bottom_up"],
        tuple(counts),
        len(prompts),
        {"scale": scale, "neurons": len(neurons), **{k: v for k, v in neurons.meta.items() if k in ("by", "fraction")}},
    )


@dataclass(frozen=True)
class NeuronEffects:
    """Individual ablation effect of single neurons, in the set's ranking order."""

    model_name: str
    baseline: float
    layers: tuple[int, ...]
    indices: tuple[int, ...]
    scores: tuple[float, ...]  # the ranking score (e.g. diff) of each neuron
    delta: tuple[float, ...]  # Δ mean refusal score when ablating that neuron alone
    n_prompts: int

    def table(self) -> list[dict[str, Any]]:
        """Rows ``rank, layer, neuron, score, delta``, sorted by effect (most refusal removed first)."""
        rows = [
            {"rank": i + 1, "layer": la, "neuron": ix, "score": s, "delta": d}
            for i, (la, ix, s, d) in enumerate(zip(self.layers, self.indices, self.scores, self.delta))
        ]
        return sorted(rows, key=lambda r: r["delta"])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(
            path,
            {
                "kind": "cna_lens.NeuronEffects",
                "format_version": FORMAT_VERSION,
                **{k: getattr(self, k) for k in self.__dataclass_fields__},
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronEffects:
        data = read_json(path, "cna_lens.NeuronEffects", FORMAT_VERSION)
        return cls(**{k: tuple(v) if isinstance(v := data[k], list) else v for k in cls.__dataclass_fields__})


def neuron_effects(
    model: HookedModel, neurons: NeuronSet, prompts: Sequence[str], *, top_n: int = 50, **options: Any
) -> NeuronEffects:
    """Ablate each of the first ``top_n`` neurons of the set alone; Δ mean refusal score for each.
    ``options``: ``scale``, ``batch_size``, ``progress`` (:func:`ablation_scores`)."""
    top = neurons.top(top_n)
    rows = zip(top.layers, top.indices, top.scores)
    singles = [NeuronSet((la,), (ix,), (sc,), top.n_layers, top.d_mlp, top.hook) for la, ix, sc in rows]
    base, scores = ablation_scores(model, prompts, singles, desc="neurons", **options)
    deltas = tuple(score - base for score in scores)
    return NeuronEffects(model_name(model), base, top.layers, top.indices, top.scores, deltas, len(prompts))
