"""The stages of a reproduction run, each saved in the run directory as it finishes and skipped
(or continued) when the run is resumed.

* discovery: final-token statistics of ``mlp.hook_post`` (CNA), ``hook_mlp_out`` (CAA vectors) and
  ``hook_resid_pre`` (single-layer CAA, refusal direction) from one pass over the discovery prompts;
* the refusal direction's layer, chosen on validation prompts (:func:`cna_lens.controls.choose_direction_layer`);
* first-token scores (TransformerLens hooks): the validation sweep, per-prompt scores on the
  evaluation prompts, the held-out transfer split;
* the judged validation sweep: short greedy generations on the validation prompts, three-way judged;
* greedy generations on the stock engine under each condition's weight edit;
* capability: KL on harmless prompts, MMLU predictions per item (for McNemar against the baseline);
* perplexity of each completion under the unmodified model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .attribute import Attribution, attribute, attribute_multi
from .conditions import Condition, Interventions
from .controls import choose_direction_layer
from .datasets import load_dataset
from .datasets import spread as spread_rows
from .evaluate import distinct_n, final_logprobs, judge, kl_divergence, quality, refusal_score, refusal_token_ids
from .generation import generate_many
from .hooks import HookedModel
from .judge import judge_completions
from .judge_head import LABELS
from .neurons import NeuronSet
from .report import bootstrap_ci
from .runs import RunDir, add_seconds, append_jsonl, atomic_write_json, atomic_write_text, jsonl, read_json
from .scoring import label_rates, mmlu_leading_space, mmlu_predictions, perplexity
from .selection import Selection

HOOKS = {"mlp.hook_post": "attribution", "hook_mlp_out": "caa", "hook_resid_pre": "resid"}
BASELINE = Condition("baseline")


def prompts_of(dataset: str, n: int | None = None, spread: bool = False) -> list[dict[str, Any]]:
    """The first ``n`` rows of ``dataset`` (all if None); with ``spread``, ``n`` evenly spaced ones
    (which keeps every category of a set ordered by category)."""
    return spread_rows(load_dataset(dataset), n) if spread else load_dataset(dataset, n)


class Reproduction:
    """The model, its run directory and the interventions behind the conditions."""

    def __init__(
        self,
        model: HookedModel,
        out: str | Path,
        config: dict[str, Any],
        progress: bool = True,
        selection: Selection | None = None,
        neurons_file: Path | None = None,
    ):
        self.model, self.progress = model, progress
        self.run = RunDir(out, config)
        self.cfg = config
        self.out = self.run.path
        with self.run.timed("discovery"):
            found = self.discovery(HOOKS)
        chosen = None
        if selection is not None:
            chosen = (selection, self._selection_neurons(selection, found["mlp.hook_post"], neurons_file))
        self.iv = Interventions(
            model, found["mlp.hook_post"], found["hook_mlp_out"], found["hook_resid_pre"], config["seed"], chosen
        )

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

    def _selection_neurons(self, selection: Selection, attr: Attribution, given: Path | None) -> NeuronSet:
        """The selection's neurons, saved with it in ``selection/``: ``given`` (the search's own
        ``neurons.json``), else computed here (pruning estimates per-neuron effects on the
        validation prompts)."""
        path = self.out / "selection" / "neurons.json"
        if path.exists():
            return NeuronSet.load(path)
        if given is not None:
            ns = NeuronSet.load(given)
            if (ns.n_layers, ns.d_mlp) != (attr.n_layers, attr.d_mlp):
                raise ValueError(
                    f"{given} is for a {ns.n_layers} × {ns.d_mlp} model, this one is {attr.n_layers} × {attr.d_mlp}"
                )
            ns.save(path)
            selection.save(self.out / "selection" / "selection.json")
            return ns
        effects = None
        if selection.prune:
            from .selection import estimate_effects

            val = [r["prompt"] for r in load_dataset(self.cfg["val_harmful"], self.cfg["val_limit"])]
            effects = estimate_effects(self.model, val, batch_size=self.cfg["batch_size"])
        ns = selection.neurons(attr, effects)
        ns.save(path)
        selection.save(self.out / "selection" / "selection.json")  # last: a stored selection has its neurons
        return ns

    # ----------------------------------------------------------------- first-token scores
    def scores(self, c: Condition, prompts: list[str], response_prefix: str = "") -> torch.Tensor:
        with self.iv.hooked(c):
            return final_logprobs(
                self.model, prompts, batch_size=self.cfg["batch_size"], response_prefix=response_prefix
            )

    def refusal_scores(self, c: Condition, prompts: list[str]) -> torch.Tensor:
        return refusal_score(self.scores(c, prompts), refusal_token_ids(self.model.tokenizer))

    def direction_layer(self) -> dict[str, Any]:
        """The refusal direction's layer (lowest validation refusal score with KL ≤ 0.1 nats on
        harmless prompts), saved in ``direction.json``."""
        path = self.out / "direction.json"
        if path.exists():
            return read_json(path, "cna_lens.DirectionChoice")
        val = [r["prompt"] for r in load_dataset(self.cfg["val_harmful"], self.cfg["val_limit"])]
        harmless = [r["prompt"] for r in load_dataset(self.cfg["kl_dataset"], self.cfg["kl_limit"])]
        choice = choose_direction_layer(
            self.model, self.iv.resid, val, harmless=harmless, batch_size=self.cfg["batch_size"], progress=self.progress
        )
        data = {"kind": "cna_lens.DirectionChoice", "val_dataset": self.cfg["val_harmful"], **choice.to_dict()}
        atomic_write_json(path, data)
        return data

    def sweep(self, conditions: Sequence[Condition]) -> dict[str, Any]:
        """Mean first-token refusal score and share > 0 on the validation harmful prompts, per condition."""
        path = self.out / "sweep.json"
        done = read_json(path, "cna_lens.Sweep")["entries"] if path.exists() else {}
        harmful = [r["prompt"] for r in load_dataset(self.cfg["val_harmful"], self.cfg["val_limit"])]
        for c in tqdm(conditions, desc="sweep", disable=not self.progress):
            same = c.same_as().key
            if c.key in done:
                continue
            if same in done:  # the very same computation, already scored
                done[c.key] = dict(done[same])
            else:
                s = self.refusal_scores(c, harmful)
                done[c.key] = {
                    "mean_score": float(s.mean()),
                    "refusal_share": float((s > 0).float().mean()),
                    "ci": bootstrap_ci((s > 0).float().tolist()),
                }
            atomic_write_json(path, {"kind": "cna_lens.Sweep", "dataset": self.cfg["val_harmful"], "entries": done})
        return done

    def judged_sweep(self, conditions: Sequence[Condition]) -> dict[str, Any]:
        """Per condition, the judged refuse / comply / evade shares (Wilson 95 % CIs) of greedy
        completions (``choose_tokens`` new tokens) of the validation harmful prompts. Completions are
        appended to ``val_completions.jsonl`` as they finish, then labelled (file rewritten in place)."""
        path = self.out / "val_completions.jsonl"
        rows = RunDir.read_rows(path) if path.exists() else []
        have = {(r["condition"], r["prompt_id"]) for r in rows}
        val = load_dataset(self.cfg["val_harmful"], self.cfg["val_limit"])
        jobs, meta = [], []
        for c in dict.fromkeys(conditions):
            todo = [r for r in val if (c.key, r["id"]) not in have]
            if todo:
                jobs.append((self.iv.edit(c), [r["prompt"] for r in todo]))
                meta.append((c.key, todo))

        def save(j: int, i: int, text: str) -> None:
            key, todo = meta[j]
            append_jsonl(
                path, [{"condition": key, "prompt_id": todo[i]["id"], "prompt": todo[i]["prompt"], "completion": text}]
            )

        if jobs:
            generate_many(
                self.model,
                jobs,
                max_new_tokens=self.cfg["choose_tokens"],
                batch_size=self.cfg["batch_size"],
                progress=self.progress,
                on_done=save,
            )
        rows = RunDir.read_rows(path) if path.exists() else []
        todo = [r for r in rows if "label" not in r]
        if todo:
            verdicts = judge_completions(
                [r["prompt"] for r in todo], [r["completion"] for r in todo], self.cfg["judge"], progress=self.progress
            )
            for r, v in zip(todo, verdicts):
                r.update(label=v.label, confidence=round(v.confidence, 4), judge=v.judge)
            atomic_write_text(path, jsonl(rows))
        keys = {c.key for c in conditions}
        labels: dict[str, list[str]] = {}
        for r in rows:
            if r["condition"] in keys:
                labels.setdefault(r["condition"], []).append(r["label"])
        return {k: {"n": len(v), **label_rates(v, LABELS)} for k, v in labels.items()}

    def prompt_scores(
        self, name: str, dataset: str, conditions: Sequence[Condition], limit: int | None = None
    ) -> dict[str, Any]:
        """Per condition, the first-token refusal log-odds of the first ``limit`` prompts of ``dataset``
        (None: all), saved in ``<name>.json`` as ``{condition: {prompt_id: score}}``."""
        path = self.out / f"{name}.json"
        done = read_json(path, "cna_lens.PromptScores")["scores"] if path.exists() else {}
        rows = prompts_of(dataset, limit)
        todo = [c for c in dict.fromkeys(conditions) if c.key not in done]
        for c in tqdm(todo, desc=f"first-token scores ({dataset})", disable=not self.progress):
            s = self.refusal_scores(c, [r["prompt"] for r in rows])
            done[c.key] = {r["id"]: float(x) for r, x in zip(rows, s)}
            atomic_write_json(path, {"kind": "cna_lens.PromptScores", "dataset": dataset, "scores": done})
        return done

    # ----------------------------------------------------------------- generations
    def generations(self, plan: dict[str, Sequence[Condition]], n: int | None = None, spread: bool = False) -> None:
        """Greedy completions of ``n`` prompts of each dataset in ``plan`` (:func:`prompts_of`) under each
        of its conditions, on the stock engine under each condition's edit (:meth:`Interventions.edit`);
        each completion is saved as it finishes, so a stopped run resumes where it was."""
        done, jobs, meta = self.run.done(), [], []
        for dataset, conditions in plan.items():
            rows = prompts_of(dataset, n, spread)
            for c in dict.fromkeys(conditions):
                todo = [r for r in rows if (dataset, c.key, r["id"]) not in done]
                if todo:
                    jobs.append((self._timed(f"{dataset} {c.key}", self.iv.edit(c)), [r["prompt"] for r in todo]))
                    meta.append((dataset, c.key, todo))

        def save(j: int, i: int, text: str) -> None:
            dataset, key, todo = meta[j]
            row = {"model": self.cfg["model"], "dataset": dataset, "condition": key, "prompt_id": todo[i]["id"]}
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

    def _timed(self, job: str, edit: Callable[[], AbstractContextManager] | None) -> Callable[[], Any]:
        """``edit``'s factory, also adding the wall time spent inside it to ``generation_seconds.json[job]``."""

        @contextmanager
        def timed() -> Iterator[None]:
            t0 = time.perf_counter()
            try:
                with edit() if edit is not None else nullcontext():
                    yield
            finally:
                path = self.out / "generation_seconds.json"
                add_seconds(path, "cna_lens.GenerationSeconds", job, time.perf_counter() - t0)

        return timed

    # ----------------------------------------------------------------- capability
    def capability(self, conditions: Sequence[Condition], mmlu: Sequence[Condition]) -> dict[str, Any]:
        """KL on the harmless prompts for ``conditions``; MMLU predictions (one letter per item) for ``mmlu``."""
        path = self.out / "capability.json"
        done = read_json(path, "cna_lens.Capability")["entries"] if path.exists() else {}
        harmless = [r["prompt"] for r in load_dataset(self.cfg["kl_dataset"], self.cfg["kl_limit"])]
        items = load_dataset("mmlu", self.cfg["mmlu_limit"]) if self.cfg["mmlu_limit"] != 0 else []
        want = {c: c in mmlu and bool(items) for c in dict.fromkeys([*conditions, *mmlu])}
        todo = [c for c, m in want.items() if c.key not in done or (m and "mmlu_predictions" not in done[c.key])]
        base = self.scores(BASELINE, harmless) if todo else None  # a finished run skips this
        lead = mmlu_leading_space(self.model.tokenizer) if items else True
        for c in tqdm(todo, desc="capability (KL, MMLU)", disable=not self.progress):
            entry: dict[str, Any] = done.get(c.key, {})
            if "kl_mean" not in entry:
                kl = kl_divergence(base, self.scores(c, harmless))
                entry["kl_mean"], entry["kl_ci"] = float(kl.mean()), bootstrap_ci(kl.tolist())
            if want[c]:
                with self.iv.hooked(c):
                    entry["mmlu_predictions"] = mmlu_predictions(
                        self.model, items, self.cfg["batch_size"], leading_space=lead, progress=self.progress
                    )
            done[c.key] = entry
            atomic_write_json(path, {"kind": "cna_lens.Capability", "entries": done})
        return done

    # ----------------------------------------------------------------- perplexity
    def perplexity(self, dataset: str, conditions: set[str], chunk: int = 32) -> dict[tuple[str, str], float]:
        """``exp(mean NLL)`` of the completions of ``dataset`` under ``conditions`` (keys), under the
        unmodified model, appended to ``perplexity.jsonl`` chunk by chunk; ``{(condition, prompt_id): ppl}``."""
        path = self.out / "perplexity.jsonl"
        done: dict[tuple[str, str], float] = {}
        if path.exists():
            for row in RunDir.read_rows(path):
                done[row["condition"], row["prompt_id"]] = row["perplexity"]
        todo = [
            r
            for r in self.run.rows
            if r["dataset"] == dataset and r["condition"] in conditions and (r["condition"], r["prompt_id"]) not in done
        ]
        with tqdm(total=len(todo), desc=f"perplexity ({dataset})", disable=not self.progress) as bar:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                ppl = perplexity(
                    self.model, [r["prompt"] for r in part], [r["completion"] for r in part], self.cfg["batch_size"]
                )
                rows = [
                    {"dataset": dataset, "condition": r["condition"], "prompt_id": r["prompt_id"], "perplexity": p}
                    for r, p in zip(part, ppl)
                ]
                append_jsonl(path, rows)
                done.update({(x["condition"], x["prompt_id"]): x["perplexity"] for x in rows})
                bar.update(len(part))
        return done

    # ----------------------------------------------------------------- stability
    def split_half_jaccard(self, chosen: Condition) -> float:
        """Jaccard of the chosen top set from two disjoint halves of the discovery prompts."""
        path = self.out / "split_half.json"
        if path.exists():
            return read_json(path, "cna_lens.SplitHalf")["jaccard"]
        harmful = [r["prompt"] for r in load_dataset(self.cfg["discovery"][0])]
        harmless = [r["prompt"] for r in load_dataset(self.cfg["discovery"][1])]
        halves = [
            attribute(
                self.model, harmful[i::2], harmless[i::2], batch_size=self.cfg["batch_size"], progress=False
            ).top_neurons(fraction=chosen.fraction, by=chosen.ranking)
            for i in (0, 1)
        ]
        j = halves[0].jaccard(halves[1])
        atomic_write_json(path, {"kind": "cna_lens.SplitHalf", "condition": chosen.key, "jaccard": j})
        return j


