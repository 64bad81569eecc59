"""Model-based scores and the statistics that compare conditions (MMLU per item, McNemar, label-rate
intervals, completion perplexity, quality on matched answer sets).

* MMLU per item: the predicted letter is ``argmax_{c ∈ A..D} log p(" c" | prompt, "The answer is")``
  (the zero-shot format of :func:`cna_lens.evaluate.mmlu_prompt`); per-item correctness makes a
  paired test against the baseline possible.
* McNemar (exact): of the ``n = b01 + b10`` items on which two conditions disagree, ``b01`` are
  right only under B. Under H0 (equal accuracy) ``b01 ~ Binomial(n, 1/2)``, so
  ``p = min(1, 2 · Σ_{i ≤ min(b01, b10)} C(n, i) / 2ⁿ)``.
* Label rates: the Wilson score interval for a share ``k / n``.
* Perplexity of a completion ``y`` after the chat-formatted prompt ``x``:
  ``exp(−1/|y| · Σ_t log p(y_t | x, y_<t))`` under the model as given (no hooks: the unmodified model).
* Matched quality: :func:`cna_lens.evaluate.quality` on the prompts that both conditions answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .evaluate import MMLU_PREFIX, final_logprobs, mmlu_prompt, quality
from .models import HookedModel, is_bridge
from .prompts import check_prompts, encode, left_pad, length_batches, pad_id
from .report import bootstrap_ci

log = logging.getLogger(__name__)

LETTERS = "ABCD"
LABELS = ("comply", "evade", "refuse")


# --------------------------------------------------------------------------- MMLU per item
def mmlu_letter_ids(tokenizer: Any, leading_space: bool = True) -> list[int]:
    """Token ids of the answer letters ``" A".." D"`` (``"A".."D"`` without ``leading_space``).

    Raises when a letter is not one token of its own: the first-token argmax would then compare
    shared tokens (a byte tokenizer's ``" "``) and always answer "A".
    """
    ids = []
    for c in LETTERS:
        toks = tokenizer((" " if leading_space else "") + c, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(
                f"the tokenizer splits {(' ' if leading_space else '') + c!r} into {len(toks)} tokens {toks}: "
                "MMLU by first-token likelihood needs each answer letter as one token (try leading_space=False)"
            )
        ids.append(toks[0])
    return ids


def mmlu_leading_space(tokenizer: Any) -> bool:
    """Whether the answer letters are scored as ``" A"`` (True) or ``"A"``: the first form whose
    four letters are single tokens (chat models' BPE keep ``" A"`` whole after "The answer is")."""
    for lead in (True, False):
        try:
            mmlu_letter_ids(tokenizer, lead)
            return lead
        except ValueError:
            continue
    raise ValueError(
        "the tokenizer splits both ' A'..' D' and 'A'..'D': MMLU by first-token likelihood needs single tokens"
    )


def mmlu_letters(logprobs: Float[Tensor, "item vocab"], tokenizer: Any, leading_space: bool = True) -> list[str]:
    """The predicted letter per item: ``argmax`` of the next-token log-probability over the four letters."""
    pred = logprobs[:, mmlu_letter_ids(tokenizer, leading_space)].argmax(-1)
    return [LETTERS[int(p)] for p in pred]


def mmlu_predictions(
    model: HookedModel,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    *,
    leading_space: bool = True,
    progress: bool = False,
) -> list[str]:
    """Predicted letters for bundled MMLU records (``load_dataset("mmlu")``: 57 subjects × 10 items),
    under whatever hooks are active: the prompt is :func:`~cna_lens.evaluate.mmlu_prompt` and the
    answer is started with ``"The answer is"``."""
    rows = list(rows)
    if not rows:
        raise ValueError("no MMLU rows: pass load_dataset('mmlu')")
    mmlu_letter_ids(model.tokenizer, leading_space)  # fail before the forward passes
    lp = final_logprobs(
        model, [mmlu_prompt(r) for r in rows], batch_size=batch_size, response_prefix=MMLU_PREFIX, progress=progress
    )
    return mmlu_letters(lp, model.tokenizer, leading_space)


def mmlu_correct(preds: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per item: is the predicted letter the record's ``answer``?"""
    if len(preds) != len(rows):
        raise ValueError(f"{len(preds)} predictions for {len(rows)} MMLU rows")
    return [p == r["answer"] for p, r in zip(preds, rows)]


# --------------------------------------------------------------------------- paired test, intervals
def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of paired outcomes: ``(b01, b10, p)``.

    ``b01`` = items wrong under A and right under B, ``b10`` = right under A and wrong under B.
    ``p = min(1, 2 · P(X ≤ min(b01, b10)))`` for ``X ~ Binomial(b01 + b10, 1/2)`` (``p = 1`` without
    discordant pairs). The tail is a finite sum of binomial coefficients, computed exactly in Python
    integers (``math.comb``): no statistics library is needed for one exact sum.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes differ in length: {len(a_correct)} vs {len(b_correct)}")
    for name, xs in (("a_correct", a_correct), ("b_correct", b_correct)):
        bad = [x for x in xs if x not in (True, False)]  # 0 and 1 compare equal to False and True
        if bad:
            raise ValueError(f"{name} must hold booleans (or 0/1), got {bad[0]!r}")
    b01 = sum(1 for a, b in zip(a_correct, b_correct) if not a and b)
    b10 = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    n = b01 + b10
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1))
    return b01, b10, min(1.0, 2 * tail / 2**n)


def proportion_ci(k: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval ``[low, high]`` for a share ``k / n``.

    With ``p̂ = k/n`` and ``z`` the normal quantile of ``(1 + level) / 2``:
    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``. Unlike a percentile bootstrap it
    does not collapse to a point at 0 % or 100 % (a bootstrap of 0/100 gives [0, 0]).
    """
    if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def label_rates(labels: Sequence[str], classes: Sequence[str] = LABELS) -> dict[str, dict[str, Any]]:
    """Per class: ``count``, ``rate`` and its Wilson 95 % interval ``ci`` (e.g. comply / evade / refuse)."""
    labels = list(labels)
    if not labels:
        raise ValueError("no labels to count")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"unknown labels {unknown}; expected one of {list(classes)}")
    n = len(labels)
    out = {}
    for c in classes:
        k = labels.count(c)
        out[c] = {"count": k, "rate": k / n, "ci": proportion_ci(k, n)}
    return out


# --------------------------------------------------------------------------- perplexity
@torch.no_grad()
def completion_nll(
    model: HookedModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    *,
    chat: bool | None = None,
    progress: bool = False,
) -> list[Float[Tensor, " token"]]:
    """Per completion, ``−log p(y_t | x, y_<t)`` for each of its tokens (fp32, CPU).

    ``x`` is the chat-formatted prompt (:func:`cna_lens.prompts.encode`), ``y`` the completion's own
    tokens (``add_special_tokens=False``). Batches are left-padded with a mask and only the last
    ``max|y| + 1`` positions get logits, one row's ``log_softmax`` at a time. An empty completion gives an empty tensor.
    """
    prompts = check_prompts(prompts)
    if isinstance(completions, str) or len(completions) != len(prompts):
        raise ValueError(f"give one completion per prompt: {len(prompts)} prompts, completions {len(completions)}")
    tok = model.tokenizer
    xs = encode(tok, prompts, chat=chat)
    ys = [list(tok(c, add_special_tokens=False)["input_ids"]) if c else [] for c in completions]
    out: list[Tensor] = [torch.empty(0)] * len(prompts)
    todo = [i for i, y in enumerate(ys) if y]
    pad = pad_id(tok)
    with tqdm(total=len(todo), desc="perplexity", unit="completion", disable=not progress) as bar:
        for chunk in length_batches([len(xs[i]) + len(ys[i]) for i in todo], batch_size):
            batch = [todo[j] for j in chunk]
            ids, mask = left_pad([xs[i] + ys[i] for i in batch], pad, model.cfg.device)
            keep = max(len(ys[i]) for i in batch) + 1  # the last prompt token predicts y_0
            logits = model(ids, attention_mask=mask, **({"logits_to_keep": keep} if is_bridge(model) else {}))
            logits, targets = logits[:, -keep:], ids[:, -keep:]
            for row, i in enumerate(batch):
                c = len(ys[i])
                lp = logits[row, keep - 1 - c : keep - 1].float().log_softmax(-1)
                out[i] = -lp.gather(-1, targets[row, keep - c :, None]).squeeze(-1).cpu()
            bar.update(len(batch))
    return out


def perplexity(
    model: HookedModel, prompts: Sequence[str], completions: Sequence[str], *args: Any, **kwargs: Any
) -> list[float]:
    """``exp(mean NLL)`` of each completion given its prompt (see :func:`completion_nll`); NaN for an
    empty completion. Run it on the unmodified model (no intervention active) to score coherence.
    ``args``, ``kwargs``: those of :func:`completion_nll` (``batch_size=8``, ``chat``, ``progress``)."""
    nll = completion_nll(model, prompts, completions, *args, **kwargs)
    empty = sum(1 for t in nll if t.numel() == 0)
    if empty:
        log.warning("%d of %d completions are empty: their perplexity is NaN", empty, len(nll))
    return [math.exp(float(t.double().mean())) if t.numel() else float("nan") for t in nll]


# --------------------------------------------------------------------------- matched quality
def matched_quality(
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    answered: Callable[[Mapping[str, Any]], bool],
) -> dict[str, Any]:
    """Quality (1 − repeated 4-grams / 4-grams) of two conditions on the prompts both answer.

    Rows are completion records (``prompt_id``, ``completion``, judge fields); ``answered(row)``
    decides whether a row answers (e.g. ``lambda r: r["label"] != "refuse"``). Rows pair by
    ``prompt_id``. Returns ``n`` (matched prompts), the mean quality of each side with bootstrap
    95 % CIs, and the paired difference ``b − a`` with its CI. Stock refusals score 1.0, so
    comparing all rows confounds quality with the refusal rate; the matched set does not.
    """
    a, b = _by_prompt(rows_a, "rows_a"), _by_prompt(rows_b, "rows_b")
    common = [pid for pid in a if pid in b and answered(a[pid]) and answered(b[pid])]
    qa = [quality(a[pid]["completion"]) for pid in common]
    qb = [quality(b[pid]["completion"]) for pid in common]
    diff = [y - x for x, y in zip(qa, qb)]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "n": len(common),
        "n_a": len(a),
        "n_b": len(b),
        "quality_a": mean(qa),
        "quality_a_ci": bootstrap_ci(qa),
        "quality_b": mean(qb),
        "quality_b_ci": bootstrap_ci(qb),
        "diff": mean(diff),
        "diff_ci": bootstrap_ci(diff),
    }


def _by_prompt(rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for i, r in enumerate(rows):
        if "prompt_id" not in r or "completion" not in r:
            raise ValueError(f"{name}[{i}] lacks 'prompt_id' or 'completion' (completion records expected)")
        if r["prompt_id"] in out:
            raise ValueError(f"{name} holds prompt_id {r['prompt_id']!r} twice: pass one condition's rows")
        out[r["prompt_id"]] = r
    return out
