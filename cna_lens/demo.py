"""``cna-lens demo``: discover on the bundled sets, then answer a few JBB prompts with and without the
top neurons scaled, side by side, after an estimate of how long that takes here."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from .commands import _load, _select, layer_histogram


def side_by_side(prompt: str, left: str, right: str, width: int = 100) -> str:
    col = (width - 3) // 2
    wrap = lambda s: textwrap.wrap(" ".join(s.split()), col) or [""]  # noqa: E731
    a, b = wrap(left)[:8], wrap(right)[:8]
    rows = [f"{x:<{col}} │ {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join(["─" * width, textwrap.shorten(f"PROMPT: {prompt}", width), *rows])


def demo_plan(model, discovery: list[str], evals: list[str], args: argparse.Namespace):
    """Print what the demo will do and how long it should take here, timed on a slice of the work
    (discovery's pass over one batch, one and five decoding steps); return the stages."""
    import math

    from . import estimate
    from .attribute import final_token_activations_multi
    from .generation import generate
    from .prompts import encode

    limits = estimate.measure(next(model.parameters()).dtype)
    seqs = encode(model.tokenizer, discovery[: args.batch_size])
    # discovery's own pass: it stops after the last MLP, so the unembedding is not part of its cost
    first_batch = final_token_activations_multi(model, seqs, ("mlp.hook_post",), batch_size=len(seqs))
    per_batch = estimate.timed(lambda: next(first_batch))
    kw = dict(batch_size=args.batch_size, progress=False)
    first = estimate.timed(lambda: generate(model, evals, max_new_tokens=1, **kw))
    five = estimate.timed(lambda: generate(model, evals, max_new_tokens=5, **kw))
    step = max(five - first, 0.0) / 4
    stages = [
        estimate.extrapolate(
            f"discovery ({len(discovery)} prompts)",
            per_batch,
            math.ceil(len(discovery) / args.batch_size),
            f"one batch of {len(seqs)} took {per_batch:.1f} s",
        ),
        estimate.extrapolate(
            f"generation (2 × {len(evals)} prompts)",
            2 * (first + step * (args.max_new_tokens - 1)),
            1,
            f"≤ {args.max_new_tokens} tokens at {step:.2f} s per step",
        ),
    ]
    print(estimate.report(stages, limits), file=sys.stderr)
    return stages


def cmd_demo(args: argparse.Namespace) -> int:
    from .attribute import attribute
    from .datasets import load_prompts
    from .edit import edit_weights
    from .generation import generate

    harmful, harmless = load_prompts("discovery_harmful"), load_prompts("discovery_harmless")
    evals = load_prompts("jbb_harmful", limit=args.n)
    model = _load(args)
    plan = demo_plan(model, harmful + harmless, evals, args)
    t0 = time.time()
    attr = attribute(model, harmful, harmless, batch_size=args.batch_size)
    print(
        f"\ndiscovery: {len(harmful)} harmful vs {len(harmless)} harmless prompts, "
        f"{time.time() - t0:.0f}s (estimated {plan[0].seconds:.0f}s)"
    )
    neurons = _select(attr, args)
    print(
        f"top {len(neurons)} MLP neurons by {args.by} ({100 * args.fraction:g} % of "
        f"{attr.n_layers}×{attr.d_mlp}, layers {args.exclude_layers} excluded), per layer:"
    )
    print(layer_histogram(neurons.per_layer_counts()))
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    t0 = time.time()
    base = generate(model, evals, **kw)
    with edit_weights(model, neurons, scale=args.scale):
        steered = generate(model, evals, **kw)
    print(f"generation: {time.time() - t0:.0f}s (estimated {plan[1].seconds:.0f}s)")
    width = 110
    print(f"\n{'BASELINE':<{(width - 3) // 2}} │ NEURONS × {args.scale:g}")
    for p, a, b in zip(evals, base, steered):
        print(side_by_side(p, a, b, width))
    return 0
