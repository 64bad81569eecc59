"""Does bfloat16 keep the science? Discovery in bf16 vs the saved fp32 attribution: Jaccard of top sets.

    python scripts/bf16_check.py --model qwen2.5-coder-1.5b-instruct \
        --fp32 results/foundation-qwen2.5-coder-1.5b-instruct/attribution --out results/bf16-check-qwen2.5-coder-1.5b-instruct
"""

import argparse
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.compare import compare
from cna_lens.datasets import load_prompts
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--fp32", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
out = Path(args.out)
ref = cna_lens.Attribution.load(args.fp32)
t0 = time.time()
model = cna_lens.load_model(args.model, dtype=torch.bfloat16)
load_s = time.time() - t0
t0 = time.time()
attr = cna_lens.attribute(model, load_prompts("discovery_harmful"), load_prompts("discovery_harmless"), batch_size=16)
disc_s = time.time() - t0
attr.save(out / "attribution")
res = {"load_s": load_s, "discovery_s": disc_s, "n_prompts": attr.n_pos + attr.n_neg}
for f in (0.001, 0.003, 0.005):
    res[f"jaccard_abs_{f}"] = ref.top_neurons(fraction=f).jaccard(attr.top_neurons(fraction=f))
res["spearman_diff_per_layer"] = list(compare(ref, attr, ks=(50,)).rank_corr)
res["max_abs_diff_error"] = float((ref.diff - attr.diff).abs().max())
atomic_write_json(out / "bf16_check.json", res)
print(res)
