"""Agreement of the model judge (rubric + label-letter log-probabilities) with the JBB hand labels.

    PYTHONPATH=. python scripts/model_judge_check.py --model qwen2.5-coder-1.5b-instruct --n 40

Scores every (len/n)-th labelled completion (all with --n 0) and prints κ, accuracy, the confusion
matrix and the judge's label rates.
"""

from __future__ import annotations

import argparse
import json
import time

from cna_lens import load_model
from cna_lens.agreement import agreement
from cna_lens.judge import model_verdicts
from cna_lens.judge_head import LABELS
from cna_lens.judge_validation import jbb_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="packaged alias, HF model dir or hub id")
    ap.add_argument("--n", type=int, default=40, help="items, evenly spaced (0 = all)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    rows = list(jbb_rows())
    if args.n:
        rows = rows[:: max(1, len(rows) // args.n)][: args.n]
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.time()
    verdicts = model_verdicts(
        model, [r["prompt"] for r in rows], [r["completion"] for r in rows], batch_size=args.batch_size, progress=True
    )
    a = agreement([r["label"] for r in rows], [v.label for v in verdicts], LABELS)
    print(json.dumps({"model": args.model, "n": len(rows), "seconds": round(time.time() - t0, 1), **a}, indent=1))


if __name__ == "__main__":
    main()
