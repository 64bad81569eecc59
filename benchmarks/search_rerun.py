"""Does a search reproduce from an empty directory? Compare a committed search with a rerun of its command.

Run the search's command into a fresh directory (``cna-lens search ... --out RERUN``), then compare:

* the discovery statistics (``attribution/``, ``caa/``, ``resid/``: largest difference of each sum,
  relative to its largest magnitude), the pruning effects and the baseline;
* every trial's proposed parameters and objective values (and, for the trials that propose the same
  parameters, which objectives come out equal and how far KL moves), the reference curves, the
  confirmation candidates and the chosen point;
* the first-token compliance diagnostic (how many of the harmful prompts moved per trial).

The sampler is seeded per trial and decoding is greedy, so equal statistics give equal trials; a
different bf16 rounding of the statistics (another batching) can move a neuron's rank and TPE's path.

python benchmarks/search_rerun.py --search results/search-qwen2.5-coder-0.5b-instruct-judge --rerun RERUN \
    --out benchmarks/results/search-rerun/qwen2.5-coder-0.5b-instruct-judge.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cna_lens.pareto import OBJECTIVES, load_result
from cna_lens.runs import atomic_write_json


def max_rel_diff(a: Path, b: Path) -> dict[str, float] | None:
    """Per tensor of two safetensors files: max |a − b| / max |a| (None when either file is missing)."""
    if not (a.exists() and b.exists()):
        return None
    ta, tb = load_file(a), load_file(b)
    if set(ta) != set(tb):
        raise SystemExit(f"{a} and {b} hold different tensors")
    out = {}
    for k in sorted(ta):
        x, y = ta[k].double(), tb[k].double()
        out[k] = float((x - y).abs().max() / x.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    return out


def point(p: dict) -> dict:
    return {"values": p["values"], "first_token_compliance": p.get("first_token_compliance")}


def candidates(result: dict) -> list:
    return [(c["number"], c["values"]) for c in (result.get("confirmation") or {}).get("candidates", [])]


def compare(old: dict, new: dict) -> dict:
    by_number = {t["number"]: t for t in old["trials"]}
    pairs = [(by_number[t["number"]], t) for t in new["trials"] if t["number"] in by_number]
    moved = [round(32 * abs(a["first_token_compliance"] - b["first_token_compliance"])) for a, b in pairs]
    refs = {}
    for curve, points in old["references"].items():
        mine = {p["label"]: p for p in new["references"].get(curve, [])}
        refs[curve] = {
            p["label"]: {
                "committed": point(p),
                "rerun": point(mine[p["label"]]),
                "equal": p["values"] == mine[p["label"]]["values"],
            }
            for p in points
            if p["label"] in mine
        }
    same = [(a["values"], b["values"]) for a, b in pairs if a["params"] == b["params"]]
    return {
        "trials": len(pairs),
        "equal_params": len(same),
        "equal_values": sum(a["values"] == b["values"] for a, b in pairs),
        "equal_params_equal_objective": {k: sum(a[k] == b[k] for a, b in same) for k in OBJECTIVES},
        "equal_params_kl_max_abs_difference": max((abs(a["kl"] - b["kl"]) for a, b in same), default=None),
        "equal_params_kl_max_relative_difference": max(
            (abs(a["kl"] - b["kl"]) / a["kl"] for a, b in same if a["kl"] > 0), default=None
        ),
        "first_token_prompts_moved": {str(k): moved.count(k) for k in sorted(set(moved))},
        "baseline_equal": old["baseline"]["values"] == new["baseline"]["values"],
        "references": refs,
        "confirmation_equal": candidates(old) == candidates(new),
        "confirmation_same_trials": [n for n, _ in candidates(old)] == [n for n, _ in candidates(new)],
        "chosen": {
            name: {k: r["chosen"].get(k) for k in ("number", "values", "validation", "selection")}
            if r["chosen"]
            else None
            for name, r in (("committed", old), ("rerun", new))
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", required=True, help="the committed search directory")
    ap.add_argument("--rerun", required=True, help="the same command's output in a fresh directory")
    ap.add_argument("--out", required=True, help="the comparison (JSON)")
    args = ap.parse_args()
    old_dir, new_dir = Path(args.search), Path(args.rerun)
    old_cfg, new_cfg = (json.loads((d / "config.json").read_text()) for d in (old_dir, new_dir))
    if old_cfg != new_cfg:
        raise SystemExit(f"{old_dir} and {new_dir} were run with different settings")
    old, new = load_result(old_dir), load_result(new_dir)
    stats = {
        sub: max_rel_diff(old_dir / sub / "attribution.safetensors", new_dir / sub / "attribution.safetensors")
        for sub in ("attribution", "caa", "resid")
    }
    stats["effects"] = max_rel_diff(old_dir / "effects.safetensors", new_dir / "effects.safetensors")
    report = {
        "kind": "cna_lens.SearchRerun",
        "search": str(old_dir),
        "statistics_max_relative_difference": stats,
        **compare(old, new),
        "timings": {"committed": old.get("timings"), "rerun": new.get("timings")},
        "rerun_versions": {
            p: importlib.metadata.version(p) for p in ("torch", "transformers", "transformer-lens", "optuna")
        },
    }
    atomic_write_json(args.out, report)
    c = report["chosen"]
    print(
        f"{report['equal_params']}/{report['trials']} trials propose the same parameters, "
        f"{report['equal_values']} score the same; chosen trial {c['committed']['number']} -> {c['rerun']['number']}"
    )


if __name__ == "__main__":
    main()
