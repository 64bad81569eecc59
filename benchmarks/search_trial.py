"""One judged search trial, its generation in three forms, side by side in one process.

The judged objective generates greedy answers to the search's ``harmful`` validation prompts under the
trial's selection. This times that generation, for the search's chosen selection (``SEARCH/selection.json``)
or, with ``--trial N``, for trial N's:

* ``hooks16``: under TransformerLens hooks (``cna_lens.ablate``), so through TL's ``generate``,
  batch 16 (with its KV cache only where ``tl_kv_cache_works()``: before transformers 5.24);
* ``edit16`` / ``edit32``: under the equal weight edit (``cna_lens.edit_weights``) on the stock
  engine (``shrink``), batch 16 / 32 (search trials run batch 32, ``generation_batch_size``);

and the first-token scores (TL hooks, ``harmful`` + ``harmless``). Each form's texts are judged
three-way; the report gives wall time, judged compliance and how many texts equal the hook form's (in
bf16 the two forms round differently: ``a·s`` against ``W·s``).

Then the whole trial as the search measures it (``Search.measure``: the harmless scoring pass and the
generation under the edit on the stock engine, the harmful prompts' first-token scores taken from the
generation's prefill, the judge), ``--repeats`` times, each next to the separate harmful scoring pass under the
hooks that the prefill replaces; and how far the two first-token scores of the harmful prompts are
apart (bf16: the edit and the hook round differently).

python benchmarks/search_trial.py --search results/search-qwen2.5-coder-1.5b-instruct-judge --trial 54 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformer_lens
import transformers

import cna_lens
from cna_lens.attribute import Attribution
from cna_lens.datasets import SearchData
from cna_lens.evaluate import final_logprobs, refusal_score, refusal_token_ids
from cna_lens.generation import generate, tl_kv_cache_works
from cna_lens.judge import judge_completions
from cna_lens.pareto import load_result
from cna_lens.runs import atomic_write_json
from cna_lens.search import Search, share
from cna_lens.search_refs import neuron_forms
from cna_lens.selection import Selection, saved_effects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--search", required=True, help="a judged search directory (config.json, selection.json, neurons.json)"
    )
    ap.add_argument("--trial", type=int, default=None, help="this trial's selection (default: the chosen one)")
    ap.add_argument("--forms", default="edit32,hooks16,edit16", help="order in which the forms run")
    ap.add_argument("--repeats", type=int, default=2, help="whole-trial measurements (each next to a scoring pass)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src = Path(args.search)
    cfg, data, sel, neurons, number = load_trial(src, args.trial)
    model = cna_lens.load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    prompts, tokens = list(data.harmful), int(cfg["max_new_tokens"])
    forms = {
        "hooks16": (partial(cna_lens.ablate, model, neurons, sel.scale), 16),
        "edit16": (partial(cna_lens.edit_weights, model, neurons, sel.scale), 16),
        "edit32": (partial(cna_lens.edit_weights, model, neurons, sel.scale), 32),
    }
    rows: dict[str, dict] = {}
    judge_completions(prompts[:1], ["warm-up"])  # the judge loads once, outside the timings
    for name in args.forms.split(","):
        ctx, bs = forms[name]
        t = time.perf_counter()
        with ctx():
            texts = generate(model, prompts, max_new_tokens=tokens, batch_size=bs)
        seconds = time.perf_counter() - t
        labels = [v.label for v in judge_completions(prompts, texts)]
        rows[name] = {"seconds": seconds, "comply": labels.count("comply") / len(labels), "texts": texts}
        print(f"{name}: {seconds:.1f} s, judged comply {rows[name]['comply']:.3f}", flush=True)
    t = time.perf_counter()
    with forms["hooks16"][0]():
        for p in (data.harmful, data.harmless):
            final_logprobs(model, list(p), batch_size=int(cfg["batch_size"]))
    scores = time.perf_counter() - t
    trial = measure_trial(src, cfg, model, data, neurons, sel.scale, args.repeats)
    ref = rows.get("hooks16")
    for r in rows.values():
        r["identical_to_hooks16"] = None if ref is None else sum(a == b for a, b in zip(r["texts"], ref["texts"]))
    write_report(
        args.out,
        cfg,
        "cna_lens.SearchTrialBenchmark",
        number,
        {
            "selection": sel.to_dict(),
            "n_neurons": len(neurons),
            "prompts": len(prompts),
            "max_new_tokens": tokens,
            "order": args.forms.split(","),
            "versions": {
                m.__name__: importlib.metadata.version(m.__name__.replace("_", "-"))
                for m in (torch, transformers, transformer_lens)
            },
            "tl_kv_cache": tl_kv_cache_works(),
            "first_token_scores_seconds": scores,
            "forms": rows,
            "measure": trial,
        },
    )
    print(f"first-token scores (harmful + harmless, TL hooks): {scores:.1f} s")


def write_report(out_dir: str, cfg: dict, kind: str, trial: int | None, fields: dict) -> None:
    """``OUT_DIR/<model>.json``: the benchmark's kind, the search's model and dtype, the trial (if one),
    then ``fields``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"kind": kind, "model": cfg["model"], "dtype": cfg["dtype"], **({} if trial is None else {"trial": trial})}
    report |= fields
    atomic_write_json(out / f"{cfg['model']}.json", report)


