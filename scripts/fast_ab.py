"""Before/after of ``cna_lens.fast`` in one process: TL's own attention and unshared batches vs
copy-free GQA and the shared chat prefix, on reproduce's forward-only stages (same prompts, batch).

python scripts/fast_ab.py --model qwen2.5-coder-1.5b-instruct --out results/fast-ab-qwen2.5-coder-1.5b-instruct
"""

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.attention import grouped_attention
from cna_lens.attribute import attribute_multi
from cna_lens.datasets import load_prompts
from cna_lens.evaluate import final_logprobs
from cna_lens.fast import computed_tokens, shared_prefix
from cna_lens.prompts import encode
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--batch-size", type=int, default=100)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
model = cna_lens.load_model(args.model)
harmful, harmless, val = (
    load_prompts("discovery_harmful"),
    load_prompts("discovery_harmless"),
    load_prompts("harmful_val"),
)
bs = args.batch_size


@contextlib.contextmanager
def fast(on: bool):
    grouped_attention(model, on)
    with shared_prefix(on):
        yield


tasks = {
    "discovery (202 prompts, CNA + CAA hooks)": lambda: attribute_multi(
        model, harmful, harmless, ["mlp.hook_post", "hook_mlp_out"], batch_size=bs, progress=False
    ),
    "first-token scores (39 harmful_val prompts)": lambda: final_logprobs(model, val, batch_size=bs),
}
out: dict = {"model": args.model, "dtype": str(next(model.parameters()).dtype), "batch_size": bs, "tasks": {}}
for name, fn in tasks.items():
    times: dict[str, list[float]] = {"before": [], "after": []}
    results = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for label, on in (("before", False), ("after", True)):
            with fast(on):
                t0 = time.perf_counter()
                results[label] = fn()
                if rep:
                    times[label].append(time.perf_counter() - t0)
    entry = {k: statistics.median(v) for k, v in times.items()}
    entry["speedup"] = entry["before"] / entry["after"]
    if isinstance(results["after"], torch.Tensor):
        entry["max_abs_logprob_diff"] = float((results["after"] - results["before"]).abs().max())
    else:
        a, b = results["after"]["mlp.hook_post"], results["before"]["mlp.hook_post"]
        entry["max_abs_diff_of_diff"] = float((a.diff - b.diff).abs().max())
        entry["top_0.3%_jaccard"] = a.top_neurons(fraction=0.003).jaccard(b.top_neurons(fraction=0.003))
    out["tasks"][name] = entry
    print(name, entry, flush=True)
sets = [encode(model.tokenizer, x) for x in (harmful, harmless)]  # attribution batches each set apart
with shared_prefix(False):
    out["discovery_tokens"] = sum(computed_tokens(model, s, bs) for s in sets)
out["discovery_tokens_shared"] = sum(computed_tokens(model, s, bs) for s in sets)
atomic_write_json(Path(args.out) / "fast_ab.json", out)
print(out)
