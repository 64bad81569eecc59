"""A search trial's scoring pass on its two engines, side by side in one process.

A trial's KL and over-refusal come from next-token log-probabilities on the ``harmless`` validation
prompts (:func:`cna_lens.evaluate.final_logprobs`). This times that pass, alternating, ``--repeats``
times, for the unmodified model and for a trial's selection (default: the chosen one):

* ``tl``: TransformerLens' forward under the hook form (``cna_lens.ablate``), every prompt whole;
* ``stock``: ``engine="auto"`` under the equal weight edit (``cna_lens.edit_weights``): the stock HF
  model's prefill, the prompts' common chat prefix computed once per batch (what a search runs);

and reports KL(base ‖ trial) per prompt as each engine computes it, and KL between the two engines'
unmodified log-probabilities (the rounding floor of comparing across engines). With ``--fp32`` the
same KL is computed again with the model in float32 (the reference both bf16 engines round from), and
each engine's mean |KL_bf16 − KL_fp32| over the prompts is reported.

python benchmarks/scoring_engines.py --search results/search-qwen2.5-coder-1.5b-instruct-judge --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import time
from functools import partial
from pathlib import Path

import torch
from search_trial import load_trial, write_report

import cna_lens
from cna_lens.evaluate import final_logprobs, kl_divergence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", required=True, help="a judged search directory")
    ap.add_argument("--trial", type=int, default=None, help="this trial's selection (default: the chosen one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="also the float32 KL, to see which engine rounds less")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg, data, sel, neurons, number = load_trial(Path(args.search), args.trial)
    model = cna_lens.load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    prompts, bs = list(data.harmless), int(cfg["batch_size"])
    forms = {
        ("tl", "base"): (contextlib.nullcontext, "tl"),
        ("stock", "base"): (contextlib.nullcontext, "auto"),
        ("tl", "trial"): (partial(cna_lens.ablate, model, neurons, sel.scale), "tl"),
        ("stock", "trial"): (partial(cna_lens.edit_weights, model, neurons, sel.scale), "auto"),
    }
    seconds: dict[str, list[float]] = {f"{e} {c}": [] for e, c in forms}
    lp = {}
    final_logprobs(model, prompts[:2], engine="auto")  # warm-up: the stock model is built once, outside the timings
    for r in range(args.repeats):
        for (engine, cond), (ctx, name) in forms.items():
            t = time.perf_counter()
            with ctx():
                lp[engine, cond] = final_logprobs(model, prompts, batch_size=bs, engine=name)
            seconds[f"{engine} {cond}"].append(time.perf_counter() - t)
            print(f"repeat {r}: {engine} {cond}: {seconds[f'{engine} {cond}'][-1]:.2f} s", flush=True)
    kl = {e: kl_divergence(lp[e, "base"], lp[e, "trial"]) for e in ("tl", "stock")}
    ratio = [s / t for s, t in zip(seconds["stock trial"], seconds["tl trial"])]
    fp32 = None
    if args.fp32:
        ref = cna_lens.load_model(cfg["model"], dtype=torch.float32)
        base = final_logprobs(ref, prompts, batch_size=bs)
        with cna_lens.ablate(ref, neurons, sel.scale):
            kl32 = kl_divergence(base, final_logprobs(ref, prompts, batch_size=bs))
        fp32 = {
            "kl_mean": float(kl32.mean()),
            "mean_abs_error": {e: float((k - kl32).abs().mean()) for e, k in kl.items()},
            "max_abs_error": {e: float((k - kl32).abs().max()) for e, k in kl.items()},
        }
    write_report(
        args.out,
        cfg,
        "cna_lens.ScoringEngineBenchmark",
        number,
        {
            "n_neurons": len(neurons),
            "prompts": len(prompts),
            "batch_size": bs,
            "seconds": seconds,
            "stock_over_tl_trial": ratio,
            "kl_mean": {e: float(k.mean()) for e, k in kl.items()},
            "kl_abs_diff_per_prompt": {
                "max": float((kl["tl"] - kl["stock"]).abs().max()),
                "mean": float((kl["tl"] - kl["stock"]).abs().mean()),
            },
            "kl_base_tl_vs_stock_mean": float(kl_divergence(lp["tl", "base"], lp["stock", "base"]).mean()),
            "fp32": fp32,
        },
    )
    print(
        f"stock / tl time, trial: {', '.join(f'{x:.2f}' for x in ratio)}; KL {kl['tl'].mean():.4f} (tl) vs "
        f"{kl['stock'].mean():.4f} (stock)"
    )


if __name__ == "__main__":
    main()
