"""Foundation check on a real model: discovery on the bundled sets, then 20 JBB harmful prompts
answered greedily (64 new tokens) with and without the top neurons ablated. Resumable: the
attribution and every condition's completions are saved as they finish.

    python scripts/foundation_run.py --model qwen2.5-coder-1.5b-instruct --out results/foundation-qwen2.5-coder-1.5b-instruct
"""

import argparse
import time
from pathlib import Path

import cna_lens
from cna_lens.datasets import load_dataset, load_prompts
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
p.add_argument("--out", required=True)
p.add_argument("--n", type=int, default=20)
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--fractions", default="0.001,0.003,0.005,0.01")
p.add_argument("--by", default="abs")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

t0 = time.time()
model = cna_lens.load_model(args.model)
timings = {"load_s": time.time() - t0}
harmful, harmless = load_prompts("discovery_harmful"), load_prompts("discovery_harmless")
if (out / "attribution" / "attribution.json").exists():
    attr = cna_lens.Attribution.load(out / "attribution")
else:
    t0 = time.time()
    attr = cna_lens.attribute(model, harmful, harmless, batch_size=16)
    timings["discovery_s"] = time.time() - t0
    timings["discovery_prompts"] = len(harmful) + len(harmless)
    attr.save(out / "attribution")
    atomic_write_json(out / "timings.json", timings)

hist = {}
for f in [float(x) for x in args.fractions.split(",")]:
    ns = attr.top_neurons(fraction=f, by=args.by)
    ns.save(out / f"neurons_{args.by}_{f}.json")
    hist[f"{args.by}_{f}"] = ns.per_layer_counts()
atomic_write_json(out / "layer_histograms.json", hist)

rows = load_dataset("jbb_harmful", limit=args.n)
prompts = [r["prompt"] for r in rows]
conditions = [("baseline", None)] + [
    (f"ablate_{args.by}_{f}", f) for f in [float(x) for x in args.fractions.split(",")]
]
for name, f in conditions:
    path = out / f"completions_{name}.json"
    if path.exists():
        continue
    t0 = time.time()
    if f is None:
        texts = cna_lens.generate(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=20)
    else:
        with cna_lens.ablate(model, attr.top_neurons(fraction=f, by=args.by)):
            texts = cna_lens.generate(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=20)
    atomic_write_json(
        path,
        {
            "condition": name,
            "seconds": time.time() - t0,
            "rows": [{"id": r["id"], "prompt": r["prompt"], "completion": t} for r, t in zip(rows, texts)],
        },
    )
    print(name, f"{time.time() - t0:.0f}s", flush=True)
