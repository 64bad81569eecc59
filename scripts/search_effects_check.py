"""Check the pruning estimate of a search against exact single-neuron ablations.

For 10 random neurons of the chosen selection's candidate set (before pruning), compare
``selection.estimate_effects`` (saved in ``effects.safetensors``) with ``circuits.neuron_effects``
(one forward pass over the prompts per neuron) on the same ``harmful_train`` prompts.

    python scripts/search_effects_check.py results/search-qwen2.5-coder-0.5b-instruct
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import cna_lens
from cna_lens.attribute import Attribution
from cna_lens.circuits import neuron_effects
from cna_lens.datasets import load_prompts
from cna_lens.neurons import NeuronSet
from cna_lens.runs import atomic_write_json, read_json
from cna_lens.selection import Selection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = read_json(args.out / "config.json", "cna_lens.RunConfig")
    n_prompts = int(cfg["data"]["effects"].split(":")[1].rstrip("]"))  # "harmful_train[:32]"
    attr = Attribution.load(args.out / "attribution")
    est = load_file(str(args.out / "effects.safetensors"))["delta"]
    sel = Selection.load(args.out / "selection.json")
    cand = Selection(sel.ranking, sel.fraction, sel.first_layer, sel.last_layer).neurons(attr)  # before pruning
    rows = torch.randperm(len(cand), generator=torch.Generator().manual_seed(args.seed))[: args.n].tolist()
    ns = NeuronSet(
        tuple(cand.layers[i] for i in rows),
        tuple(cand.indices[i] for i in rows),
        (0.0,) * len(rows),
        attr.n_layers,
        attr.d_mlp,
    )
    model = cna_lens.load_model(cfg["model"], dtype=cfg["dtype"])
    t0 = time.time()
    exact = neuron_effects(model, ns, load_prompts("harmful_train", n_prompts), top_n=len(rows), progress=False)
    table = [
        {"layer": la, "neuron": ix, "estimate": float(est[la, ix]), "exact": d}
        for la, ix, d in zip(exact.layers, exact.indices, exact.delta)
    ]
    agree = sum((r["estimate"] > 0) == (r["exact"] > 0) for r in table)
    res = {"kind": "cna_lens.EffectsCheck", "seconds": time.time() - t0, "sign_agreement": [agree, len(table)]}
    atomic_write_json(args.out / "effects_check.json", {**res, "rows": table})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