def load_trial(src: Path, trial: int | None) -> tuple[dict, SearchData, Selection, cna_lens.NeuronSet, int]:
    """A judged search's configuration, validation prompts, and the selection, neurons and number of
    ``trial`` (None: the chosen one, as the search saved them)."""
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("objective") != "judge":
        raise SystemExit(f"{src} is not a judged search (objective {cfg.get('objective')!r})")
    n_h, n_a = (int(cfg["data"][k].split(":")[1].rstrip("]")) for k in ("harmful", "harmless"))
    data = SearchData.bundled(n_h, n_a)
    result = load_result(src)
    if trial is None:
        chosen = Selection.load(src / "selection.json"), cna_lens.NeuronSet.load(src / "neurons.json")
        return cfg, data, *chosen, result["chosen"]["number"]
    row = next((t for t in result["trials"] if t["number"] == trial), None)
    if row is None:
        raise SystemExit(f"{src} has no complete trial {trial}")
    sel = Selection.from_dict(row["selection"])
    neurons = sel.neurons(Attribution.load(src / "attribution"), saved_effects(src))  # as the search computed them
    if len(neurons) != row["n_neurons"]:
        raise SystemExit(f"trial {trial}: {len(neurons)} neurons, but the search measured {row['n_neurons']}")
    return cfg, data, sel, neurons, trial


def measure_trial(src: Path, cfg: dict, model, data: SearchData, neurons, scale: float, repeats: int) -> dict:
    """``Search.measure`` of the trial (as the search runs it) next to the harmful scoring pass under the
    hooks that its prefill scores replace, alternating; and the two scores' differences."""
    ids = refusal_token_ids(model.tokenizer)
    hooked, stock = neuron_forms(model, neurons, scale)
    base = {"harmless": final_logprobs(model, list(data.harmless), batch_size=int(cfg["batch_size"]), engine="auto")}
    with tempfile.TemporaryDirectory() as tmp:
        search = Search(
            tmp,
            model=cfg["model"],
            data=data,
            objective="judge",
            judge=cfg["judge"],
            max_new_tokens=int(cfg["max_new_tokens"]),
            batch_size=int(cfg["batch_size"]),
            generation_batch_size=int(cfg["generation_batch_size"]),
        )
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            out, lp = search.measure(model, hooked, base, stock)
            measured = time.perf_counter() - t
            t = time.perf_counter()
            with hooked():
                hooks_lp = final_logprobs(model, list(data.harmful), batch_size=int(cfg["batch_size"]))
            runs.append({"measure_seconds": measured, "harmful_scoring_pass_seconds": time.perf_counter() - t})
            saved = runs[-1]["harmful_scoring_pass_seconds"]
            print(f"trial: {measured:.1f} s; the harmful scoring pass its prefill replaces: {saved:.1f} s", flush=True)
    prefill, hooks = refusal_score(lp["harmful"], ids), refusal_score(hooks_lp, ids)
    return {
        "values": out["values"],
        "runs": runs,
        "first_token_compliance": {"prefill": out["first_token_compliance"], "hooks": share(hooks <= 0)},
        "refusal_score_max_abs_difference": float((prefill - hooks).abs().max()),
        "refusal_score_sign_flips": int(((prefill <= 0) != (hooks <= 0)).sum()),
    }


if __name__ == "__main__":
    main()
