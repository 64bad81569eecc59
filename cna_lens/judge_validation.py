"""Training data and held-out validation of the three-way judge (numbers in ``judge_validation.json``).

Data (``cna_lens/data``, see SOURCES.md):
* XSTest v2 completions: 5 models × 450 prompts, two human annotators each. ``partial`` (partial
  refusal) maps to ``evade``. The head trains on the items both annotators agree on; every item is
  scored against the final label, against each annotator, and on the agreed subset.
* JBB hand labels (``jbb_labels.jsonl``): completions of this project's runs labelled by reading
  (``jbb_labels_guide.md``).
* Held-out JBB hand labels (``jbb_labels_heldout.jsonl``): completions of conditions the judge never
  trained on, shuffled together and read blind to condition and judge by two readers
  (``annotation_1`` / ``annotation_2``); a third reading decides where they differ (``label``).

Validation:
* XSTest held out by model: train on the other 4 models (+ all JBB labels), test on the 5th.
* JBB: (a) a head trained on XSTest only; (b) 5 folds grouped by JBB behaviour (prompt id mod 5,
  so a behaviour never sits on both sides across conditions), training on all XSTest + the other
  JBB folds. Per (model, condition): the judge's refuse/comply/evade rates against the labels.
* Held-out conditions: the shipped head (trained on all of the above), a head retrained in 5 folds by
  behaviour with the other held-out folds added, and the regex, against the final labels; the two
  readers against each other (the human ceiling); per condition the hand-label rates (Wilson 95 %
  CIs) and, for conditions on the same prompts, an exact McNemar test of compliance.
* The regex judge is scored on the same items (it needs no training).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.resources import files
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from .agreement import agreement
from .evaluate import judge as regex_judge
from .judge_head import (
    ENCODER_ID,
    ENCODER_PACKAGE,
    ENCODER_SHA256,
    ENCODER_VERSION,
    LABELS,
    EmbeddingCache,
    JudgeHead,
    default_head,
    features,
    train_head,
)
from .scoring import label_rates, mcnemar

log = logging.getLogger(__name__)

#: the committed validation numbers (``scripts/validate_judge.py`` writes them) and their format
VALIDATION_FILE = "judge_validation.json"
FORMAT_VERSION = 2
XSTEST_FILE = "xstest_v2_completions.jsonl"
JBB_LABELS_FILE = "jbb_labels.jsonl"
HELDOUT_FILE = "jbb_labels_heldout.jsonl"
XSTEST_LABEL = {"comply": "comply", "refuse": "refuse", "partial": "evade"}
XSTEST_ANNOTATION = {"1_full_compliance": "comply", "2_full_refusal": "refuse", "3_partial_refusal": "evade"}
#: Head hyperparameters: L2 strength (≈ 1/C of scikit-learn's LogisticRegression), class balancing, and
#: the weight of a JBB item relative to an XSTest item (JBB is the target domain and has 8× fewer
#: items). The two label sets disagree on what evasion is (XSTest counts "alternatives without an
#: answer" as refusal and "refuse, then answer" as partial; the JBB guide calls the first evade and
#: the second comply), so more JBB weight trades XSTest κ for JBB κ: weight 1 → 0.79 / 0.45,
#: 5 → 0.73 / 0.50, 10 → 0.67 / 0.52 (XSTest held-out-model / JBB cross-validated). Chosen on that
#: small grid (L2 ∈ {10, 100, 300, 1000, 3000}, JBB weight ∈ {1, 3, 5, 10, 20}, feature blocks) as the
#: best JBB κ that keeps XSTest κ ≥ 0.7, so both numbers are mildly optimistic; the XSTest-only
#: transfer to JBB is not selected on.
L2 = 300.0
BALANCED = True
JBB_WEIGHT = 5.0
JBB_FOLDS = 5


def data_bytes(name: str) -> bytes:
    return files("cna_lens").joinpath("data", name).read_bytes()


@cache
def xstest_rows() -> tuple[dict[str, Any], ...]:
    """XSTest completions with ``label``/``annotation_1``/``annotation_2`` mapped to LABELS and ``agreed``."""
    rows = []
    for line in data_bytes(XSTEST_FILE).decode("utf-8").splitlines():
        r = json.loads(line)
        a1, a2 = XSTEST_ANNOTATION[r["annotation_1"]], XSTEST_ANNOTATION[r["annotation_2"]]
        rows.append(
            {**r, "label": XSTEST_LABEL[r["label"]], "annotation_1": a1, "annotation_2": a2, "agreed": a1 == a2}
        )
    return tuple(rows)


@cache
def jbb_rows() -> tuple[dict[str, Any], ...]:
    from .judge import read_labelled

    return tuple(read_labelled(files("cna_lens").joinpath("data", JBB_LABELS_FILE)))


@cache
def heldout_rows() -> tuple[dict[str, Any], ...]:
    """Held-out hand labels: ``label`` (final), ``annotation_1`` / ``annotation_2`` (the blind readings)."""
    from .judge import read_labelled

    rows = tuple(read_labelled(files("cna_lens").joinpath("data", HELDOUT_FILE)))
    for r in rows:
        if r.get("annotation_1") not in LABELS or r.get("annotation_2") not in LABELS:
            raise ValueError(f"{HELDOUT_FILE}: {r.get('prompt_id')} lacks two readings in {LABELS}")
    return rows


def load_validation() -> dict[str, Any]:
    """The committed ``judge_validation.json`` (kind and format version checked)."""
    from .runs import read_json

    path = Path(str(files("cna_lens").joinpath("data", VALIDATION_FILE)))
    return read_json(path, "cna_lens.JudgeValidation", FORMAT_VERSION)


def training_hash() -> str:
    """sha256 over the two training files, in a fixed order."""
    h = hashlib.sha256()
    for name in (XSTEST_FILE, JBB_LABELS_FILE):
        h.update(name.encode())
        h.update(hashlib.sha256(data_bytes(name)).digest())
    return h.hexdigest()


def head_meta(n_train: int) -> dict[str, Any]:
    return {
        "encoder": {"id": ENCODER_ID, "package": ENCODER_PACKAGE, "version": ENCODER_VERSION, "sha256": ENCODER_SHA256},
        "training_data": {
            "files": [XSTEST_FILE, JBB_LABELS_FILE],
            "sha256": training_hash(),
            "n": n_train,
            "xstest": "items both annotators agree on (partial -> evade)",
            "jbb_weight": JBB_WEIGHT,
        },
    }


def _labels(rows: Sequence[dict[str, Any]], field: str = "label") -> torch.Tensor:
    return torch.tensor([LABELS.index(r[field]) for r in rows])


def _fit(x: torch.Tensor, y: torch.Tensor, n_jbb: int = 0, meta: dict[str, Any] | None = None) -> JudgeHead:
    """Train on ``x``/``y`` whose last ``n_jbb`` rows are JBB items (weighted ``JBB_WEIGHT``)."""
    w = torch.ones(len(y), dtype=torch.float64)
    if n_jbb:
        w[len(y) - n_jbb :] = JBB_WEIGHT
    return train_head(x, y, l2=L2, balanced=BALANCED, sample_weight=w, meta=meta)


def _predict(head: JudgeHead, x: torch.Tensor) -> list[str]:
    return [LABELS[int(i)] for i in head.proba(x).argmax(-1)]


def feature_table(cache: EmbeddingCache, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every XSTest row and every JBB row (from ``cache``, computing what is missing)."""
    xs, jb = xstest_rows(), jbb_rows()
    fx = features([r["prompt"] for r in xs], [r["completion"] for r in xs], cache, progress)
    fj = features([r["prompt"] for r in jb], [r["completion"] for r in jb], cache, progress)
    return fx, fj


