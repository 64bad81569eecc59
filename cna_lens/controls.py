"""Matched comparisons for CNA: controls that share its size, baselines that share its strength.

* Magnitude-matched random neurons: per layer, one random non-selected neuron per selected one,
  drawn among the ``pool`` neurons whose activation magnitude is closest to it. Magnitude is the
  RMS of the final-token activation over both prompt sets, ``sqrt((Σa²_P + Σa²_N) / (|P| + |N|))``
  (the energy zeroing the neuron removes), or ``(|mean_P| + |mean_N|) / 2``.
* Non-contrastive set: the top neurons by that magnitude, whatever their contrast.
* Single-layer CAA: ``x_l ← x_l − α v_l`` at one layer's hook (e.g. the residual stream).
* Refusal direction (Arditi et al.): ``r = (μ_P − μ_N) / ‖μ_P − μ_N‖`` of ``blocks.l.hook_resid_pre``
  at the final token; the layer is the one whose ablation lowers the first-token refusal score the
  most on validation prompts. Ablation projects ``r`` out of every residual write (hook form
  :func:`cna_lens.ablate_direction`, weight form :func:`cna_lens.edit_direction`).
* Matched tables: each method's (KL, compliance) curve, linearly interpolated to a common KL and to
  a common compliance. (Pareto fronts: ``cna_lens.pareto.pareto_mask``.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .attribute import Attribution
from .edit import hf_model, tied_embeddings, unit_directions
from .evaluate import final_logprobs, kl_divergence, refusal_score, refusal_token_ids
from .hooks import FwdHook, HookedModel, check_hook
from .intervene import direction_hooks, steering_hooks
from .neurons import NeuronSet, best_neurons

log = logging.getLogger(__name__)

MAGNITUDES = ("rms", "mean_abs")
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


# --------------------------------------------------------------------------- neuron controls
def activation_magnitude(attr: Attribution, by: str = "rms") -> Float[Tensor, "layer neuron"]:
    """Per-neuron activation scale over both prompt sets (float64): ``rms`` or ``mean_abs`` (see module)."""
    n = attr.n_pos + attr.n_neg
    if n == 0:
        raise ValueError("the attribution holds no prompts")
    if by == "rms":
        return ((attr.sumsq_pos + attr.sumsq_neg) / n).clamp_min(0).sqrt()
    if by == "mean_abs":
        mean = lambda s, k: s / k if k else torch.zeros_like(s)  # noqa: E731
        return (mean(attr.sum_pos, attr.n_pos).abs() + mean(attr.sum_neg, attr.n_neg).abs()) / 2
    raise ValueError(f"by={by!r}: choose one of {MAGNITUDES}")


def magnitude_matched(
    attr: Attribution,
    neurons: NeuronSet,
    seed: int = 0,
    *,
    by: str = "rms",
    pool: int = 8,
    magnitude: Float[Tensor, "layer neuron"] | None = None,
) -> NeuronSet:
    """Random neurons with the same per-layer counts and activation scale as ``neurons``, none of them in it.

    In each layer the selected neurons are visited from the largest magnitude down; each draws (seeded)
    one of the ``pool`` not yet drawn, non-selected neurons of that layer closest to it in magnitude.
    Nearest-neighbour rather than quantile bins: CNA neurons sit in the extreme tail (the 1.5B's
    0.3 % set has its median at the 99th per-layer percentile and 2.2× the 95th), where a 5 % bin
    would hand the control neurons of half the scale. Where a layer's tail holds too few other neurons
    the control still falls short of the top ones: ``meta`` records the median control / selected
    magnitude ratio and the two-sample Kolmogorov–Smirnov distance of the two magnitude samples
    (1.5B, 0.3 % set, pool 8: 0.97 and 0.10; a per-layer-count random control: 0.92). ``magnitude``
    overrides the scale (e.g. RMS times the down-projection column norm).
    """
    if (neurons.n_layers, neurons.d_mlp) != (attr.n_layers, attr.d_mlp) or neurons.hook != attr.hook:
        raise ValueError(
            f"neurons ({neurons.hook}, {neurons.n_layers} × {neurons.d_mlp}) were not selected from this "
            f"attribution ({attr.hook}, {attr.n_layers} × {attr.d_mlp})"
        )
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    m = activation_magnitude(attr, by) if magnitude is None else magnitude.double()
    if tuple(m.shape) != (attr.n_layers, attr.d_mlp):
        raise ValueError(f"magnitude must be [{attr.n_layers}, {attr.d_mlp}], got {tuple(m.shape)}")
    chosen = neurons.mask()
    g = torch.Generator().manual_seed(seed)
    layers: list[int] = []
    picks: list[int] = []
    ratios: list[float] = []
    selected: list[float] = []
    for layer, idx in neurons.by_layer().items():
        cand = (~chosen[layer]).nonzero().squeeze(-1)
        if len(cand) < len(idx):
            raise ValueError(f"layer {layer} has {len(idx)} selected neurons but only {len(cand)} others to draw")
        cm, taken = m[layer, cand], torch.zeros(len(cand), dtype=torch.bool)
        for i in idx[m[layer, idx].argsort(descending=True, stable=True)].tolist():
            dist = (cm - m[layer, i]).abs().masked_fill(taken, math.inf)
            near = dist.argsort(stable=True)[: min(pool, len(cand) - int(taken.sum()))]
            j = int(near[torch.randint(len(near), (1,), generator=g)])
            taken[j] = True
            layers.append(layer)
            picks.append(int(cand[j]))
            selected.append(float(m[layer, i]))
            if m[layer, i] > 0:
                ratios.append(float(cm[j] / m[layer, i]))
    drawn = [float(m[layer, i]) for layer, i in zip(layers, picks)]
    return NeuronSet(
        tuple(layers),
        tuple(picks),
        tuple(drawn),
        neurons.n_layers,
        neurons.d_mlp,
        neurons.hook,
        {
            **neurons.meta,
            "control": "magnitude_matched",
            "seed": seed,
            "magnitude": by if magnitude is None else "given",
            "pool": pool,
            "median_magnitude_ratio": float(torch.tensor(ratios).median()) if ratios else None,
            "magnitude_ks": ks_distance(selected, drawn) if drawn else None,
        },
    )


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov–Smirnov distance ``max_x |F_a(x) − F_b(x)|`` of empirical CDFs."""
    ta, tb = torch.tensor(a, dtype=torch.float64).sort().values, torch.tensor(b, dtype=torch.float64).sort().values
    x = torch.cat([ta, tb])
    fa = torch.searchsorted(ta, x, right=True).double() / len(ta)
    fb = torch.searchsorted(tb, x, right=True).double() / len(tb)
    return float((fa - fb).abs().max())


