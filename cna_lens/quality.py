"""Answer quality of search points: what their long answers turn into.

A point's quality change on a prompt set is mean(q_S − q_base) over the prompts that neither the point
nor the unmodified model refuses (regex judge), q = 1 − repeated 4-grams / 4-grams of a greedy answer
(:func:`cna_lens.scoring.matched_quality`). KL measures the next token; this measures loops, which
show in the later part of a 150-token answer (``benchmarks/quality_by_length.py``).

Measured on every trial of a search whose data has quality prompts (``SearchData.quality``), where
``Rule.quality_margin`` also makes it an Optuna constraint (``Trial.set_constraint``: a violation > 0
marks a trial infeasible, and TPE models good proposals on the feasible ones), and on the
confirmation's candidates (:func:`cna_lens.confirm.answer_quality`). A search keeps its trials'
answers in ``quality.json`` (``baseline``, and ``trials``: number → texts), written after each group
of trials.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import stock_runs
from .evaluate import judge
from .runs import atomic_write_json, read_json
from .scoring import matched_quality
from .search_refs import neuron_forms

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .confirm import ConfirmData
    from .datasets import SearchData
    from .hooks import HookedModel
    from .neurons import NeuronSet
    from .pareto import Rule
    from .search import Search

FORMAT_VERSION = 1
KIND = "cna_lens.SearchQuality"
FILE = "quality.json"


def answers_under(
    model: HookedModel,
    prompts: list[str],
    scalings: Sequence[tuple[NeuronSet, float]],
    tokens: int,
    batch_size: int,
    unmodified: list[str],
) -> list[list[str]]:
    """Greedy answers to ``prompts`` under each ``(neurons, scale)``: decoded together on the stock engine
    (:func:`generate_grouped`), else one scaling at a time under its weight edit or hooks; an empty
    set is the unmodified model, whose answers are ``unmodified``."""
    from .generation import generate

    live = [i for i, (n, _) in enumerate(scalings) if len(n)]
    out = [list(unmodified) for _ in scalings]
    if len(live) > 1 and stock_runs(model):
        from .speed.grouped import generate_grouped

        texts, _ = generate_grouped(
            model, prompts, [scalings[i] for i in live], max_new_tokens=tokens, batch_size=batch_size
        )
        for i, t in zip(live, texts):
            out[i] = t
        return out
    for i in live:
        hooked, stock = neuron_forms(model, *scalings[i])
        with (stock or hooked)():
            out[i] = generate(model, prompts, max_new_tokens=tokens, batch_size=batch_size)
    return out


def quality_against(baseline: list[str], answers: list[str]) -> dict[str, Any]:
    """:func:`matched_quality` of ``answers`` against ``baseline`` (same prompts, in order) on the prompts
    both answer by the regex judge (:func:`cna_lens.evaluate.judge`); ``diff`` = mean(q_S − q_base)."""
    rows = lambda texts: [  # noqa: E731
        {"prompt_id": i, "completion": t, "refused": judge(t).refused} for i, t in enumerate(texts)
    ]
    return matched_quality(rows(baseline), rows(answers), lambda r: not r["refused"])


def check_quality(data: SearchData, rule: Rule, confirm: ConfirmData | None) -> None:
    """A margin needs answers to judge (the search's quality prompts or a confirmation's), and the
    confirmation's quality prompts must be fresh (none of the search's)."""
    if rule.quality_margin is None:
        return
    if not rule.confirm_top and data.quality is None:
        raise ValueError(
            "rule.quality_margin needs answers to judge: quality prompts in the search (SearchData.quality) "
            "or a confirmation (rule.confirm_top >= 1)"
        )
    shared = set(data.quality or ()) & set(confirm.quality_prompts if rule.confirm_top and confirm else ())
    if shared:
        raise ValueError(
            f"{len(shared)} of the search's quality prompts are also the confirmation's: the confirmation "
            "would not re-measure them on fresh prompts"
        )


def violation(margin: float, quality: dict[str, Any]) -> float:
    """A trial's Optuna constraint (feasible where ≤ 0): −diff − margin for its :func:`quality_against`
    result, and 1 where ``diff`` is NaN (no prompt answered by both), which never passes."""
    return 1.0 if math.isnan(quality["diff"]) else -quality["diff"] - margin


def stored(out: Path) -> dict[str, Any] | None:
    """A search's ``quality.json`` (None: not written yet)."""
    path = out / FILE
    return read_json(path, KIND, FORMAT_VERSION) if path.exists() else None


def search_baseline(search: Search, model: HookedModel) -> dict[str, Any]:
    """The search's ``quality.json``, with the unmodified model's answers to ``search.data.quality``
    (generated and saved the first time; the prompts and length are pinned in the search's config)."""
    from .generation import generate

    store = stored(search.out)
    if store is None:
        d, tokens = search.data, search.rule.quality_tokens
        with search.run_dir.timed("baseline"):
            answers = generate(model, list(d.quality), max_new_tokens=tokens, batch_size=search.generation_batch_size)
        store = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "prompts": d.names.get("quality", ""),
            "tokens": tokens,
            "baseline": answers,
            "trials": {},
        }
        atomic_write_json(search.out / FILE, store)
    return store


def measure_quality(
    search: Search,
    model: HookedModel,
    store: dict[str, Any],
    numbers: Sequence[int],
    scalings: Sequence[tuple[NeuronSet, float]],
    results: Sequence[dict[str, Any]],
) -> None:
    """Each trial's answers to the search's quality prompts (decoded together) and its ``quality``
    (:func:`quality_against` the baseline's) in its result, whose ``seconds`` gains its share of the
    decoding; the answers join ``store`` (:func:`search_baseline`) under the trial numbers, saved."""
    prompts, tokens = list(search.data.quality), search.rule.quality_tokens
    with search.run_dir.timed("trials"):
        t0 = time.perf_counter()
        texts = answers_under(model, prompts, scalings, tokens, search.generation_batch_size, store["baseline"])
        share = (time.perf_counter() - t0) / max(1, sum(1 for n, _ in scalings if len(n)))
    for n, (neurons, _), res, t in zip(numbers, scalings, results, texts):
        res["quality"] = quality_against(store["baseline"], t)
        res["seconds"] += share if len(neurons) else 0.0
        store["trials"][str(n)] = t
    atomic_write_json(search.out / FILE, store)
