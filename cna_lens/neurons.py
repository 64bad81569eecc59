"""``NeuronSet``: a selection of MLP neurons ``(layer, index)`` with their scores."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .runs import atomic_write_json, read_json

FORMAT_VERSION = 1


@dataclass(frozen=True)
class NeuronSet:
    """Neurons ``(layers[i], indices[i])`` of a model with ``n_layers`` × ``d_mlp`` MLP neurons.

    ``scores`` are the ranking scores (ordered best first when made by ``top_neurons``);
    ``meta`` records how the set was made (ranking rule, fraction, source model, ...).
    """

    layers: tuple[int, ...]
    indices: tuple[int, ...]
    scores: tuple[float, ...]
    n_layers: int
    d_mlp: int
    hook: str = "mlp.hook_post"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.indices) == len(self.scores)):
            raise ValueError("layers, indices and scores must have the same length")
        for layer, idx in zip(self.layers, self.indices):
            if not (0 <= layer < self.n_layers and 0 <= idx < self.d_mlp):
                raise ValueError(f"neuron ({layer}, {idx}) is outside {self.n_layers} layers × {self.d_mlp}")
        if len(set(zip(self.layers, self.indices))) != len(self.layers):
            raise ValueError("a NeuronSet cannot hold the same neuron twice")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def pairs(self) -> set[tuple[int, int]]:
        return set(zip(self.layers, self.indices))

    def by_layer(self) -> dict[int, Int[Tensor, " k"]]:
        """``{layer: sorted neuron indices}`` for the layers that hold any selected neuron."""
        out: dict[int, list[int]] = {}
        for layer, idx in zip(self.layers, self.indices):
            out.setdefault(layer, []).append(idx)
        return {layer: torch.tensor(sorted(ix), dtype=torch.long) for layer, ix in sorted(out.items())}

    def per_layer_counts(self) -> list[int]:
        """Number of selected neurons in each layer (length ``n_layers``)."""
        counts = [0] * self.n_layers
        for layer in self.layers:
            counts[layer] += 1
        return counts

    def mask(self) -> Bool[Tensor, "layer neuron"]:
        m = torch.zeros(self.n_layers, self.d_mlp, dtype=torch.bool)
        if len(self):
            m[torch.tensor(self.layers), torch.tensor(self.indices)] = True
        return m

    def top(self, k: int) -> NeuronSet:
        """The first ``k`` neurons (the best ``k`` when the set is ranked)."""
        return NeuronSet(
            self.layers[:k],
            self.indices[:k],
            self.scores[:k],
            self.n_layers,
            self.d_mlp,
            self.hook,
            {**self.meta, "k": min(k, len(self))},
        )

    def layer_subset(self, layers: int | list[int]) -> NeuronSet:
        """The selected neurons that lie in ``layers``."""
        keep = {layers} if isinstance(layers, int) else set(layers)
        rows = [i for i, layer in enumerate(self.layers) if layer in keep]
        return NeuronSet(
            tuple(self.layers[i] for i in rows),
            tuple(self.indices[i] for i in rows),
            tuple(self.scores[i] for i in rows),
            self.n_layers,
            self.d_mlp,
            self.hook,
            {**self.meta, "layers": sorted(keep)},
        )

    def random_like(self, seed: int = 0) -> NeuronSet:
        """A control: the same number of neurons in each layer, drawn uniformly at random (seeded)."""
        g = torch.Generator().manual_seed(seed)
        layers: list[int] = []
        indices: list[int] = []
        for layer, count in enumerate(self.per_layer_counts()):
            if count:
                layers += [layer] * count
                indices += torch.randperm(self.d_mlp, generator=g)[:count].tolist()
        return NeuronSet(
            tuple(layers),
            tuple(indices),
            (0.0,) * len(layers),
            self.n_layers,
            self.d_mlp,
            self.hook,
            {**self.meta, "control": "random_like", "seed": seed},
        )

    def jaccard(self, other: NeuronSet) -> float:
        """|A ∩ B| / |A ∪ B| over (layer, index) pairs."""
        a, b = self.pairs, other.pairs
        return len(a & b) / len(a | b) if (a or b) else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "cna_lens.NeuronSet",
            "format_version": FORMAT_VERSION,
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "hook": self.hook,
            "meta": self.meta,
            "per_layer_counts": self.per_layer_counts(),
            "neurons": [
                {"layer": layer, "index": idx, "score": score}
                for layer, idx, score in zip(self.layers, self.indices, self.scores)
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (``neurons.json``)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronSet:
        data = read_json(path, "cna_lens.NeuronSet", FORMAT_VERSION)
        try:
            rows = data["neurons"]
            return cls(
                tuple(int(r["layer"]) for r in rows),
                tuple(int(r["index"]) for r in rows),
                tuple(float(r["score"]) for r in rows),
                int(data["n_layers"]),
                int(data["d_mlp"]),
                str(data["hook"]),
                dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed NeuronSet ({e!r})") from e


def ranked(scores: Float[Tensor, "layer neuron"], k: int) -> tuple[list[int], list[int], list[float]]:
    """``(layers, indices, scores)`` of the ``k`` highest scores, best first (float64; a stable sort:
    equal scores keep the lower flat index first, whatever the sort's implementation)."""
    flat = scores.double().flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    d = scores.shape[1]
    return (order // d).tolist(), (order % d).tolist(), flat[order].tolist()


def best_neurons(
    scores: Float[Tensor, "layer neuron"],
    k: int | None = None,
    fraction: float = 0.001,
    exclude_layers: Sequence[int] = (0, 1),
    hook: str = "mlp.hook_post",
    meta: dict[str, Any] | None = None,
) -> NeuronSet:
    """The ``k`` highest-scoring neurons outside ``exclude_layers``, best first (``k = round(fraction ·
    n_layers · d_mlp)`` if None); ``meta`` gains ``k``, ``fraction`` (``k`` over all neurons) and
    ``exclude_layers``."""
    n_layers, d_mlp = scores.shape
    bad = [layer for layer in exclude_layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"exclude_layers {bad} outside 0..{n_layers - 1}")
    scores = scores.double().clone()
    scores[list(exclude_layers)] = float("-inf")
    total, eligible = n_layers * d_mlp, int(torch.isfinite(scores).sum())
    if k is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, round(fraction * total))
    if not 1 <= k <= eligible:
        raise ValueError(f"k must be in 1..{eligible} (neurons outside excluded layers), got {k}")
    layers, indices, values = ranked(scores, k)
    extra = {"k": k, "fraction": k / total, "exclude_layers": list(exclude_layers)}
    return NeuronSet(tuple(layers), tuple(indices), tuple(values), n_layers, d_mlp, hook, {**(meta or {}), **extra})
