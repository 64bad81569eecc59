"""Print the markdown tables of a reproduce run directory (the README and docs use its output).

python scripts/results_table.py results/reproduce-qwen2.5-coder-1.5b-instruct [--sweep]
"""

import json
import sys
from pathlib import Path

from cna_lens.conditions import Condition


def pct(e, label, ci=True):
    if not e:
        return "—"
    r = e[label]
    return f"{100 * r['rate']:.0f} [{100 * r['ci'][0]:.0f}–{100 * r['ci'][1]:.0f}]" if ci else f"{100 * r['rate']:.0f}"


def num(x, fmt):
    return "—" if x is None else format(x, fmt)


def main(run: str) -> None:
    res = json.loads((Path(run) / "results.json").read_text())
    comp, cap, ppl = res["compliance"], res["capability"], res["perplexity"]
    harm = comp["jbb_harmful"]
    n_mmlu = next((c["mmlu_n"] for c in cap.values() if "mmlu_n" in c), 0)
    print(
        "| condition | comply % [95 % CI] | evade % | refuse % [95 % CI] | regex refusal % | KL (nats) "
        f"| MMLU ({n_mmlu}) | McNemar p | perplexity, answered prompts (baseline) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cond in res["conditions"]:
        e, c, p = harm.get(cond), cap.get(cond, {}), ppl.get(cond, {})
        m, mb = p.get("matched"), p.get("matched_baseline")
        pp = f"{m['ppl']:.2f} ({mb['ppl']:.2f}), n={m['n']}" if m and m["n"] else "—"
        print(
            f"| {Condition.parse(cond).label} | {pct(e, 'comply')} | {pct(e, 'evade', False)} | {pct(e, 'refuse')} | "
            f"{100 * e['regex_refusal']:.0f} | {num(c.get('kl_mean'), '.3f')} | {num(c.get('mmlu_acc'), '.3f')} | "
            f"{num(c.get('mcnemar', {}).get('p'), '.2g')} | {pp} |"
        )
    print("\n| condition | JBB benign refuse % | XSTest safe refuse % | matched quality Δ vs baseline (n) |")
    print("|---|---|---|---|")
    for cond in comp.get("jbb_benign", {}):
        mq = harm.get(cond, {}).get("matched_quality")
        print(
            f"| {Condition.parse(cond).label} | {pct(comp['jbb_benign'].get(cond), 'refuse')} | "
            f"{pct(comp.get('xstest_safe', {}).get(cond), 'refuse')} | "
            + (f"{mq['diff']:+.3f} ({mq['n']})" if mq else "—")
            + " |"
        )
    m = res.get("matched") or {}
    for name, key in (("at_kl", "KL"), ("at_compliance", "compliance")):
        if name in m:
            print(f"\nAt the chosen point's {key} ({m[name]['target']:.3g}):\n")
            print("| method | KL | compliance | MMLU |\n|---|---|---|---|")
            for method, row in m[name]["methods"].items():
                cells = ["—"] * 3 if row is None else [num(row.get(k), ".3f") for k in ("kl", "compliance", "mmlu")]
                print(f"| {method} | " + " | ".join(cells) + " |")
    ft, held = res["first_token_vs_judge"], res["heldout"]
    print(
        f"\nfirst-token score > 0 vs judged refusal: accuracy {num(ft['pooled_accuracy'], '.3f')} "
        f"(n = {ft['n']}), Pearson r over conditions {num(ft['pearson_r'], '.3f')}"
    )
    print("held-out harmful_test, first-token refusal: " + ", ".join(
        f"{Condition.parse(c).label} {100 * v['first_token_refusal']:.0f} % (n = {v['n']})" for c, v in held.items()
    ))  # fmt: skip
    print(f"direction layer {res['direction']['layer']}; split-half Jaccard {res['split_half_jaccard']:.3f}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings_s"].items()))


def sweep(run: str) -> None:
    """The validation sweep: share of harmful_val prompts with positive first-token refusal log-odds."""
    s = {Condition.parse(k): e for k, e in json.loads((Path(run) / "sweep.json").read_text())["entries"].items()}
    grid = [c for c in s if c.kind == "cna" and c.scale is None]
    fractions, rankings = sorted({c.fraction for c in grid}), sorted({c.ranking for c in grid})
    head = " | ".join(f"CNA by {b} | random ({b})" for b in rankings)
    print(f"| top fraction | {head} |")
    print("|---|" + "---|" * (2 * len(rankings)))
    for f in fractions:
        cells = [
            num(s.get(Condition(kind, b, f), {}).get("refusal_share"), ".2f")
            for b in rankings
            for kind in ("cna", "random")
        ]
        print(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    for title, pick in (
        ("scale", lambda c: c.kind == "cna" and c.scale is not None),
        ("CAA (all layers)", lambda c: c.kind == "caa"),
        ("CAA (one layer)", lambda c: c.kind == "caa_layer"),
        ("controls", lambda c: c.kind in ("magnitude", "top", "direction")),
    ):
        print(f"\n{title}: " + ", ".join(f"{c.label} → {e['refusal_share']:.2f}" for c, e in s.items() if pick(c)))
    print(f"baseline: {s[Condition('baseline')]['refusal_share']:.2f}")


if __name__ == "__main__":
    (sweep if "--sweep" in sys.argv else main)(sys.argv[1])
