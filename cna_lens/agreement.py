"""Agreement between a judge and reference labels: confusion matrix, accuracy, Cohen's κ, recall, rates.

Cohen's κ = (p_o − p_e) / (1 − p_e), p_o = Σ_k C_kk / n, p_e = Σ_k (row_k / n)(col_k / n) for the
confusion matrix C (rows: reference, columns: judge). Small and exact, so written out here rather
than pulling in scikit-learn for one formula (tests check it against hand-computed values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def confusion(reference: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """C[i][j] = number of items with reference ``labels[i]`` and prediction ``labels[j]``."""
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference labels but {len(predicted)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in [*reference, *predicted] if x not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among {list(labels)}")
    c = [[0] * len(labels) for _ in labels]
    for r, p in zip(reference, predicted):
        c[index[r]][index[p]] += 1
    return c


def cohen_kappa(c: Sequence[Sequence[int]]) -> float:
    """Cohen's κ from a confusion matrix (1.0 when both sides use one identical label only)."""
    n = sum(map(sum, c))
    if n == 0:
        raise ValueError("empty confusion matrix")
    k = len(c)
    p_o = sum(c[i][i] for i in range(k)) / n
    rows = [sum(c[i]) / n for i in range(k)]
    cols = [sum(c[i][j] for i in range(k)) / n for j in range(k)]
    p_e = sum(r * q for r, q in zip(rows, cols))
    return 1.0 if p_e == 1.0 else (p_o - p_e) / (1 - p_e)


def agreement(reference: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """n, accuracy, κ, per-class recall (None where a class is absent from the reference), the rate of
    each label under reference and judge (shares of n), and the confusion matrix."""
    c = confusion(reference, predicted, labels)
    n = len(reference)
    if n == 0:
        raise ValueError("no items to compare")
    k = len(labels)
    return {
        "n": n,
        "accuracy": sum(c[i][i] for i in range(k)) / n,
        "kappa": cohen_kappa(c),
        "recall": {lab: (c[i][i] / sum(c[i]) if sum(c[i]) else None) for i, lab in enumerate(labels)},
        "rate_reference": {lab: sum(c[i]) / n for i, lab in enumerate(labels)},
        "rate_judge": {lab: sum(c[j][i] for j in range(k)) / n for i, lab in enumerate(labels)},
        "confusion": {"rows": "reference", "columns": "judge", "labels": list(labels), "counts": c},
    }
