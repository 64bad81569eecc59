"""How long must an answer be before its loss of quality shows? The answer-quality change of each
candidate of an ``answer_quality.py`` result, on its answers cut to their first W words.

For each cut W and candidate S: mean(q_S − q_base) over the prompts neither refuses (regex judge on
the whole answer, so the matched set does not change with W), q = 1 − repeated 4-grams / 4-grams of
the first W whitespace words (:func:`cna_lens.evaluate.quality`). Tells how many tokens a quality
measurement inside the search needs (``--quality-tokens``).

python benchmarks/quality_by_length.py \\
    --answers benchmarks/results/answer-quality/qwen2.5-coder-1.5b-instruct-judge.jsonl \\
    --out benchmarks/results/answer-quality/qwen2.5-coder-1.5b-instruct-judge-by-length.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cna_lens.evaluate import judge, quality
from cna_lens.runs import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=Path, required=True, help="an answer_quality.py .jsonl")
    p.add_argument("--cuts", default="30,45,60,80,1000", help="words kept (1000: whole answers of 150 tokens)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cuts = [int(c) for c in args.cuts.split(",")]
    texts: dict[str, dict[int, str]] = defaultdict(dict)
    for line in args.answers.read_text().splitlines():
        r = json.loads(line)
        texts[r["condition"]][r["prompt_id"]] = r["completion"]
    base = texts.pop("baseline")
    cut = lambda t, w: " ".join(t.split()[:w])  # noqa: E731
    words = [len(t.split()) for t in base.values()]
    rows = []
    for cond, answers in texts.items():
        both = [i for i in base if not judge(base[i]).refused and not judge(answers[i]).refused]
        diff = {w: float(np.mean([quality(cut(answers[i], w)) - quality(cut(base[i], w)) for i in both])) for w in cuts}
        longest = max(len(answers[i].split()) for i in both)
        rows.append({"condition": cond, "n": len(both), "diff_by_words": diff, "longest_answer_words": longest})
    out = {
        "kind": "cna_lens.bench.QualityByLength",
        "answers": str(args.answers),
        "baseline_words": {"median": float(np.median(words)), "max": max(words)},
        "cuts": cuts,
        "candidates": rows,
    }
    atomic_write_json(args.out, out)
    print(f"cut (words): {cuts}")
    for r in rows:
        print(f"{r['condition']:>10} (n={r['n']}): " + " ".join(f"{r['diff_by_words'][w]:+.3f}" for w in cuts))


if __name__ == "__main__":
    main()
