"""Which neurons to scale: a ranking, a share, a layer window, causal pruning and a scale.

A :class:`Selection` turns an :class:`~cna_lens.attribute.Attribution` into a :class:`NeuronSet`:

1. rank every neuron ``(l, i)`` by one score (P = harmful, N = harmless final-token activations)::

       abs      |mean_P − mean_N|                       (the paper's ranking)
       diff     mean_P − mean_N                         (more active on harmful prompts)
       effect   (mean_P − mean_N) / pooled std          (Cohen's d)
       t        |Welch t| = |diff| / sqrt(var_P/|P| + var_N/|N|)   (contrast in standard errors)
       contrast_minus_utility   |diff| − λ · rms_N,  rms_N = sqrt(mean_N a²)

   ``rms_N`` is how strongly the neuron fires on harmless prompts (the root mean square bounds the
   mean |a| from above; the stored sums hold Σa and Σa², not Σ|a|). Both terms are activations, so
   λ (``utility_weight``) has no unit: λ = 1 ranks neurons by how far their contrast exceeds their
   everyday use; λ = 0 is ``abs``.
2. keep the layers ``first_layer..last_layer`` and take the best ``k = round(fraction · L · d_mlp)``
   there (the share is of all MLP neurons, so sets of equal ``fraction`` have equal size);
3. with ``prune``, drop the neurons whose single ablation *raises* the mean refusal score
   (Δ_j > 0, from measured effects: :func:`estimate_effects` or ``circuits.neuron_effects``);
4. scale the remaining neurons by ``scale`` ∈ [−1, 1] (0 ablates, −1 flips their sign).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .attribute import Attribution
from .circuits import NeuronEffects
from .evaluate import refusal_score, refusal_token_ids
from .hooks import HookedModel, check_hook, hook_name
from .models import last_logits_kwargs
from .neurons import NeuronSet, ranked
from .prompts import encode, left_pad, length_batches, pad_id
from .runs import atomic_write, atomic_write_json, read_json

FORMAT_VERSION = 1
RANKINGS = ("abs", "diff", "effect", "t", "contrast_minus_utility")


def ranking_scores(attr: Attribution, ranking: str, utility_weight: float = 0.0) -> Float[Tensor, "layer neuron"]:
    """The score of every neuron under ``ranking`` (higher = selected first); see the module docstring."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r}: choose one of {', '.join(RANKINGS)}")
    if ranking == "t":
        return attr.welch_t.abs()
    if ranking == "contrast_minus_utility":
        return attr.diff.abs() - utility_weight * attr.rms_neg
    return attr.scores(ranking)  # abs, diff, effect: the rankings of Attribution.top_neurons


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Selection.{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Selection.{name} must be finite, got {value}")
    return float(value)


def _layer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Selection.{name} must be an int layer index, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"Selection.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Selection:
    """A rule that picks and scales MLP neurons from an Attribution (see the module docstring).

    ``last_layer=None`` means the model's last layer. ``utility_weight`` is λ of
    ``contrast_minus_utility`` and must stay 0 for the other rankings.
    """

    ranking: str = "abs"
    fraction: float = 0.001
    first_layer: int = 2
    last_layer: int | None = None
    prune: bool = False
    scale: float = 0.0
    utility_weight: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.ranking, str) or self.ranking not in RANKINGS:
            raise ValueError(f"Selection.ranking {self.ranking!r}: choose one of {', '.join(RANKINGS)}")
        fraction = _number("fraction", self.fraction)
        if not 0 < fraction <= 1:
            raise ValueError(f"Selection.fraction is the share of all MLP neurons, in (0, 1]; got {fraction}")
        _layer("first_layer", self.first_layer)
        if self.last_layer is not None:
            _layer("last_layer", self.last_layer)
            if self.last_layer < self.first_layer:
                raise ValueError(f"Selection.last_layer {self.last_layer} is below first_layer {self.first_layer}")
        if not isinstance(self.prune, bool):
            raise TypeError(f"Selection.prune must be True or False, got {self.prune!r}")
        if not -1 <= _number("scale", self.scale) <= 1:
            raise ValueError(f"Selection.scale must be in [-1, 1] (0 ablates, -1 flips the sign), got {self.scale}")
        weight = _number("utility_weight", self.utility_weight)
        if weight < 0:
            raise ValueError(f"Selection.utility_weight (λ) must be >= 0, got {weight}")
        if weight and self.ranking != "contrast_minus_utility":
            raise ValueError(
                f"Selection.utility_weight={weight} only applies to ranking='contrast_minus_utility', "
                f"not {self.ranking!r}; leave it at 0"
            )
        for f in ("fraction", "scale", "utility_weight"):
            object.__setattr__(self, f, float(getattr(self, f)))  # JSON round trip gives the same object

    def window(self, n_layers: int) -> tuple[int, int]:
        """``(first, last)`` layer, inclusive, checked against a model with ``n_layers`` layers."""
        last = n_layers - 1 if self.last_layer is None else self.last_layer
        if last >= n_layers or self.first_layer >= n_layers:
            raise ValueError(
                f"layer window {self.first_layer}..{last} does not fit a model with {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
        return self.first_layer, last

    def k(self, n_layers: int, d_mlp: int) -> int:
        """Neurons taken before pruning: ``max(1, round(fraction · n_layers · d_mlp))``."""
        return max(1, round(self.fraction * n_layers * d_mlp))

    def neurons(self, attr: Attribution, effects: NeuronEffects | Tensor | None = None) -> NeuronSet:
        """The selected neurons, best first (``scores`` = the ranking score).

        ``effects``: Δ mean refusal score of each neuron ablated alone, needed when ``prune``: a dense
        ``[layer, neuron]`` tensor (:func:`estimate_effects`) or a :class:`NeuronEffects` (exact, for a
        subset; unmeasured neurons are kept).
        """
        if self.prune and effects is None:
            raise ValueError(
                "Selection.prune needs per-neuron effects: pass effects=estimate_effects(model, prompts) "
                "or circuits.neuron_effects(...)"
            )
        first, last = self.window(attr.n_layers)
        k = self.k(attr.n_layers, attr.d_mlp)
        eligible = (last - first + 1) * attr.d_mlp
        if k > eligible:
            raise ValueError(
                f"fraction {self.fraction:g} asks for {k} neurons but layers {first}..{last} hold only {eligible}; "
                "lower the fraction or widen the window"
            )
        scores = ranking_scores(attr, self.ranking, self.utility_weight).double().clone()
        scores[:first] = float("-inf")
        scores[last + 1 :] = float("-inf")
        layers, idx, values = ranked(scores, k)
        keep = [True] * k
        if self.prune:
            raises = raising_mask(effects, attr.n_layers, attr.d_mlp)  # type: ignore[arg-type]
            keep = [not bool(raises[la, ix]) for la, ix in zip(layers, idx)]
        rows = [j for j in range(k) if keep[j]]
        return NeuronSet(
            tuple(layers[j] for j in rows),
            tuple(idx[j] for j in rows),
            tuple(values[j] for j in rows),
            attr.n_layers,
            attr.d_mlp,
            attr.hook,
            {
                "model": attr.model_name,
                "selection": self.to_dict(),
                "by": self.ranking,
                "k": k,
                "pruned": k - len(rows),
                "fraction": len(rows) / (attr.n_layers * attr.d_mlp),
            },
        )

    def describe(self) -> str:
        """A short label, e.g. ``t 0.3% L2-23 pruned ×0``."""
        last = "end" if self.last_layer is None else self.last_layer
        lam = f" λ={self.utility_weight:.2g}" if self.ranking == "contrast_minus_utility" else ""
        prune = " pruned" if self.prune else ""
        return f"{self.ranking}{lam} {100 * self.fraction:.3g}% L{self.first_layer}-{last}{prune} ×{self.scale:.2g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Selection fields {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"kind": "cna_lens.Selection", "format_version": 1, "selection": {...}}`` atomically."""
        atomic_write_json(
            path, {"kind": "cna_lens.Selection", "format_version": FORMAT_VERSION, "selection": self.to_dict()}
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        data = read_json(path, "cna_lens.Selection", FORMAT_VERSION)
        if not isinstance(data.get("selection"), dict):
            raise ValueError(f"{path}: no 'selection' object")
        return cls.from_dict(data["selection"])


@dataclass(frozen=True)
class SearchSpace:
    """What the sampler may choose: rankings, share range (log-uniform), lowest first layer
    (layers 0-1 are excluded by default, as in the paper), scale range, pruning, λ range."""

    rankings: tuple[str, ...] = RANKINGS
    fraction: tuple[float, float] = (1e-4, 0.02)
    min_layer: int = 2
    scale: tuple[float, float] = (-1.0, 1.0)
    prune: tuple[bool, ...] = (False, True)
    utility_weight: tuple[float, float] = (0.0, 2.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rankings", tuple(self.rankings))
        object.__setattr__(self, "prune", tuple(self.prune))
        bad = [r for r in self.rankings if r not in RANKINGS]
        if not self.rankings or bad:
            raise ValueError(f"SearchSpace.rankings {list(self.rankings)}: choose among {', '.join(RANKINGS)}")
        lo, hi = self.fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"SearchSpace.fraction must satisfy 0 < low <= high <= 1, got {self.fraction}")
        if not -1 <= self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"SearchSpace.scale must satisfy -1 <= low <= high <= 1, got {self.scale}")
        if not self.prune or any(not isinstance(p, bool) for p in self.prune):
            raise ValueError(f"SearchSpace.prune must be a non-empty tuple of bools, got {self.prune}")
        if not 0 <= self.utility_weight[0] <= self.utility_weight[1]:
            raise ValueError(f"SearchSpace.utility_weight must satisfy 0 <= low <= high, got {self.utility_weight}")
        if isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int) or self.min_layer < 0:
            raise ValueError(f"SearchSpace.min_layer must be an int >= 0, got {self.min_layer!r}")

    def suggest(self, trial: Any, n_layers: int) -> Selection:
        """A Selection from an Optuna trial (window = first layer + the share ``span`` of the rest)."""
        if self.min_layer >= n_layers:
            raise ValueError(f"SearchSpace.min_layer {self.min_layer} but the model has {n_layers} layers")
        ranking = trial.suggest_categorical("ranking", list(self.rankings))
        fraction = trial.suggest_float("fraction", *self.fraction, log=self.fraction[0] < self.fraction[1])
        first = trial.suggest_int("first_layer", self.min_layer, n_layers - 1)
        last = first + round(trial.suggest_float("span", 0.0, 1.0) * (n_layers - 1 - first))
        prune = trial.suggest_categorical("prune", list(self.prune))
        scale = trial.suggest_float("scale", *self.scale)
        lam = trial.suggest_float("utility_weight", *self.utility_weight) if ranking == RANKINGS[-1] else 0.0
        fraction = min(fraction, (last - first + 1) / n_layers)  # a window holds at most its own neurons
        return Selection(ranking, fraction, first, last, prune, scale, lam)


