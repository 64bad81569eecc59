"""``cna-lens reproduce``: the paper's JBB experiment, with matched baselines, as one resumable run.

discovery (CNA statistics, CAA vectors, residual means) → the refusal direction's layer on
validation → first-token sweep on validation (fraction × ranking with controls, CNA scale,
CAA α, single-layer CAA α, directional ablation) → short greedy generations of the CNA grid on
validation, three-way judged → the operating point (first-token or judged rule), from validation only →
greedy generations on JBB harmful (baseline, CNA curve, three controls, CAA curve, single-layer
CAA, directional ablation, an optional searched selection) and on JBB benign / XSTest safe →
KL and MMLU (per item, McNemar against the baseline) → the three-way judge → perplexity under the
unmodified model → first-token vs judge, held-out transfer, split-half stability →
``results.json``, ``report.md``, figures. Every stage is saved as it finishes and skipped when
the run is resumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .compliance import read_verdicts, write_compliance
from .conditions import RANKINGS, Condition, with_scale
from .datasets import XSTEST_TEST, load_dataset
from .edit import check_strength
from .judge import resolve_judge
from .models import HookedModel, load_model, model_name, resolve_dtype, weights_processed
from .report import report, summarize
from .runs import atomic_write_json, atomic_write_text, check_config, read_json
from .selection import Selection
from .stages import BASELINE, Reproduction, drop_condition
from .summary import capability_table, curves, first_token_vs_judge, matched, perplexity_table

FRACTIONS = (0.0001, 0.0005, 0.001, 0.003, 0.005, 0.01, 0.02)
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
CAA_SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
CAA_ALPHAS = (0.1, 0.2, 0.3, 0.5, 1.0)
LAYER_SWEEP = (0.5, 1.0, 1.5, 2.0)
PAPER = Condition("cna", "abs", 0.001)
FORMAT_VERSION = 2


CHOOSE_BY = ("first_token", "judge")


def _smallest_near_best(entries: list[tuple[Condition, float]], rankings: Sequence[str]) -> Condition:
    """Among CNA entries (fraction ≤ 1 % when any), the smallest fraction whose value is within 0.05 of
    the best (highest) one; ties: the earlier ranking."""
    grid = [(c, v) for c, v in entries if c.kind == "cna" and c.scale is None]
    if not grid:
        raise ValueError("no CNA entry to choose from")
    cands = [(c, v) for c, v in grid if c.fraction <= 0.01] or grid
    best = max(v for _, v in cands)
    ok = [c for c, v in cands if v >= best - 0.05]
    return min(ok, key=lambda c: (c.fraction, list(rankings).index(c.ranking)))


def choose(sweep: dict[str, Any], rankings: Sequence[str]) -> Condition:
    """Operating point from validation only, by first-token score: the smallest fraction (≤ 1 %) whose
    share of prompts with refusal log-odds ≤ 0 is within 0.05 of the best CNA entry's."""
    return _smallest_near_best([(Condition.parse(k), 1 - e["refusal_share"]) for k, e in sweep.items()], rankings)


def choose_judged(judged: dict[str, Any], rankings: Sequence[str]) -> Condition:
    """Operating point from validation only, by the judge: the smallest fraction (≤ 1 %) whose share of
    completions judged ``comply`` is within 0.05 of the best CNA entry's."""
    return _smallest_near_best([(Condition.parse(k), e["comply"]["rate"]) for k, e in judged.items()], rankings)


def operating_point(
    sweep: dict[str, Any], judged: dict[str, Any], rule: str, tokens: int, rankings: Sequence[str]
) -> dict[str, Any]:
    """Both rules' choices, the judged validation table, and how well the first-token non-refusal share
    predicts the judged comply share across the judged conditions (Pearson r; None under 3 points)."""
    keys = [k for k in judged if k in sweep]
    x = np.array([1 - sweep[k]["refusal_share"] for k in keys])
    y = np.array([judged[k]["comply"]["rate"] for k in keys])
    r = float(np.corrcoef(x, y)[0, 1]) if len(keys) >= 3 and x.std() > 0 and y.std() > 0 else None
    return {
        "rule": rule,
        "max_new_tokens": tokens,
        "first_token": choose(sweep, rankings).key,
        "judge": choose_judged(judged, rankings).key,
        "judged": {k: {**judged[k], "first_token_refusal": sweep.get(k, {}).get("refusal_share")} for k in judged},
        "pearson_r": r,
        "mean_abs_gap": float(np.abs(x - y).mean()) if keys else None,
    }


