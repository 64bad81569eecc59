"""Do the searched neurons beat the reference methods at equal KL on prompts no search chose on?

Each search directory must have been run with ``--confirm K --confirm-front`` on the same model, fresh
prompts and discovery statistics, so that the reference curves (CNA by |diff|, CAA, directional
ablation) measured there are the same for all (checked). For each search: its points re-measured on
the fresh prompts (the validation front with KL ≤ cap, and the other confirmation candidates), and for
each reference point the best of them with no more KL (``pareto.equal_kl``, as in ``pareto.json``).
Then, per reference point, how many searches reach its compliance at equal or lower KL, and each
search's exact McNemar test against it, prompt by prompt (``pareto.paired``; where both points kept
per-prompt labels); the other way round, each search's chosen point against each curve's best point
with no more KL (``pareto.references_at``). The searches are not pooled: the best of all their points
on the same prompts would again be a maximum of noisy scores. Writes ``OUT.json`` and the figure ``OUT.{html,png}``
(each search's front on the fresh prompts, with the reference curves).

python benchmarks/equal_kl.py --searches DIR ... --labels LABEL ... \
    --out benchmarks/results/equal-kl/qwen2.5-coder-1.5b-instruct-judge
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from cna_lens.pareto import equal_kl, fresh_points, load_result, references_at
from cna_lens.plot import fresh_fronts, save_figure
from cna_lens.runs import atomic_write_json

POINT_KEYS = ("number", "label", "n_neurons", "validation", "values")


def describe(path: Path, label: str) -> dict:
    res = load_result(path)
    conf = res.get("confirmation") or {}
    if "front" not in conf:
        raise ValueError(f"{path}: no fresh-prompt front (rerun it with --confirm K --confirm-front)")
    cfg = json.loads((path / "config.json").read_text())
    points, seen = fresh_points(conf), {t["number"] for t in conf["front"]}
    chosen = next(p for p in points if p["number"] == res["chosen"]["number"])  # with its per-prompt labels
    after = [t for t in res["trials"] if t["number"] >= cfg["startup_trials"]]  # TPE's own proposals
    rankings = Counter(t["selection"]["ranking"] for t in after)
    return {
        "search": label,
        "seed": cfg["seed"],
        "trial_batch": cfg.get("trial_batch", 1),
        "rankings_searched": cfg["space"]["rankings"],
        "n_trials": res["n_trials"],
        "rankings_after_startup": dict(rankings.most_common()),
        "chosen": {k: res["chosen"][k] for k in ("number", "label", "values", "validation")},
        "points": [{k: p[k] for k in POINT_KEYS} | {"on_validation_front": p["number"] in seen} for p in points],
        "equal_kl": equal_kl(points, conf["references"]),  # recomputed: the same as pareto.json's
        "chosen_equal_kl": references_at(chosen, conf["references"]),
        "_result": res,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--searches", nargs="+", type=Path, required=True)
    p.add_argument("--labels", nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.html, OUT.png")
    args = p.parse_args()
    if len(args.labels) != len(args.searches):
        raise SystemExit(f"{len(args.searches)} searches but {len(args.labels)} labels")
    rows = [describe(d, lab) for d, lab in zip(args.searches, args.labels)]
    first = rows[0]["_result"]["confirmation"]
    for r in rows[1:]:
        conf = r["_result"]["confirmation"]
        if r["_result"]["model"] != rows[0]["_result"]["model"] or conf["data"] != first["data"]:
            raise SystemExit(f"{r['search']}: another model or other fresh prompts than {rows[0]['search']}")
        same = {k: [(q["values"], q.get("labels")) for q in v] for k, v in conf["references"].items()} == {
            k: [(q["values"], q.get("labels")) for q in v] for k, v in first["references"].items()
        }
        if not same:
            raise SystemExit(f"{r['search']}: its reference curves differ from {rows[0]['search']}'s")
    refs = [(e["curve"], e["label"], e["kl"], e["compliance"]) for e in rows[0]["equal_kl"]]
    reached = []
    for i, (curve, label, kl, comp) in enumerate(refs):
        best = [r["equal_kl"][i]["search_compliance"] for r in rows]
        tests = [r["equal_kl"][i].get("paired") for r in rows]
        reached.append(
            {
                "curve": curve,
                "label": label,
                "kl": kl,
                "compliance": comp,
                "searches_at_least_as_compliant": sum(b is not None and b >= comp for b in best),
                "search_best": dict(zip(args.labels, best)),
                "paired": dict(zip(args.labels, tests)),
            }
        )
    model = rows[0]["_result"]["model"]
    fig = fresh_fronts({r["search"]: r.pop("_result") for r in rows})
    out = {
        "kind": "cna_lens.bench.EqualKL",
        "model": model,
        "fresh_prompts": dict(first["data"]),
        "baseline": first["baseline"]["values"],
        "n_searches": len(rows),
        "references": first["references"],
        "reached": reached,
        "searches": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.parent / f"{args.out.name}.json"  # the stem may hold dots (qwen2.5-...)
    atomic_write_json(path, out)
    save_figure(fig, args.out)
    for e in reached:
        best = ", ".join(
            f"{k}: {'-' if v is None else f'{v:.3f}'}" + (f" (p {q['p']:.2g})" if (q := e["paired"][k]) else "")
            for k, v in e["search_best"].items()
        )
        print(f"{e['curve']} {e['label']}: {e['compliance']:.3f} at KL {e['kl']:.4f} | best searched at <= KL: {best}")
    for r in rows:
        for e in r["chosen_equal_kl"]:
            ref = "none" if e["label"] is None else f"{e['label']} {e['compliance']:.3f} at KL {e['kl']:.4f}"
            test = f" (p {e['paired']['p']:.2g})" if e["paired"] else ""
            print(f"{r['search']}: chosen {r['chosen']['values']['compliance']:.3f} vs {e['curve']} {ref}{test}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
