"""fp32 vs bf16 on one model, side by side in one process: attribution and batched greedy generation.

    python scripts/dtype_speed.py --model qwen2.5-coder-1.5b-instruct --out results/dtype-speed-qwen2.5-coder-1.5b-instruct

Same prompts, batch size and threads for both dtypes; median of ``--repeats`` after a warm-up.
"""

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--prompts", type=int, default=64, help="discovery prompts (half harmful)")
p.add_argument("--gen-prompts", type=int, default=32)
p.add_argument("--max-new-tokens", type=int, default=32)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
pos = load_prompts("discovery_harmful")[: args.prompts // 2]
neg = load_prompts("discovery_harmless")[: args.prompts - args.prompts // 2]
jbb = load_prompts("jbb_harmful", limit=args.gen_prompts)


def timed(fn):
    fn()
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


def measure(dtype: str) -> dict:
    model = cna_lens.load_model(args.model, dtype=dtype)
    n = len(pos) + len(neg)
    return {
        "attribution": timed(lambda: cna_lens.attribute(model, pos, neg, batch_size=n, progress=False)),
        "generation": timed(
            lambda: cna_lens.generate(
                model, jbb, max_new_tokens=args.max_new_tokens, batch_size=len(jbb), progress=False
            )
        ),
    }


res = {"model": args.model, "threads": torch.get_num_threads(), "settings": vars(args)}
for dtype in ("float32", "bfloat16"):
    res[dtype] = measure(dtype)
    print(dtype, res[dtype], flush=True)
    gc.collect()
res["bf16_speedup"] = {
    k: res["float32"][k]["median_s"] / res["bfloat16"][k]["median_s"] for k in ("attribution", "generation")
}
atomic_write_json(Path(args.out) / "dtype_speed.json", res)
print(res["bf16_speedup"])
