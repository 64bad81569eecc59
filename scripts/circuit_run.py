"""Circuit maps on a real model from a saved attribution (resumable: each map is saved once done).

    python scripts/circuit_run.py --model qwen2.5-coder-1.5b-instruct \
        --attribution results/foundation-qwen2.5-coder-1.5b-instruct/attribution --n 12 --top-n 30
"""

import argparse
import time
from pathlib import Path

import cna_lens
from cna_lens.circuits import LayerMap, layer_map, neuron_effects
from cna_lens.datasets import load_prompts
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--attribution", required=True)
p.add_argument("--fraction", type=float, default=0.001)
p.add_argument("--n", type=int, default=12, help="JBB harmful prompts to average the refusal score over")
p.add_argument("--top-n", type=int, default=30)
args = p.parse_args()
out = Path(args.attribution).parent
model = cna_lens.load_model(args.model)
attr = cna_lens.Attribution.load(args.attribution)
neurons = attr.top_neurons(fraction=args.fraction)
prompts = load_prompts("jbb_harmful", limit=args.n)
timings = {}
if not (out / "layer_map" / "layer_map.json").exists():
    t0 = time.time()
    layer_map(model, neurons, prompts, batch_size=16).save(out / "layer_map")
    timings["layer_map_s"] = time.time() - t0
lm = LayerMap.load(out / "layer_map")
print("baseline", lm.baseline, "per-layer delta", [round(float(x), 3) for x in lm.delta])
if not (out / "neuron_effects.json").exists():
    t0 = time.time()
    neuron_effects(model, neurons, prompts, top_n=args.top_n, batch_size=16).save(out / "neuron_effects.json")
    timings["neuron_effects_s"] = time.time() - t0
if timings:
    atomic_write_json(out / "circuit_timings.json", timings)
