"""What does answer quality inside the search (``--trial-quality N``) cost a trial, and does it leave the
other objectives alone?

Two judged searches (the default three-way judge) on one loaded model, with the same seed and
settings and fewer trials than TPE's random start-up ones, so that both propose the same selections:
``plain``, and ``quality``, where every trial also answers N evenly spaced ``xstest_safe_val`` prompts
(outside the confirmation's 100) for T tokens, with ``--quality-margin`` (its constraint marks trials
infeasible; it cannot steer start-up proposals). Only the trials are compared: both searches start
from a ``references.json`` whose curves are empty, so no reference point is measured, and the quality
search reads the plain one's discovery statistics, pruning effects and baseline (the same computations
on the same prompts) instead of repeating them. Reports each trial's
seconds in both (its share of the batch's decoding), their ratio, whether the parameters and the three
objectives are identical, and the quality search's answer-quality changes; ``OUT.jsonl`` holds every
answer to the quality prompts (the unmodified model's and each trial's), for reading by eye.

python benchmarks/trial_quality.py --model qwen2.5-coder-0.5b-instruct --dtype float32 --trials 8 \\
    --trial-batch 4 --n 16 --work runs/trial-quality \\
    --out benchmarks/results/trial-quality/qwen2.5-coder-0.5b-instruct-float32
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cna_lens import load_model
from cna_lens.bench import machine
from cna_lens.datasets import SearchData
from cna_lens.evaluate import quality
from cna_lens.pareto import Rule
from cna_lens.quality import stored
from cna_lens.runs import atomic_write_json, atomic_write_text
from cna_lens.search import Search
from cna_lens.search_refs import CURVES

#: what a search computes once, before its trials, from its validation prompts (not the quality ones)
SHARED = ("attribution", "caa", "resid", "effects.safetensors", "baseline.json", "baseline.safetensors")


def header(kind: str, args: argparse.Namespace) -> dict:
    """A result's kind, model, dtype, the machine's limits (:func:`cna_lens.bench.machine`) and settings."""
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    return {"kind": kind, "model": args.model, "dtype": args.dtype, "machine": machine(True), "settings": settings}


def start_from(search: Search, source: Search | None = None, shared: tuple[str, ...] = SHARED) -> None:
    """Prepare ``search`` so that only its trials run: a ``references.json`` with empty curves (no
    reference point is measured) and, from ``source``, the ``shared`` one-time stages it would repeat."""
    for f in shared if source is not None else ():
        src, dst = source.out / f, search.out / f
        if src.exists() and not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    refs = search.out / "references.json"
    if not refs.exists():
        atomic_write_json(refs, {"kind": "cna_lens.SearchReferences", "curves": {c: [] for c in CURVES}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trials", type=int, default=8, help="<= --startup (both searches propose the same)")
    p.add_argument("--startup", type=int, default=10, help="TPE's random start-up trials")
    p.add_argument("--trial-batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48, help="the judged answers' length")
    p.add_argument("--n", type=int, default=16, help="--trial-quality")
    p.add_argument("--tokens", type=int, default=150, help="--quality-tokens")
    p.add_argument("--margin", type=float, default=0.01, help="--quality-margin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output stem (.json, .jsonl)")
    args = p.parse_args()
    if not 1 <= args.trials <= args.startup:
        raise SystemExit(f"--trials {args.trials}: between 1 and --startup ({args.startup}), so both propose alike")
    data = {
        "plain": SearchData.bundled(),
        "quality": SearchData.bundled(quality="xstest_safe_val", n_quality=args.n),  # checks --n
    }
    rules = {"plain": Rule(), "quality": Rule(quality_margin=args.margin, quality_tokens=args.tokens)}
    kw = dict(objective="judge", max_new_tokens=args.max_new_tokens, trial_batch=args.trial_batch)
    kw |= dict(seed=args.seed, startup_trials=args.startup, dtype=args.dtype)
    searches = {
        name: Search(args.work / name, model=args.model, data=data[name], rule=rules[name], **kw) for name in data
    }  # settings checked before the model loads
    model = load_model(args.model, dtype=args.dtype)
    results = {}
    for name, search in searches.items():
        start_from(search, searches["plain"] if name == "quality" else None)
        results[name] = search.run(model, args.trials)
    plain_rows, quality_rows = (results[k]["trials"] for k in ("plain", "quality"))
    rows = [
        {
            "number": a["number"],
            "n_neurons": a["n_neurons"],
            "same_params": a["params"] == b["params"],
            "same_objectives": a["values"] == b["values"] and a.get("labels") == b.get("labels"),
            "seconds_plain": a["seconds"],
            "seconds_quality": b["seconds"],
            "quality": b["quality"],
        }
        for a, b in zip(plain_rows, quality_rows)
    ]
    live = [r for r in rows if r["n_neurons"]]
    mean = lambda k: sum(r[k] for r in live) / len(live)  # noqa: E731
    out = {
        **header("cna_lens.bench.TrialQuality", args),
        "quality_prompts": data["quality"].names["quality"],
        "seconds_per_trial": {"plain": mean("seconds_plain"), "quality": mean("seconds_quality")},
        "ratio": mean("seconds_quality") / mean("seconds_plain"),
        "stage_seconds": {k: results[k]["timings"] for k in results},
        "all_same_params": all(r["same_params"] for r in rows),
        "all_same_objectives": all(r["same_objectives"] for r in rows),
        "trials": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.parent / f"{args.out.name}.json", out)
    store = stored(searches["quality"].out)
    answers = [("baseline", store["baseline"])] + [(f"trial:{n}", t) for n, t in store["trials"].items()]
    lines = [
        json.dumps(
            {"condition": c, "prompt_id": i, "prompt": q, "completion": t, "quality": quality(t)}, ensure_ascii=False
        )
        for c, texts in answers
        for i, (q, t) in enumerate(zip(data["quality"].quality, texts))
    ]
    atomic_write_text(args.out.parent / f"{args.out.name}.jsonl", "\n".join(lines) + "\n")
    print(
        f"{len(live)} trials: {out['seconds_per_trial']['plain']:.1f} s plain, "
        f"{out['seconds_per_trial']['quality']:.1f} s with {args.n} quality answers of {args.tokens} tokens "
        f"(x{out['ratio']:.2f}); same params {out['all_same_params']}, same objectives {out['all_same_objectives']}"
    )
    for r in rows:
        q = r["quality"]
        print(
            f"  trial {r['number']}: answer quality {q['diff']:+.3f} "
            f"[{q['diff_ci'][0]:+.3f}, {q['diff_ci'][1]:+.3f}] on {q['n']} prompts"
        )


if __name__ == "__main__":
    main()