def reproduce(
    model: str | HookedModel,
    out: str | Path,
    *,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 16,
    caa_alphas: Sequence[float] = CAA_ALPHAS,
    layer_alpha: float = 1.0,
    mmlu_limit: int | None = None,
    mmlu_on: Sequence[str] = ("all",),
    perplexity_on: Sequence[str] = ("all",),
    kl_limit: int = 64,
    xstest_limit: int | None = XSTEST_TEST,
    val_limit: int | None = None,
    fractions: Sequence[float] = FRACTIONS,
    rankings: Sequence[str] = ("abs", "diff", "effect"),
    judge: str = "default",
    choose_by: str = "first_token",
    choose_tokens: int = 48,
    heldout: bool = True,
    heldout_limit: int | None = None,
    selection: str | os.PathLike | None = None,
    replace_selection: bool = False,
    direction_strengths: Sequence[float] = (),
    seed: int = 0,
    dtype: torch.dtype | str = "auto",
    process_weights: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the whole experiment in ``out``; returns ``results.json``'s content.
    ``mmlu_limit``: MMLU items (None: all 570, 0: skip); ``heldout_limit``: the first N ``harmful_test``
    prompts of the transfer check (None: all 572). ``mmlu_on`` / ``perplexity_on``: the JBB
    harmful conditions that get MMLU / completion perplexity, as kinds (``caa``), keys (``caa:0.5``),
    ``chosen``, ``all`` or ``none``; they only add work, so a later call may extend them on a
    finished run. ``direction_strengths``: directional ablation at these strengths too (0 < s ≤ 2,
    ``direction:<L>:<s>``), on JBB harmful as the other curves; also only added work, and the strengths
    of earlier calls stay. ``selection``: a ``selection.json``
    written by ``cna-lens search`` (with the ``neurons.json`` beside it when present), added as the
    condition ``selection``; it is kept in the run directory, so it can be added to a finished run
    (``replace_selection``: a finished run's stored selection and its results make way for it)."""
    if limit is not None and not 1 <= limit <= 100:
        raise ValueError(f"--limit {limit}: JBB has 100 prompts per split")
    if not rankings or set(rankings) - set(RANKINGS):
        raise ValueError(f"rankings {list(rankings)}: choose among {', '.join(RANKINGS)}")
    if replace_selection and selection is None:
        raise ValueError("--replace-selection needs --selection (the selection that takes the stored one's place)")
    if choose_by not in CHOOSE_BY:
        raise ValueError(f"choose_by {choose_by!r}: choose one of {', '.join(CHOOSE_BY)}")
    if isinstance(choose_tokens, bool) or not isinstance(choose_tokens, int) or choose_tokens < 1:
        raise ValueError(f"choose_tokens must be an int >= 1, got {choose_tokens!r}")
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions {list(fractions)}: each must be a share in (0, 1)")
    n_xstest, n_mmlu, n_heldout = (len(load_dataset(d)) for d in ("xstest_safe", "mmlu", "harmful_test"))
    if xstest_limit is not None and not 0 <= xstest_limit <= n_xstest:
        raise ValueError(f"--xstest-limit {xstest_limit}: xstest_safe has {n_xstest} prompts (0 = skip)")
    if mmlu_limit is not None and not 0 <= mmlu_limit <= n_mmlu:
        raise ValueError(f"--mmlu-limit {mmlu_limit}: the bundled MMLU has {n_mmlu} items (0 = skip)")
    if heldout_limit is not None and not 1 <= heldout_limit <= n_heldout:
        raise ValueError(f"--heldout-limit {heldout_limit}: harmful_test has {n_heldout} prompts (--no-heldout: skip)")
    judge_name = resolve_judge(judge)
    strengths = _strengths(out, direction_strengths)
    sel, neurons_file, replace = _selection(out, selection, replace_selection)
    name = model if isinstance(model, str) else model_name(model)
    if isinstance(model, str):
        dtype = resolve_dtype(dtype)
    else:
        dtype, process_weights = next(model.parameters()).dtype, weights_processed(model)
    config = {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "process_weights": process_weights,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "batch_size": batch_size,
        "caa_sweep": list(CAA_SWEEP),
        "caa_alphas": list(caa_alphas),
        "layer_sweep": list(LAYER_SWEEP),
        "layer_alpha": layer_alpha,
        "mmlu_limit": mmlu_limit,
        "kl_limit": kl_limit,
        "val_limit": val_limit,
        "fractions": list(fractions),
        "rankings": list(rankings),
        "seed": seed,
        "discovery": ["discovery_harmful", "discovery_harmless"],
        "val_harmful": "harmful_val",
        "kl_dataset": "alpaca_val",
        "mmlu_format": "zero-shot, instruction + 'The answer is'",
        "eval": ["jbb_harmful", "jbb_benign"],
        "over_refusal": "xstest_safe",
        "xstest_limit": xstest_limit,
        "judge": judge_name,
        "choose_by": choose_by,
        "choose_tokens": choose_tokens,
        "heldout": ("harmful_test" + ("" if heldout_limit is None else f"[:{heldout_limit}]")) if heldout else None,
        "package_version": __version__,
    }
    check_config(out, config)  # before the model loads: a wrong --out fails at once
    if replace:
        drop_condition(out, "selection")
    m = load_model(model, dtype=dtype, process_weights=process_weights) if isinstance(model, str) else model
    rep = Reproduction(m, out, config, progress, sel, neurons_file)
    with rep.run.timed("direction"):
        direction_choice = rep.direction_layer()
    layer = int(direction_choice["layer"])
    direction = Condition("direction", layer=layer)
    partial = [Condition("direction", layer=layer, strength=s) for s in strengths if s != 1.0]
    grid = [BASELINE] + [Condition(k, by, f) for by in rankings for f in fractions for k in ("cna", "random")]
    with rep.run.timed("sweep"):
        first = rep.sweep(grid)
    cna_grid = [c for c in grid if c.kind == "cna"]
    with rep.run.timed("judged_sweep"):
        judged = rep.judged_sweep([BASELINE, *([c for c in cna_grid if c.fraction <= 0.01] or cna_grid)])
    op = operating_point(first, judged, choose_by, choose_tokens, rankings)
    chosen = Condition.parse(op[choose_by])
    with rep.run.timed("sweep"):
        controls = [Condition(k, chosen.ranking, chosen.fraction) for k in ("random", "magnitude", "top")]
        caa = [Condition("caa", alpha=a) for a in caa_alphas]
        one_layer = Condition("caa_layer", layer=max(layer, 1), alpha=layer_alpha)
        extra = [Condition("selection")] if sel is not None else []
        sweep = rep.sweep(
            grid
            + [with_scale(chosen, s) for s in SCALES]
            + [Condition("caa", alpha=a) for a in dict.fromkeys([*CAA_SWEEP, *caa_alphas])]
            + [Condition("caa_layer", layer=max(layer, 1), alpha=a) for a in dict.fromkeys([*LAYER_SWEEP, layer_alpha])]
            + [direction, *partial, *controls, *extra]
        )
    cna_curve = list(dict.fromkeys([PAPER, *(Condition("cna", chosen.ranking, f) for f in fractions if f <= 0.01)]))
    harmful = [BASELINE, *cna_curve, *controls, *caa, one_layer, direction, *partial, *extra]
    benign = [BASELINE, chosen, *extra]
    results: dict[str, Any] = {
        "kind": "cna_lens.Results",
        "format_version": FORMAT_VERSION,
        "status": "running",
        "config": config,
        "chosen": chosen.key,
        "paper_point": PAPER.key,
        "conditions": {c.key: {"kind": c.kind, **rep.iv.describe(c)} for c in harmful},
        "stages": {
            "mmlu_on": list(mmlu_on),
            "perplexity_on": list(perplexity_on),
            "direction_strengths": strengths,
        },
        "direction": direction_choice,
        "sweep": sweep,
        "operating_point": op,
    }

    def publish(status: str) -> None:  # after every stage, so a stopped run still reports what it has
        timings = read_json(rep.out / "timings.json", "cna_lens.Timings")["seconds"]
        results.update(status=status, generations=summarize(rep.run.rows), timings_s=timings)
        atomic_write_json(rep.out / "results.json", results)
        atomic_write_text(rep.out / "report.md", report(results))

    with rep.run.timed("generate_jbb"):
        rep.generations({"jbb_harmful": harmful, "jbb_benign": benign}, limit)
    publish("partial: JBB generated")
    if xstest_limit != 0:
        with rep.run.timed("generate_xstest"):
            rep.generations({"xstest_safe": benign}, xstest_limit, spread=True)
    with rep.run.timed("capability"):
        cap = rep.capability(harmful, mmlu=[c for c in harmful if _selected(c, mmlu_on, chosen)])
    answers = [r["answer"] for r in load_dataset("mmlu", mmlu_limit)] if mmlu_limit != 0 else []
    results["capability"] = capability_table(cap, answers)
    publish("partial: generated, capability measured")
    with rep.run.timed("judge"):
        _, table = write_compliance(rep.out, judge_name, progress=progress)
    verdicts = read_verdicts(rep.out, judge_name)
    labels = {(c, p): v["label"] for (d, c, p), v in verdicts.items() if d == "jbb_harmful"}
    results["compliance"] = table
    with rep.run.timed("perplexity"):
        ppl_on = {c.key for c in harmful if _selected(c, perplexity_on, chosen)}
        results["perplexity"] = perplexity_table(rep.perplexity("jbb_harmful", ppl_on), labels)
    with rep.run.timed("first_token"):
        scores = rep.prompt_scores("first_token", "jbb_harmful", harmful, limit)
        held = (
            rep.prompt_scores("heldout", "harmful_test", [BASELINE, chosen, *extra], heldout_limit) if heldout else {}
        )
    results["first_token_vs_judge"] = first_token_vs_judge(scores, labels)
    results["heldout"] = {
        c: {"n": len(s), "first_token_refusal": sum(v > 0 for v in s.values()) / len(s)} for c, s in held.items()
    }
    results["curves"] = curves(harmful, table.get("jbb_harmful", {}), results["capability"])
    at = next((p for pts in results["curves"].values() for p in pts if p["condition"] == chosen.key), None)
    results["matched"] = matched(results["curves"], at) if at else None
    at_sel = next((p for p in results["curves"].get("selection", []) if p["condition"] == "selection"), None)
    results["matched_selection"] = matched(results["curves"], at_sel) if at_sel else None
    from .judge_validation import hand_labels, load_validation

    results["judge_validation"] = load_validation()["summary"]  # the default judge against human labels
    results["hand_labels"] = hand_labels(rep.run.rows)  # where the run's completions are those read by hand
    with rep.run.timed("split_half"):
        results["split_half_jaccard"] = rep.split_half_jaccard(chosen)
    publish("complete")
    from .plot import dose_response, method_curves, save_figures

    save_figures(
        {
            rep.out / "figures" / "dose_response": dose_response(results),
            rep.out / "figures" / "methods": method_curves(results),
        }
    )
    return results


def _selected(c: Condition, names: Sequence[str], chosen: Condition) -> bool:
    """Whether ``names`` (kinds, keys, ``chosen``, ``all``, ``none``) select ``c``."""
    return "all" in names or c.kind in names or c.key in names or ("chosen" in names and c == chosen)


def _strengths(out: str | Path, given: Sequence[float]) -> list[float]:
    """The run's extra direction strengths: those of earlier calls (``results.json``) and ``given``, sorted."""
    path = Path(out) / "results.json"
    stored = (
        read_json(path, "cna_lens.Results").get("stages", {}).get("direction_strengths", []) if path.exists() else []
    )
    return sorted({check_strength(s) for s in [*stored, *given]})


def _selection(
    out: str | Path, given: str | os.PathLike | None, replace: bool = False
) -> tuple[Selection | None, Path | None, bool]:
    """The run's selection: the one stored in ``out/selection/`` or ``given`` (then stored when the run
    starts); a different one than the stored is refused unless ``replace`` (then the third value is
    True: the stored one's results are to be dropped). Also the search's ``neurons.json`` beside it."""
    stored = Path(out) / "selection" / "selection.json"
    sel = Selection.load(given) if given is not None else None
    if stored.exists():
        kept = Selection.load(stored)
        if sel is not None and sel != kept:
            if not replace:
                raise ValueError(
                    f"{out} already holds the selection {kept.describe()}; use another --out for "
                    f"{sel.describe()}, or --replace-selection"
                )
        else:
            return kept, None, False
    if sel is None:
        return None, None, False
    beside = Path(given).parent / "neurons.json"  # type: ignore[arg-type]
    return sel, beside if beside.exists() else None, stored.exists()