def top_mean_activation(
    attr: Attribution,
    k: int | None = None,
    fraction: float = 0.001,
    exclude_layers: Sequence[int] = (0, 1),
    by: str = "rms",
) -> NeuronSet:
    """The non-contrastive set: the ``k`` neurons of largest activation magnitude over both prompt sets
    (``k = round(fraction · n_layers · d_mlp)`` if None, as :meth:`Attribution.top_neurons`)."""
    meta = {"model": attr.model_name, "by": f"magnitude:{by}", "control": "top_mean_activation"}
    return best_neurons(activation_magnitude(attr, by), k, fraction, exclude_layers, attr.hook, meta)


# --------------------------------------------------------------------------- residual-stream baselines
def caa_single_layer(
    vectors: Float[Tensor, "layer d_model"], alpha: float, layer: int, hook: str = "hook_resid_pre"
) -> list[FwdHook]:
    """CAA at one layer only: ``blocks.{layer}.{hook} ← x − alpha · vectors[layer]`` at every position.
    ``vectors`` is the ``.diff`` of an attribution over the same hook (residual stream by default)."""
    if vectors.ndim != 2 or not 0 <= layer < vectors.shape[0]:
        raise ValueError(f"layer {layer} outside the {tuple(vectors.shape)} vectors (expected [layer, d_model])")
    return steering_hooks(vectors, alpha, hook, layers=[layer])