def train_default(cache: EmbeddingCache, progress: bool = False) -> JudgeHead:
    """The shipped head: all agreed XSTest items + all JBB labels."""
    fx, fj = feature_table(cache, progress)
    xs, jb = xstest_rows(), jbb_rows()
    keep = [i for i, r in enumerate(xs) if r["agreed"]]
    x = torch.cat([fx[keep], fj])
    y = torch.cat([_labels([xs[i] for i in keep]), _labels(jb)])
    return _fit(x, y, len(jb), head_meta(len(y)))


def _xstest_report(rows: Sequence[dict[str, Any]], pred: Sequence[str]) -> dict[str, Any]:
    agreed = [i for i, r in enumerate(rows) if r["agreed"]]
    return {
        "final_label": agreement([r["label"] for r in rows], pred, LABELS),
        "annotator_1": agreement([r["annotation_1"] for r in rows], pred, LABELS),
        "annotator_2": agreement([r["annotation_2"] for r in rows], pred, LABELS),
        "agreed_items": agreement([rows[i]["label"] for i in agreed], [pred[i] for i in agreed], LABELS),
    }


def _conditions(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Row indices by ``"model | condition"``, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(f"{r['model']} | {r['condition']}", []).append(i)
    return groups


def _regex_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The regex judge's label of each row's completion (it knows only refuse and comply)."""
    return ["refuse" if regex_judge(r["completion"]).refused else "comply" for r in rows]


def _by_behaviour(
    rows: Sequence[dict[str, Any]], x: torch.Tensor, base_x: torch.Tensor, base_y: torch.Tensor, base_jbb: int
) -> list[str]:
    """Each row's label predicted by a head trained on ``base_x`` / ``base_y`` (whose last ``base_jbb`` rows are
    JBB items) plus the rows of the other folds, folds by behaviour (prompt index mod ``JBB_FOLDS``)."""
    fold = torch.tensor([int(r["prompt_id"].rsplit("_", 1)[-1]) % JBB_FOLDS for r in rows])
    y = _labels(rows)
    pred: list[str] = [""] * len(rows)
    for f in range(JBB_FOLDS):
        test = fold == f
        head = _fit(torch.cat([base_x, x[~test]]), torch.cat([base_y, y[~test]]), base_jbb + int((~test).sum()))
        for i, p in zip(test.nonzero().flatten().tolist(), _predict(head, x[test])):
            pred[i] = p
    return pred


def _jbb_report(rows: Sequence[dict[str, Any]], pred: Sequence[str]) -> dict[str, Any]:
    per = {}
    for key, idx in _conditions(rows).items():
        a = agreement([rows[i]["label"] for i in idx], [pred[i] for i in idx], LABELS)
        diff = {lab: a["rate_judge"][lab] - a["rate_reference"][lab] for lab in LABELS}
        per[key] = {**a, "rate_difference": diff, "max_abs_rate_difference": max(abs(d) for d in diff.values())}
    return {
        "all": agreement([r["label"] for r in rows], pred, LABELS),
        "per_condition": per,
        "max_abs_rate_difference": max(p["max_abs_rate_difference"] for p in per.values()),
    }


def _paired_comply(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact McNemar test of hand-labelled compliance for each pair of conditions of one model on the
    same prompts: ``first_only`` / ``second_only`` = prompts only that condition's completion complies with."""
    by: dict[tuple[str, str], dict[str, bool]] = {}
    for r in rows:
        by.setdefault((r["model"], r["condition"]), {})[r["prompt_id"]] = r["label"] == "comply"
    out = {}
    for (ma, a), (mb, b) in combinations(by, 2):
        common = sorted(by[ma, a].keys() & by[mb, b].keys())
        if ma != mb or not common:
            continue
        b01, b10, p = mcnemar([by[ma, a][k] for k in common], [by[mb, b][k] for k in common])
        out[f"{ma} | {a} vs {b}"] = {"n": len(common), "first_only": b10, "second_only": b01, "p": p}
    return out


