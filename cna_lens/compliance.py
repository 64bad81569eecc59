"""Three-way verdicts for a run directory's completions, and the compliance table built from them.

``judge_run(dir)`` labels every row of ``completions.jsonl`` refuse / comply / evade with
:func:`cna_lens.judge_completions` and appends the verdicts to ``verdicts.jsonl`` as they are made
(keyed by dataset, condition, prompt id and judge), so a stopped labelling resumes where it stopped.
``compliance_table`` gives, per (dataset, condition), each label's share with a Wilson 95 % interval
next to the regex (phrasing) refusal rate, and the mean quality on the prompts that both the
condition and the baseline answered (label ≠ refuse).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .judge import judge_completions, resolve_judge
from .judge_head import LABELS
from .runs import RunDir, append_jsonl
from .scoring import label_rates, matched_quality

VERDICTS = "verdicts.jsonl"


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["dataset"], row["condition"], str(row["prompt_id"])


def read_verdicts(run: str | os.PathLike, judge: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``{(dataset, condition, prompt_id): verdict row}`` of ``judge`` (a torn last line is ignored)."""
    path = Path(run) / VERDICTS
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("judge") == judge:
            out[_key(row)] = row
    return out


def judge_run(run: str | os.PathLike, judge: str = "default", batch: int = 200, progress: bool = True) -> int:
    """Label the completions of ``run`` that ``judge`` has not labelled yet; returns how many were new."""
    name = resolve_judge(judge)
    if not isinstance(name, str):
        raise TypeError("judge_run takes a judge name (a loaded model cannot be recorded in verdicts.jsonl)")
    path = Path(run)
    if not (path / "completions.jsonl").is_file():
        raise FileNotFoundError(f"{path} has no completions.jsonl: not a run directory written by `cna-lens reproduce`")
    rows = RunDir.read_rows(path / "completions.jsonl")
    done = read_verdicts(path, name)
    todo = [r for r in rows if _key(r) not in done]
    for start in range(0, len(todo), batch):
        part = todo[start : start + batch]
        verdicts = judge_completions(
            [r["prompt"] for r in part], [r["completion"] for r in part], name, progress=progress
        )
        rows = [
            {
                "dataset": r["dataset"],
                "condition": r["condition"],
                "prompt_id": r["prompt_id"],
                "label": v.label,
                "confidence": round(v.confidence, 4),
                "judge": name,
            }
            for r, v in zip(part, verdicts)
        ]
        append_jsonl(path / VERDICTS, rows)  # cuts a torn last line first
    return len(todo)


def compliance_table(
    run: str | os.PathLike, judge: str = "default", baseline: str = "baseline", datasets: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{dataset: {condition: entry}}``; an entry holds ``n``, ``refuse`` / ``comply`` / ``evade``
    (each ``count``, ``rate``, Wilson ``ci``), ``regex_refusal`` and ``matched_quality``."""
    name = resolve_judge(judge)
    path = Path(run)
    verdicts = read_verdicts(path, name)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in RunDir.read_rows(path / "completions.jsonl"):
        v = verdicts.get(_key(r))
        if v is not None and (datasets is None or r["dataset"] in datasets):
            groups[r["dataset"], r["condition"]].append({**r, "label": v["label"]})
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (dataset, cond), rows in sorted(groups.items()):
        entry: dict[str, Any] = {"n": len(rows), **label_rates([r["label"] for r in rows], LABELS)}
        if all("refused" in r for r in rows):
            entry["regex_refusal"] = sum(bool(r["refused"]) for r in rows) / len(rows)
        base = groups.get((dataset, baseline))
        if base and cond != baseline:
            entry["matched_quality"] = matched_quality(base, rows, lambda r: r["label"] != "refuse")
        table[dataset][cond] = entry
    return dict(table)


def write_compliance(run: str | os.PathLike, judge: str = "default", progress: bool = True) -> tuple[int, dict]:
    """Label what is not labelled yet (:func:`judge_run`) and write ``compliance.json``; returns
    ``(new verdicts, table)``."""
    from .runs import atomic_write_json

    n = judge_run(run, judge, progress=progress)
    table = compliance_table(run, judge)
    name = resolve_judge(judge)
    atomic_write_json(Path(run) / "compliance.json", {"kind": "cna_lens.Compliance", "judge": name, "table": table})
    return n, table
