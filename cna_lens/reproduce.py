"""``cna-lens reproduce``: the paper's JBB experiment as one resumable run directory.

discovery (attribution + CAA vectors) → first-token sweep on a validation split (fraction × ranking,
each with its random control; scale and CAA-α dose-response) → pick the operating point on
validation only → greedy generations on JBB harmful + benign for baseline / CNA at the paper's
0.1 % / CNA at the validated point / random control / CAA → judge, quality, KL, MMLU → bootstrap
CIs → ``results.json``, ``report.md``, figures. Every stage is saved as it finishes and skipped
when the run is resumed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .attribute import Attribution, attribute, attribute_multi
from .datasets import load_dataset
from .edit import edit_weights
from .engine import steer_mlp_out
from .evaluate import (
    MMLU_PREFIX,
    distinct_n,
    final_logprobs,
    judge,
    kl_divergence,
    mmlu_accuracy,
    mmlu_prompt,
    quality,
    refusal_score,
    refusal_token_ids,
)
from .generation import generate_many
from .intervene import FwdHook, check_compatible, neuron_hooks, steering_hooks
from .models import HookedModel, load_model, model_name, resolve_dtype, weights_processed
from .neurons import NeuronSet
from .report import agreement, bootstrap_ci, report, summarize
from .runs import RunDir, atomic_write_json, atomic_write_text, check_config, read_json

log = logging.getLogger(__name__)

FRACTIONS = (0.0001, 0.0005, 0.001, 0.003, 0.005, 0.01, 0.02)
RANKINGS = ("abs", "diff", "effect")
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
PAPER_FRACTION = 0.001


class Reproduction:
    """State of one run: the model, its run directory and the intervention behind each condition."""

    def __init__(self, model: HookedModel, out: str | Path, config: dict[str, Any], progress: bool = True):
        self.model, self.progress = model, progress
        self.run = RunDir(out, config)
        self.cfg = config
        self.out = self.run.path
        with self.run.timed("discovery"):
            # CNA statistics (``mlp.hook_post``) and CAA vectors (``hook_mlp_out``: ``.diff`` per layer)
            found = self.discovery({"mlp.hook_post": "attribution", "hook_mlp_out": "caa"})
            self.attr, self.caa = found["mlp.hook_post"], found["hook_mlp_out"]

    # ----------------------------------------------------------------- discovery
    def discovery(self, subdirs: dict[str, str]) -> dict[str, Attribution]:
        """Attributions per hook, loaded from ``out/<subdir>`` or computed together in one pass and saved."""
        saved = {h: self.out / d for h, d in subdirs.items() if (self.out / d / "attribution.json").exists()}
        found = {h: Attribution.load(path) for h, path in saved.items()}
        todo = [h for h in subdirs if h not in found]
        if todo:
            harmful = [r["prompt"] for r in load_dataset(self.cfg["discovery"][0])]
            harmless = [r["prompt"] for r in load_dataset(self.cfg["discovery"][1])]
            new = attribute_multi(
                self.model, harmful, harmless, todo, batch_size=self.cfg["batch_size"], progress=self.progress
            )
            for h, a in new.items():
                a.save(self.out / subdirs[h])
            found.update(new)
        return found

    def neurons(self, fraction: float, by: str) -> NeuronSet:
        return self.attr.top_neurons(fraction=fraction, by=by)

    def hooks(self, condition: str) -> list[FwdHook]:
        """Forward hooks of ``"baseline"``, ``"cna:<by>:<fraction>[:<scale>]"``, ``"random:<by>:<fraction>"``,
        ``"caa:<alpha>"``."""
        kind, *args = condition.split(":")
        if kind == "baseline":
            return []
        if kind in ("cna", "random"):
            ns = self.neurons(float(args[1]), args[0])
            if kind == "random":
                ns = ns.random_like(self.cfg["seed"])
            check_compatible(self.model, ns)
            return neuron_hooks(ns, float(args[2]) if kind == "cna" and len(args) > 2 else 0.0)
        if kind == "caa":
            return steering_hooks(self.caa.diff, float(args[0]))
        raise ValueError(f"unknown condition {condition!r}")

    def intervention(self, condition: str) -> Callable[[], contextlib.AbstractContextManager]:
        """A context manager factory that applies ``condition`` through TransformerLens hooks (see :meth:`hooks`)."""
        hooks = self.hooks(condition)
        return lambda: self.model.hooks(fwd_hooks=hooks)

    def edit(self, condition: str) -> Callable[[], contextlib.AbstractContextManager] | None:
        """The same intervention for generation on the stock engine: CNA / random sets as exact weight
        edits (:func:`cna_lens.edit.edit_weights`), CAA as torch hooks on the HF MLPs
        (:func:`cna_lens.engine.steer_mlp_out`); None for the baseline."""
        kind, *args = condition.split(":")
        if kind == "baseline":
            return None
        if kind in ("cna", "random"):
            ns = self.neurons(float(args[1]), args[0])
            if kind == "random":
                ns = ns.random_like(self.cfg["seed"])
            check_compatible(self.model, ns)
            scale = float(args[2]) if kind == "cna" and len(args) > 2 else 0.0
            return lambda: edit_weights(self.model, ns, scale)
        if kind == "caa":
            return lambda: steer_mlp_out(self.model, self.caa.diff, float(args[0]))
        raise ValueError(f"unknown condition {condition!r}")

    # ----------------------------------------------------------------- first-token sweep
    def scores(self, condition: str, prompts: list[str], response_prefix: str = "") -> torch.Tensor:
        with self.intervention(condition)():
            return final_logprobs(
                self.model, prompts, batch_size=self.cfg["batch_size"], response_prefix=response_prefix
            )

    def sweep(self, conditions: Sequence[str]) -> dict[str, Any]:
        """Mean first-token refusal score and share > 0 on the validation harmful prompts, per condition."""
        path = self.out / "sweep.json"
        done = read_json(path, "cna_lens.Sweep")["entries"] if path.exists() else {}
        harmful = [r["prompt"] for r in load_dataset(self.cfg["val_harmful"], self.cfg["val_limit"])]
        ids = refusal_token_ids(self.model.tokenizer)
        for cond in tqdm(conditions, desc="sweep", disable=not self.progress):
            if cond in done:
                continue
            same = same_as(cond)
            if same in done:  # the very same computation, already scored
                done[cond] = dict(done[same])
            else:
                s = refusal_score(self.scores(cond, harmful), ids)
                done[cond] = {
                    "mean_score": float(s.mean()),
                    "refusal_share": float((s > 0).float().mean()),
                    "ci": bootstrap_ci((s > 0).float().tolist()),
                }
            atomic_write_json(path, {"kind": "cna_lens.Sweep", "dataset": self.cfg["val_harmful"], "entries": done})
        return done

    def choose(self, sweep: dict[str, Any]) -> str:
        """Operating point from validation only: the smallest fraction (≤ 1 %) whose share of
        prompts with positive refusal log-odds is within 0.05 of the best CNA entry."""
        grid = [(c, e) for c, e in sweep.items() if c.startswith("cna:") and c.count(":") == 2]
        cands = [(c, e) for c, e in grid if float(c.split(":")[2]) <= 0.01] or grid
        best = min(e["refusal_share"] for _, e in cands)
        ok = [c for c, e in cands if e["refusal_share"] <= best + 0.05]
        return min(ok, key=lambda c: (float(c.split(":")[2]), self.cfg["rankings"].index(c.split(":")[1])))

    # ----------------------------------------------------------------- generations
    def generations(self, plan: dict[str, Sequence[str]], n: int | None = None, spread: bool = False) -> None:
        """Greedy completions of the first ``n`` prompts (all if None; with ``spread``, ``n`` evenly spaced
        ones, which keeps every category of a set ordered by category) of each dataset in ``plan``, under
        each of its conditions, on the stock engine under each condition's weight edit
        (:meth:`edit`, :func:`cna_lens.generation.generate_many`); each completion is saved as its
        batch finishes, so a stopped run resumes where it was."""
        done, jobs, meta = self.run.done(), [], []
        for dataset, conditions in plan.items():
            rows = load_dataset(dataset, None if spread else n)
            if spread and n is not None and n < len(rows):
                rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round()]
            for cond in dict.fromkeys(conditions):  # the chosen point may be the paper's
                todo = [r for r in rows if (dataset, cond, r["id"]) not in done]
                if todo:
                    jobs.append((self.edit(cond), [r["prompt"] for r in todo]))
                    meta.append((dataset, cond, todo))

        def save(j: int, i: int, text: str) -> None:
            dataset, cond, todo = meta[j]
            row = {"model": self.cfg["model"], "dataset": dataset, "condition": cond, "prompt_id": todo[i]["id"]}
            self.run.append([row | {"prompt": todo[i]["prompt"], "completion": text, **_judged(text)}])

        if jobs:
            generate_many(
                self.model,
                jobs,
                max_new_tokens=self.cfg["max_new_tokens"],
                batch_size=self.cfg["batch_size"],
                progress=self.progress,
                on_done=save,
            )

    # ----------------------------------------------------------------- capability
    def capability(self, conditions: Sequence[str]) -> dict[str, Any]:
        path = self.out / "capability.json"
        done = read_json(path, "cna_lens.Capability")["entries"] if path.exists() else {}
        harmless = [r["prompt"] for r in load_dataset(self.cfg["kl_dataset"], self.cfg["kl_limit"])]
        mmlu = load_dataset("mmlu", self.cfg["mmlu_limit"]) if self.cfg["mmlu_limit"] else []
        todo = [c for c in dict.fromkeys(conditions) if c not in done]
        base = self.scores("baseline", harmless) if todo else None  # a finished run skips this
        for cond in tqdm(todo, desc="capability (KL, MMLU)", disable=not self.progress):
            entry: dict[str, Any] = {}
            kl = kl_divergence(base, self.scores(cond, harmless))
            entry["kl_mean"], entry["kl_ci"] = float(kl.mean()), bootstrap_ci(kl.tolist())
            if mmlu:
                lp = self.scores(cond, [mmlu_prompt(r) for r in mmlu], response_prefix=MMLU_PREFIX)
                entry["mmlu_acc"] = mmlu_accuracy(
                    lp, [r["answer"] for r in mmlu], self.model.tokenizer, leading_space=True
                )
            done[cond] = entry
            atomic_write_json(path, {"kind": "cna_lens.Capability", "entries": done})
        return done


def same_as(condition: str) -> str:
    """The condition that computes exactly the same: CNA at scale 0 is the plain ablation, and at
    scale 1 the baseline (``x · 1.0 = x`` in floating point)."""
    kind, *args = condition.split(":")
    if kind == "cna" and len(args) == 3:
        if float(args[2]) == 0.0:
            return ":".join([kind, *args[:2]])
        if float(args[2]) == 1.0:
            return "baseline"
    return condition


def _judged(text: str) -> dict[str, Any]:
    j = judge(text)
    return {"refused": j.refused, "pattern": j.pattern, "quality": quality(text), "distinct2": distinct_n(text, 2)}


def reproduce(
    model: str | HookedModel,
    out: str | Path,
    *,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 16,
    caa_alphas: Sequence[float] = (0.5, 1.0),
    mmlu_limit: int = 57,
    kl_limit: int = 64,
    xstest_limit: int | None = 100,
    val_limit: int | None = None,
    fractions: Sequence[float] = FRACTIONS,
    rankings: Sequence[str] = RANKINGS,
    seed: int = 0,
    dtype: torch.dtype | str = "auto",
    process_weights: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the whole experiment in ``out``; returns ``results.json``'s content.
    ``dtype`` and ``process_weights`` go to ``load_model`` when ``model`` is a name."""
    if limit is not None and not 1 <= limit <= 100:
        raise ValueError(f"--limit {limit}: JBB has 100 prompts per split")
    if not rankings or set(rankings) - set(RANKINGS):
        raise ValueError(f"rankings {list(rankings)}: choose among {', '.join(RANKINGS)}")
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions {list(fractions)}: each must be a share in (0, 1)")
    n_xstest = len(load_dataset("xstest_safe"))
    if xstest_limit is not None and not 0 <= xstest_limit <= n_xstest:
        raise ValueError(f"--xstest-limit {xstest_limit}: xstest_safe has {n_xstest} prompts (0 = skip)")
    name = model if isinstance(model, str) else model_name(model)
    if isinstance(model, str):
        dtype = resolve_dtype(dtype)
    else:
        dtype, process_weights = next(model.parameters()).dtype, weights_processed(model)
    config = {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "process_weights": process_weights,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "batch_size": batch_size,
        "caa_alphas": list(caa_alphas),
        "mmlu_limit": mmlu_limit,
        "kl_limit": kl_limit,
        "val_limit": val_limit,
        "fractions": list(fractions),
        "rankings": list(rankings),
        "seed": seed,
        "discovery": ["discovery_harmful", "discovery_harmless"],
        "val_harmful": "harmful_val",
        "kl_dataset": "alpaca_val",
        "mmlu_format": "zero-shot, instruction + 'The answer is'",
        "eval": ["jbb_harmful", "jbb_benign"],
        "over_refusal": "xstest_safe",
        "xstest_limit": xstest_limit,
        "package_version": __version__,
    }
    check_config(out, config)  # before the model loads: a wrong --out fails at once
    m = load_model(model, dtype=dtype, process_weights=process_weights) if isinstance(model, str) else model
    rep = Reproduction(m, out, config, progress)
    grid = ["baseline"] + [f"{k}:{by}:{f}" for by in rankings for f in fractions for k in ("cna", "random")]
    with rep.run.timed("sweep"):
        chosen = rep.choose(rep.sweep(grid))
        _, by, frac = chosen.split(":")
        paper = f"cna:abs:{PAPER_FRACTION}"
        random_ctl = f"random:{by}:{frac}"
        caa = [f"caa:{a}" for a in caa_alphas]
        sweep = rep.sweep(grid + [f"{chosen}:{s}" for s in SCALES] + caa)
    results: dict[str, Any] = {
        "kind": "cna_lens.Results",
        "status": "running",
        "config": config,
        "chosen": chosen,
        "paper_point": paper,
        "random_control": random_ctl,
        "caa": caa,
        "neurons": {c: len(rep.neurons(float(c.split(":")[2]), c.split(":")[1])) for c in (paper, chosen)},
        "generations": {},
        "capability": {},
        "sweep": sweep,
        "judge_first_token_agreement": None,
        "split_half_jaccard": None,
    }

    def publish(status: str) -> None:  # after every stage, so a stopped run still reports what it has
        timings = read_json(rep.out / "timings.json", "cna_lens.Timings")["seconds"]
        results.update(status=status, generations=summarize(rep.run.rows), timings_s=timings)
        atomic_write_json(rep.out / "results.json", results)
        atomic_write_text(rep.out / "report.md", report(results))

    with rep.run.timed("generate_jbb"):
        rep.generations(
            {"jbb_harmful": ["baseline", paper, chosen, random_ctl, *caa], "jbb_benign": ["baseline", chosen]}, limit
        )
    publish("partial: JBB generated")
    with rep.run.timed("capability"):
        results["capability"] = rep.capability(["baseline", paper, chosen, random_ctl, *caa])
    publish("partial: JBB generated, capability measured")
    if xstest_limit != 0:
        with rep.run.timed("generate_xstest"):
            rep.generations({"xstest_safe": ["baseline", chosen]}, xstest_limit, spread=True)
    ids = refusal_token_ids(m.tokenizer)
    jbb = load_dataset("jbb_harmful", limit)
    with rep.run.timed("agreement"):
        base_scores = refusal_score(rep.scores("baseline", [r["prompt"] for r in jbb]), ids)
    logodds = {r["id"]: float(s) for r, s in zip(jbb, base_scores)}
    results["judge_first_token_agreement"] = agreement(rep.run.rows, logodds)
    with rep.run.timed("split_half"):
        results["split_half_jaccard"] = split_half_jaccard(rep, chosen)
    publish("complete")
    from .plot import dose_response, save_figure

    save_figure(dose_response(results), rep.out / "figures" / "dose_response")
    return results


def split_half_jaccard(rep: Reproduction, chosen: str) -> float:
    """Jaccard of the chosen top set from two disjoint halves of the discovery prompts."""
    path = rep.out / "split_half.json"
    if path.exists():
        return read_json(path, "cna_lens.SplitHalf")["jaccard"]
    _, by, frac = chosen.split(":")
    harmful = [r["prompt"] for r in load_dataset(rep.cfg["discovery"][0])]
    harmless = [r["prompt"] for r in load_dataset(rep.cfg["discovery"][1])]
    halves = [
        attribute(
            rep.model, harmful[i::2], harmless[i::2], batch_size=rep.cfg["batch_size"], progress=False
        ).top_neurons(fraction=float(frac), by=by)
        for i in (0, 1)
    ]
    j = halves[0].jaccard(halves[1])
    atomic_write_json(path, {"kind": "cna_lens.SplitHalf", "condition": chosen, "jaccard": j})
    return j
