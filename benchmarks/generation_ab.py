"""Evaluation generation, engine against engine, side by side in one process on one loaded model.

* ``old``: a checkout of the former engine (continuous-batching pool over TransformerLens with
  patched attention and KV cache; conditions as TL hooks), imported from ``--old`` as its own package;
* ``hf``: this checkout's stock engine (HF ``generate`` on the plain HF model that shares the
  bridge's tensors, static batches sorted by length; conditions as exact weight edits);
* ``cb``: HF continuous batching (``generate_batch``, paged KV cache) on the same plain model and edits.

Every engine decodes the same prompts (JBB harmful, chat-formatted), greedy, with the same batch size,
under each condition; the model is loaded once (bf16 where native). Reports wall time, tokens
emitted, row-steps decoded (static batches keep finished rows), and how many completions are
token-for-token identical to the first engine's.

python benchmarks/generation_ab.py --old /work/wt-old --out benchmarks/results/generation-ab
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import cna_lens
from cna_lens.datasets import load_prompts
from cna_lens.edit import edit_weights
from cna_lens.engine import stock_model
from cna_lens.generation import batches_by_length, eos_token_ids, greedy_tokens
from cna_lens.prompts import encode, pad_id
from cna_lens.runs import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def import_old(checkout: str):
    """The ``cna_lens`` package of another checkout, imported as ``cna_lens_old`` (its own modules)."""
    init = Path(checkout) / "cna_lens" / "__init__.py"
    spec = importlib.util.spec_from_file_location("cna_lens_old", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cna_lens_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def condition_args(cond: str) -> tuple[str, float, float]:
    """``"cna:<by>:<fraction>[:<scale>]"`` → (by, fraction, scale); baseline → ("", 0, 1)."""
    if cond == "baseline":
        return "", 0.0, 1.0
    kind, by, frac, *scale = cond.split(":")
    if kind != "cna":
        raise ValueError(f"condition {cond!r}: use baseline or cna:<by>:<fraction>[:<scale>]")
    return by, float(frac), float(scale[0]) if scale else 0.0


def run_old(old, model, seqs, conds, attr_dir, args):
    attr = old.Attribution.load(attr_dir)
    jobs = []
    for c in conds:
        by, frac, scale = condition_args(c)
        jobs.append(([] if c == "baseline" else old.neuron_hooks(attr.top_neurons(fraction=frac, by=by), scale), seqs))
    toks = old.greedy_many(model, jobs, args.max_new_tokens, batch_size=args.batch_size)
    return dict(zip(conds, toks)), None


def run_hf(model, seqs, conds, attr, args):
    out, steps = {}, 0
    for c in conds:
        by, frac, scale = condition_args(c)
        ns = attr.top_neurons(fraction=frac, by=by) if c != "baseline" else None

        def count(batch, toks):
            nonlocal steps
            steps += len(batch) * max(map(len, toks), default=0)

        if ns is None:
            out[c] = greedy_tokens(model, seqs, args.max_new_tokens, batch_size=args.batch_size, on_batch=count)
        else:
            with edit_weights(model, ns, scale):
                out[c] = greedy_tokens(model, seqs, args.max_new_tokens, batch_size=args.batch_size, on_batch=count)
    return out, steps


def run_cb(model, seqs, conds, attr, args):
    """HF continuous batching, sized for the workload (the default sizing assumes a GPU's memory)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    plain, eos = stock_model(model), eos_token_ids(model)
    page = 64
    cb = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=sum(math.ceil((len(s) + args.max_new_tokens) / page) for s in seqs) + 8,
        max_batch_tokens=max(256, max(map(len, seqs)) * 4),
        max_requests_per_batch=args.batch_size,
        allow_block_sharing=False,
    )
    gc = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id(model.tokenizer)
    )
    out = {}
    for c in conds:
        by, frac, scale = condition_args(c)
        ctx = edit_weights(model, attr.top_neurons(fraction=frac, by=by), scale) if c != "baseline" else None
        with ctx if ctx is not None else contextlib.nullcontext():
            res = plain.generate_batch(
                [list(s) for s in seqs], generation_config=gc, continuous_batching_config=cb, warmup=False
            )
        rows = [r.generated_tokens for r in res.values()]
        out[c] = [next((r[:k] for k, t in enumerate(r) if t in eos), r) for r in rows]
    return out, None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", help="root of a checkout with the former engine (omit to skip it)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--attribution",
        default=str(ROOT / "results/reproduce-qwen2.5-coder-1.5b-instruct/attribution"),
    )
    p.add_argument("--conditions", default="baseline,cna:abs:0.003")
    p.add_argument("--n", type=int, default=48, help="JBB harmful prompts")
    p.add_argument("--max-new-tokens", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--engines", default="old,hf", help="comma list of old, hf, cb, in the order run")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    engines = args.engines.split(",")
    if set(engines) - {"old", "hf", "cb"} or ("old" in engines and not args.old):
        raise SystemExit("--engines: choose among old (needs --old), hf, cb")
    conds = args.conditions.split(",")
    for c in conds:
        condition_args(c)
    old = import_old(args.old) if "old" in engines else None
    # the old engine patches the bridge it loads; the stock engine only reads that bridge's tensors
    model = (old or cna_lens).load_model(args.model, dtype=args.dtype)
    attr = cna_lens.Attribution.load(args.attribution)
    seqs = encode(model.tokenizer, load_prompts("jbb_harmful", limit=args.n))
    res: dict = {
        "kind": "cna_lens.GenerationAB",
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompts": len(seqs),
        "prompt_tokens": sum(map(len, seqs)),
        "batch_size": args.batch_size,
        "static_batches": [len(b) for b in batches_by_length([len(s) for s in seqs], args.batch_size)],
        "max_new_tokens": args.max_new_tokens,
        "conditions": conds,
        "engines": {},
    }
    tokens = {}
    for e in engines:
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        if e == "old":
            tokens[e], steps = run_old(old, model, seqs, conds, args.attribution, args)
        elif e == "hf":
            tokens[e], steps = run_hf(model, seqs, conds, attr, args)
        else:
            tokens[e], steps = run_cb(model, seqs, conds, attr, args)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        emitted = sum(len(t) for c in conds for t in tokens[e][c])
        res["engines"][e] = {
            "wall_s": wall,
            "cpu_s": cpu,  # all threads of this process: less sensitive than wall time to other load
            "tokens_emitted": emitted,
            "tokens_per_s": emitted / wall,
            "row_steps_decoded": steps,
            "per_condition_tokens": {c: sum(map(len, tokens[e][c])) for c in conds},
            "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
        }
        print(f"{e}: {wall:.1f} s wall, {cpu:.1f} s CPU, {emitted} tokens", flush=True)
    ref = engines[0]
    for e in engines[1:]:
        same = {c: sum(a == b for a, b in zip(tokens[ref][c], tokens[e][c])) for c in conds}
        prefix = {  # identical up to where the shorter one stops (e.g. one row cut by max_new_tokens only)
            c: sum(a[: min(len(a), len(b))] == b[: min(len(a), len(b))] for a, b in zip(tokens[ref][c], tokens[e][c]))
            for c in conds
        }
        res["engines"][e]["identical_to_" + ref] = same
        res["engines"][e]["same_prefix_as_" + ref] = prefix
    texts = {e: {c: [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens[e][c]] for c in conds} for e in engines}
    out = Path(args.out)
    atomic_write_json(out / "generation_ab.json", res)
    atomic_write_json(out / "texts.json", {"kind": "cna_lens.GenerationABTexts", "texts": texts})
    lines = [
        "| engine | wall s | CPU s | tokens emitted | tokens/s (wall) | identical to first |",
        "|---|---|---|---|---|---|",
    ]
    for e, r in res["engines"].items():
        ident = r.get("identical_to_" + ref)
        ident_s = ", ".join(f"{c}: {v}/{len(seqs)}" for c, v in ident.items()) if ident else "—"
        lines.append(
            f"| {e} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['tokens_emitted']} | {r['tokens_per_s']:.1f} | {ident_s} |"
        )
    atomic_write_text(out / "generation_ab.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
