"""``cna-lens reproduce`` with the generation pool's events timed, for profiling a real run.

Every decoding step, prefill, merge and row selection of ``cna_lens.generation`` is logged as
``[kind, rows, ..., seconds, start]`` (step: rows, columns; prefill: rows, tokens, columns; merge /
select: rows, columns) and written to the JSON file when the process exits (Ctrl-C included),
then summarized:

python scripts/trace_reproduce.py runs/trace.json reproduce --model qwen2.5-coder-1.5b-instruct ...
python scripts/trace_reproduce.py --summary runs/trace.json
"""

import atexit
import collections
import json
import sys
import time

from cna_lens import generation as G
from cna_lens.cli import main


def summary(path: str) -> None:
    log = json.load(open(path))
    total, count = collections.Counter(), collections.Counter()
    for e in log:
        total[e[0]] += e[-2]
        count[e[0]] += 1
    print("seconds (calls):", {k: f"{v:.1f} ({count[k]})" for k, v in total.items()})
    steps = [e for e in log if e[0] == "step"]
    buckets: dict = collections.defaultdict(lambda: [0, 0.0, 0])
    for _, rows, cols, dt, _ in steps:
        b = buckets[(min(rows // 50 * 50, 150), cols // 50 * 50)]
        b[0], b[1], b[2] = b[0] + 1, b[1] + dt, b[2] + rows
    print("rows ≥, columns ≥: steps, s, ms per row-step")
    for key in sorted(buckets):
        n, s, r = buckets[key]
        print(f"  {key}: {n}, {s:.0f}, {1000 * s / r:.1f}")
    pre = [e for e in log if e[0] == "prefill"]
    print(f"prefills {len(pre)}: rows {sum(e[1] for e in pre)}, positions with padding {sum(e[1] * e[3] for e in pre)}")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
        sys.exit()
    log, out = [], sys.argv.pop(1)

    def timed(name, fn, info):
        def wrapped(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            log.append((name, *info(*a, r), time.perf_counter() - t, t))
            return r

        return wrapped

    G._step = timed("step", G._step, lambda m, p, r: (len(p.rows), p.mask.shape[1]))
    G._prefill = timed(
        "prefill", G._prefill, lambda m, rows, seqs, *a: (len(rows), sum(map(len, seqs)), a[-1].mask.shape[1])
    )
    G._merge = timed("merge", G._merge, lambda a, b, pad, r: (len(r.rows), r.mask.shape[1]))
    G._select = timed("select", G._select, lambda p, keep, r: (len(keep), r.mask.shape[1]))
    atexit.register(lambda: json.dump(log, open(out, "w")))
    sys.argv[0] = "cna-lens"
    main()
