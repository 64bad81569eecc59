"""Command line: ``cna-lens discover | generate | export | judge | reproduce | bench | demo``.

Wiring only; the logic lives in the library.
"""

from __future__ import annotations

import argparse
import sys

from .commands import (
    DEFAULT_MODEL,
    DEMO_FRACTION,
    cmd_bench,
    cmd_discover,
    cmd_export,
    cmd_generate,
    cmd_judge,
    cmd_reproduce,
    cmd_search,
)
from .demo import cmd_demo


def build_parser() -> argparse.ArgumentParser:
    from .conditions import RANKINGS
    from .models import DTYPES
    from .reproduce import CAA_ALPHAS, FRACTIONS

    parser = argparse.ArgumentParser(prog="cna-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model_default: str | None = None) -> None:
        p.add_argument(
            "--model",
            default=model_default,
            required=model_default is None,
            help="packaged alias, HF model dir, .gguf file or hub id",
        )
        p.add_argument(
            "--dtype",
            choices=["auto", *DTYPES],
            default="auto",
            help="auto: bfloat16 where the hardware runs it natively (avx512_bf16/AMX CPU, sm80+ GPU), else float32",
        )
        p.add_argument(
            "--process-weights",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="fold norms into the weights (HookedTransformer coordinates; ~3x the model's size in RAM to load)",
        )
        p.add_argument("--device", default="cpu")
        p.add_argument("--batch-size", type=int, default=16)

    def selection(p: argparse.ArgumentParser, fraction: float) -> None:
        p.add_argument("--fraction", type=float, default=fraction, help="share of all MLP neurons")
        p.add_argument("--k", type=int, default=None, help="number of neurons (overrides --fraction)")
        p.add_argument("--by", choices=["abs", "diff", "effect", "abs_effect"], default="abs")
        p.add_argument("--exclude-layers", default="0,1")

    d = sub.add_parser("discover", help="contrastive attribution; writes attribution/ and neurons.json")
    common(d)
    d.add_argument("--positive", default="discovery_harmful", help="prompt file or bundled dataset name")
    d.add_argument("--negative", default="discovery_harmless", help="prompt file or bundled dataset name")
    d.add_argument("--out", required=True)
    selection(d, 0.001)
    d.set_defaults(func=cmd_discover)

    g = sub.add_parser("generate", help="greedy completions, optionally with neurons scaled")
    common(g)
    g.add_argument("--prompts", required=True, help="prompt file or bundled dataset name")
    g.add_argument("--neurons", help="neurons.json, or a directory written by `discover`")
    g.add_argument("--scale", type=float, default=0.0)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--response-prefix",
        default="",
        help="the start of every answer, after the assistant turn's opening (e.g. 'Sure, here is'); "
        "the completion is what follows it",
    )
    g.add_argument("--out", help="write JSONL here instead of stdout")
    g.add_argument("--judge", help="also judge each completion: regex | classifier | default | model:<id>")
    g.add_argument(
        "--engine",
        choices=["auto", "cb", "shrink", "hf", "tl", "vllm"],
        default="auto",
        help="auto/shrink: static batches that finished rows leave; cb: HF continuous batching; hf: HF generate; "
        "tl: TransformerLens; vllm: an exported model directory on CUDA GPUs (the vllm extra)",
    )
    g.add_argument("--tensor-parallel", type=int, default=1, help="GPUs for --engine vllm")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="write the model with neurons scaled into its weights (HF dir or GGUF)")
    common(x)
    x.set_defaults(dtype="float32", func=cmd_export)
    x.add_argument("--neurons", required=True, help="neurons.json, or a directory written by `discover`")
    x.add_argument("--scale", type=float, default=0.0)
    x.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    x.add_argument("--format", choices=["hf", "gguf"], default="hf")
    x.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0"], default="f16")
    x.add_argument("--force", action="store_true", help="replace an existing --out directory")
    j = sub.add_parser("judge", help="label completions refuse / comply / evade (JSONL in, JSONL out)")
    j.add_argument("--in", dest="inp", required=True, help="JSONL rows with prompt and completion fields, or a run dir")
    j.add_argument("--judge", default="default", help="default | regex | classifier | model:<id>")
    j.add_argument("--out", help="write JSONL here instead of stdout")
    j.add_argument("--prompt-field", default="prompt")
    j.add_argument("--completion-field", default="completion")
    j.add_argument("--batch-size", type=int, default=8, help="model judge batch size")
    j.set_defaults(func=cmd_judge)

    r = sub.add_parser("reproduce", help="the paper's JBB experiment as one resumable run directory")
    common(r)
    r.add_argument("--out", required=True)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--limit", type=int, default=None, help="first N JBB prompts per split (1..100)")
    r.add_argument("--caa-alphas", default=",".join(map(str, CAA_ALPHAS)), help="CAA strengths generated")
    r.add_argument("--layer-alpha", type=float, default=1.0, help="single-layer CAA strength generated")
    r.add_argument("--mmlu-limit", type=int, default=None, help="MMLU items (default all 570; 0 = skip)")
    r.add_argument("--mmlu-on", default="all", help="conditions MMLU scores: kinds, keys, chosen, all, none")
    r.add_argument("--perplexity-on", default="all", help="conditions whose completions get perplexity (as --mmlu-on)")
    r.add_argument("--kl-limit", type=int, default=64, help="alpaca_val prompts for the KL measure")
    r.add_argument(
        "--xstest-limit",
        type=int,
        default=100,
        help="XSTest safe prompts, evenly spaced (0 = skip); xstest_safe_val holds the other 150 of 250",
    )
    r.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="sweep: shares of all MLP neurons")
    r.add_argument("--rankings", default=",".join(RANKINGS), help="sweep: rankings among abs,diff,effect")
    r.add_argument("--judge", default="default", help="regex | classifier | model:<id> (default: classifier)")
    r.add_argument(
        "--choose-by",
        choices=["first_token", "judge"],
        default="first_token",
        help="operating-point rule on validation: first-token score, or judged short generations (both reported)",
    )
    r.add_argument("--choose-tokens", type=int, default=48, help="generation length of the judged validation sweep")
    r.add_argument("--selection", default=None, help="selection.json from `cna-lens search`, added as a condition")
    r.add_argument(
        "--direction-strengths",
        default="",
        help="directional ablation also at these strengths, comma-separated in (0, 2] (1 = full ablation)",
    )
    r.add_argument(
        "--replace-selection", action="store_true", help="a finished run's stored selection makes way for --selection"
    )
    r.add_argument("--heldout", action=argparse.BooleanOptionalAction, default=True, help="harmful_test transfer")
    r.add_argument("--heldout-limit", type=int, default=None, help="first N harmful_test prompts (default all 572)")
    r.set_defaults(func=cmd_reproduce)

    b = sub.add_parser("bench", help="CNA's speed as fractions of this machine's limits (JSON + markdown)")
    common(b, "smollm2-135m-instruct")
    b.set_defaults(batch_size=32)
    b.add_argument("--out", default="benchmarks/results", help="folder for <model>-<dtype>.json and bench.md")
    b.add_argument("--prompts", type=int, default=32, help="discovery prompts timed (half harmful)")
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--rss", default="100,400", help="prompt counts for the peak-RSS check")
    b.add_argument("--no-hf", action="store_true", help="skip the plain HF forward comparison")
    b.add_argument("--no-batch1", action="store_true", help="skip the batch-size-1 loop")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("search", help="multi-objective search over neuron selections (validation data only; resumable)")
    common(s)
    s.add_argument("--out", required=True, help="search directory (config.json, study.db, pareto.json, ...)")
    s.add_argument("--trials", type=int, default=30, help="total trials (a rerun resumes up to this many)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--objective",
        choices=["first_token", "judge"],
        default="first_token",
        help="compliance: first-token refusal log-odds <= 0, or the three-way judge on short generations",
    )
    s.add_argument("--judge", default="default", help="judge for --objective judge (see cna_lens.judge)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="generation length for --objective judge")
    s.add_argument(
        "--generation-batch-size", type=int, default=32, help="prompts decoded together for --objective judge"
    )
    s.add_argument(
        "--trial-batch",
        type=int,
        default=1,
        help="--objective judge: trials proposed together, their answers decoded in one batch of "
        "K x --generation-batch-size rows (faster per trial on CPU; docs/search.md)",
    )
    s.add_argument("--n-harmful", type=int, default=32, help="harmful_val prompts (compliance)")
    s.add_argument(
        "--n-harmless", type=int, default=32, help="alpaca_val prompts (KL; over-refusal too unless --benign)"
    )
    s.add_argument("--n-effects", type=int, default=32, help="harmful_train prompts for the pruning effects")
    s.add_argument("--benign", default=None, help="bundled dataset for over-refusal (default: the alpaca_val prompts)")
    s.add_argument("--rankings", default="abs,diff,effect,t,contrast_minus_utility")
    s.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True, help="let trials prune neurons")
    s.add_argument("--kl-cap", type=float, default=0.3, help="rule: highest compliance with KL <= this (nats)")
    s.add_argument("--over-refusal-slack", type=float, default=0.0, help="rule: over-refusal <= baseline + this")
    s.add_argument(
        "--confirm",
        type=int,
        default=0,
        help="rule: re-measure the first N points on fresh prompts and choose on those (0: choose on validation)",
    )
    s.add_argument(
        "--confirm-front",
        action="store_true",
        help="with --confirm: also re-measure the front (KL <= cap) and the reference curves on the fresh prompts "
        "(pareto_fresh.html; compares methods at equal KL, not used to choose)",
    )
    s.add_argument(
        "--quality-margin",
        type=float,
        default=None,
        help="with --confirm and/or --trial-quality: choose only points whose long answers to the quality prompts "
        "keep answer quality (1 - repeated 4-grams) >= baseline - this (e.g. 0.01)",
    )
    s.add_argument("--quality-tokens", type=int, default=150, help="answer length for --quality-margin")
    s.add_argument(
        "--quality-prompts",
        default="xstest_safe_val",
        help="bundled set for --quality-margin (default: the 150 safe XSTest prompts no reproduction uses), "
        "or 'harmless' for the confirmation's alpaca_val prompts",
    )
    s.add_argument("--confirm-quality", type=int, default=100, help="evenly spaced --quality-prompts prompts")
    s.add_argument(
        "--trial-quality",
        type=int,
        default=0,
        help="every trial also answers N evenly spaced --quality-prompts prompts (outside the confirmation's) "
        "at --quality-tokens; with --quality-margin a constraint of the search (0: off; docs/search.md)",
    )
    s.add_argument("--confirm-harmful", type=int, default=64, help="fresh harmful_train prompts for --confirm")
    s.add_argument("--confirm-harmless", type=int, default=64, help="fresh alpaca_val prompts for --confirm")
    s.add_argument("--samples", type=int, default=8, help="prompts per set to generate for the chosen point")
    s.add_argument("--sample-tokens", type=int, default=64)
    s.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="also write pareto.png")
    s.set_defaults(func=cmd_search)

    m = sub.add_parser("demo", help="discover on the bundled sets, then JBB prompts with/without ablation")
    common(m, DEFAULT_MODEL)
    selection(m, DEMO_FRACTION)
    m.add_argument("--n", type=int, default=6, help="JBB harmful prompts to show")
    m.add_argument("--scale", type=float, default=0.0)
    m.add_argument("--max-new-tokens", type=int, default=48)
    m.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checks import check_args

    args = build_parser().parse_args(argv)
    try:
        check_args(args)  # every argument, before any model loads
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"cna-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