def raising_mask(effects: NeuronEffects | Tensor, n_layers: int, d_mlp: int) -> Bool[Tensor, "layer neuron"]:
    """True where ablating the neuron alone raises the mean refusal score (Δ > 0); unmeasured: False."""
    if isinstance(effects, Tensor):
        if tuple(effects.shape) != (n_layers, d_mlp):
            raise ValueError(f"effects have shape {tuple(effects.shape)}, expected {(n_layers, d_mlp)}")
        return effects > 0
    if isinstance(effects, NeuronEffects):
        mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
        for la, ix, d in zip(effects.layers, effects.indices, effects.delta):
            if not (0 <= la < n_layers and 0 <= ix < d_mlp):
                raise ValueError(f"effects name neuron ({la}, {ix}), outside {n_layers} layers × {d_mlp}")
            mask[la, ix] = d > 0
        return mask
    raise TypeError(f"effects must be a [layer, neuron] tensor or a NeuronEffects, got {type(effects).__name__}")


def estimate_effects(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    hook: str = "mlp.hook_post",
    chat: bool | None = None,
    progress: bool = True,
) -> Float[Tensor, "layer neuron"]:
    """First-order estimate of Δ mean refusal score when each neuron alone is ablated (all at once)::

        Δ_j ≈ (1/|P|) Σ_x Σ_t ∂s(x)/∂h_{t,j} · (0 − h_{t,j})     (attribution patching)

    with ``s`` the first-token refusal log-odds and ``h`` the activation at every prompt position
    ``t``. Cost: one forward and one backward pass per batch (≈ 3 forward passes) for *all*
    neurons, against one forward pass over every prompt *per neuron* for the exact measurement
    (``circuits.neuron_effects``). It is a linear approximation: exact for a neuron whose removal
    moves the score linearly, less so where one neuron alone switches the output.
    """
    check_hook(model, hook)
    tok = model.tokenizer
    seqs = encode(tok, prompts, chat=chat)
    ids_r = refusal_token_ids(tok)
    n_layers = model.cfg.n_layers
    total: Tensor | None = None
    for batch in tqdm(length_batches([len(s) for s in seqs], batch_size), desc="effects", disable=not progress):
        ids, mask = left_pad([seqs[i] for i in batch], pad_id(tok), next(model.parameters()).device)
        acts: list[Tensor | None] = [None] * n_layers
        zeros: list[Tensor | None] = [None] * n_layers
        fwd = [(hook_name(la, hook), partial(_probe, acts=acts, zeros=zeros, layer=la)) for la in range(n_layers)]
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            logits = model(ids, attention_mask=mask, **last_logits_kwargs(model))
            score = refusal_score(logits[:, -1, :].float().log_softmax(-1), ids_r).sum()
            grads = torch.autograd.grad(score, zeros)  # type: ignore[arg-type]
        keep = mask.unsqueeze(-1).float()  # products in float32 even for a bf16 model, sums in float64
        delta = torch.stack([-(g.float() * a.float() * keep).double().sum((0, 1)).cpu() for g, a in zip(grads, acts)])
        total = delta if total is None else total + delta
    assert total is not None
    return (total / len(seqs)).float()


def _probe(act: Tensor, hook: object, *, acts: list, zeros: list, layer: int) -> Tensor:
    """Record ``act`` and add a zero leaf whose gradient is ∂score/∂act (the value is unchanged)."""
    z = torch.zeros_like(act, requires_grad=True)
    acts[layer], zeros[layer] = act.detach(), z
    return act + z


#: the per-neuron pruning effects (Δ refusal score) a search saves, under the key "delta"
EFFECTS_FILE = "effects.safetensors"


def save_effects(out: str | Path, delta: Float[Tensor, "layer neuron"]) -> None:
    """Save pruning effects (:func:`estimate_effects`) in search directory ``out``."""
    atomic_write(Path(out) / EFFECTS_FILE, lambda tmp: save_file({"delta": delta.contiguous()}, tmp))


def saved_effects(out: str | Path) -> Float[Tensor, "layer neuron"] | None:
    """The pruning effects saved in search directory ``out`` (None: it has none, e.g. no pruning)."""
    path = Path(out) / EFFECTS_FILE
    return load_file(str(path))["delta"] if path.exists() else None
