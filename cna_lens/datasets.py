"""Bundled prompt sets (see ``cna_lens/data/SOURCES.md`` for provenance and licenses) and prompt files.

Content warning: the harmful sets contain requests for harmful content; use them only for refusal
and safety research.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

#: name → (file, record filter or None). Every record has ``id``, ``prompt``, ``category``.
DATASETS: dict[str, tuple[str, dict[str, str] | None]] = {
    "discovery_harmful": ("discovery_harmful.json", None),  # NousResearch/neural-steering HARMFUL (99)
    "discovery_harmless": ("discovery_harmless.json", None),  # ... BENIGN (104, one duplicate)
    "jbb_harmful": ("jbb_harmful.json", None),  # JailbreakBench JBB-Behaviors (100)
    "jbb_benign": ("jbb_benign.json", None),
    "advbench": ("advbench.json", None),
    "harmful_train": ("rd_harmful_splits.json", {"split": "train"}),  # refusal_direction splits
    "harmful_val": ("rd_harmful_splits.json", {"split": "val"}),
    "harmful_test": ("rd_harmful_splits.json", {"split": "test"}),
    "alpaca_train": ("alpaca_harmless.json", {"split": "train"}),  # CC BY-NC 4.0
    "alpaca_val": ("alpaca_harmless.json", {"split": "val"}),
    "alpaca_test": ("alpaca_harmless.json", {"split": "test"}),
    "xstest_safe": ("xstest.json", {"label": "safe"}),
    "xstest_safe_val": ("xstest.json", {"label": "safe"}),  # the 150 the reproduction does not use (below)
    "xstest_unsafe": ("xstest.json", {"label": "unsafe"}),
    "mmlu": ("mmlu_subset.json", None),
    "mmlu_dev": ("mmlu_dev.json", None),
}


#: XSTest safe prompts a reproduction answers by default: ``spread(xstest_safe, XSTEST_TEST)``
XSTEST_TEST = 100


def _spread_index(m: int, n: int | None) -> list[int]:
    """Indices of ``n`` evenly spaced items of ``m``, rounded (all of them when ``n`` is None or ≥ m)."""
    return list(range(m)) if n is None or n >= m else [int(i) for i in np.linspace(0, m - 1, n).round()]


def spread(rows: list[Any], n: int | None) -> list[Any]:
    """``n`` evenly spaced ``rows`` (all when ``n`` is None or ≥ their number): keeps every category of
    a set ordered by category."""
    return [rows[i] for i in _spread_index(len(rows), n)]


def spread_rest(rows: list[Any], n: int | None) -> list[Any]:
    """The ``rows`` that :func:`spread` ``(rows, n)`` leaves out, in order."""
    taken = set(_spread_index(len(rows), n))
    return [r for i, r in enumerate(rows) if i not in taken]


@cache
def _read(file: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(files("cna_lens").joinpath("data", file).read_text(encoding="utf-8")))


def load_dataset(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a bundled set (dicts with at least ``id``, ``prompt``, ``category``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    file, where = DATASETS[name]
    rows = [dict(r) for r in _read(file) if not where or all(r.get(k) == v for k, v in where.items())]
    if name == "discovery_harmless":
        rows = [r for r in rows if r.get("duplicate_of") is None]
    if name == "xstest_safe_val":  # a validation split: disjoint from the reproduction's test prompts
        rows = spread_rest(rows, XSTEST_TEST)
    if limit is not None:
        if not 1 <= limit <= len(rows):
            raise ValueError(f"limit={limit} but {name!r} has {len(rows)} prompts")
        rows = rows[:limit]
    return rows


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """The prompt texts of a bundled set."""
    return [r["prompt"] for r in load_dataset(name, limit)]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: ``.json`` (list of strings or of ``{"prompt": ...}``), ``.jsonl``, or
    plain text with one prompt per line (blank lines and lines starting with ``#`` skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    prompts: list[str] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got a JSON {type(data).__name__}")
        prompts = [_prompt_of(item, f"{path}[{i}]") for i, item in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                prompts.append(_prompt_of(item, f"{path}:{lineno}"))
            else:
                prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts found (the file is empty or holds only blank lines and # comments)")
    return prompts


def _prompt_of(item: Any, where: str) -> str:
    if isinstance(item, dict):
        item = item.get("prompt")
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"{where}: expected a non-empty string or an object with a 'prompt' string")
    return item


@dataclass(frozen=True)
class SearchData:
    """Prompt sets: discovery (attribution), effects (pruning), and the three validation sets.
    ``benign=None`` reuses the ``harmless`` passes for over-refusal (no extra forward pass).
    ``quality``: prompts every trial answers at length, for answer quality (None: not measured)."""

    discovery_pos: tuple[str, ...]
    discovery_neg: tuple[str, ...]
    effects: tuple[str, ...]
    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    benign: tuple[str, ...] | None = None
    names: dict[str, str] = field(default_factory=dict, compare=False)
    quality: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for f in ("discovery_pos", "discovery_neg", "effects", "harmful", "harmless", "benign", "quality"):
            v = getattr(self, f)
            if v is None and f in ("benign", "quality"):
                continue
            if isinstance(v, str) or not v or not all(isinstance(p, str) and p.strip() for p in v):
                raise ValueError(f"SearchData.{f} must be a non-empty list of non-empty prompt strings")
            object.__setattr__(self, f, tuple(v))

    @classmethod
    def bundled(
        cls,
        n_harmful: int = 32,
        n_harmless: int = 32,
        n_effects: int = 32,
        benign: str | None = None,
        quality: str | None = None,
        n_quality: int = 16,
        confirm_quality: int = 100,
        n_discovery: int | None = None,
    ):
        """Discovery on the paper's sets (the first ``n_discovery`` of each; None: all), pruning effects
        on ``harmful_train``, objectives on ``harmful_val`` / ``alpaca_val`` (first ``n`` of each;
        over-refusal on ``benign`` if given); answer quality (if ``quality`` names a bundled set) on
        ``n_quality`` evenly spaced prompts of those the confirmation's ``confirm_quality`` evenly spaced
        ones (:meth:`ConfirmData.bundled`) leave out."""
        cut = "" if n_discovery is None else f"[:{n_discovery}]"
        names = {
            "discovery": f"discovery_harmful{cut}/discovery_harmless{cut}",
            "effects": f"harmful_train[:{n_effects}]",
        }
        names |= {"harmful": f"harmful_val[:{n_harmful}]", "harmless": f"alpaca_val[:{n_harmless}]"}
        names["benign"] = benign or names["harmless"]
        prompts = None
        if quality is not None:
            rest = spread_rest(load_prompts(quality), confirm_quality)
            if not 1 <= n_quality <= len(rest):
                raise ValueError(
                    f"trial answer quality on {n_quality} prompts of {quality}, which has {len(rest)} outside the "
                    f"confirmation's {confirm_quality}"
                )
            prompts = tuple(spread(rest, n_quality))
            names["quality"] = f"{quality} ({n_quality} evenly spaced, outside the confirmation's {confirm_quality})"
        return cls(
            tuple(load_prompts("discovery_harmful", n_discovery)),
            tuple(load_prompts("discovery_harmless", n_discovery)),
            tuple(load_prompts("harmful_train", n_effects)),
            tuple(load_prompts("harmful_val", n_harmful)),
            tuple(load_prompts("alpaca_val", n_harmless)),
            tuple(load_prompts(benign)) if benign else None,
            names,
            prompts,
        )

    def digest(self) -> str:
        """Of every prompt set (``quality`` only where there is one: a search without it keeps its digest)."""
        h = hashlib.sha256()
        for f in ("discovery_pos", "discovery_neg", "effects", "harmful", "harmless", "benign"):
            h.update(f"{f}\0{list(getattr(self, f) or [])!r}\0".encode())
        if self.quality is not None:
            h.update(f"quality\0{list(self.quality)!r}\0".encode())
        return h.hexdigest()[:16]
