"""How a search measures: its trials (several decoded together), the reference curves it draws beside
them, each intervention's two forms, and the completions of its choice for reading by eye.

A measurement runs an intervention in its stock-engine form (a weight edit, or HF module hooks for
CAA) where the model has one: its scores (first-token refusal, KL) and, for the judged objective, its
generations, as evaluation generates; in its TransformerLens-hook form otherwise (a hooked model
that is not a bridge). The two forms are equal up to float rounding (``tests/unit/test_edit.py``,
``tests/unit/test_scoring.py``, ``tests/integration/test_search.py``). Curves, on the trials' objectives:

- CNA by |diff| at shares ``f`` (layers 2+, scale 0): the paper's selection;
- CAA at strengths ``α`` (``x_l ← x_l − α·v_l`` at every ``hook_mlp_out``);
- directional ablation of the refusal direction of layer ``round(d · n_layers)``, d in ``DIRECTION_DEPTHS``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .attribute import Attribution
from .controls import direction_ablation_hooks, refusal_direction
from .edit import edit_direction, edit_weights
from .engine import steer_mlp_out, stock_runs
from .hooks import HookedModel
from .intervene import ablate, steer
from .models import is_bridge
from .neurons import NeuronSet
from .runs import atomic_write_json, read_json
from .selection import Selection

if TYPE_CHECKING:
    from .datasets import SearchData
    from .search import Search

REFERENCE_FRACTIONS = (0.0005, 0.001, 0.003, 0.01)
CAA_ALPHAS = (0.1, 0.25, 0.5, 1.0)
DIRECTION_DEPTHS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CURVES = ("CNA |diff| (share)", "CAA (α)", "direction ablation (layer)")

#: a point of a curve: its label, its hook form and its stock-engine form (None: everything under the hooks)
Point = tuple[str, Callable[[], Any], Callable[[], Any] | None]


def neuron_forms(model: HookedModel, neurons: NeuronSet, scale: float = 0.0) -> tuple[Callable, Callable | None]:
    """Scaling ``neurons`` by ``scale`` as TransformerLens hooks and as the equal weight edit (for the
    stock engine; None for a model whose weights cannot be edited)."""
    return partial(ablate, model, neurons, scale), partial(edit_weights, model, neurons, scale) if is_bridge(
        model
    ) else None


def measure_neurons(
    search: Search,
    model: HookedModel,
    neurons: NeuronSet,
    scale: float,
    baseline: dict[str, Any],
    base: dict,
    stage: str,
    data: SearchData | None = None,
) -> dict[str, Any]:
    """:meth:`Search.measure` with ``neurons`` scaled by ``scale`` (:func:`neuron_forms`), timed as
    ``stage``; no neurons (pruning left none) is the unmodified model: the measured ``baseline``, 0 s."""
    if not len(neurons):
        return {**baseline, "seconds": 0.0}
    with search.run_dir.timed(stage):
        hooked, stock = neuron_forms(model, neurons, scale)
        return search.measure(model, hooked, base, stock, data)[0]


def measure_trials(
    search: Search,
    model: HookedModel,
    scalings: Sequence[tuple[NeuronSet, float]],
    baseline: dict[str, Any],
    base: dict,
    stage: str = "trials",
    data: SearchData | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_neurons` for each ``(neurons, scale)``. In a judged search on the stock engine,
    the harmful prompts' answers of all of them are decoded in one batch (:func:`generate_grouped`)
    and each measurement's ``seconds`` holds its share of that decoding."""
    live = [i for i, (neurons, _) in enumerate(scalings) if len(neurons)]
    if len(live) < 2 or search.judge_fn is None or not stock_runs(model):
        return [measure_neurons(search, model, n, s, baseline, base, stage, data) for n, s in scalings]
    from .speed.grouped import generate_grouped

    # no neurons: the unmodified model, as measure_neurons gives it (no pass); the others below
    out = [measure_neurons(search, model, n, s, baseline, base, stage, data) if not len(n) else {} for n, s in scalings]
    with search.run_dir.timed(stage):
        t0 = time.perf_counter()
        texts, first = generate_grouped(
            model,
            list((data or search.data).harmful),
            [scalings[i] for i in live],
            max_new_tokens=search.max_new_tokens,
            batch_size=search.generation_batch_size,
        )
        decoding = (time.perf_counter() - t0) / len(live)
        for g, i in enumerate(live):
            hooked, stock = neuron_forms(model, *scalings[i])
            out[i] = search.measure(model, hooked, base, stock, data, answers=(texts[g], first[g]))[0]
            out[i]["seconds"] += decoding
    return out


