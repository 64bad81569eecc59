"""Search over :class:`~cna_lens.selection.Selection` s for a compliance × side-effect Pareto front.

Each trial picks a selection (ranking, share, layer window, pruning, scale, λ), applies it, and
measures on **validation prompts only** (none used for discovery or pruning):

    compliance   = share of ``harmful`` prompts with first-token refusal log-odds s(x) ≤ 0   (max)
                   (``objective="judge"``: share judged "comply" on short greedy generations)
    kl           = mean over ``harmless`` prompts of KL(p_base ‖ p_S), next-token distribution (min)
    over_refusal = share of ``benign`` prompts with s(x) > 0                                   (min)

Optuna's multi-objective TPE proposes the selections: a maintained sampler for mixed categorical /
log-scaled / integer spaces, and its SQLite storage (``study.db``) makes a stopped search resume.
The sampler of trial n is seeded from ``(seed, n)``, so a search stopped after n trials and resumed
proposes what an uninterrupted one would. With ``trial_batch=K`` (judged objective) K trials are
proposed at once (TPE's constant liar: a running trial counts as a bad one, so the batch spreads) and
their answers decoded in one batch (:mod:`cna_lens.speed.grouped`); a search resumed after a multiple
of K trials proposes what an uninterrupted one would. Discovery statistics, pruning effects and baseline
log-probabilities are computed once (and saved); a trial costs only its own forward passes.
With ``Rule(confirm_top=k)`` the rule's first k points are measured again on fresh prompts and the
choice is made on those (:mod:`cna_lens.confirm`). With quality prompts (``SearchData.quality``) every
trial also answers them at length, and ``Rule.quality_margin`` bounds its answer quality
(:mod:`cna_lens.quality`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .attribute import Attribution, attribute_multi
from .confirm import ConfirmData, confirm
from .datasets import SearchData
from .engine import stock_runs
from .evaluate import final_logprobs, kl_divergence, refusal_score, refusal_token_ids
from .hooks import HookedModel
from .models import model_name
from .pareto import OBJECTIVES, Rule, build_result
from .quality import check_quality, measure_quality, search_baseline, violation
from .runs import RunDir, atomic_write, atomic_write_json, exclusive, read_json
from .search_refs import CAA_ALPHAS, REFERENCE_FRACTIONS, measure_trials, reference_curves
from .selection import SearchSpace, Selection, estimate_effects, save_effects, saved_effects

log = logging.getLogger(__name__)

STUDY = "cna_lens.search"
OBJECTIVE_KINDS = ("first_token", "judge")


def share(mask: torch.Tensor) -> float:
    """k / n as a Python float (exactly the fraction, unlike a float32 mean)."""
    return int(mask.sum()) / mask.numel()


def judge_function(judge: str = "default") -> Callable[..., Any]:
    """:func:`cna_lens.judge.judge_completions`, after checking the judge's name (no model loads)."""
    from .judge import judge_completions, resolve_judge

    resolve_judge(judge)  # an unknown judge name fails here, before any model work
    return judge_completions


