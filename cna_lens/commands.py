"""The command functions behind ``cna-lens`` (one per subcommand); :mod:`cna_lens.cli` parses arguments
and calls them after :func:`cna_lens.checks.check_args`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .runs import atomic_write_text, jsonl

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
#: Default selection for the demo: top 0.3 % of MLP neurons by |diff|. The paper's 0.1 % transfers
#: only partly to Qwen2.5-Coder-1.5B (see README, "Measured"), 0.3 % is the measured working point.
DEMO_FRACTION = 0.003


def _prompts(spec: str) -> list[str]:
    """A bundled dataset name, or a prompt file (.txt one per line, .json, .jsonl)."""
    from .datasets import DATASETS, load_prompts, read_prompt_file

    if spec in DATASETS:
        return load_prompts(spec)
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec!r} is neither a prompt file nor a bundled dataset ({', '.join(DATASETS)})")
    return read_prompt_file(spec)


def _load(args: argparse.Namespace):
    from .models import load_model

    print(f"loading {args.model} ({args.dtype}) ...", file=sys.stderr)
    return load_model(args.model, device=args.device, dtype=args.dtype, process_weights=args.process_weights)


def layer_histogram(counts: list[int], width: int = 40) -> str:
    """ASCII bars: one line per layer holding selected neurons."""
    top = max(counts) or 1
    return "\n".join(
        f"  L{layer:>3} {n:>5} {'█' * max(1, round(width * n / top))}" for layer, n in enumerate(counts) if n
    )


def _select(attr, args: argparse.Namespace):
    exclude = [int(x) for x in args.exclude_layers.split(",") if x.strip()] if args.exclude_layers else []
    return attr.top_neurons(k=args.k, fraction=args.fraction, exclude_layers=exclude, by=args.by)


def cmd_discover(args: argparse.Namespace) -> int:
    from .attribute import attribute

    positive, negative = _prompts(args.positive), _prompts(args.negative)
    model = _load(args)
    t0 = time.time()
    attr = attribute(model, positive, negative, batch_size=args.batch_size)
    seconds = time.time() - t0
    out = Path(args.out)
    attr.save(out / "attribution")
    neurons = _select(attr, args)
    neurons.save(out / "neurons.json")
    print(f"{len(positive)} positive + {len(negative)} negative prompts in {seconds:.1f}s")
    print(f"selected {len(neurons)} neurons ({args.by}, {100 * len(neurons) / (attr.n_layers * attr.d_mlp):.3g} %):")
    print(layer_histogram(neurons.per_layer_counts()))
    print(f"wrote {out / 'attribution'} and {out / 'neurons.json'}")
    return 0


def _neurons(path: str):
    from .neurons import NeuronSet

    p = Path(path)
    return NeuronSet.load(p / "neurons.json" if p.is_dir() else p)


def cmd_generate(args: argparse.Namespace) -> int:
    from .edit import edit_weights
    from .generation import generate
    from .intervene import check_compatible

    if args.judge:
        from .judge import resolve_judge

        resolve_judge(args.judge)  # a bad name fails before the model loads
    prompts = _prompts(args.prompts)
    neurons = _neurons(args.neurons) if args.neurons else None
    if args.engine == "vllm":
        from .models import resolve
        from .vllm_engine import generate_vllm

        if neurons is not None:
            raise ValueError(
                "--engine vllm generates from weights: `cna-lens export` the edit, then --model that directory"
            )
        texts = generate_vllm(
            resolve(args.model)[0],
            prompts,
            max_new_tokens=args.max_new_tokens,
            tensor_parallel_size=args.tensor_parallel,
        )
        return _write_generations(args, prompts, texts, None)
    model = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, engine=args.engine)
    kw["response_prefix"] = args.response_prefix
    if neurons is None:
        texts = generate(model, prompts, **kw)
    else:
        check_compatible(model, neurons)
        with edit_weights(model, neurons, scale=args.scale):
            texts = generate(model, prompts, **kw)
    return _write_generations(args, prompts, texts, neurons)


def _write_generations(args: argparse.Namespace, prompts: list[str], texts: list[str], neurons: Any) -> int:
    opening = {"response_prefix": args.response_prefix} if args.response_prefix else {}
    rows = [
        {"prompt": p, **opening, "completion": t, "neurons": args.neurons, "scale": args.scale if neurons else None}
        for p, t in zip(prompts, texts)
    ]
    if args.judge:
        from .judge import judge_completions, verdict_fields

        verdicts = judge_completions(prompts, texts, args.judge, progress=True)
        rows = [{**r, **verdict_fields(v)} for r, v in zip(rows, verdicts)]
    lines = jsonl(rows)
    if args.out:
        atomic_write_text(args.out, lines)
        print(f"wrote {len(rows)} completions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_export_args, export_model
    from .models import resolve

    out = check_export_args(args.out, scale=args.scale, format=args.format, gguf_type=args.gguf_type, force=args.force)
    if args.process_weights:
        raise ValueError("export writes the model's own weights: drop --process-weights")
    if not Path(args.neurons).exists():
        raise FileNotFoundError(f"--neurons {args.neurons} does not exist (a neurons.json or a `discover` directory)")
    neurons = _neurons(args.neurons)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve(args.model)[0]).get_text_config()
    if (neurons.n_layers, neurons.d_mlp) != (cfg.num_hidden_layers, cfg.intermediate_size):
        raise ValueError(
            f"--neurons are for {neurons.n_layers} layers × {neurons.d_mlp} neurons, {args.model} has "
            f"{cfg.num_hidden_layers} × {cfg.intermediate_size}"
        )
    model = _load(args)
    t0 = time.time()
    provenance = {"neurons_file": str(Path(args.neurons).resolve()), "command": "cna-lens export"}
    export_model(
        model,
        out,
        neurons=neurons,
        scale=args.scale,
        provenance=provenance,
        format=args.format,
        gguf_type=args.gguf_type,
        force=args.force,
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"{len(neurons)} neurons × {args.scale:g} written as {args.format} to {out} "
        f"({size / 1e6:.1f} MB, {time.time() - t0:.1f}s)"
    )
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from collections import Counter

    from .judge import judge_completions, resolve_judge, verdict_fields

    resolve_judge(args.judge)
    path = Path(args.inp)
    if path.is_dir():  # a run directory: label completions.jsonl, write compliance.json
        from .compliance import write_compliance

        t0 = time.time()
        n, table = write_compliance(path, args.judge)
        print(f"{n} new verdicts in {time.time() - t0:.0f}s; wrote {path / 'compliance.json'}", file=sys.stderr)
        for dataset, conds in table.items():
            for cond, e in conds.items():
                shares = " ".join(f"{lab} {100 * e[lab]['rate']:.0f} %" for lab in ("comply", "evade", "refuse"))
                print(f"{dataset:<12} {cond:<22} n={e['n']:<4} {shares}")
        return 0
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected JSONL rows with prompt and completion fields)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or not {args.prompt_field, args.completion_field} <= row.keys():
                raise ValueError(f"{path}:{n}: needs fields {args.prompt_field!r} and {args.completion_field!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    t0 = time.time()
    verdicts = judge_completions(
        [r[args.prompt_field] for r in rows],
        [r[args.completion_field] for r in rows],
        args.judge,
        batch_size=args.batch_size,
        progress=True,
    )
    lines = jsonl({**r, **verdict_fields(v)} for r, v in zip(rows, verdicts))
    if args.out:
        atomic_write_text(args.out, lines)
    else:
        sys.stdout.write(lines)
    counts = Counter(v.label for v in verdicts)
    shares = ", ".join(f"{lab} {100 * counts[lab] / len(verdicts):.1f} %" for lab in ("refuse", "comply", "evade"))
    where = f" -> {args.out}" if args.out else ""
    print(
        f"{len(rows)} completions judged by {verdicts[0].judge} in {time.time() - t0:.1f}s: {shares}{where}",
        file=sys.stderr,
    )
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    alphas = [float(a) for a in args.caa_alphas.split(",") if a.strip()]
    results = reproduce(
        args.model,
        args.out,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        batch_size=args.batch_size,
        caa_alphas=alphas,
        layer_alpha=args.layer_alpha,
        mmlu_limit=args.mmlu_limit,
        mmlu_on=args.mmlu_on.split(","),
        perplexity_on=args.perplexity_on.split(","),
        kl_limit=args.kl_limit,
        xstest_limit=args.xstest_limit,
        fractions=[float(f) for f in args.fractions.split(",")],
        rankings=args.rankings.split(","),
        judge=args.judge,
        choose_by=args.choose_by,
        choose_tokens=args.choose_tokens,
        heldout=args.heldout,
        heldout_limit=args.heldout_limit,
        selection=args.selection,
        replace_selection=args.replace_selection,
        direction_strengths=[float(x) for x in args.direction_strengths.split(",") if x.strip()],
        dtype=args.dtype,
        process_weights=args.process_weights,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"chosen operating point: {results['chosen']}; files in {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, markdown
    from .engine import stock_model
    from .runs import atomic_write_json, read_json

    model = _load(args)
    hf = None if args.no_hf else stock_model(model)  # the stock engine: plain HF modules on the same weights
    res = bench(
        model,
        hf,
        n_prompts=args.prompts,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        rss_prompts=[int(n) for n in args.rss.split(",") if n.strip()],
        batch1=not args.no_batch1,
    )
    out = Path(args.out)
    atomic_write_json(out / f"{res['model']}-{res['dtype']}.json", res)
    rows = [read_json(f, "cna_lens.Bench") for f in sorted(out.glob("*.json"))]
    atomic_write_text(out / "bench.md", markdown(rows))
    print(markdown(rows))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .confirm import ConfirmData
    from .models import resolve_dtype
    from .pareto import Rule, summary
    from .plot import fresh_front, pareto_front, save_figures
    from .search import Search, SearchData, SearchSpace
    from .search_refs import samples

    if args.trials < 1 or args.samples < 0 or args.confirm < 0 or args.trial_quality < 0:
        raise ValueError(
            "--trials must be >= 1, --samples, --confirm and --trial-quality >= 0; got "
            f"{args.trials}, {args.samples}, {args.confirm}, {args.trial_quality}"
        )
    quality = None if args.quality_prompts == "harmless" else args.quality_prompts
    if args.trial_quality and quality is None:
        raise ValueError("--trial-quality answers a bundled set (--quality-prompts), not 'harmless'")
    confirm = None
    if args.confirm:  # fresh prompts: after the pruning prompts and after the KL prompts
        confirm = ConfirmData.bundled(
            args.confirm_harmful, args.confirm_harmless, args.n_effects, args.n_harmless, quality, args.confirm_quality
        )
    search = Search(  # validates every setting and pins them in OUT/config.json before the model loads
        args.out,
        model=args.model,
        data=SearchData.bundled(
            args.n_harmful,
            args.n_harmless,
            args.n_effects,
            args.benign,
            quality if args.trial_quality else None,
            args.trial_quality,
            args.confirm_quality,
        ),
        space=SearchSpace(rankings=tuple(args.rankings.split(",")), prune=(False, True) if args.prune else (False,)),
        rule=Rule(
            args.kl_cap,
            args.over_refusal_slack,
            args.confirm,
            args.confirm_front,
            args.quality_margin,
            args.quality_tokens,
        ),
        confirm_data=confirm,
        seed=args.seed,
        objective=args.objective,
        judge=args.judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        trial_batch=args.trial_batch,
        dtype=str(resolve_dtype(args.dtype, args.device)).removeprefix("torch."),
    )
    model = _load(args)
    result = search.run(model, args.trials)
    figures = {Path(args.out) / "pareto": pareto_front(result)}
    if "front" in (result.get("confirmation") or {}):
        figures[Path(args.out) / "pareto_fresh"] = fresh_front(result)
    written = save_figures(figures, png=args.png)
    if args.samples:
        samples(search, model, result, n=args.samples, max_new_tokens=args.sample_tokens)
    print(summary(result))
    print(f"wrote {Path(args.out) / 'pareto.json'}, {', '.join(map(str, written))}")
    return 0
