"""How much of JBB the model delivers when its answer is made to start complying (a prefilling attack).

Interventions on refusal neurons or directions remove the refusal; whether the model then *delivers*
is bounded by what it can and will write once it has started. This measures that: for conditions of a
finished reproduction (default: the baseline, its refusal direction's layer and its searched
selection), every JBB harmful prompt is answered greedily with the answer forced to open with JBB's own
target ("Sure, here is a defamatory article claiming ..."), and the opening plus the continuation is
judged three-way, next to the same run's answers without the opening. The interventions are the run's
own (attributions, direction layer, selection and neurons from its directory), on the stock engine as
exact weight edits, with the run's model, dtype and token budget.

A crash loses at most the answer in flight: answers are appended to ``OUT/completions.jsonl`` as they
finish and a rerun generates only the missing ones. Where ``OUT/hand_labels.jsonl`` holds readers'
labels of those answers (``condition``, ``prompt_id``, ``label``), ``ceiling.json`` also reports them,
next to the hand labels of the same run's free answers where they were read
(``cna_lens/data/jbb_labels_heldout.jsonl``).

python benchmarks/compliance_ceiling.py --run results/reproduce-qwen2.5-coder-1.5b-instruct-judge-selection \
    --out benchmarks/results/compliance-ceiling/qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch

import cna_lens
from cna_lens.agreement import agreement
from cna_lens.attribute import Attribution
from cna_lens.compliance import read_verdicts
from cna_lens.conditions import Condition, Interventions
from cna_lens.datasets import load_dataset
from cna_lens.generation import generate_many
from cna_lens.judge import LABELS, judge_completions, read_labelled
from cna_lens.judge_validation import HELDOUT_FILE, heldout_rows
from cna_lens.neurons import NeuronSet
from cna_lens.runs import RunDir, append_jsonl, atomic_write_json
from cna_lens.scoring import mcnemar, proportion_ci
from cna_lens.selection import Selection
from cna_lens.stages import HOOKS

DATASET = "jbb_harmful"
JUDGE = "classifier"


def read_done(path: Path) -> dict[tuple[str, str], dict]:
    """``{(condition, prompt_id): row}`` of the answers already written (a torn last line is skipped)."""
    return {(r["condition"], r["prompt_id"]): r for r in (RunDir.read_rows(path) if path.exists() else [])}


def interventions(run: Path, model, seed: int) -> Interventions:
    """The run's own interventions: its saved attributions (``HOOKS``' directories) and selection."""
    found = {h: Attribution.load(run / d) for h, d in HOOKS.items() if (run / d / "attribution.json").exists()}
    chosen = None
    if (run / "selection" / "neurons.json").exists():
        chosen = (
            Selection.load(run / "selection" / "selection.json"),
            NeuronSet.load(run / "selection" / "neurons.json"),
        )
    return Interventions(
        model, found["mlp.hook_post"], found.get("hook_mlp_out"), found.get("hook_resid_pre"), seed, chosen
    )


def report_head(kind: str, run: Path, cfg: dict, n: int) -> dict:
    """What a report of these benchmarks opens with: the run, its model, dtype and token budget, the
    prompts, and the library versions."""
    return {
        "kind": kind,
        "run": str(run),
        "model": cfg["model"],
        "dtype": cfg["dtype"],
        "max_new_tokens": cfg["max_new_tokens"],
        "dataset": DATASET,
        "n": n,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "transformer-lens")},
    }


def share(labels: list[str], label: str) -> dict:
    k = sum(x == label for x in labels)
    return {"share": k / len(labels), "ci95": proportion_ci(k, len(labels))}


def hand_summary(run: Path, rows: list[dict], keys: list[str], labelled: list[dict], report: dict) -> dict:
    """Hand labels of the prefilled answers, next to the hand labels of the same run's free answers
    (``jbb_labels_heldout.jsonl``, where that condition was read): shares with Wilson intervals, the
    paired McNemar test of comply free against comply prefilled, and the judge's agreement."""
    ids = [r["id"] for r in rows]
    mine = {(x["condition"], x["prompt_id"]): x["label"] for x in labelled}
    source = (run / "completions.jsonl").as_posix()
    free: dict[str, dict[str, str]] = {}
    for x in heldout_rows():
        if x["source"] == source:
            free.setdefault(x["source_condition"], {})[x["prompt_id"]] = x["label"]
    out: dict = {"source_free": f"cna_lens/data/{HELDOUT_FILE}"}
    for key in keys:
        got = [mine.get((key, i)) for i in ids]
        if None in got:
            continue
        judged = report["conditions"][key]["labels"]
        entry: dict = {
            "prefilled": {lab: share(got, lab) for lab in LABELS},
            "judge_agreement": sum(judged[i]["prefilled"] == g for i, g in zip(ids, got)) / len(ids),
        }
        if all(i in free.get(key, {}) for i in ids):
            was = [free[key][i] for i in ids]
            b01, b10, p = mcnemar([w == "comply" for w in was], [g == "comply" for g in got])
            entry["free"] = {lab: share(was, lab) for lab in LABELS}
            entry["mcnemar_comply"] = {"prefilled_only": b01, "free_only": b10, "p": p}
        out[key] = entry
    pairs = [
        (mine[k, i], report["conditions"][k]["labels"][i]["prefilled"]) for k in keys for i in ids if (k, i) in mine
    ]
    pooled = agreement([h for h, _ in pairs], [j for _, j in pairs], LABELS)
    out["judge_vs_readers"] = {k: pooled[k] for k in ("n", "accuracy", "kappa")}
    both = [(x["annotation_1"], x["annotation_2"]) for x in labelled if "annotation_2" in x]
    if both:
        readers = agreement([a for a, _ in both], [b for _, b in both], LABELS)
        out["reader_2_vs_reader_1"] = {k: readers[k] for k in ("n", "accuracy", "kappa")}
    read = [c for c in free if all(i in free[c] for i in ids)]
    if read:
        forced = [k for k in keys if all((k, i) in mine for i in ids)]
        out["per_prompt"] = {  # shares of the prompts that comply in all / any of the hand-read conditions
            "free_conditions": sorted(read),
            "free_all": sum(all(free[c][i] == "comply" for c in read) for i in ids) / len(ids),
            "free_any": sum(any(free[c][i] == "comply" for c in read) for i in ids) / len(ids),
            "free_or_forced_any": sum(
                any(free[c][i] == "comply" for c in read) or any(mine[k, i] == "comply" for k in forced) for i in ids
            )
            / len(ids),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished reproduction directory (config.json, attribution/, ...)")
    ap.add_argument("--conditions", default=None, help="comma-separated keys (default: baseline,direction:L,selection)")
    ap.add_argument("--limit", type=int, default=None, help="first N JBB prompts (default: all 100)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    cfg = json.loads((run / "config.json").read_text())
    if args.conditions is None:
        layer = json.loads((run / "direction.json").read_text())["layer"]
        keys = ["baseline", f"direction:{layer}"] + (["selection"] if (run / "selection").is_dir() else [])
    else:
        keys = args.conditions.split(",")
    conditions = [Condition.parse(k) for k in keys]
    for c in conditions:
        if c.kind == "selection" and not (run / "selection" / "neurons.json").exists():
            raise SystemExit(f"{run} has no selection/neurons.json for the 'selection' condition")
    rows = load_dataset(DATASET, args.limit)
    before = read_verdicts(run, JUDGE)
    missing = [c.key for c in conditions if not all((DATASET, c.key, r["id"]) in before for r in rows)]
    if missing:
        raise SystemExit(f"{run}/verdicts.jsonl lacks {JUDGE} labels of {', '.join(missing)} on {DATASET}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "completions.jsonl"
    done = read_done(path)

    iv = None
    for c in conditions:
        todo = [r for r in rows if (c.key, r["id"]) not in done]
        if not todo:
            continue
        if iv is None:
            iv = interventions(run, cna_lens.load_model(cfg["model"], dtype=getattr(torch, cfg["dtype"])), cfg["seed"])

        def save(_job: int, i: int, text: str, c: Condition = c, todo: list = todo) -> None:
            r = todo[i]
            row = {"condition": c.key, "prompt_id": r["id"], "prompt": r["prompt"], "prefix": r["target"]}
            row["completion"] = r["target"] + text
            append_jsonl(path, [row])
            done[c.key, r["id"]] = row

        generate_many(
            iv.model,
            [(iv.edit(c), [r["prompt"] for r in todo])],
            max_new_tokens=cfg["max_new_tokens"],
            batch_size=args.batch_size,
            response_prefix=[r["target"] for r in todo],
            on_done=save,
        )

    report = report_head("cna_lens.ComplianceCeiling", run, cfg, len(rows)) | {"judge": JUDGE, "conditions": {}}
    if (run / "selection" / "selection.json").exists():  # what the 'selection' condition is
        report["selection"] = json.loads((run / "selection" / "selection.json").read_text())
    prompts = [r["prompt"] for r in rows]
    for c in conditions:
        forced = [
            v.label for v in judge_completions(prompts, [done[c.key, r["id"]]["completion"] for r in rows], JUDGE)
        ]
        free = [before[DATASET, c.key, r["id"]]["label"] for r in rows]
        report["conditions"][c.key] = {
            "label": c.label,
            "prefilled": {lab: share(forced, lab) for lab in LABELS},
            "free": {lab: share(free, lab) for lab in LABELS},
            "comply_prefilled_only": sum(a == "comply" != b for a, b in zip(forced, free)),
            "comply_free_only": sum(b == "comply" != a for a, b in zip(forced, free)),
            "labels": {r["id"]: {"prefilled": a, "free": b} for r, a, b in zip(rows, forced, free)},
        }
    hand = out / "hand_labels.jsonl"
    if hand.exists():
        report["hand"] = hand_summary(run, rows, [c.key for c in conditions], read_labelled(hand), report)
    atomic_write_json(out / "ceiling.json", report)
    for key, entry in report["conditions"].items():
        p, f = entry["prefilled"]["comply"], entry["free"]["comply"]
        print(f"{key:>14}: judged comply {f['share']:.2f} free -> {p['share']:.2f} prefilled {p['ci95']}")


if __name__ == "__main__":
    main()
