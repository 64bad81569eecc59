"""Does bfloat16 keep the science? bf16 discovery and JBB generations against a finished fp32 reproduce run.

    python scripts/bf16_check.py --model qwen2.5-coder-1.5b-instruct \
        --fp32 results/reproduce-qwen2.5-coder-1.5b-instruct --out results/bf16-check-qwen2.5-coder-1.5b-instruct

Measures (resumable: each stage is saved in ``--out`` and skipped when present):
* the top sets from bf16 discovery vs the fp32 run's: Jaccard at several fractions (goal ≥ 0.95),
  per-layer Spearman of ``diff``, largest |diff| error;
* JBB harmful refusal in bf16 (same decoding as the fp32 run) for ``--conditions`` (default: the
  baseline and CNA at the fp32 run's chosen point, with the bf16 top set): rate + 95 % CI next to
  the fp32 rate and CI, and the per-prompt agreement of the judge's verdicts (paired);
* wall times (load, discovery, each generation condition).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.compare import compare
from cna_lens.datasets import load_dataset, load_prompts
from cna_lens.evaluate import judge
from cna_lens.report import bootstrap_ci
from cna_lens.runs import atomic_write_json

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--fp32", required=True, help="a finished `cna-lens reproduce` run directory (fp32)")
p.add_argument("--out", required=True)
p.add_argument("--fractions", default="0.001,0.003,0.005,0.01")
p.add_argument("--conditions", default="baseline,chosen", help="baseline, chosen, paper, or cna:<by>:<fraction>")
args = p.parse_args()
out, ref_dir = Path(args.out), Path(args.fp32)
ref = cna_lens.Attribution.load(ref_dir / "attribution")
ref_results = json.loads((ref_dir / "results.json").read_text())
cfg = ref_results["config"]
res_path = out / "bf16_check.json"
res = json.loads(res_path.read_text()) if res_path.exists() else {"model": args.model, "fp32_run": str(ref_dir)}


def save() -> None:
    atomic_write_json(res_path, res)


t0 = time.time()
model = cna_lens.load_model(args.model, dtype=torch.bfloat16)
res["load_s"] = time.time() - t0
if (out / "attribution" / "attribution.json").exists():
    attr = cna_lens.Attribution.load(out / "attribution")
else:
    t0 = time.time()
    attr = cna_lens.attribute(
        model, load_prompts(cfg["discovery"][0]), load_prompts(cfg["discovery"][1]), batch_size=cfg["batch_size"]
    )
    res["discovery_s"] = time.time() - t0
    attr.save(out / "attribution")
res["jaccard_abs"] = {
    f: ref.top_neurons(fraction=float(f)).jaccard(attr.top_neurons(fraction=float(f)))
    for f in args.fractions.split(",")
}
res["spearman_diff_per_layer"] = [float(x) for x in compare(ref, attr, ks=(50,)).rank_corr]
res["max_abs_diff_error"] = float((ref.diff - attr.diff).abs().max())
res["max_abs_diff"] = float(ref.diff.abs().max())
save()
print({k: v for k, v in res.items() if k != "spearman_diff_per_layer"})

# JBB harmful generations, decoded exactly as the fp32 run did.
rows = load_dataset("jbb_harmful", cfg["limit"])
fp32_rows = [json.loads(line) for line in (ref_dir / "completions.jsonl").read_text().splitlines()]
res.setdefault("generations", {})
named = {"chosen": ref_results["chosen"], "paper": ref_results["paper_point"]}
for cond in [named.get(c, c) for c in args.conditions.split(",")]:
    if cond in res["generations"]:
        continue
    t0 = time.time()
    if cond == "baseline":
        texts = cna_lens.generate(
            model, [r["prompt"] for r in rows], max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"]
        )
    else:
        _, by, frac = cond.split(":")
        with cna_lens.ablate(model, attr.top_neurons(fraction=float(frac), by=by), 0.0):
            texts = cna_lens.generate(
                model, [r["prompt"] for r in rows], max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"]
            )
    refused = [float(judge(t).refused) for t in texts]
    ref_by_id = {r["prompt_id"]: r for r in fp32_rows if r["dataset"] == "jbb_harmful" and r["condition"] == cond}
    paired = [(x, t, ref_by_id[r["id"]]) for x, t, r in zip(refused, texts, rows) if r["id"] in ref_by_id]
    fp32 = ref_results["generations"]["jbb_harmful"][cond]
    res["generations"][cond] = {
        "seconds": time.time() - t0,
        "n": len(texts),
        "bf16_refusal_rate": sum(refused) / len(refused),
        "bf16_refusal_ci": bootstrap_ci(refused),
        "fp32_refusal_rate": fp32["refusal_rate"],
        "fp32_refusal_ci": fp32["refusal_ci"],
        "verdict_agreement": sum(x == float(f["refused"]) for x, _, f in paired) / len(paired),
        "same_completion": sum(t == f["completion"] for _, t, f in paired) / len(paired),
        "completions": texts,
    }
    save()
    g = res["generations"][cond]
    print(cond, {k: v for k, v in g.items() if k != "completions"})
