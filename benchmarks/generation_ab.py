"""Evaluation generation, engine against engine, side by side in one process on one loaded model.

* ``old``: a checkout of the former engine (continuous-batching pool over TransformerLens with
  patched attention and KV cache; conditions as TL hooks), imported from ``--old`` as its own package;
* ``shrink``: this checkout's default, static batches sorted by length from which each row leaves as
  it finishes, on the plain HF model that shares the bridge's tensors (conditions as exact weight edits);
* ``cb``: HF continuous batching on the same model and edits;
* ``hf``: HF ``generate`` on static batches sorted by length (same model and edits);
* ``shrink_noprefix``: ``shrink`` with every row prefilling its whole prompt (no shared-prefix prefill).

Every engine decodes the same prompts (JBB harmful, chat-formatted), greedy, with the same batch size,
under each condition; the model is loaded once (bf16 where native). Reports wall and process CPU
time, tokens emitted, row-steps decoded (``hf``: static batches keep finished rows), and how many
completions are token-for-token identical to the first engine's. ``--scoring`` also times the
first-token scores (the sweep's computation) of the former code against this checkout's.

python benchmarks/generation_ab.py --old OLD_CHECKOUT --engines shrink,old,cb --out DIR  [--scoring]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
from cna_lens.prompts import encode, left_pad, pad_id
from cna_lens.runs import atomic_write_json, atomic_write_text
from cna_lens.speed import shrink_generate

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


def shrink_no_prefix(model, seqs, max_new_tokens, batch_size, on_batch):
    """``greedy_tokens(engine="shrink")`` with ``share_prefix=False``: each row prefills its whole prompt."""
    plain, eos, out = stock_model(model), eos_token_ids(model), [[] for _ in seqs]
    for batch in batches_by_length([len(s) for s in seqs], batch_size):
        ids, mask = left_pad([seqs[i] for i in batch], pad_id(model.tokenizer), plain.device)

        def row(r, toks, b=batch):
            out[b[r]] = list(toks)
            on_batch([b[r]], [list(toks)])

        shrink_generate(plain, ids, mask, max_new_tokens, eos, row, share_prefix=False)
    return out


def run_new(model, seqs, conds, attr, args, engine):
    """This checkout's engine ``engine`` ("cb", "shrink", "hf" or "shrink_noprefix") under each
    condition's weight edit."""
    out, steps = {}, 0

    def count(batch, toks):
        nonlocal steps
        steps += len(batch) * max(map(len, toks), default=0)

    for c in conds:
        by, frac, scale = condition_args(c)
        edit = edit_weights(model, attr.top_neurons(fraction=frac, by=by), scale) if c != "baseline" else None
        with edit if edit is not None else contextlib.nullcontext():
            if engine == "shrink_noprefix":
                out[c] = shrink_no_prefix(model, seqs, args.max_new_tokens, args.batch_size, count)
            else:
                kw = dict(batch_size=args.batch_size, on_batch=count, engine=engine)
                out[c] = greedy_tokens(model, seqs, args.max_new_tokens, **kw)
    return out, steps


def score_ab(old, model, attr, args) -> dict:
    """First-token scoring (``final_logprobs`` under TL hooks, the sweep's computation) of baseline and
    the CNA sets of ``--score-fractions`` on the validation prompts: the former code (shared chat
    prefix, lower blocks, patched attention) against plain left-padded batches on TL's own attention."""
    import importlib

    from cna_lens.evaluate import final_logprobs

    prompts = load_prompts("harmful_val", limit=args.score_n)
    fracs = [float(f) for f in args.score_fractions.split(",")]
    sets = {"baseline": None} | {f"cna:abs:{f}": attr.top_neurons(fraction=f, by="abs") for f in fracs}
    o_ev, o_fast = importlib.import_module("cna_lens_old.evaluate"), importlib.import_module("cna_lens_old.fast")
    o_attn, o_attr = importlib.import_module("cna_lens_old.attention"), old.Attribution.load(args.attribution)
    n = model.cfg.n_layers
    out: dict = {"prompts": len(prompts), "conditions": list(sets), "engines": {}}
    logps = {}
    for e in ("old", "new"):
        o_attn.fast_attention(model, e == "old")  # the former code's attention patches: on for it only
        t0, c0 = time.perf_counter(), time.process_time()
        if e == "old":
            hooks = {
                c: [] if ns is None else old.neuron_hooks(o_attr.top_neurons(fraction=float(c.split(":")[2]), by="abs"))
                for c, ns in sets.items()
            }
            lower = o_fast.LowerBlocks(
                model, {o_fast.first_changed([h for h, _ in x], n) - 1 for x in hooks.values() if x}
            )
            for c, x in hooks.items():
                with model.hooks(fwd_hooks=x):
                    logps[(e, c)] = o_ev.final_logprobs(model, prompts, batch_size=args.batch_size, lower=lower)
        else:
            for c, ns in sets.items():
                with model.hooks(fwd_hooks=[] if ns is None else cna_lens.neuron_hooks(ns)):
                    logps[(e, c)] = final_logprobs(model, prompts, batch_size=args.batch_size)
        out["engines"][e] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        print(f"scoring {e}: {out['engines'][e]['wall_s']:.1f} s wall", flush=True)
    o_attn.fast_attention(model, False)
    out["max_abs_logprob_diff"] = {c: float((logps[("old", c)] - logps[("new", c)]).abs().max()) for c in sets}
    out["same_argmax"] = {c: int((logps[("old", c)].argmax(-1) == logps[("new", c)].argmax(-1)).sum()) for c in sets}
    return out


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
    p.add_argument(
        "--engines", default="old,hf", help="comma list of old, hf, cb, shrink, shrink_noprefix, in the order run"
    )
    p.add_argument("--scoring", action="store_true", help="also time first-token scoring, former code vs new")
    p.add_argument("--score-n", type=int, default=None, help="harmful_val prompts for --scoring (default: all)")
    p.add_argument("--score-fractions", default="0.001,0.003,0.01")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    engines = args.engines.split(",")
    if (
        set(engines) - {"old", "hf", "cb", "shrink", "shrink_noprefix", ""}
        or ("old" in engines and not args.old)
        or (args.scoring and not args.old)
    ):
        raise SystemExit(
            "--engines: choose among old (needs --old), hf, cb, shrink, shrink_noprefix; --scoring needs --old"
        )
    engines = [e for e in engines if e]
    conds = args.conditions.split(",")
    for c in conds:
        condition_args(c)
    old = import_old(args.old) if "old" in engines or args.scoring else None
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
        else:
            tokens[e], steps = run_new(model, seqs, conds, attr, args, e)
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
    ref = engines[0] if engines else None
    for e in engines[1:]:
        same = {c: sum(a == b for a, b in zip(tokens[ref][c], tokens[e][c])) for c in conds}
        prefix = {  # identical up to where the shorter one stops (e.g. one row cut by max_new_tokens only)
            c: sum(a[: min(len(a), len(b))] == b[: min(len(a), len(b))] for a, b in zip(tokens[ref][c], tokens[e][c]))
            for c in conds
        }
        res["engines"][e]["identical_to_" + ref] = same
        res["engines"][e]["same_prefix_as_" + ref] = prefix
    texts = {
        e: {c: [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens[e][c]] for c in conds}
        for e in engines
    }
    if args.scoring:
        res["scoring"] = score_ab(old, model, attr, args)
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
        row = [e, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", str(r["tokens_emitted"])]
        row += [f"{r['tokens_per_s']:.1f}", ident_s]
        lines.append("| " + " | ".join(row) + " |")
    atomic_write_text(out / "generation_ab.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
