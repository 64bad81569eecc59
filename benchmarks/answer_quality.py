"""Do a search's candidates keep the quality of long answers to benign prompts? The confirmation's
answer-quality guard (``--quality-margin``) applied to a finished search.

A copy of ``--source`` (a finished search with ``--confirm K``) in ``--work`` is resumed with
``--quality-margin M --quality-tokens T --quality-prompts P --confirm-quality N``: nothing the source
measured is measured again except its validation baseline where its log-probabilities are not kept
(``baseline.safetensors`` is not committed). The unmodified model and each of the K candidates answer
N evenly spaced prompts of P (by default ``xstest_safe_val``: the 150 safe XSTest prompts no
reproduction uses) greedily for T tokens. A candidate's quality change is mean(q_S − q_base) over the
prompts both answer, q = 1 − repeated 4-grams / 4-grams (:func:`cna_lens.quality.quality_against`), and
the rule then chooses only among candidates with a change ≥ −M. Writes ``OUT.json`` (per candidate:
fresh compliance, KL, quality change with its bootstrap CI, whether it passes; the pick without and
with the guard) and ``OUT.jsonl`` (every answer, for reading by eye).

python benchmarks/answer_quality.py --source results/search-qwen2.5-coder-1.5b-instruct-judge \\
    --work runs/answer-quality/qwen2.5-coder-1.5b-instruct-judge \\
    --out benchmarks/results/answer-quality/qwen2.5-coder-1.5b-instruct-judge
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ranking_studies import check_source, command

from cna_lens.confirm import ConfirmData
from cna_lens.evaluate import judge, quality
from cna_lens.pareto import Rule, load_result
from cna_lens.runs import atomic_write_json, atomic_write_text, read_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True, help="finished search with --confirm K")
    p.add_argument("--work", type=Path, required=True, help="the copy of the source that is resumed")
    p.add_argument("--margin", type=float, default=0.01, help="--quality-margin")
    p.add_argument("--tokens", type=int, default=150, help="--quality-tokens")
    p.add_argument("--prompts", default="xstest_safe_val", help="--quality-prompts (a bundled set, or harmless)")
    p.add_argument("--n", type=int, default=100, help="--confirm-quality")
    p.add_argument("--out", type=Path, required=True, help="output stem (.json, .jsonl)")
    args = p.parse_args()
    try:
        guard = Rule(confirm_top=1, quality_margin=args.margin, quality_tokens=args.tokens)  # checks both
    except ValueError as e:
        raise SystemExit(f"--margin / --tokens: {e}") from None
    qset = None if args.prompts == "harmless" else args.prompts
    prompts = ConfirmData.bundled(quality=qset, n_quality=args.n).quality_prompts  # checks the set and n
    cfg, res, _ = check_source(args.source, references=False)
    if not res.get("confirmation"):
        raise SystemExit(f"{args.source}: no confirmation (a search run with --confirm K)")
    if not (args.work / "config.json").exists():
        if args.work.exists():
            shutil.rmtree(args.work)  # copied but never started: copy again
        shutil.copytree(args.source, args.work, ignore=shutil.ignore_patterns("*.html", "*.png", ".lock"))
    rule = res["rule"]
    kw = dict(
        rankings=",".join(cfg["space"]["rankings"]),
        seed=cfg["seed"],
        trials=res["n_trials"],
        trial_batch=cfg.get("trial_batch", 1),
        confirm=rule["confirm_top"],
        front=rule.get("confirm_front", False),
    )
    extra = ["--quality-margin", str(args.margin), "--quality-tokens", str(args.tokens)]
    extra += ["--quality-prompts", args.prompts, "--confirm-quality", str(args.n)]
    subprocess.run([*command(cfg, res, args.work, **kw), *extra], check=True)

    guarded = load_result(args.work)
    conf = read_json(args.work / "confirm.json", "cna_lens.SearchConfirmation")
    before = [c["number"] for c in res["confirmation"]["candidates"]]
    cands = guarded["confirmation"]["candidates"]
    if [c["number"] for c in cands] != before:  # the resumed validation baseline moved the rule's order
        raise SystemExit(f"candidates {[c['number'] for c in cands]} differ from the source's {before}")
    store = conf["quality"]
    out = {
        "kind": "cna_lens.bench.AnswerQuality",
        "source": str(args.source),
        "model": cfg["model"],
        "dtype": cfg["dtype"],
        "prompts": store["prompts"],
        "tokens": store["tokens"],
        "margin": args.margin,
        "rule": guarded["rule"]["text"],
        "baseline": {
            "quality": sum(map(quality, store["baseline"])) / len(store["baseline"]),
            "regex_refusals": sum(judge(t).refused for t in store["baseline"]),
        },
        "candidates": [
            {
                "number": c["number"],
                "label": c["label"],
                "n_neurons": c["n_neurons"],
                "fresh": c["values"],
                "quality": c["quality"],
                "passes": guard.quality_ok(c),
            }
            for c in cands
        ],
        "chosen_without_guard": res["chosen"]["number"] if res["chosen"] else None,
        "chosen_with_guard": guarded["chosen"]["number"] if guarded["chosen"] else None,
        "seconds": read_json(args.work / "timings.json", "cna_lens.Timings")["seconds"].get("quality"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.parent / f"{args.out.name}.json", out)
    rows = [("baseline", store["baseline"])] + [(f"trial:{n}", t) for n, t in store["answers"].items()]
    lines = [
        json.dumps(
            {"condition": cond, "prompt_id": i, "prompt": prompts[i], "completion": t, "quality": quality(t)},
            ensure_ascii=False,
        )
        for cond, texts in rows
        for i, t in enumerate(texts)
    ]
    atomic_write_text(args.out.parent / f"{args.out.name}.jsonl", "\n".join(lines) + "\n")
    print(f"answers to {out['prompts']}, {store['tokens']} tokens; baseline quality {out['baseline']['quality']:.3f}")
    for c in out["candidates"]:
        q = c["quality"]
        print(
            f"trial {c['number']:>3}: compliance {c['fresh']['compliance']:.3f}, KL {c['fresh']['kl']:.3f}, "
            f"quality {q['diff']:+.4f} [{q['diff_ci'][0]:+.4f}, {q['diff_ci'][1]:+.4f}] (n={q['n']})"
            f"{'' if c['passes'] else '  excluded'}"
        )
    print(f"chosen: trial {out['chosen_without_guard']} without the guard, {out['chosen_with_guard']} with it")


if __name__ == "__main__":
    sys.exit(main())