def direction_layers(n_layers: int) -> list[int]:
    """The layers whose refusal direction the directional-ablation curve ablates."""
    return sorted({min(n_layers - 1, max(1, round(d * n_layers))) for d in DIRECTION_DEPTHS})


def reference_points(
    search: Search, model: HookedModel, attr: Attribution, caa: Attribution, progress: bool
) -> dict[str, Callable[[], list[Point]]]:
    """Per curve, a function building its points (the residual statistics for the directions are
    computed only when that curve is measured)."""
    editable = is_bridge(model)

    def directions() -> list[Point]:
        resid = search.resid(model, progress)
        out: list[Point] = []
        for layer in direction_layers(model.cfg.n_layers):
            r = refusal_direction(resid, layer)
            hooked = partial(model.hooks, fwd_hooks=direction_ablation_hooks(model, r))
            out.append((f"L{layer}", hooked, partial(edit_direction, model, r) if editable else None))
        return out

    def cna() -> list[Point]:
        return [
            (f"{100 * f:g}%", *neuron_forms(model, Selection("abs", f).neurons(attr))) for f in search.ref_fractions
        ]

    def caa_points() -> list[Point]:
        stock = lambda a: partial(steer_mlp_out, model, caa.diff, a) if editable else None  # noqa: E731
        return [(f"α={a:g}", partial(steer, model, caa.diff, a), stock(a)) for a in search.caa_alphas]

    return {CURVES[0]: cna, CURVES[1]: caa_points, CURVES[2]: directions}


def reference_curves(
    search: Search, model: HookedModel, attr: Attribution, caa: Attribution, base: dict, progress: bool
) -> dict[str, list[dict[str, Any]]]:
    """Measure every reference curve missing from ``references.json`` (saved after each curve); the
    others are read back."""
    path = search.out / "references.json"
    curves = read_json(path, "cna_lens.SearchReferences")["curves"] if path.exists() else {}
    save = lambda: atomic_write_json(path, {"kind": "cna_lens.SearchReferences", "curves": curves})  # noqa: E731
    todo = reference_points(search, model, attr, caa, progress)
    return measure_curves(search, model, todo, curves, base, save, progress)


def measure_curves(
    search: Search,
    model: HookedModel,
    todo: dict[str, Callable[[], list[Point]]],
    curves: dict[str, list[dict[str, Any]]],
    base: dict,
    save: Callable[[], Any],
    progress: bool,
    data: SearchData | None = None,
    stage: str = "references",
) -> dict[str, list[dict[str, Any]]]:
    """Measure each curve of ``todo`` (name → its points' builder) missing from ``curves``, on ``data``
    (None: the search's validation prompts), into ``curves``; ``save()`` after each curve. A curve
    without points is skipped."""
    for name, build in todo.items():
        if name in curves or not (points := build()):
            continue
        with search.run_dir.timed(stage):
            it = tqdm(points, desc=name if data is None else f"{stage} {name}", disable=not progress)
            curves[name] = [
                {"label": lab, **search.measure(model, hooked, base, stock, data)[0]} for lab, hooked, stock in it
            ]
        save()
    return curves


def samples(
    search: Search, model: HookedModel, result: dict[str, Any], n: int = 8, max_new_tokens: int = 64
) -> list[dict]:
    """Greedy completions of the first ``n`` harmful and harmless validation prompts of a finished ``search``
    for the baseline and the chosen selection (for reading by eye), kept in ``completions.jsonl`` (not recomputed)."""
    from .generation import generate

    conditions = {"baseline": contextlib.nullcontext}
    if result.get("chosen"):  # write() saved its neurons
        sel = Selection.from_dict(result["chosen"]["selection"])
        hooked, stock = neuron_forms(model, NeuronSet.load(search.out / "neurons.json"), sel.scale)
        conditions[f"trial:{result['chosen']['number']}"] = stock or hooked
    done = search.run_dir.done()
    for dataset, prompts in (("harmful", search.data.harmful[:n]), ("harmless", search.data.harmless[:n])):
        for cond, ctx in conditions.items():
            if all((dataset, cond, str(i)) in done for i in range(len(prompts))):
                continue
            with ctx():
                texts = generate(
                    model, list(prompts), max_new_tokens=max_new_tokens, batch_size=search.generation_batch_size
                )
            search.run_dir.append(
                [
                    {"dataset": dataset, "condition": cond, "prompt_id": str(i), "prompt": p, "completion": t}
                    for i, (p, t) in enumerate(zip(prompts, texts))
                ]
            )
    return [r for r in search.run_dir.rows if r["condition"] in conditions]
