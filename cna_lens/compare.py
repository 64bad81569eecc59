"""Model vs model (e.g. base vs instruct): neuron-by-neuron agreement of two attributions.

Same shape (n_layers, d_mlp):  per-layer Spearman ρ of ``diff``; Jaccard of the top-k sets; a
table of the union of top neurons with both diffs and ranks; cross-application (ablate A's set in
B, see :func:`cross_apply`). Different shapes: neuron indices mean nothing across models, so only
depth-normalized per-layer profiles (:func:`layer_profile`) are comparable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .attribute import Attribution
from .circuits import ablation_scores
from .edit import edit_weights
from .generation import generate
from .models import HookedModel
from .neurons import NeuronSet
from .runs import atomic_write_json, read_json

FORMAT_VERSION = 1


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n−1 along the last dim (ties broken by position)."""
    return x.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).double()


def spearman(a: Float[Tensor, "... n"], b: Float[Tensor, "... n"]) -> Float[Tensor, ...]:
    """Spearman rank correlation along the last dimension."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return ((ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()).float()


def check_same_shape(a: Attribution, b: Attribution) -> None:
    if (a.n_layers, a.d_mlp) != (b.n_layers, b.d_mlp):
        raise ValueError(
            f"neuron-level comparison needs the same architecture: {a.model_name} has {a.n_layers} layers × "
            f"{a.d_mlp} neurons, {b.model_name} has {b.n_layers} × {b.d_mlp}, so neuron i of one model is "
            "unrelated to neuron i of the other. Use compare.layer_profile() for a depth-normalized comparison."
        )


@dataclass(frozen=True)
class Comparison:
    name_a: str
    name_b: str
    rank_corr: tuple[float, ...]  # per layer
    jaccard: dict[int, float]  # top-k → Jaccard of the two top sets
    table: tuple[dict[str, Any], ...]  # union of both top-k_max sets: layer, neuron, diff/rank in A and B

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(
            path,
            {
                "kind": "cna_lens.Comparison",
                "format_version": FORMAT_VERSION,
                "name_a": self.name_a,
                "name_b": self.name_b,
                "rank_corr": list(self.rank_corr),
                "jaccard": {str(k): v for k, v in self.jaccard.items()},
                "table": list(self.table),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Comparison:
        d = read_json(path, "cna_lens.Comparison", FORMAT_VERSION)
        return cls(
            d["name_a"],
            d["name_b"],
            tuple(d["rank_corr"]),
            {int(k): v for k, v in d["jaccard"].items()},
            tuple(d["table"]),
        )


def compare(
    a: Attribution,
    b: Attribution,
    *,
    ks: Sequence[int] = (50, 250, 1000),
    by: str = "abs",
    exclude_layers: Sequence[int] = (0, 1),
) -> Comparison:
    """Neuron-by-neuron comparison of two attributions of same-shape models."""
    check_same_shape(a, b)
    rho = spearman(a.diff.double(), b.diff.double())
    eligible = (a.n_layers - len(exclude_layers)) * a.d_mlp
    ks = [k for k in ks if 1 <= k <= eligible]
    jac = {
        k: a.top_neurons(k=k, by=by, exclude_layers=exclude_layers).jaccard(
            b.top_neurons(k=k, by=by, exclude_layers=exclude_layers)
        )
        for k in ks
    }
    kmax = max(ks)
    ta, tb = (x.top_neurons(k=kmax, by=by, exclude_layers=exclude_layers) for x in (a, b))
    rank_a = {p: i + 1 for i, p in enumerate(zip(ta.layers, ta.indices))}
    rank_b = {p: i + 1 for i, p in enumerate(zip(tb.layers, tb.indices))}
    da, db = a.diff, b.diff
    rows = tuple(
        {
            "layer": la,
            "neuron": ix,
            "diff_a": float(da[la, ix]),
            "diff_b": float(db[la, ix]),
            "rank_a": rank_a.get((la, ix)),
            "rank_b": rank_b.get((la, ix)),
        }
        for la, ix in sorted(set(rank_a) | set(rank_b), key=lambda p: min(rank_a.get(p, 1e9), rank_b.get(p, 1e9)))
    )
    return Comparison(a.model_name, b.model_name, tuple(rho.tolist()), jac, rows)


def layer_profile(neurons: NeuronSet) -> dict[str, list[float]]:
    """Depth-normalized profile: layer centre ``(l + ½)/n_layers`` and the share of the set in layer l."""
    counts = neurons.per_layer_counts()
    total = max(sum(counts), 1)
    return {
        "depth": [(layer + 0.5) / neurons.n_layers for layer in range(neurons.n_layers)],
        "share": [c / total for c in counts],
    }


def cross_apply(
    model_b: HookedModel,
    neurons_a: NeuronSet,
    prompts: Sequence[str],
    *,
    scale: float = 0.0,
    max_new_tokens: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Ablate A's neurons in model B: Δ mean refusal score of B (and completions if max_new_tokens > 0)."""
    if (neurons_a.n_layers, neurons_a.d_mlp) != (model_b.cfg.n_layers, model_b.cfg.d_mlp):
        raise ValueError(
            f"the neuron set is for {neurons_a.n_layers} × {neurons_a.d_mlp}, model B is "
            f"{model_b.cfg.n_layers} × {model_b.cfg.d_mlp}: cross-application needs the same shape"
        )
    base, (ablated,) = ablation_scores(
        model_b, prompts, [neurons_a], scale=scale, batch_size=batch_size, progress=False
    )
    texts = []
    if max_new_tokens:  # the same intervention as a weight edit: generation on the stock engine
        with edit_weights(model_b, neurons_a, scale):
            texts = generate(model_b, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    return {"baseline_score": base, "ablated_score": ablated, "delta": ablated - base, "completions": texts}
