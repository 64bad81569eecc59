"""Several search trials' judged answers decoded in one batch, against one trial at a time, side by side.

For trials of a committed judged search (default: its first eight), the answers to its ``harmful``
validation prompts (greedy, ``max_new_tokens`` of the search) are decoded

* ``alone``: each trial under its weight edit (``generate_scored``, batch ``generation_batch_size``),
  as ``--trial-batch 1`` runs;
* ``grouped K``: K trials at a time, one batch of K × ``generation_batch_size`` rows with per-row
  neuron scales (``cna_lens.speed.grouped.generate_grouped``), as ``--trial-batch K`` runs;

in turn, ``--repeats`` times (the order reversed on every other repeat). Reported per form: seconds per
trial (median over repeats, and each repeat's), the ratio to ``alone`` within each repeat, how many answers
equal ``alone``'s (in bf16 a scaled activation and a scaled weight column round differently, and a
larger batch may sum in another order) and how many trials keep their judged compliance.

python benchmarks/grouped_decoding.py --search results/search-qwen2.5-coder-1.5b-instruct-judge --out DIR
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from search_trial import load_trial, write_report

import cna_lens
from cna_lens.generation import generate_scored
from cna_lens.judge import judge_completions
from cna_lens.speed.grouped import generate_grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", required=True, help="a judged search directory")
    ap.add_argument("--trials", default="0,1,2,3,4,5,6,7", help="trial numbers (a multiple of every K)")
    ap.add_argument("--groups", default="2,4,8", help="K values of the grouped form")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src, numbers, ks = (
        Path(args.search),
        [int(t) for t in args.trials.split(",")],
        [int(k) for k in args.groups.split(",")],
    )
    if any(len(numbers) % k for k in ks):
        raise SystemExit(f"{len(numbers)} trials cannot be split into groups of {ks}")
    loaded = [load_trial(src, n) for n in numbers]
    cfg, data = loaded[0][0], loaded[0][1]
    scalings = [(neurons, sel.scale) for _, _, sel, neurons, _ in loaded]
    model = cna_lens.load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    prompts, tokens, bs = list(data.harmful), int(cfg["max_new_tokens"]), int(cfg["generation_batch_size"])

    def alone() -> list[list[str]]:
        out = []
        for neurons, scale in scalings:
            with cna_lens.edit_weights(model, neurons, scale):
                out.append(generate_scored(model, prompts, max_new_tokens=tokens, batch_size=bs, progress=False)[0])
        return out

    def grouped(k: int) -> list[list[str]]:
        out = []
        for i in range(0, len(scalings), k):
            out += generate_grouped(model, prompts, scalings[i : i + k], max_new_tokens=tokens, batch_size=bs)[0]
        return out

    forms = {"alone": alone, **{f"grouped {k}": (lambda k=k: grouped(k)) for k in ks}}
    judge_completions(prompts[:1], ["warm-up"])  # the judge loads once, outside the timings
    seconds: dict[str, list[float]] = {f: [] for f in forms}
    texts: dict[str, list[list[str]]] = {}
    for r in range(args.repeats):
        for name in list(forms) if r % 2 == 0 else list(forms)[::-1]:
            t = time.perf_counter()
            texts[name] = forms[name]()
            seconds[name].append((time.perf_counter() - t) / len(scalings))
            print(f"repeat {r}: {name}: {seconds[name][-1]:.1f} s per trial", flush=True)
    comply = {
        name: [[v.label for v in judge_completions(prompts, t)].count("comply") / len(prompts) for t in per_trial]
        for name, per_trial in texts.items()
    }
    rows = {}
    for name in forms:
        ratios = [s / a for s, a in zip(seconds[name], seconds["alone"])]
        same = sum(x == y for t, u in zip(texts[name], texts["alone"]) for x, y in zip(t, u))
        rows[name] = {
            "seconds_per_trial": statistics.median(seconds[name]),
            "seconds_per_trial_each_repeat": seconds[name],
            "ratio_to_alone_each_repeat": ratios,
            "answers_equal_to_alone": f"{same}/{len(prompts) * len(scalings)}",
            "trials_with_equal_compliance": sum(c == a for c, a in zip(comply[name], comply["alone"])),
            "compliance": comply[name],
        }
        row = rows[name]
        print(f"{name}: {row['seconds_per_trial']:.1f} s per trial, {row['answers_equal_to_alone']} answers as alone")
    write_report(
        args.out,
        cfg,
        "cna_lens.GroupedDecodingBenchmark",
        None,
        {
            "trials": numbers,
            "prompts": len(prompts),
            "max_new_tokens": tokens,
            "generation_batch_size": bs,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "forms": rows,
        },
    )


if __name__ == "__main__":
    main()