def refusal_direction(attr_resid: Attribution, layer: int) -> Float[Tensor, " d_model"]:
    """Unit difference-in-means direction ``(μ_harmful − μ_harmless) / ‖·‖`` of the residual stream at
    ``layer``'s final token (an attribution over ``hook_resid_pre`` / ``_mid`` / ``_post``)."""
    if attr_resid.hook not in RESIDUAL_HOOKS:
        raise ValueError(
            f"the attribution is over {attr_resid.hook!r}; the refusal direction needs a residual-stream hook "
            f"({', '.join(RESIDUAL_HOOKS)}): attribute(model, harmful, harmless, hook='hook_resid_pre')"
        )
    if not 0 <= layer < attr_resid.n_layers:
        raise ValueError(f"layer {layer} outside 0..{attr_resid.n_layers - 1}")
    d = attr_resid.diff[layer].double()
    if not bool(d.norm() > 0):
        raise ValueError(f"the mean difference at layer {layer} is zero: no direction")
    return (d / d.norm()).float()


def direction_ablation_hooks(
    model: HookedModel, direction: Float[Tensor, "*layer d_model"], strength: float = 1.0
) -> list[FwdHook]:
    """``fwd_hooks`` of directional ablation equal to :func:`cna_lens.edit_direction` on this model (at
    ``strength``): the unembedding's input is projected too where the embedding is tied to it."""
    try:
        tied = tied_embeddings(hf_model(model))
    except TypeError:  # a HookedTransformer: no weight form to match
        tied = False
    r = unit_directions(direction, model.cfg.n_layers, model.cfg.d_model)
    return direction_hooks(r, unembed=tied, strength=strength)


@dataclass(frozen=True)
class DirectionChoice:
    """Per candidate layer: mean first-token refusal score on validation prompts with the direction
    ablated; mean KL on harmless prompts (when given) for the layers checked, best score first.
    ``layer``: the lowest score among layers with KL ≤ ``max_kl`` (all layers when none passes:
    ``kl_filter_met`` False)."""

    layer: int
    baseline_score: float
    scores: dict[int, float]
    kl: dict[int, float] = field(default_factory=dict)
    max_kl: float | None = None
    kl_filter_met: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "baseline_score": self.baseline_score,
            "scores": {str(k): v for k, v in self.scores.items()},
            "kl": {str(k): v for k, v in self.kl.items()},
            "max_kl": self.max_kl,
            "kl_filter_met": self.kl_filter_met,
        }