class Search:
    """A resumable search in directory ``out``. The constructor validates every setting and pins
    them in ``config.json`` (a directory holding another search is refused) before any model work."""

    def __init__(
        self,
        out: str | Path,
        *,
        model: str,
        data: SearchData,
        space: SearchSpace | None = None,
        rule: Rule | None = None,
        seed: int = 0,
        objective: str = "first_token",
        judge: str = "default",
        max_new_tokens: int = 32,
        batch_size: int = 16,
        generation_batch_size: int = 32,
        startup_trials: int = 10,
        reference_fractions: Sequence[float] = REFERENCE_FRACTIONS,
        caa_alphas: Sequence[float] = CAA_ALPHAS,
        dtype: str = "",
        confirm_data: ConfirmData | None = None,
        trial_batch: int = 1,
    ):
        if objective not in OBJECTIVE_KINDS:
            raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVE_KINDS)}")
        self.judge_fn = judge_function(judge) if objective == "judge" else None
        for name, v, lo in (
            ("seed", seed, 0),
            ("max_new_tokens", max_new_tokens, 1),
            ("batch_size", batch_size, 1),
            ("generation_batch_size", generation_batch_size, 1),
            ("startup_trials", startup_trials, 1),
            ("trial_batch", trial_batch, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if trial_batch > 1 and objective != "judge":
            raise ValueError(
                f"trial_batch={trial_batch} decodes several trials' answers together; only objective='judge' "
                "generates answers (first-token trials need no batching)"
            )
        if not all(0 < f <= 1 for f in reference_fractions):
            raise ValueError(f"reference_fractions must lie in (0, 1], got {list(reference_fractions)}")
        if not all(math.isfinite(a) for a in caa_alphas):
            raise ValueError(f"caa_alphas must be finite, got {list(caa_alphas)}")
        space, rule = space or SearchSpace(), rule or Rule()
        if not isinstance(space, SearchSpace) or not isinstance(rule, Rule) or not isinstance(data, SearchData):
            raise TypeError("space, rule and data must be a SearchSpace, a Rule and a SearchData")
        if rule.confirm_top and not isinstance(confirm_data, ConfirmData):
            raise ValueError(f"rule.confirm_top={rule.confirm_top} needs confirm_data (a ConfirmData of fresh prompts)")
        check_quality(data, rule, confirm_data)
        self.confirm_data = confirm_data
        self.data, self.space, self.rule, self.seed = data, space, rule, seed
        self.objective, self.max_new_tokens, self.batch_size = objective, max_new_tokens, batch_size
        self.generation_batch_size = generation_batch_size
        self.startup, self.trial_batch = startup_trials, trial_batch
        self.ref_fractions, self.caa_alphas = tuple(reference_fractions), tuple(caa_alphas)
        config = {
            "command": "search",
            "model": model,
            "dtype": dtype,
            "package_version": __version__,
            "seed": seed,
            "objective": objective,
            **(
                {"judge": judge, "max_new_tokens": max_new_tokens, "generation_batch_size": generation_batch_size}
                if objective == "judge"
                else {}
            ),
            **({"quality_tokens": rule.quality_tokens} if data.quality is not None else {}),
            "batch_size": batch_size,
            "startup_trials": startup_trials,
            "trial_batch": trial_batch,
            "data": {**data.names, "digest": data.digest()},
            "space": asdict(space),
            "reference_fractions": list(self.ref_fractions),
            "caa_alphas": list(self.caa_alphas),
        }
        self.run_dir = RunDir(out, json.loads(json.dumps(config)))  # as stored: tuples become lists
        self.out = self.run_dir.path
        self.judge = judge

    # ------------------------------------------------------------------ shared, computed once
    def discovery(self, model: HookedModel, progress: bool) -> tuple[Attribution, Attribution]:
        """CNA statistics (``mlp.hook_post``) and CAA vectors (``hook_mlp_out``), saved; the same pass also
        saves the residual-stream statistics the direction curve needs (:meth:`resid`)."""
        dirs = {"mlp.hook_post": self.out / "attribution", "hook_mlp_out": self.out / "caa"}
        if all((d / "attribution.json").exists() for d in dirs.values()):
            return Attribution.load(dirs["mlp.hook_post"]), Attribution.load(dirs["hook_mlp_out"])
        dirs["hook_resid_pre"] = self.out / "resid"
        with self.run_dir.timed("discovery"):
            found = attribute_multi(
                model,
                self.data.discovery_pos,
                self.data.discovery_neg,
                list(dirs),
                batch_size=self.batch_size,
                progress=progress,
            )
        for h, d in dirs.items():
            found[h].save(d)
        return found["mlp.hook_post"], found["hook_mlp_out"]

    def effects(self, model: HookedModel, progress: bool) -> torch.Tensor | None:
        """Per-neuron Δ refusal score for pruning (:func:`estimate_effects` on ``data.effects``), saved."""
        if True not in self.space.prune:
            return None
        if (saved := saved_effects(self.out)) is not None:
            return saved
        with self.run_dir.timed("effects"):
            delta = estimate_effects(model, self.data.effects, batch_size=self.batch_size, progress=progress)
        save_effects(self.out, delta)
        return delta

    # ------------------------------------------------------------------ one measurement
    def measure(
        self,
        model: HookedModel,
        intervention: Callable[[], Any],
        base: dict | None,
        stock: Callable[[], Any] | None = None,
        data: SearchData | None = None,
        answers: tuple[list[str], Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The three objectives (and diagnostics) under an intervention, and the log-probabilities per set;
        ``base`` = the baseline's log-probabilities (None: this is the baseline). ``intervention()``: its
        TransformerLens-hook form; ``stock()``: the same intervention in its stock-engine form (a weight
        edit, or HF module hooks), equal up to float rounding. Everything runs under ``stock()`` where
        there is one, as evaluation generates: the scores on the stock engine, whose prefill computes the
        prompts' common chat prefix once (:func:`final_logprobs`), and in a judged search the harmful
        prompts' first-token scores (a diagnostic there) from the generation's own prefill, so those
        prompts pass through the model once. ``data``: other prompts than the search's (the
        confirmation's); ``answers``: the harmful prompts' answers and first-token log-probabilities,
        already generated under this intervention (:func:`cna_lens.search_refs.measure_trials`). A judged
        measurement keeps each harmful prompt's label (``labels``), for paired tests (:func:`pareto.paired`)."""
        d, bs = data or self.data, self.batch_size
        t0 = time.perf_counter()
        texts = None
        score = lambda prompts: final_logprobs(model, list(prompts), batch_size=bs, engine="auto")  # noqa: E731
        with (stock or intervention)():
            lp = {"harmless": score(d.harmless)}
            if self.judge_fn is None:
                lp["harmful"] = score(d.harmful)
            lp["benign"] = lp["harmless"] if d.benign is None else score(d.benign)
            if self.judge_fn is not None:
                texts, first = answers or self.generate(model, list(d.harmful))
                lp["harmful"] = first if first is not None else score(d.harmful)
        ids = refusal_token_ids(model.tokenizer)
        s = {k: refusal_score(v, ids) for k, v in lp.items()}
        kl = torch.zeros(len(d.harmless)) if base is None else kl_divergence(base["harmless"], lp["harmless"])
        out: dict[str, Any] = {
            "values": {
                "compliance": share(s["harmful"] <= 0),
                "kl": max(0.0, float(kl.mean())),  # KL ≥ 0; float rounding can give -1e-9
                "over_refusal": share(s["benign"] > 0),
            },
            "first_token_compliance": share(s["harmful"] <= 0),
            "mean_refusal_score": float(s["harmful"].mean()),
            "kl_max": float(kl.max()),
        }
        if texts is not None:
            labels = [v.label for v in self.judge_fn(list(d.harmful), texts, judge=self.judge)]
            out["values"]["compliance"] = labels.count("comply") / len(labels)
            out["judged"] = {k: labels.count(k) / len(labels) for k in ("refuse", "comply", "evade")}
            out["labels"] = labels  # per harmful prompt, in order: paired tests between points
            agree = [(float(x) > 0) == (lab != "comply") for x, lab in zip(s["harmful"], labels)]
            out["agreement"] = sum(agree) / len(agree)
        out["seconds"] = time.perf_counter() - t0
        return out, lp

    def generate(self, model: HookedModel, prompts: list[str]) -> tuple[list[str], Tensor | None]:
        """Greedy answers and their prefill's first-token log-probabilities (:func:`generate_scored`)."""
        from .generation import generate_scored

        return generate_scored(
            model, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.generation_batch_size
        )

    def resid(self, model: HookedModel, progress: bool) -> Attribution:
        """Residual-stream statistics (``hook_resid_pre``) on the discovery prompts, for the refusal
        directions of the reference curve: saved by :meth:`discovery`, computed here for a search
        whose discovery did not save them."""
        d = self.out / "resid"
        if (d / "attribution.json").exists():
            return Attribution.load(d)
        with self.run_dir.timed("resid"):
            pos, neg, bs = self.data.discovery_pos, self.data.discovery_neg, self.batch_size
            found = attribute_multi(model, pos, neg, ["hook_resid_pre"], batch_size=bs, progress=progress)
        found["hook_resid_pre"].save(d)
        return found["hook_resid_pre"]

    # ------------------------------------------------------------------ the study
    def sampler(self, n_done: int) -> Any:
        """Multi-objective TPE seeded from ``(seed, n_done)``: resuming proposes what one run would."""
        import optuna

        seed = int(np.random.SeedSequence([self.seed, n_done]).generate_state(1)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate / group
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                n_startup_trials=self.startup,
                n_ei_candidates=128,
                constant_liar=self.trial_batch > 1,  # a batch's later proposals avoid its earlier ones
            )

    def run(self, model: HookedModel, trials: int, progress: bool = True) -> dict[str, Any]:
        """Run until ``trials`` trials are complete (resuming those in ``study.db``); write ``pareto.json``
        and the chosen ``selection.json``; return the result dict."""
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise ValueError(f"trials must be an int >= 1, got {trials!r}")
        with exclusive(self.out / ".lock"):
            return self._run(model, trials, progress)

    def _run(self, model: HookedModel, trials: int, progress: bool) -> dict[str, Any]:
        import optuna

        attr, caa = self.discovery(model, progress)
        effects = self.effects(model, progress)
        baseline, base_lp = self.baseline(model)
        refs_file = self.out / "references.json"
        refs = read_json(refs_file, "cna_lens.SearchReferences")["curves"] if refs_file.exists() else {}
        storage = f"sqlite:///{(self.out / 'study.db').resolve()}"
        directions = ["maximize" if OBJECTIVES[o] else "minimize" for o in OBJECTIVES]
        study = optuna.create_study(
            study_name=STUDY, storage=storage, directions=directions, load_if_exists=True, sampler=self.sampler(0)
        )
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left by a stopped run (single process)
        done = lambda s: len(s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # noqa: E731
        store = search_baseline(self, model) if self.data.quality is not None else None  # the quality answers
        with tqdm(total=trials, initial=min(done(study), trials), desc="search", disable=not progress) as bar:
            while (n := done(study)) < trials:
                study = optuna.load_study(study_name=STUDY, storage=storage, sampler=self.sampler(n))
                asked, sels, sets = [], [], []
                try:
                    for _ in range(min(self.trial_batch, trials - n)):  # each proposal sees the batch's earlier ones
                        asked.append(study.ask())
                        sels.append(self.space.suggest(asked[-1], attr.n_layers))
                        sets.append(sels[-1].neurons(attr, effects))
                    scalings = [(neurons, sel.scale) for neurons, sel in zip(sets, sels)]
                    results = measure_trials(self, model, scalings, baseline, base_lp)
                    if store is not None:
                        measure_quality(self, model, store, [t.number for t in asked], scalings, results)
                except BaseException:
                    for trial in asked:
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                for trial, sel, neurons, res in zip(asked, sels, sets, results):
                    res |= {"selection": sel.to_dict(), "n_neurons": len(neurons), "pruned": neurons.meta["pruned"]}
                    for k, v in res.items():
                        if k != "values":
                            trial.set_user_attr(k, v)
                    if "quality" in res and self.rule.quality_margin is not None:  # TPE proposes from feasible trials
                        trial.set_constraint("answer_quality", violation(self.rule.quality_margin, res["quality"]))
                    study.tell(trial, [res["values"][o] for o in OBJECTIVES])
                    bar.update()
                    bar.set_postfix_str(", ".join(f"{k}={v:.3g}" for k, v in res["values"].items()))
                self.write(study, baseline, refs, attr, effects)  # a stopped search leaves its trials readable
        refs = reference_curves(self, model, attr, caa, base_lp, progress)  # after the trials: they come first
        conf = None
        if self.rule.confirm_top:
            conf = confirm(self, model, self.rows(study), baseline, attr, effects, progress, caa)
        return self.write(study, baseline, refs, attr, effects, conf)

    def baseline(self, model: HookedModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The unmodified model's measurement and harmless-prompt log-probabilities (for KL), saved with
        the engine that computed them; log-probabilities of another engine (rounding apart) are recomputed."""
        path, engine = self.out / "baseline.safetensors", "stock" if stock_runs(model) else "tl"
        if path.exists():
            stored = read_json(self.out / "baseline.json", "cna_lens.SearchBaseline")
            if stored.get("engine", "tl") == engine:
                return stored["baseline"], load_file(str(path))
        with self.run_dir.timed("baseline"):
            baseline, lp = self.measure(model, contextlib.nullcontext, None)
        atomic_write_json(
            self.out / "baseline.json", {"kind": "cna_lens.SearchBaseline", "engine": engine, "baseline": baseline}
        )
        atomic_write(path, lambda tmp: save_file({"harmless": lp["harmless"].contiguous()}, tmp))
        return baseline, {"harmless": lp["harmless"]}

    @staticmethod
    def rows(study: Any) -> list[dict[str, Any]]:
        """One row per complete trial: ``number``, ``values`` (objective → value), user attributes, ``params``."""
        import optuna

        return [
            {"number": t.number, "values": dict(zip(OBJECTIVES, t.values)), **t.user_attrs, "params": t.params}
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ]

    def write(
        self, study: Any, baseline: dict, refs: dict, attr: Attribution, effects: Any, conf: dict | None = None
    ) -> dict[str, Any]:
        """``pareto.json`` (every complete trial, 3-objective and compliance × KL front flags), the
        chosen point's ``selection.json`` and its ``neurons.json`` (scale them by the selection's scale);
        ``conf``: the confirmation's measurements, when the rule asks for them."""
        rows = self.rows(study)
        timings = self.out / "timings.json"
        header = {k: self.run_dir.config[k] for k in ("model", "dtype", "seed", "objective", "data", "space")}
        header["timings"] = read_json(timings, "cna_lens.Timings")["seconds"] if timings.exists() else {}
        result = build_result(header, rows, baseline, refs, self.rule, conf)
        chosen = result["chosen"]
        atomic_write_json(self.out / "pareto.json", result)
        if chosen is not None:
            sel = Selection.from_dict(chosen["selection"])
            sel.save(self.out / "selection.json")
            sel.neurons(attr, effects).save(self.out / "neurons.json")
        else:
            for f in ("selection.json", "neurons.json"):
                (self.out / f).unlink(missing_ok=True)
            if conf is not None or not self.rule.confirm_top:  # else: chosen after the confirmation
                log.warning("no trial meets the rule (%s); no selection.json written", self.rule.describe())
        return result


def search(model: HookedModel, out: str | Path, *, trials: int = 30, progress: bool = True, **kwargs: Any) -> dict:
    """Run (or resume) a search on an already loaded model; see :class:`Search` for the settings
    (``data`` defaults to :meth:`SearchData.bundled`, and then ``confirm_data``, when the rule asks for
    it, to :meth:`ConfirmData.bundled`: the prompts after the bundled search's)."""
    if "data" not in kwargs:
        kwargs["data"] = SearchData.bundled()
        if kwargs.get("rule") is not None and kwargs["rule"].confirm_top:
            kwargs.setdefault("confirm_data", ConfirmData.bundled())
    kwargs.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    return Search(out, model=model_name(model), **kwargs).run(model, trials, progress)
