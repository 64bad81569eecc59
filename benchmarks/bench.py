"""Benchmark CNA against this machine's limits; same as ``cna-lens bench`` (see ``cna_lens/bench.py``).

python benchmarks/bench.py --model qwen2.5-coder-0.5b-instruct --out benchmarks/results
"""

import sys

from cna_lens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