def choose_direction_layer(
    model: HookedModel,
    attr_resid: Attribution,
    val_prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    harmless: Sequence[str] | None = None,
    max_kl: float = 0.1,
    batch_size: int = 16,
    progress: bool = False,
) -> DirectionChoice:
    """Pick the layer whose refusal direction, ablated, lowers the mean first-token refusal log-odds on
    ``val_prompts`` the most. Default candidates: layers 1 to below 0.8 · n_layers (Arditi et al.: later
    directions act on the output tokens directly; layer 0 holds only the final token's embedding);
    with ``harmless``, layers whose ablation moves the harmless next-token distribution by more than
    ``max_kl`` nats (mean KL) are skipped."""
    check_hook(model, attr_resid.hook)
    if attr_resid.n_layers != model.cfg.n_layers or attr_resid.d_mlp != model.cfg.d_model:
        raise ValueError(
            f"the attribution is {attr_resid.n_layers} × {attr_resid.d_mlp}; this model's residual stream is "
            f"{model.cfg.n_layers} × {model.cfg.d_model}"
        )
    # layer 0's residual is the embedding of the final token, which the chat template fixes: no contrast there
    n = model.cfg.n_layers
    layers = list(range(1, max(2, int(0.8 * n)))) if layers is None else [int(x) for x in layers]
    if not layers:
        raise ValueError("no candidate layers")
    directions = {layer: refusal_direction(attr_resid, layer) for layer in layers}  # checks before the passes
    ids = refusal_token_ids(model.tokenizer)
    score = lambda: float(refusal_score(final_logprobs(model, val_prompts, batch_size=batch_size), ids).mean())  # noqa: E731
    baseline = score()
    base_h = final_logprobs(model, harmless, batch_size=batch_size) if harmless is not None else None
    scores: dict[int, float] = {}
    kl: dict[int, float] = {}
    for layer in tqdm(layers, desc="direction layer", disable=not progress):
        with model.hooks(fwd_hooks=direction_ablation_hooks(model, directions[layer])):
            scores[layer] = score()
    # the KL filter in order of score: the first layer that passes is the choice (the same layer as
    # filtering every layer first), and the harmless passes stop there
    ranked = sorted(layers, key=lambda layer: (scores[layer], layer))
    best = None
    for layer in ranked if base_h is not None else []:
        with model.hooks(fwd_hooks=direction_ablation_hooks(model, directions[layer])):
            kl[layer] = float(kl_divergence(base_h, final_logprobs(model, harmless, batch_size=batch_size)).mean())
        if kl[layer] <= max_kl:
            best = layer
            break
    ok = base_h is None or best is not None
    if not ok:
        log.warning("no layer's direction ablation stays within KL %.3g nats; choosing among all", max_kl)
    best = ranked[0] if best is None else best
    return DirectionChoice(best, baseline, scores, kl, max_kl if base_h is not None else None, ok)


# --------------------------------------------------------------------------- matched tables
def _at(points: Sequence[Mapping[str, float]], key: str, target: float) -> dict[str, float] | None:
    """Walk the KL-sorted polyline; at the first segment whose ``key`` reaches ``target``, interpolate
    every metric linearly. None when ``target`` lies outside the curve (no extrapolation)."""
    for p, q in zip(points, points[1:]) if len(points) > 1 else [(points[0], points[0])]:
        lo, hi = sorted((p[key], q[key]))
        if lo <= target <= hi:
            t = 0.0 if hi == lo else (target - p[key]) / (q[key] - p[key])
            out = {k: p[k] + t * (q[k] - p[k]) for k in p if k in q}
            out[key] = target
            return out
    return None


def matched_table(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    at_kl: float | None = None,
    at_compliance: float | None = None,
) -> dict[str, Any]:
    """Each method's metrics at a common KL and at a common compliance.

    ``curves``: ``{method: [{"kl": …, "compliance": …, other metrics …}, …]}`` (e.g. one point per
    CAA α or CNA fraction). Points are ordered by KL and joined by straight lines; every metric is
    interpolated along that line. ``at_kl`` gives compliance (and the rest) at that KL;
    ``at_compliance`` gives the smallest KL on the line at which the method reaches that compliance.
    A method whose curve does not reach the target gets None.
    """
    if at_kl is None and at_compliance is None:
        raise ValueError("give at_kl, at_compliance or both")
    table: dict[str, Any] = {}
    sorted_curves = {}
    for method, pts in curves.items():
        pts = [dict(p) for p in pts]
        if not pts or any(not {"kl", "compliance"} <= p.keys() for p in pts):
            raise ValueError(f"curve {method!r}: every point needs 'kl' and 'compliance' (and at least one point)")
        if any(not math.isfinite(float(v)) for p in pts for v in p.values()):
            raise ValueError(f"curve {method!r} holds a non-finite value")
        sorted_curves[method] = sorted(pts, key=lambda p: (p["kl"], p["compliance"]))
    for name, key, target in (("at_kl", "kl", at_kl), ("at_compliance", "compliance", at_compliance)):
        if target is not None:
            rows = {m: _at(pts, key, float(target)) for m, pts in sorted_curves.items()}
            table[name] = {"target": float(target), "methods": rows}
    return table
