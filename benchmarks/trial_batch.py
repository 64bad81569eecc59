"""What does ``--trial-batch K`` cost a search? Compare searches that differ in it (or in nothing).

For each search directory, from its ``timings.json``, ``pareto.json`` and ``config.json``:

* the seconds of each stage, and of a trial (trials / their number);
* on validation, the rule's best point (highest compliance with KL ≤ cap and over-refusal ≤ baseline
  + slack) and the front's quality over every KL budget up to the cap,

      gain = (1 / cap) ∫_0^cap max(0, max{c_i : KL_i ≤ κ, over-refusal ok} − c_baseline) dκ

  (the area the front dominates above the baseline, per nat: the best compliance gain at a budget
  drawn uniformly from [0, cap]) after the first 25, 50, 75 and all trials, and how many trials
  propose parameters another trial proposed;
* how often TPE proposes each ranking after the random start-up trials (a search tends to settle
  on one);
* the confirmation: its candidates' compliance on fresh prompts (each, and their mean), and the
  choice: its number, fresh-prompt and validation values.

python benchmarks/trial_batch.py --searches results/search-qwen2.5-coder-1.5b-instruct-judge RERUN \
    --labels committed "rerun --trial-batch 4" [--wall-seconds 4400 2800] \
    --out benchmarks/results/trial-batch/qwen2.5-coder-1.5b-instruct-judge.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from cna_lens.pareto import Rule, load_result
from cna_lens.runs import atomic_write_json


def front_gain(trials: list[dict], base: dict, rule: Rule) -> float:
    """The mean, over KL budgets κ uniform in [0, cap], of the best compliance gain over the baseline
    among trials with KL ≤ κ that meet the rule's caps (module docstring)."""
    ok = sorted((t["values"]["kl"], t["values"]["compliance"]) for t in rule.rank(trials, base))
    area, best, cap = 0.0, base["compliance"], rule.kl_cap
    for (kl, c), nxt in zip(ok, [k for k, _ in ok[1:]] + [cap]):
        best = max(best, c)
        area += (nxt - kl) * (best - base["compliance"])
    return area / cap


def describe(path: Path, label: str) -> dict:
    res = load_result(path)
    cfg = json.loads((path / "config.json").read_text())
    rule = Rule(res["rule"]["kl_cap"], res["rule"]["over_refusal_slack"])
    base, timings, trials = res["baseline"]["values"], res["timings"], res["trials"]
    best = rule.choose(trials, base)  # on validation
    params = [json.dumps(t["params"], sort_keys=True) for t in trials]
    chosen = res.get("chosen")
    fresh = [c["values"]["compliance"] for c in (res.get("confirmation") or {}).get("candidates", [])]
    return {
        "search": label,
        "trial_batch": cfg.get("trial_batch", 1),
        "seconds": timings,
        "stage_seconds_total": sum(timings.values()),
        "seconds_per_trial": timings["trials"] / len(trials),
        "trials": len(trials),
        "repeated_params": len(params) - len(set(params)),
        "rankings_after_startup": dict(
            Counter(t["selection"]["ranking"] for t in trials if t["number"] >= cfg["startup_trials"]).most_common()
        ),
        "front_gain_per_nat": front_gain(trials, base, rule),
        "front_gain_per_nat_after": {
            n: front_gain([t for t in trials if t["number"] < n], base, rule) for n in (25, 50, 75, len(trials))
        },
        "validation_best": None if best is None else {"number": best["number"], **best["values"]},
        "confirmed_fresh_compliance": fresh,
        "confirmed_fresh_compliance_mean": sum(fresh) / len(fresh) if fresh else None,
        "chosen": None
        if chosen is None
        else {"number": chosen["number"], "fresh": chosen["values"], "validation": chosen.get("validation")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--searches", nargs="+", required=True, help="search directories (same command)")
    ap.add_argument("--labels", nargs="+", help="a name for each search in the report (default: its path)")
    ap.add_argument("--wall-seconds", nargs="+", type=float, help="each search command's wall time, measured around it")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    labels, wall = args.labels or args.searches, args.wall_seconds or [None] * len(args.searches)
    if not len(labels) == len(wall) == len(args.searches):
        raise SystemExit(f"{len(args.searches)} searches but {len(labels)} labels and {len(wall)} wall times")
    rows = [describe(Path(p), label) | {"command_wall_seconds": w} for p, label, w in zip(args.searches, labels, wall)]
    atomic_write_json(Path(args.out), {"kind": "cna_lens.TrialBatchComparison", "searches": rows})
    for r in rows:
        best, chosen = r["validation_best"], r["chosen"]
        gains = ", ".join(f"{g:.3f}" for g in r["front_gain_per_nat_after"].values())
        print(
            f"{r['search']} (K={r['trial_batch']}): trials {r['seconds']['trials']:.0f} s "
            f"({r['seconds_per_trial']:.1f} s each), stages {r['stage_seconds_total']:.0f} s; "
            f"front gain after 25/50/75/all trials {gains}; rankings after start-up {r['rankings_after_startup']}; "
            f"fresh compliance of the confirmed candidates (mean) {r['confirmed_fresh_compliance_mean']}; "
            f"validation best {best}; chosen {chosen}"
        )


if __name__ == "__main__":
    main()