def heldout_report(rows: Sequence[dict[str, Any]], judges: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The held-out section of :func:`validate` for ``rows``: each of ``judges`` (name → its label of each
    row) and the regex against the final labels, the readers, the hand-label rates, paired tests."""
    groups = _conditions(rows)
    readers = {
        key: agreement([rows[i]["annotation_1"] for i in idx], [rows[i]["annotation_2"] for i in idx], LABELS)
        for key, idx in groups.items()
    }
    return {
        "n": len(rows),
        "hand_rates": {key: label_rates([rows[i]["label"] for i in idx]) for key, idx in groups.items()},
        "readers": {
            "all": agreement([r["annotation_1"] for r in rows], [r["annotation_2"] for r in rows], LABELS),
            "per_condition": readers,
            "decided_by_third_reading": sum(r["annotation_1"] != r["annotation_2"] for r in rows),
        },
        **{name: _jbb_report(rows, labels) for name, labels in judges.items()},
        "regex": _jbb_report(rows, _regex_labels(rows)),
        "paired_comply": _paired_comply(rows),
    }


def hand_labels(completions: Sequence[Mapping[str, Any]], dataset: str = "jbb_harmful") -> dict[str, Any]:
    """The blind hand labels that describe a run's conditions word for word: for each condition of
    ``completions`` (rows with ``model``, ``dataset``, ``condition``, ``prompt_id``, ``completion``) whose
    ``dataset`` completions are exactly those of one held-out labelled condition (same model, same prompts,
    the same text), that condition's name (``labelled_as``) and :func:`label_rates` of its final labels."""
    read: dict[tuple[str, str], tuple[dict[str, str], list[str]]] = {}  # (model, condition) -> texts, labels
    for r in heldout_rows():
        texts, labels = read.setdefault((r["model"], r["condition"]), ({}, []))
        texts[r["prompt_id"]] = r["completion"]
        labels.append(r["label"])
    runs: dict[tuple[str, str], dict[str, str]] = {}
    for r in completions:
        if r["dataset"] == dataset:
            runs.setdefault((r["model"], r["condition"]), {})[r["prompt_id"]] = r["completion"]
    out: dict[str, Any] = {}
    for (model, cond), texts in runs.items():
        name = next((c for (m, c), (t, _) in read.items() if m == model and t == texts), None)
        if name is not None:
            out[cond] = {"labelled_as": name, **label_rates(read[model, name][1])}
    return out


def validate(cache: EmbeddingCache, progress: bool = False) -> dict[str, Any]:
    """All validation numbers (see the module docstring) as a JSON-ready dict."""
    xs, jb = list(xstest_rows()), list(jbb_rows())
    fx, fj = feature_table(cache, progress)
    yx, yj = _labels(xs), _labels(jb)
    agreed = torch.tensor([r["agreed"] for r in xs])
    models = sorted({r["model"] for r in xs})

    # XSTest held out by model.
    pred_cls: list[str] = [""] * len(xs)
    for m in models:
        test = torch.tensor([r["model"] == m for r in xs])
        train = ~test & agreed
        head = _fit(torch.cat([fx[train], fj]), torch.cat([yx[train], yj]), len(jb))
        for i, p in zip(test.nonzero().flatten().tolist(), _predict(head, fx[test])):
            pred_cls[i] = p
    pred_rx = _regex_labels(xs)
    xstest = {}
    for name, pred in (("classifier", pred_cls), ("regex", pred_rx)):
        folds = {}
        for m in models:
            idx = [i for i, r in enumerate(xs) if r["model"] == m]
            folds[m] = _xstest_report([xs[i] for i in idx], [pred[i] for i in idx])
        xstest[name] = {"pooled": _xstest_report(xs, pred), "per_held_out_model": folds}
    xstest["human_annotator_1_vs_2"] = agreement(
        [r["annotation_1"] for r in xs], [r["annotation_2"] for r in xs], LABELS
    )

    # JBB hand labels.
    keep = agreed.nonzero().flatten()
    head_x = _fit(fx[keep], yx[keep])
    pred_cv = _by_behaviour(jb, fj, fx[keep], yx[keep], 0)
    jbb = {
        "classifier_xstest_only": _jbb_report(jb, _predict(head_x, fj)),
        "classifier_cross_validated": _jbb_report(jb, pred_cv),
        "regex": _jbb_report(jb, _regex_labels(jb)),
    }
    ho = heldout_rows()
    fh = features([r["prompt"] for r in ho], [r["completion"] for r in ho], cache, progress)
    # the shipped head, and whether the held-out labels themselves would fix it (the other folds added)
    retrained = _by_behaviour(ho, fh, torch.cat([fx[keep], fj]), torch.cat([yx[keep], yj]), len(jb))
    heldout = heldout_report(
        ho, {"classifier": _predict(default_head(), fh), "classifier_retrained_cross_validated": retrained}
    )
    pooled = {n: xstest[n]["pooled"]["final_label"] for n in ("classifier", "regex")}
    summary = {
        "xstest_held_out_kappa": {n: a["kappa"] for n, a in pooled.items()},
        "xstest_held_out_accuracy": {n: a["accuracy"] for n, a in pooled.items()},
        "jbb_kappa": {n: r["all"]["kappa"] for n, r in jbb.items()},
        "jbb_max_abs_rate_difference": {n: r["max_abs_rate_difference"] for n, r in jbb.items()},
        "heldout_kappa": {n: heldout[n]["all"]["kappa"] for n in ("classifier", "regex")},
        "heldout_readers_kappa": heldout["readers"]["all"]["kappa"],
    }
    return {
        "kind": "cna_lens.JudgeValidation",
        "format_version": FORMAT_VERSION,
        "labels": list(LABELS),
        "summary": summary,
        "head": {"l2": L2, "balanced": BALANCED, **head_meta(int(agreed.sum()) + len(jb))},
        "xstest": {
            "design": "train on the agreed items of 4 models + all JBB labels, test on every item of the 5th; "
            "XSTest's partial refusal counts as evade",
            "n": len(xs),
            "n_agreed": int(agreed.sum()),
            **xstest,
        },
        "jbb": {
            "design": {
                "classifier_xstest_only": "head trained on agreed XSTest items only",
                "classifier_cross_validated": f"{JBB_FOLDS} folds by behaviour (prompt index mod {JBB_FOLDS}); "
                "train on agreed XSTest + the other JBB folds",
                "labels": "read one by one by the labelling guide (labeller 'reader')",
            },
            "n": len(jb),
            **jbb,
        },
        "heldout": {
            "design": "conditions the judge never trained on, items of all conditions shuffled together and read "
            "blind to condition and judge by two readers; a third reading decides where they differ; "
            "classifier = the shipped head; classifier_retrained_cross_validated = "
            f"{JBB_FOLDS} folds by behaviour, trained on agreed XSTest + all JBB labels + the other held-out folds",
            **heldout,
        },
    }
