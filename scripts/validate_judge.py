"""Held-out agreement of the judges with human labels -> cna_lens/data/judge_validation.json.

    PYTHONPATH=. python scripts/validate_judge.py

XSTest held out by model (5 folds) and the JBB hand labels (see cna_lens.judge_validation); the same
embedding cache as scripts/train_judge.py. tests/unit/test_judge_validation.py recomputes the file.
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib.resources import files
from pathlib import Path

from cna_lens.judge_head import stored_embeddings
from cna_lens.judge_validation import VALIDATION_FILE, validate
from cna_lens.runs import atomic_write_json

CACHE = Path("results/judge/embeddings.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--out", default=str(files("cna_lens").joinpath("data", VALIDATION_FILE)))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    with stored_embeddings(args.cache) as cache:
        res = validate(cache, progress=True)
    atomic_write_json(args.out, res)
    x, j = res["xstest"], res["jbb"]
    for name in ("classifier", "regex"):
        p = x[name]["pooled"]["final_label"]
        print(f"XSTest {name:10s} kappa {p['kappa']:.3f} acc {p['accuracy']:.3f} recall {p['recall']}")
        for m, f in x[name]["per_held_out_model"].items():
            print(f"   {m:16s} kappa {f['final_label']['kappa']:.3f} acc {f['final_label']['accuracy']:.3f}")
    for name, r in j.items():
        if isinstance(r, dict) and "all" in r:
            print(
                f"JBB {name:28s} kappa {r['all']['kappa']:.3f} acc {r['all']['accuracy']:.3f} "
                f"max rate diff {r['max_abs_rate_difference']:.3f}"
            )
    print(f"{time.time() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