def _judged(text: str) -> dict[str, Any]:
    j = judge(text)
    return {"refused": j.refused, "pattern": j.pattern, "quality": quality(text), "distinct2": distinct_n(text, 2)}


#: the run files with one entry per condition: JSON lines (a ``condition`` field) and JSON maps
_ROW_FILES = ("completions.jsonl", "verdicts.jsonl", "perplexity.jsonl", "val_completions.jsonl")
_MAP_FILES = {
    "capability.json": "entries",
    "sweep.json": "entries",
    "first_token.json": "scores",
    "heldout.json": "scores",
}


def drop_condition(out: str | Path, key: str) -> None:
    """Remove every result of condition ``key`` from the run in ``out`` (for ``selection``, its stored
    selection last, so a stopped drop is redone). Each file is rewritten atomically."""
    import shutil

    out = Path(out)
    for name in _ROW_FILES:
        if (out / name).exists():
            rows = RunDir.read_rows(out / name)
            atomic_write_text(out / name, jsonl(r for r in rows if r.get("condition") != key))
    for name, field in _MAP_FILES.items():
        if (out / name).exists():
            data = json.loads((out / name).read_text(encoding="utf-8"))
            data[field].pop(key, None)
            atomic_write_json(out / name, data)
    if (out / "generation_seconds.json").exists():
        data = json.loads((out / "generation_seconds.json").read_text(encoding="utf-8"))
        data["seconds"] = {job: t for job, t in data["seconds"].items() if job.split(" ", 1)[-1] != key}
        atomic_write_json(out / "generation_seconds.json", data)
    if key == "selection" and (out / "selection").exists():
        shutil.rmtree(out / "selection")
