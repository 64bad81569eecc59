"""Does the answer-quality constraint steer the search? Two judged searches that both measure every
trial's answer quality (``--trial-quality N``), one without and one with ``--quality-margin M``.

Same model, seed and settings, so the random start-up trials are the same in both; after them TPE
proposes from the trials it has seen, and only the constrained search marks those losing more than M
infeasible. Reports, over the trials after the start-up ones: the mean quality change, the share
within the margin, and the best compliance among trials within the margin and the KL cap (the rule's
pick on validation). Both searches start from a ``references.json`` whose curves are empty (no
reference point is measured) and the constrained one reads the other's discovery statistics, pruning
effects and baselines, the quality prompts' answers included (the same computations).

python benchmarks/quality_constraint.py --model smollm2-135m-instruct --trials 24 --margin 0.05 \\
    --work runs/quality-constraint --out benchmarks/results/quality-constraint/smollm2-135m-instruct-float32.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trial_quality import header, start_from

from cna_lens import load_model
from cna_lens.datasets import SearchData
from cna_lens.pareto import Rule
from cna_lens.quality import FILE as QUALITY_FILE
from cna_lens.quality import stored
from cna_lens.runs import atomic_write_json
from cna_lens.search import Search


def summary(rows: list[dict], startup: int, margin: float, rule: Rule, base: dict) -> dict:
    """Over the trials after the start-up ones."""
    guided = [r for r in rows if r["number"] >= startup]
    ok = [r for r in guided if rule.quality_ok(r)]
    best = rule.choose(ok, base)
    return {
        "n": len(guided),
        "mean_quality_change": sum(r["quality"]["diff"] for r in guided) / max(1, len(guided)),
        "within_margin": len(ok) / max(1, len(guided)),
        "best_within_margin_and_cap": None
        if best is None
        else {"number": best["number"], "values": best["values"], "quality": best["quality"]["diff"]},
        "trials": [
            {"number": r["number"], "values": r["values"], "quality": r["quality"]["diff"], "label": r["label"]}
            for r in guided
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--startup", type=int, default=10)
    p.add_argument("--trial-batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--n", type=int, default=16, help="--trial-quality")
    p.add_argument("--tokens", type=int, default=150, help="--quality-tokens")
    p.add_argument("--margin", type=float, default=0.01, help="--quality-margin of the constrained search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.trials <= args.startup:
        raise SystemExit(f"--trials {args.trials}: more than --startup ({args.startup}), or nothing is steered")
    data = SearchData.bundled(quality="xstest_safe_val", n_quality=args.n)
    rules = {
        "measured": Rule(quality_tokens=args.tokens),
        "constrained": Rule(quality_margin=args.margin, quality_tokens=args.tokens),
    }
    kw = dict(objective="judge", max_new_tokens=args.max_new_tokens, trial_batch=args.trial_batch, data=data)
    kw |= dict(seed=args.seed, startup_trials=args.startup, dtype=args.dtype)
    searches = {name: Search(args.work / name, model=args.model, rule=rule, **kw) for name, rule in rules.items()}
    model = load_model(args.model, dtype=args.dtype)
    results = {}
    for name, search in searches.items():
        if name == "constrained" and stored(search.out) is None:  # the unmodified model's answers
            atomic_write_json(search.out / QUALITY_FILE, {**stored(searches["measured"].out), "trials": {}})
        start_from(search, searches["measured"] if name == "constrained" else None)
        results[name] = search.run(model, args.trials)
    judge = Rule(quality_margin=args.margin)  # both searches judged by the same margin
    out = {
        **header("cna_lens.bench.QualityConstraint", args),
        "quality_prompts": data.names["quality"],
        "same_startup_trials": [r["params"] for r in results["measured"]["trials"][: args.startup]]
        == [r["params"] for r in results["constrained"]["trials"][: args.startup]],
        "after_startup": {
            name: summary(res["trials"], args.startup, args.margin, judge, res["baseline"]["values"])
            for name, res in results.items()
        },
        "stage_seconds": {name: res["timings"] for name, res in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    for name, s in out["after_startup"].items():
        best = s["best_within_margin_and_cap"]
        print(
            f"{name}: {s['n']} trials after start-up, mean quality change {s['mean_quality_change']:+.3f}, "
            f"{s['within_margin']:.0%} within {args.margin}; best within margin and KL cap: "
            + ("none" if best is None else f"trial {best['number']} {best['values']} quality {best['quality']:+.3f}")
        )


if __name__ == "__main__":
    main()
