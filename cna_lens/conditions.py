"""Experimental conditions as values, and the intervention behind each.

A :class:`Condition` names one intervention of a reproduction; its :attr:`~Condition.key` is the
string that run files store (``completions.jsonl``'s ``condition``, the JSON tables' keys):

=========================  ===================================================================
key                        intervention
=========================  ===================================================================
``baseline``               none
``cna:<rank>:<f>[:<s>]``   top ``f`` of neurons by ranking ``rank``, ``hook_post ← s · hook_post``
                           (``s`` = 0 when omitted)
``random:<rank>:<f>``      the same per-layer counts, random neurons (zeroed)
``magnitude:<rank>:<f>``   random neurons matched in activation RMS, per layer (zeroed)
``top:<rank>:<f>``         the same count, largest activation RMS whatever the contrast (zeroed)
``caa:<a>``                ``mlp_out_l ← mlp_out_l − a · v_l`` in every layer (CAA)
``caa_layer:<L>:<a>``      ``resid_pre_L ← resid_pre_L − a · u_L`` at one layer, as ``mlp_out_{L−1}``
``direction:<L>[:<s>]``    the refusal direction ``r`` of ``resid_pre_L`` projected out of every write,
                           ``w ← w − s (w·r) r`` (``s`` = 1 when omitted; 0 < ``s`` ≤ 2)
``selection``              the neurons of a :class:`cna_lens.selection.Selection`, at its scale
=========================  ===================================================================

``v`` are the MLP-output mean differences (harmful − harmless), ``u`` the residual-stream ones.
:class:`Interventions` turns a condition into TransformerLens hooks (first-token scores) or into
the equal stock-engine form for generation: an exact weight edit (neurons, direction) or plain
torch hooks on the HF MLPs (CAA; Qwen2 and Llama checkpoints have no ``down_proj`` bias).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .attribute import Attribution
from .controls import direction_ablation_hooks, magnitude_matched, refusal_direction, top_mean_activation
from .edit import check_strength, edit_direction, edit_weights
from .engine import steer_mlp_out
from .hooks import FwdHook, HookedModel
from .intervene import check_compatible, neuron_hooks, steering_hooks
from .neurons import NeuronSet
from .selection import Selection

KINDS = ("baseline", "cna", "random", "magnitude", "top", "caa", "caa_layer", "direction", "selection")
NEURON_KINDS = ("cna", "random", "magnitude", "top")
RANKINGS = ("abs", "diff", "effect")
#: display names of the kinds, for tables and figure legends
NAMES = {
    "baseline": "baseline",
    "cna": "CNA",
    "random": "random, count-matched,",
    "magnitude": "random, RMS-matched,",
    "top": "top RMS activation, size",
    "caa": "CAA (all layers)",
    "caa_layer": "CAA (one layer)",
    "direction": "directional ablation",
    "selection": "searched selection",
}


def _num(x: float) -> str:
    return repr(float(x)).removesuffix(".0") if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Condition:
    """One intervention (see the module table). Build with the class methods or :meth:`parse`."""

    kind: str
    ranking: str | None = None
    fraction: float | None = None
    scale: float | None = None
    alpha: float | None = None
    layer: int | None = None
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"condition kind {self.kind!r}: choose among {', '.join(KINDS)}")
        need = {
            "baseline": (),
            "cna": ("ranking", "fraction"),
            "random": ("ranking", "fraction"),
            "magnitude": ("ranking", "fraction"),
            "top": ("ranking", "fraction"),
            "caa": ("alpha",),
            "caa_layer": ("layer", "alpha"),
            "direction": ("layer",),
            "selection": (),
        }[self.kind]
        allowed = set(need) | {"cna": {"scale"}, "direction": {"strength"}}.get(self.kind, set())
        given = {
            f for f in ("ranking", "fraction", "scale", "alpha", "layer", "strength") if getattr(self, f) is not None
        }
        if set(need) - given or given - allowed:
            raise ValueError(f"a {self.kind!r} condition takes {', '.join(need) or 'nothing'}, got {sorted(given)}")
        if self.ranking is not None and self.ranking not in RANKINGS:
            raise ValueError(f"ranking {self.ranking!r}: choose among {', '.join(RANKINGS)}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"fraction {self.fraction}: a share in (0, 1)")
        if self.layer is not None and self.layer < (1 if self.kind == "caa_layer" else 0):
            raise ValueError(f"layer {self.layer} of a {self.kind!r} condition is out of range")
        if self.strength is not None:
            check_strength(self.strength)

    # ------------------------------------------------------------------ construction and keys
    @classmethod
    def parse(cls, key: str) -> Condition:
        """The condition of a stored key (inverse of :attr:`key`)."""
        kind, *args = str(key).split(":")
        try:
            if kind in ("baseline", "selection") and not args:
                return cls(kind)
            if kind == "cna" and len(args) in (2, 3):
                return cls(kind, args[0], float(args[1]), float(args[2]) if len(args) == 3 else None)
            if kind in NEURON_KINDS and len(args) == 2:
                return cls(kind, args[0], float(args[1]))
            if kind == "caa" and len(args) == 1:
                return cls(kind, alpha=float(args[0]))
            if kind == "caa_layer" and len(args) == 2:
                return cls(kind, layer=int(args[0]), alpha=float(args[1]))
            if kind == "direction" and len(args) in (1, 2):
                return cls(kind, layer=int(args[0]), strength=float(args[1]) if len(args) == 2 else None)
        except ValueError as e:
            raise ValueError(f"condition {key!r}: {e}") from None
        raise ValueError(f"condition {key!r} is not one of the forms in cna_lens.conditions")

    @property
    def key(self) -> str:
        if self.kind in ("baseline", "selection"):
            return self.kind
        if self.kind in NEURON_KINDS:
            tail = f":{_num(self.scale)}" if self.scale is not None else ""
            return f"{self.kind}:{self.ranking}:{_num(self.fraction)}{tail}"  # type: ignore[arg-type]
        if self.kind == "caa":
            return f"caa:{_num(self.alpha)}"  # type: ignore[arg-type]
        if self.kind == "caa_layer":
            return f"caa_layer:{self.layer}:{_num(self.alpha)}"  # type: ignore[arg-type]
        tail = f":{_num(self.strength)}" if self.strength is not None else ""
        return f"direction:{self.layer}{tail}"

    def __str__(self) -> str:
        return self.key

    @property
    def label(self) -> str:
        """A readable legend entry, e.g. ``CNA |diff| 0.3 %`` or ``CAA (all layers) α 0.5``."""
        name = NAMES[self.kind]
        if self.kind in NEURON_KINDS:
            by = {"abs": "|diff|", "diff": "diff", "effect": "effect"}[self.ranking]  # type: ignore[index]
            s = f" ×{_num(self.scale)}" if self.scale is not None else ""
            of = "" if self.kind == "cna" else "of "  # a control is built from the CNA set it names
            return f"{name} {of}{by} {100 * self.fraction:.3g} %{s}"  # type: ignore[operator]
        if self.kind == "caa":
            return f"{name} α {_num(self.alpha)}"  # type: ignore[arg-type]
        if self.kind == "caa_layer":
            return f"{name} L{self.layer} α {_num(self.alpha)}"  # type: ignore[arg-type]
        if self.kind == "direction":
            return f"{name} L{self.layer}" + (f" ×{_num(self.strength)}" if self.strength is not None else "")
        return name

    @property
    def neuron_scale(self) -> float:
        """The factor a neuron condition multiplies its neurons by."""
        return 0.0 if self.scale is None else float(self.scale)

    @property
    def direction_strength(self) -> float:
        """The strength of a direction condition (1 when omitted)."""
        return 1.0 if self.strength is None else float(self.strength)

    def same_as(self) -> Condition:
        """The condition that computes exactly the same: CNA at scale 0 is the plain ablation, and at
        scale 1 the baseline (``x · 1.0 = x`` in floating point); a direction at strength 1 the plain
        directional ablation."""
        if self.kind == "direction" and self.strength == 1.0:
            return Condition("direction", layer=self.layer)
        if self.kind == "cna" and self.scale is not None:
            if self.scale == 0.0:
                return Condition("cna", self.ranking, self.fraction)
            if self.scale == 1.0:
                return Condition("baseline")
        return self


def with_scale(c: Condition, scale: float) -> Condition:
    """A CNA condition at another scale."""
    return Condition("cna", c.ranking, c.fraction, float(scale))


# --------------------------------------------------------------------------- interventions
class Interventions:
    """What each condition does to ``model``, from the run's attributions.

    ``attr``: ``mlp.hook_post`` statistics (CNA sets and their controls); ``caa``: ``hook_mlp_out``
    (CAA vectors, ``.diff``); ``resid``: ``hook_resid_pre`` (single-layer CAA, refusal direction);
    ``selection``: the neurons behind the ``selection`` condition (already chosen, with its scale).
    """

    def __init__(
        self,
        model: HookedModel,
        attr: Attribution,
        caa: Attribution | None = None,
        resid: Attribution | None = None,
        seed: int = 0,
        selection: tuple[Selection, NeuronSet] | None = None,
    ):
        self.model, self.attr, self.caa, self.resid, self.seed = model, attr, caa, resid, seed
        self.selection = selection
        self._sets: dict[Condition, NeuronSet] = {}

    def neurons(self, c: Condition) -> NeuronSet:
        """The neuron set of a neuron condition (cached: random draws are seeded, so they repeat)."""
        if c.kind == "selection":
            if self.selection is None:
                raise ValueError("no selection was given for the 'selection' condition")
            return self.selection[1]
        if c.kind not in NEURON_KINDS:
            raise ValueError(f"{c.key!r} is not a neuron condition")
        base = Condition("cna", c.ranking, c.fraction)
        if base not in self._sets:
            self._sets[base] = self.attr.top_neurons(fraction=c.fraction, by=c.ranking)
        if c.kind == "cna":
            return self._sets[base]
        if c not in self._sets:
            cna = self._sets[base]
            if c.kind == "random":
                ns = cna.random_like(self.seed)
            elif c.kind == "magnitude":
                ns = magnitude_matched(self.attr, cna, self.seed)
            else:
                ns = top_mean_activation(self.attr, k=len(cna))
            self._sets[c] = ns
        return self._sets[c]

    def _scale(self, c: Condition) -> float:
        return float(self.selection[0].scale) if c.kind == "selection" and self.selection else c.neuron_scale

    @cached_property
    def _layer_vectors(self) -> torch.Tensor:
        if self.resid is None:
            raise ValueError("single-layer CAA needs the hook_resid_pre attribution")
        return self.resid.diff.float()

    def _shifted(self, c: Condition) -> torch.Tensor:
        """``[layer, d_model]`` vectors, zero but for row ``L − 1`` = ``u_L``: subtracting at
        ``mlp_out_{L−1}`` is subtracting at ``resid_pre_L`` (the residual add is a sum)."""
        u = self._layer_vectors
        if not 1 <= c.layer < u.shape[0]:  # type: ignore[operator]
            raise ValueError(f"{c.key!r}: layer must lie in 1..{u.shape[0] - 1}")
        v = torch.zeros_like(u)
        v[c.layer - 1] = u[c.layer]  # type: ignore[operator]
        return v

    def direction(self, c: Condition) -> torch.Tensor:
        if self.resid is None:
            raise ValueError("directional ablation needs the hook_resid_pre attribution")
        return refusal_direction(self.resid, c.layer)  # type: ignore[arg-type]

    def _caa_vectors(self) -> torch.Tensor:
        if self.caa is None:
            raise ValueError("CAA needs the hook_mlp_out attribution")
        return self.caa.diff

    def hooks(self, c: Condition) -> list[FwdHook]:
        """TransformerLens ``fwd_hooks`` of ``c`` (for first-token scores)."""
        if c.kind == "baseline":
            return []
        if c.kind in NEURON_KINDS or c.kind == "selection":
            ns = self.neurons(c)
            check_compatible(self.model, ns)
            return neuron_hooks(ns, self._scale(c))
        if c.kind == "caa":
            return steering_hooks(self._caa_vectors(), c.alpha)  # type: ignore[arg-type]
        if c.kind == "caa_layer":
            return steering_hooks(self._shifted(c), c.alpha, layers=[c.layer - 1])  # type: ignore[arg-type,operator]
        return direction_ablation_hooks(self.model, self.direction(c), c.direction_strength)

    def hooked(self, c: Condition) -> contextlib.AbstractContextManager:
        """A context manager that holds ``c``'s TransformerLens hooks."""
        return self.model.hooks(fwd_hooks=self.hooks(c))

    def edit(self, c: Condition) -> Callable[[], contextlib.AbstractContextManager] | None:
        """A factory of ``c``'s stock-engine form for generation (None for the baseline): neuron sets
        as exact weight edits, the direction as the orthogonalised writers, CAA as HF MLP hooks."""
        if c.kind == "baseline":
            return None
        if c.kind in NEURON_KINDS or c.kind == "selection":
            ns, s = self.neurons(c), self._scale(c)
            check_compatible(self.model, ns)
            return lambda: edit_weights(self.model, ns, s)
        if c.kind == "caa":
            v, a = self._caa_vectors(), float(c.alpha)  # type: ignore[arg-type]
            return lambda: steer_mlp_out(self.model, v, a)
        if c.kind == "caa_layer":
            v, a, layer = self._shifted(c), float(c.alpha), c.layer - 1  # type: ignore[arg-type,operator]
            return lambda: steer_mlp_out(self.model, v, a, layers=[layer])
        r, s = self.direction(c), c.direction_strength
        return lambda: edit_direction(self.model, r, s)

    def describe(self, c: Condition) -> dict[str, Any]:
        """JSON-ready facts of ``c``: its neuron count, or its layer / α."""
        out: dict[str, Any] = {"label": c.label}
        if c.kind in NEURON_KINDS or c.kind == "selection":
            out["neurons"] = len(self.neurons(c))
        return out
