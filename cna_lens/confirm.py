"""Re-measure a search's best candidates on fresh prompts before choosing one (``Rule.confirm_top``).

A search scores n trials on the same m validation prompts and keeps the best. Each score is a share
of m prompts with sampling error ≈ √(p(1−p)/m) (±0.08 at m = 32, p = 0.7), so the maximum of n of
them is biased upward: the winner's curse. Here the rule's first k candidates on validation are
measured again, with the same objectives, on prompts no trial, discovery or pruning saw
(``harmful_train`` after the pruning prompts, ``alpaca_val`` after the KL prompts), and the rule
chooses among them on those numbers alone.

With ``Rule.confirm_front`` the compliance × KL front's points (KL ≤ cap) and the search's reference
curves are measured on the same prompts too, so that the methods compare at equal KL where no point
was chosen (reported, not used to choose).

With ``Rule.quality_margin`` the candidates and the baseline also answer ``ConfirmData.quality`` at
length (by default safe XSTest prompts that look harmful, none of them the reproduction's), and a
candidate whose answers lose more quality than the margin is not chosen.

The measurements are kept in ``confirm.json`` (one per trial number and, under ``references``, one
list per curve, under ``quality`` the long answers, written as each finishes, so a stopped confirmation
resumes; the fresh baseline's next-token log-probabilities, 64 × vocabulary floats, are recomputed on
resume rather than stored).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .datasets import load_prompts, spread
from .evaluate import final_logprobs
from .quality import answers_under, quality_against
from .runs import atomic_write_json, read_json
from .search_refs import measure_curves, measure_trials, reference_points
from .selection import Selection

if TYPE_CHECKING:
    from collections.abc import Callable

    from .attribute import Attribution
    from .hooks import HookedModel
    from .neurons import NeuronSet
    from .search import Search

FORMAT_VERSION = 1
KIND = "cna_lens.SearchConfirmation"


@dataclass(frozen=True)
class ConfirmData:
    """Fresh prompts for the confirmation: compliance on ``harmful``, KL and over-refusal on ``harmless``,
    answer quality (``Rule.quality_margin``) on ``quality`` (None: on ``harmless``)."""

    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    names: dict[str, str] = field(default_factory=dict, compare=False)
    quality: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for f in ("harmful", "harmless", "quality"):
            v = getattr(self, f)
            if v is None and f == "quality":
                continue
            if isinstance(v, str) or not v or not all(isinstance(p, str) and p.strip() for p in v):
                raise ValueError(f"ConfirmData.{f} must be a non-empty list of non-empty prompt strings")
            object.__setattr__(self, f, tuple(v))

    @property
    def quality_prompts(self) -> tuple[str, ...]:
        return self.harmless if self.quality is None else self.quality

    @classmethod
    def bundled(
        cls,
        n_harmful: int = 64,
        n_harmless: int = 64,
        skip_harmful: int = 32,
        skip_harmless: int = 32,
        quality: str | None = "xstest_safe_val",
        n_quality: int = 100,
    ):
        """``harmful_train[skip_harmful : skip_harmful + n_harmful]`` (the search's pruning prompts are
        ``harmful_train[:skip_harmful]``) and ``alpaca_val[skip_harmless : skip_harmless + n_harmless]``;
        for answer quality ``n_quality`` evenly spaced prompts of the bundled set ``quality`` (default: safe
        XSTest prompts that look harmful, none of them the reproduction's; None: the harmless ones)."""
        sets = {}
        for name, key, skip, n in (
            ("harmful_train", "harmful", skip_harmful, n_harmful),
            ("alpaca_val", "harmless", skip_harmless, n_harmless),
        ):
            prompts = load_prompts(name)
            if n < 1 or skip < 0 or skip + n > len(prompts):
                raise ValueError(
                    f"confirmation needs {name}[{skip}:{skip + n}], but {name} has {len(prompts)} prompts "
                    f"(at most {len(prompts) - skip} after the {skip} the search uses)"
                )
            sets[key] = (tuple(prompts[skip : skip + n]), f"{name}[{skip}:{skip + n}]")
        names = {k: v[1] for k, v in sets.items()}
        prompts = None
        if quality is not None:
            rows = load_prompts(quality)
            if not 1 <= n_quality <= len(rows):
                raise ValueError(f"answer quality on {n_quality} prompts of {quality}, which has {len(rows)}")
            prompts = tuple(spread(rows, n_quality))
            names["quality"] = f"{quality} ({n_quality} evenly spaced)"
        return cls(sets["harmful"][0], sets["harmless"][0], names, prompts)

    def digest(self) -> str:
        """Of the harmful and harmless prompts (the quality prompts have their own: :meth:`quality_digest`)."""
        h = hashlib.sha256(f"harmful\0{list(self.harmful)!r}\0harmless\0{list(self.harmless)!r}".encode())
        return h.hexdigest()[:16]

    def quality_digest(self) -> str:
        """Of the answer-quality prompts (:attr:`quality_prompts`)."""
        return hashlib.sha256(f"quality\0{list(self.quality_prompts)!r}".encode()).hexdigest()[:16]


def confirm(
    search: Search,
    model: HookedModel,
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    attr: Attribution,
    effects: Any,
    progress: bool = True,
    caa: Attribution | None = None,
) -> dict[str, Any]:
    """Measure the baseline and ``search.rule``'s candidates among ``rows`` (complete trials, with their
    validation ``values``) on ``search.confirm_data``; with ``rule.confirm_front`` also the front's rows
    (:meth:`Rule.front_rows`) and the reference curves (``caa``: the CAA vectors). Return
    ``confirm.json``'s object (read back when already measured). A ``confirm.json`` of other prompts is
    refused, not mixed."""
    if search.rule.confirm_front and caa is None:
        raise ValueError("rule.confirm_front re-measures the reference curves: pass caa (the CAA vectors)")
    data = search.confirm_data
    path = search.out / "confirm.json"
    names = {k: v for k, v in data.names.items() if k != "quality"}  # kept with the answers (answer_quality)
    header = {"kind": KIND, "format_version": FORMAT_VERSION, "data": {**names, "digest": data.digest()}}
    stored = read_json(path, KIND, FORMAT_VERSION) if path.exists() else None
    if stored is not None and stored["data"]["digest"] != header["data"]["digest"]:
        raise ValueError(
            f"{path} holds measurements on other prompts ({stored['data']}); "
            f"delete it to re-measure on {header['data']}"
        )
    conf = stored or {**header, "baseline": None, "trials": {}}
    fresh = replace(search.data, harmful=data.harmful, harmless=data.harmless, benign=None)
    base = None
    if conf["baseline"] is None:
        with search.run_dir.timed("confirm"):
            conf["baseline"], lp = search.measure(model, contextlib.nullcontext, None, data=fresh)
        base = {"harmless": lp["harmless"]}
        atomic_write_json(path, conf)
    rule = search.rule
    wanted = rule.candidates(rows, baseline["values"]) + (rule.front_rows(rows) if rule.confirm_front else [])
    todo = list({str(r["number"]): r for r in wanted if str(r["number"]) not in conf["trials"]}.values())
    curves = {}
    if rule.confirm_front:
        done = conf.setdefault("references", {})
        curves = {k: v for k, v in reference_points(search, model, attr, caa, progress).items() if k not in done}
    # resumed: the baseline's log-probabilities again, the same pass (not stored: large)
    if (todo or curves) and base is None:
        base = {"harmless": final_logprobs(model, list(data.harmless), batch_size=search.batch_size, engine="auto")}
    k = search.trial_batch  # candidates measured together (their answers decoded in one batch)
    with tqdm(total=len(todo), desc="confirm", disable=not progress) as bar:
        for chunk in (todo[i : i + k] for i in range(0, len(todo), k)):
            scalings = scalings_of(chunk, attr, effects)
            results = measure_trials(search, model, scalings, conf["baseline"], base, "confirm", fresh)
            conf["trials"] |= {str(r["number"]): res for r, res in zip(chunk, results)}
            atomic_write_json(path, conf)  # a stopped confirmation keeps what it measured
            bar.update(len(chunk))
    save = lambda: atomic_write_json(path, conf)  # noqa: E731
    if curves:  # the reference curves on the same fresh prompts, one curve at a time
        measure_curves(search, model, curves, conf["references"], base, save, progress, fresh, "confirm")
    if rule.quality_margin is not None:
        answer_quality(search, model, rule.candidates(rows, baseline["values"]), conf, attr, effects, save, progress)
    return conf


def answer_quality(
    search: Search,
    model: HookedModel,
    candidates: list[dict[str, Any]],
    conf: dict[str, Any],
    attr: Attribution,
    effects: Any,
    save: Callable[[], Any],
    progress: bool = True,
) -> None:
    """Greedy ``rule.quality_tokens``-token answers to the confirmation's quality prompts, from the
    baseline and each candidate (kept in ``conf["quality"]``: ``prompts``, ``tokens``, ``digest``,
    ``baseline``, ``answers``: trial → texts), and each candidate's :func:`quality_against` the baseline in
    ``conf["trials"][n]["quality"]``. Saved after each group of ``search.trial_batch`` candidates (decoded
    together); answers of another length or to other prompts are regenerated, not mixed."""
    from .generation import generate

    data, tokens, gbs = search.confirm_data, search.rule.quality_tokens, search.generation_batch_size
    prompts, which = list(data.quality_prompts), {"tokens": tokens, "digest": data.quality_digest()}
    store = conf.get("quality")
    if store is None or {k: store.get(k) for k in which} != which:
        name = data.names.get("quality" if data.quality is not None else "harmless", "")
        with search.run_dir.timed("quality"):
            store = {
                "prompts": name,
                **which,
                "baseline": generate(model, prompts, max_new_tokens=tokens, batch_size=gbs),
            }
        store["answers"] = {}
        conf["quality"] = store
        for t in conf["trials"].values():
            t.pop("quality", None)
        save()
    todo = [r for r in candidates if "quality" not in conf["trials"][str(r["number"])]]
    k = search.trial_batch
    with tqdm(total=len(todo), desc="answer quality", disable=not progress) as bar:
        for chunk in (todo[i : i + k] for i in range(0, len(todo), k)):
            scalings = scalings_of(chunk, attr, effects)
            with search.run_dir.timed("quality"):
                texts = answers_under(model, prompts, scalings, tokens, gbs, store["baseline"])
            for r, t in zip(chunk, texts):
                store["answers"][str(r["number"])] = t
                conf["trials"][str(r["number"])]["quality"] = quality_against(store["baseline"], t)
            save()
            bar.update(len(chunk))


def scalings_of(rows: list[dict[str, Any]], attr: Attribution, effects: Any) -> list[tuple[NeuronSet, float]]:
    """Each trial row's ``(neurons, scale)``, from its stored selection."""
    sels = [Selection.from_dict(r["selection"]) for r in rows]
    return [(sel.neurons(attr, effects), sel.scale) for sel in sels]
