"""Print the headline markdown table of a reproduce run directory (README and docs use its output).

    python scripts/results_table.py results/reproduce-qwen2.5-coder-1.5b-instruct [--sweep]
"""

import json
import sys
from pathlib import Path

NAMES = {
    "baseline": "baseline",
    "cna:abs:0.001": "CNA top 0.1 % (paper's point)",
    "cna:abs:0.003": "CNA top 0.3 % (chosen on validation)",
    "random:abs:0.003": "random, same per-layer counts",
    "caa:0.5": "CAA α = 0.5",
    "caa:1.0": "CAA α = 1.0",
}


def pct(e, label):
    lo, hi = e[label]["ci"]
    return f"{100 * e[label]['rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}]"


def main(run: str) -> None:
    d = Path(run)
    table = json.loads((d / "compliance.json").read_text())["table"]
    cap = json.loads((d / "capability.json").read_text())["entries"]
    harm, benign, xs = table["jbb_harmful"], table.get("jbb_benign", {}), table.get("xstest_safe", {})
    print("| condition | comply % [95 % CI] | evade % | refuse % | regex refusal % | benign refuse % | XSTest safe refuse % | KL (nats) | MMLU (57) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cond, name in NAMES.items():
        if cond not in harm:
            continue
        e, c = harm[cond], cap.get(cond, {})
        b = f"{100 * benign[cond]['refuse']['rate']:.0f}" if cond in benign else "—"
        x = f"{100 * xs[cond]['refuse']['rate']:.0f}" if cond in xs else "—"
        kl = f"{c['kl_mean']:.2f}" if "kl_mean" in c else "—"
        mmlu = f"{c['mmlu_acc']:.2f}" if "mmlu_acc" in c else "—"
        print(
            f"| {name} | {pct(e, 'comply')} | {pct(e, 'evade')} | {pct(e, 'refuse')} | "
            f"{100 * e['regex_refusal']:.0f} | {b} | {x} | {kl} | {mmlu} |"
        )




def sweep(run: str) -> None:
    """The validation sweep: share of harmful_val prompts with positive first-token refusal log-odds."""
    s = json.loads((Path(run) / "sweep.json").read_text())["entries"]
    fr = sorted({float(c.split(":")[2]) for c in s if c.startswith("cna:") and c.count(":") == 2})
    by = sorted({c.split(":")[1] for c in s if c.startswith("cna:") and c.count(":") == 2})
    head = " | ".join(f"CNA by {b} | random ({b})" for b in by)
    print(f"| top fraction | {head} |")
    print("|---|" + "---|" * (2 * len(by)))
    for f in fr:
        cells = []
        for b in by:
            for kind in ("cna", "random"):
                e = s.get(f"{kind}:{b}:{f:g}")
                cells.append(f"{e['refusal_share']:.2f}" if e else "—")
        print(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    scales = sorted(c for c in s if c.count(":") == 3)
    print("\nscale: " + ", ".join(f"×{c.split(':')[3]} → {s[c]['refusal_share']:.2f}" for c in scales))
    print("CAA: " + ", ".join(f"α {c.split(':')[1]} → {s[c]['refusal_share']:.2f}" for c in s if c.startswith("caa:")))
    print(f"baseline: {s['baseline']['refusal_share']:.2f}")


if __name__ == "__main__":
    (sweep if "--sweep" in sys.argv else main)(sys.argv[1])
